# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Queue names: the scheme, parsing, what a worker serves, and every queue the catalog needs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.catalog import default_catalog
from fleet.queues import (
    DEVICE_TIERS,
    MAX_PRIORITY,
    QueueRef,
    all_queue_names,
    kombu_queue,
    parse_queue,
    queue_name,
    queues_for_worker,
    tiers_up_to,
)
from fleet.spec import TaskKind

CATALOG = default_catalog()
KINDS = tuple(TaskKind)
ALL = all_queue_names(CATALOG)


@pytest.mark.parametrize(
    ("kind", "accelerator", "devices", "namespace", "expected"),
    [
        ("inference", "nvidia-h100", 1, "", "inference.nvidia-h100"),
        (TaskKind.INFERENCE, "nvidia-h100", 1, "", "inference.nvidia-h100"),
        ("inference", "nvidia-h200", 8, "", "inference.nvidia-h200.x8"),
        ("embedding", "cpu", 1, "", "embedding.cpu"),
        ("training", "aws-trainium1", 16, "", "training.aws-trainium1.x16"),
        ("fine_tune", "nvidia-l4", 2, "", "fine_tune.nvidia-l4.x2"),
        ("batch", "aws-inferentia2", 6, "", "batch.aws-inferentia2.x6"),
        ("inference", "aws-inferentia2", 12, "", "inference.aws-inferentia2.x12"),
        ("inference", "nvidia-l4", 1, "staging.", "staging.inference.nvidia-l4"),
        ("batch", "google-tpu-v5e", 4, "team-a.", "team-a.batch.google-tpu-v5e.x4"),
        ("inference", "nvidia-l4", 0, "", "inference.nvidia-l4"),
    ],
)
def test_queue_name_scheme(kind, accelerator, devices, namespace, expected):
    """``[namespace]<kind>.<accelerator>[.x<N>]``, with no suffix for one device."""
    assert queue_name(kind, accelerator, devices, namespace) == expected


@pytest.mark.parametrize(
    ("name", "namespace", "expected"),
    [
        ("inference.nvidia-h100", "", QueueRef(TaskKind.INFERENCE, "nvidia-h100", 1)),
        ("inference.nvidia-h200.x8", "", QueueRef(TaskKind.INFERENCE, "nvidia-h200", 8)),
        ("fine_tune.cpu", "", QueueRef(TaskKind.FINE_TUNE, "cpu", 1)),
        ("staging.batch.nvidia-l4.x2", "staging.", QueueRef(TaskKind.BATCH, "nvidia-l4", 2)),
        ("staging.batch.nvidia-l4.x2", "", None),
        ("batch.nvidia-l4.x2", "staging.", None),
        ("celery", "", None),
        ("inference", "", None),
        ("inference.NVIDIA-H100", "", None),
        ("dance.nvidia-h100", "", None),
        ("inference.nvidia-h100.x", "", None),
        ("inference.nvidia-h100.8", "", None),
        ("inference.nvidia-h100.x8.extra", "", None),
    ],
)
def test_parse_queue(name, namespace, expected):
    """Names of the scheme parse to (kind, accelerator, devices); anything else is None."""
    assert parse_queue(name, namespace) == expected


@given(
    kind=st.sampled_from(KINDS),
    accelerator=st.sampled_from(CATALOG.names()),
    devices=st.integers(min_value=1, max_value=128),
    namespace=st.sampled_from(["", "staging.", "team-a.", "x."]),
)
def test_parse_queue_round_trips(kind, accelerator, devices, namespace):
    """parse_queue(queue_name(...)) gives back the kind, accelerator and device count."""
    name = queue_name(kind, accelerator, devices, namespace)
    assert parse_queue(name, namespace) == QueueRef(kind, accelerator, devices)


def test_every_catalog_queue_parses():
    """Every queue the catalog needs is a name of the scheme."""
    for name in ALL:
        ref = parse_queue(name)
        assert ref is not None, name
        assert queue_name(ref.kind, ref.accelerator, ref.devices) == name


# ------------------------------------------------------------------------ worker queues


def tiers_of(queues, kind, accelerator):
    """The device tiers among ``queues`` for one kind and accelerator."""
    refs = [parse_queue(q) for q in queues]
    return {r.devices for r in refs if r and r.kind == kind and r.accelerator == accelerator}


def test_eight_gpu_h100_worker_serves_every_tier_up_to_eight():
    """An 8-GPU H100 worker serves x1, x2, x4 and x8 of all five kinds, nothing above."""
    queues = queues_for_worker(CATALOG.family("nvidia-h100"), 8)
    for kind in KINDS:
        tiers = tiers_of(queues, kind, "nvidia-h100")
        assert {1, 2, 4, 8} <= tiers
        assert max(tiers) == 8
    assert "inference.nvidia-h100" in queues
    assert "training.nvidia-h100.x8" in queues
    assert all(parse_queue(q).accelerator == "nvidia-h100" for q in queues)
    assert list(queues) == sorted(queues)
    assert len(queues) == len(set(queues))


def test_eight_gpu_worker_serves_every_h100_queue_placement_can_make():
    """Each h100 queue in the catalog's list (offers have 1, 2 or 8 GPUs) has an 8-GPU consumer."""
    worker = set(queues_for_worker(CATALOG.family("nvidia-h100"), 8))
    needed = {q for q in ALL if parse_queue(q).accelerator == "nvidia-h100"}
    assert needed <= worker


def test_one_gpu_l4_worker_serves_only_base_queues():
    """A 1-GPU L4 worker serves exactly the five base queues."""
    queues = queues_for_worker(CATALOG.family("nvidia-l4"), 1)
    assert set(queues) == {f"{kind}.nvidia-l4" for kind in KINDS}


def test_inferentia2_serves_no_training_queues():
    """Inferentia2 workers serve inference, embedding and batch, never training or fine_tune."""
    queues = queues_for_worker(CATALOG.family("aws-inferentia2"), 12)
    kinds = {parse_queue(q).kind for q in queues}
    assert kinds == {TaskKind.INFERENCE, TaskKind.EMBEDDING, TaskKind.BATCH}
    assert "inference.aws-inferentia2.x12" in queues
    assert "inference.aws-inferentia2.x6" in queues


@pytest.mark.parametrize("devices", [1, 8, 64])
def test_cpu_worker_serves_only_base_queues(devices):
    """A cpu worker is one device whatever it is told: base queues only."""
    queues = queues_for_worker(CATALOG.family("cpu"), devices)
    assert set(queues) == {f"{kind}.cpu" for kind in KINDS}


def test_t4_worker_serves_no_training():
    """T4 lists no training, so a T4 worker has no training queue (fine_tune it has)."""
    queues = queues_for_worker(CATALOG.family("nvidia-t4"), 1)
    assert "training.nvidia-t4" not in queues
    assert "fine_tune.nvidia-t4" in queues


def test_namespace_prefixes_every_worker_queue():
    """A namespace prefixes every queue a worker serves."""
    queues = queues_for_worker(CATALOG.family("nvidia-l4"), 4, namespace="staging.")
    assert queues
    assert all(q.startswith("staging.") for q in queues)
    assert all(parse_queue(q, "staging.") is not None for q in queues)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (1, (1,)),
        (2, (1, 2)),
        (3, (1, 2, 3)),
        (4, (1, 2, 4)),
        (6, (1, 2, 4, 6)),
        (8, (1, 2, 4, 6, 8)),
        (12, (1, 2, 4, 6, 8, 12)),
        (16, (1, 2, 4, 6, 8, 12, 16)),
    ],
)
def test_tiers_up_to(devices, expected):
    """A worker serves every standard tier up to its device count, and its own count."""
    assert tiers_up_to(devices) == expected


@given(st.integers(min_value=1, max_value=256))
def test_tiers_include_every_power_of_two_placement_can_ask_for(devices):
    """Every power of two up to the device count, and the count itself, is a served tier."""
    tiers = set(tiers_up_to(devices))
    assert devices in tiers
    assert max(tiers) == devices
    powers = {2**k for k in range(9) if 2**k <= devices and 2**k in DEVICE_TIERS}
    assert powers <= tiers


# ------------------------------------------------------------------------- catalog queues


@pytest.mark.parametrize(
    "name",
    [
        "inference.nvidia-h200.x8",
        "inference.aws-inferentia2.x12",
        "inference.aws-inferentia2.x6",
        "training.aws-trainium1.x16",
        "inference.nvidia-h100",
        "embedding.cpu",
        "batch.nvidia-l4.x8",
    ],
)
def test_all_queue_names_includes(name):
    """all_queue_names has the queues the catalog's offers can need."""
    assert name in ALL


@pytest.mark.parametrize(
    "name",
    [
        "training.aws-inferentia2",
        "fine_tune.aws-inferentia2.x12",
        "inference.cpu.x2",
        "inference.nvidia-h100.x16",
        "training.nvidia-t4",
    ],
)
def test_all_queue_names_excludes(name):
    """all_queue_names has no queue for a kind a family refuses or a tier no offer reaches."""
    assert name not in ALL


def test_all_queue_names_cover_every_family_and_kind():
    """Every family has a base queue for every kind it runs, and the list is sorted and unique."""
    for family in CATALOG.families.values():
        for kind in KINDS:
            assert (queue_name(kind, family.name) in ALL) == (kind.value in family.kinds)
    assert list(ALL) == sorted(set(ALL))


def test_all_queue_names_namespace():
    """With a namespace every catalog queue carries the prefix."""
    namespaced = all_queue_names(CATALOG, namespace="staging.")
    assert namespaced == tuple(f"staging.{q}" for q in ALL)


def test_kombu_queue_is_durable_with_priorities():
    """kombu_queue declares a durable queue routed by its own name, with priorities 0..9."""
    q = kombu_queue("inference.nvidia-l4")
    assert q.name == q.routing_key == "inference.nvidia-l4"
    assert q.durable
    assert q.queue_arguments == {"x-max-priority": MAX_PRIORITY}
    assert MAX_PRIORITY == 9

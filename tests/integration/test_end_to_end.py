"""The whole path of a task on real parts: client, broker, placement, chip-aware workers."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import group
from kombu import Connection

from fleet.app import TASK_NAME
from fleet.catalog import default_catalog
from fleet.client import Fleet
from fleet.dlq import DeadLetterQueue
from fleet.placement import NoPlacementError
from fleet.queues import all_queue_names, queue_name
from fleet.spec import SpecError, TaskKind
from fleet.stats import AmqpStats, RedisStats
from fleet.status import collect
from tests.integration.conftest import Broker
from tests.integration.procs import worker_process

pytestmark = pytest.mark.integration

L4_CHAT: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
    "input": {"prompt": "the queue", "seed": 3},
    "tokens_in": 100,
    "tokens_out": 12,
    "requirements": {"accelerators": ["nvidia-l4"]},
}
H100_70B: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-70b-instruct", "params_b": 70, "dtype": "bf16"},
    "input": {"prompt": "a long answer", "seed": 1},
    "tokens_in": 100,
    "tokens_out": 8,
    # 8 x L4 (192 GB) would hold it too, and at one task's traffic placement prices that
    # cheaper box ahead of an 8 x H100 one; the 80 GB floor keeps this story on the H100
    "requirements": {
        "accelerators": ["nvidia-h100", "nvidia-l4", "cpu"],
        "min_accelerator_memory_gb": 80,
    },
}


def queue_depths(broker: Broker, names: list[str]) -> dict[str, int]:
    """Ready messages per queue straight from the broker."""
    if broker.settings.is_redis:
        source = RedisStats(redis.Redis.from_url(broker.settings.broker_url))
    else:
        source = AmqpStats(broker.settings.broker_url)
    return {n: s.ready for n, s in source.read(names).items()}


def purge(broker: Broker, names: list[str]) -> None:
    """Empty the given queues (tests that leave messages behind clean up)."""
    with Connection(broker.settings.broker_url) as conn:
        channel = conn.channel()
        for n in names:
            try:
                channel.queue_purge(n)
                if broker.settings.is_redis:
                    for p in range(1, 10):
                        channel.client.delete(f"{n}:{p}")
            except Exception:  # noqa: BLE001 - a queue that was never declared is empty
                channel = conn.channel()


def test_results_come_back_from_the_chosen_chip(broker: Broker, fleet: Fleet, logs: Path) -> None:
    """A submitted task runs on an emulated L4 worker and its real output comes back."""
    with worker_process(broker.app, broker.env, "nvidia-l4", log_dir=logs):
        handle = fleet.submit(L4_CHAT)
        assert handle.placement.queue == queue_name(
            TaskKind.INFERENCE, "nvidia-l4", 1, broker.settings.namespace
        )
        result = handle.get(timeout=60)
    assert result["accelerator"] == "nvidia-l4"
    assert result["emulated"] is True
    assert result["queue"] == handle.placement.queue
    assert result["output"]["tokens_out"] == 12
    assert result["output"]["text"]


def test_task_needing_h100_memory_waits_for_an_h100(
    broker: Broker, fleet: Fleet, logs: Path
) -> None:
    """A 70B bf16 task is never run by cpu or L4 workers, even when they are the only ones online."""
    with (
        worker_process(broker.app, broker.env, "cpu", log_dir=logs),
        worker_process(broker.app, broker.env, "nvidia-l4", log_dir=logs),
    ):
        handle = fleet.submit(H100_70B)
        assert handle.placement.accelerator == "nvidia-h100"
        assert handle.placement.devices == 4  # 168 GB needs 4 x 80 GB
        time.sleep(4)
        assert handle.state == "PENDING"
        assert queue_depths(broker, [handle.placement.queue])[handle.placement.queue] == 1
        with worker_process(
            broker.app, broker.env, "nvidia-h100", devices=4, concurrency=1, log_dir=logs
        ):
            result = handle.get(timeout=60)
    assert result["accelerator"] == "nvidia-h100"
    assert len(result["devices"]) == 4


def test_unplaceable_task_is_refused_at_submit(broker: Broker, fleet: Fleet) -> None:
    """A 2,000B bf16 model fits no single instance: submit raises and nothing reaches the broker."""
    spec = {"kind": "inference", "model": {"name": "huge", "params_b": 2000}, "tokens_out": 10}
    names = list(all_queue_names(default_catalog(), broker.settings.namespace))
    before = sum(queue_depths(broker, names).values())
    with pytest.raises(NoPlacementError) as info:
        fleet.submit(spec)
    assert "nvidia-h200" in str(info.value)
    assert sum(queue_depths(broker, names).values()) == before


def test_invalid_spec_is_refused_at_submit(fleet: Fleet) -> None:
    """An invalid spec raises SpecError naming the field; nothing is sent."""
    with pytest.raises(SpecError, match=r"model\.params_b"):
        fleet.submit({"kind": "inference", "model": {"name": "x", "params_b": -1}})


def test_submit_many_lands_every_message_on_its_queue(broker: Broker, fleet: Fleet) -> None:
    """submit_many of 10,000 tasks leaves exactly 10,000 messages, each on its placement's queue."""
    shapes = [
        L4_CHAT,
        {
            "kind": "embedding",
            "model": {"name": "hash-embed", "params_b": 0.02, "dtype": "fp32"},
            "input": {"texts": ["a"]},
            "tokens_in": 10,
            "requirements": {"accelerators": ["cpu"]},
        },
        {**H100_70B, "priority": 7},
    ]
    specs = [shapes[i % 3] for i in range(10_000)]
    handles = fleet.submit_many(specs)
    expected = Counter(h.placement.queue for h in handles)
    try:
        assert sum(expected.values()) == 10_000
        assert len(expected) == 3
        assert queue_depths(broker, list(expected)) == dict(expected)
    finally:
        purge(broker, list(expected))


def test_celery_native_canvas_and_inspect_work(broker: Broker, logs: Path) -> None:
    """A Celery group of fleet.run signatures is routed by fleet and `celery inspect` sees the worker."""
    with worker_process(broker.app, broker.env, "nvidia-l4", concurrency=2, log_dir=logs) as (
        _,
        node,
    ):
        sigs = [
            broker.app.signature(
                TASK_NAME, args=({**L4_CHAT, "input": {"prompt": "x", "seed": i}},)
            )
            for i in range(4)
        ]
        results = group(sigs).apply_async().get(timeout=60)
        assert {r["accelerator"] for r in results} == {"nvidia-l4"}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "fleet.app",
                "inspect",
                "active_queues",
                "-d",
                node,
                "--timeout",
                "5",
            ],
            env={**__import__("os").environ, **broker.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    assert queue_name(TaskKind.INFERENCE, "nvidia-l4", 1, broker.settings.namespace) in out.stdout


def test_bad_message_fails_cleanly_and_the_worker_goes_on(
    broker: Broker, fleet: Fleet, logs: Path
) -> None:
    """A malformed spec sent straight to a queue fails with a clear error; the next task still runs."""
    queue = queue_name(TaskKind.INFERENCE, "nvidia-l4", 1, broker.settings.namespace)
    with worker_process(broker.app, broker.env, "nvidia-l4", log_dir=logs):
        bad = broker.app.send_task(
            TASK_NAME,
            args=({"kind": "inference", "model": {"name": "x", "params_b": "lots"}},),
            queue=queue,
        )
        with pytest.raises(Exception, match=r"invalid spec"):
            bad.get(timeout=30)
        good = fleet.submit(L4_CHAT).get(timeout=30)
    assert good["accelerator"] == "nvidia-l4"


def test_status_shows_queues_and_emulated_workers(broker: Broker, fleet: Fleet, logs: Path) -> None:
    """Fleet status reports a waiting message's queue and the live worker with its accelerator."""
    held = fleet.submit({**L4_CHAT, "requirements": {"accelerators": ["nvidia-a10g"]}})
    try:
        with worker_process(broker.app, broker.env, "nvidia-l4", log_dir=logs) as (_, node):
            time.sleep(1.5)  # registry heartbeat / remote control reply
            report = collect(broker.settings, default_catalog(), broker.app)
        queues = {q.name: q for q in report.queues}
        assert queues[held.placement.queue].ready == 1
        workers = {w.hostname: w for w in report.workers}
        assert workers[node].accelerator == "nvidia-l4"
        assert workers[node].emulated is True
        assert workers[node].active == 0
        # Earlier tests on this broker dead-letter refused tasks: status counts exactly those.
        assert report.dead_letters == len(DeadLetterQueue(broker.settings, broker.app).entries())
        if broker.settings.is_redis:  # RabbitMQ cannot peek at a queue's oldest message
            assert report.oldest_age_s[held.placement.queue] >= 1.0
    finally:
        purge(broker, [held.placement.queue])


def test_the_client_prices_with_the_traffic_it_submitted(broker: Broker, fleet: Fleet) -> None:
    """After a burst of submissions, route() charges a cold chip the idle part of that traffic."""
    spec = {**L4_CHAT, "requirements": {"accelerators": ["nvidia-l4"]}}
    assert not any("tasks/s" in r for r in fleet.route(spec).reasons)  # no traffic yet
    handles = fleet.submit_many([spec] * 50)
    try:
        why = fleet.route(spec).reasons[0]
        rate = re.search(r"idle at ([\d.]+) tasks/s", why)
        assert rate is not None, why
        assert 0 < float(rate.group(1)) <= 5  # 50 tasks over at least the meter's 10 s span
    finally:
        purge(broker, [handles[0].placement.queue])

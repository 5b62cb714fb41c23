# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Pools that hold models: validation names the key, demand per model queue, workers started with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from fleet.autoscaler.config import (
    AutoscalerConfig,
    ConfigError,
    FleetConfig,
    PoolConfig,
    catalog_for_model,
    parse_config,
)
from fleet.autoscaler.model import (
    Instance,
    InstanceState,
    OfferRef,
    QueueObservation,
    Snapshot,
)
from fleet.autoscaler.observe import observe
from fleet.autoscaler.planner import busy_pools, plan
from fleet.catalog import default_catalog
from fleet.localworkers import worker_argv
from fleet.providers.local import worker_options
from fleet.queues import all_queue_names
from fleet.settings import Settings
from fleet.spec import TaskKind

CATALOG = default_catalog()
NOW = 10_000.0
ROOT = Path(__file__).resolve().parents[2]
L4 = "inference.nvidia-l4"
TINY_L4 = f"{L4}@tiny-llama"
MINILM_CPU = "embedding.cpu@all-minilm-l6-v2"
L4_OD = OfferRef("aws", "us-east-1", "g6.xlarge", "on_demand")

POOL = """
[[pools]]
name = "p"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
"""
TPU_POOL = """
[[pools]]
name = "tpu"
provider = "fake"
accelerator = "google-tpu-v5e"
price_as = "gcp/us-central1/tpu-v5litepod-8"
"""
ONLY_TRANSFORMERS = """
[[models]]
name = "my-llm"
task = "generation"
params_b = 1.0
max_context = 4096
engines = ["transformers"]
source = { path = "/models/my-llm" }
"""
# 800B bf16 = 1,600 GB at 2 GB/s: an 800 s load, longer than the 600 s launch grace.
HUGE = """
model_load_gbps = 2.0
[[models]]
name = "huge"
task = "generation"
params_b = 800
max_context = 4096
engines = ["vllm", "reference"]
source = { path = "/models/huge" }
"""


def pool(name: str, **extra: object) -> dict[str, object]:
    """A local L4 pool dict (on-demand g6.xlarge prices), with ``extra`` fields."""
    return {
        "name": name,
        "provider": "local",
        "accelerator": "nvidia-l4",
        "price_as": "aws/us-east-1/g6.xlarge",
        "markets": ("on_demand",),
        "max_instances": 3,
        "drain_target_s": 30,
    } | extra


def config(*pools: dict[str, object], **top: object) -> AutoscalerConfig:
    """A validated config of these pool dicts."""
    return AutoscalerConfig(fleet=FleetConfig(), pools=tuple(PoolConfig(**p) for p in pools), **top)


def snap(queues: dict[str, int], instances=(), workers=()) -> Snapshot:
    """A snapshot with ``{queue: ready}``."""
    obs = {q: QueueObservation(q, ready=n) for q, n in queues.items()}
    return Snapshot(NOW, obs, tuple(instances), tuple(workers))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            POOL + 'models = ["nope"]\n',
            "pools[0].models[0]: no model 'nope' in the registry (known: all-minilm-l6-v2, tiny-llama)",
        ),
        (
            POOL + POOL.replace('"p"', '"q"') + 'models = ["tiny-llama", "gone"]\n',
            "pools[1].models[1]: no model 'gone' in the registry",
        ),
        (
            ONLY_TRANSFORMERS + POOL + 'models = ["my-llm"]\nengine = "vllm"\n',
            "pools[0].engine: vllm is not allowed for my-llm (allowed: transformers)",
        ),
        (
            TPU_POOL + 'models = ["tiny-llama"]\nengine = "transformers"\n',
            "pools[0].engine: transformers does not run on google-tpu-v5e (runtime xla)",
        ),
        (
            ONLY_TRANSFORMERS + TPU_POOL + 'models = ["my-llm"]\n',
            "pools[0].engine: transformers (the default) does not run on google-tpu-v5e (runtime xla)",
        ),
        (
            ONLY_TRANSFORMERS + POOL + 'models = ["my-llm", "all-minilm-l6-v2"]\nengine = "vllm"\n',
            "pools[0].engine: vllm is not allowed for my-llm",
        ),
        (
            POOL + 'engine = "transformers"\n',
            "pools[0]: engine: a transformers pool serves only the models it holds",
        ),
        (POOL + 'models = ["tiny-llama", "tiny-llama"]\n', "pools[0]: models: listed twice"),
        (POOL + 'engine = "onnx"\n', "pools[0].engine"),
        (
            POOL + 'models = ["tiny-llama", "minilm"]\nengine = "vllm"\n',
            "pools[0].models: a vllm pool holds one model per worker, not 2",
        ),
    ],
)
def test_pool_model_errors_name_the_key(toml, message):
    """A bad pool model or engine is refused, naming ``pools[i].models[j]`` or ``pools[i].engine``."""
    with pytest.raises(ConfigError) as caught:
        parse_config(toml, "fleet.toml", env={})
    assert message in str(caught.value)
    assert str(caught.value).startswith("fleet.toml: ")


GENERATION = {TaskKind.INFERENCE, TaskKind.TRAINING, TaskKind.FINE_TUNE}


@pytest.mark.parametrize(
    ("extra", "engine", "serving"),
    [
        ("", "reference", {None: set(TaskKind)}),
        ('engine = "reference"\n', "reference", {None: set(TaskKind)}),
        ('models = ["tiny-llama"]\n', "transformers", {"tiny-llama": GENERATION}),
        ('models = ["minilm"]\n', "transformers", {"all-minilm-l6-v2": {TaskKind.EMBEDDING}}),
        # a reference worker holding a model consumes only that model's queues
        (
            'models = ["tiny-llama"]\nengine = "reference"\n',
            "reference",
            {"tiny-llama": GENERATION},
        ),
        # vLLM serves generation and embedding, not training
        (
            'models = ["tiny-llama"]\nengine = "vllm"\n',
            "vllm",
            {"tiny-llama": {TaskKind.INFERENCE}},
        ),
    ],
)
def test_a_pool_serves_its_models_queues_or_the_plain_ones(extra, engine, serving):
    """The engine defaults to reference without models, else the first the models allow."""
    cfg = parse_config(POOL + extra, env={})
    (p,) = cfg.pools
    assert p.resolved_engine(cfg.registry) == engine
    assert p.serving(cfg.registry) == serving
    assert p.serves_plain() is (None in serving)
    assert p.model_names(cfg.registry) == {m for m in serving if m is not None}


def test_the_default_engine_skips_engines_the_chip_cannot_run():
    """tiny-llama allows transformers first, but on a TPU the default is vLLM."""
    cfg = parse_config(TPU_POOL + 'models = ["tiny-llama"]\n', env={})
    assert cfg.pools[0].resolved_engine(cfg.registry) == "vllm"


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        ("", {}),
        ('engine = "reference"\n', {}),
        (
            'models = ["tiny-llama", "minilm"]\n',
            {"FLEET_ENGINE": "transformers", "FLEET_MODELS": "tiny-llama,all-minilm-l6-v2"},
        ),
        (
            'models = ["tiny-llama"]\nengine = "reference"\n',
            {"FLEET_ENGINE": "reference", "FLEET_MODELS": "tiny-llama"},
        ),
    ],
)
def test_worker_env_carries_engine_and_models(extra, env):
    """``FLEET_ENGINE``/``FLEET_MODELS`` (canonical names) for a pool with models; none for a plain pool."""
    cfg = parse_config(POOL + extra, env={})
    assert cfg.pools[0].worker_env(cfg.registry) == env


# ------------------------------------------------------------------------------ demand


BOTH = (pool("plain-l4"), pool("llm-l4", models=("tiny-llama",)))


@pytest.mark.parametrize(
    ("queues", "launching", "busy"),
    [
        ({TINY_L4: 10}, {"llm-l4"}, {"llm-l4"}),
        ({L4: 10}, {"plain-l4"}, {"plain-l4"}),
        ({TINY_L4: 10, L4: 10}, {"plain-l4", "llm-l4"}, {"plain-l4", "llm-l4"}),
        ({f"{L4}@all-minilm-l6-v2": 10}, set(), set()),  # a model no pool holds
        ({}, set(), set()),
    ],
)
def test_demand_counts_the_model_queues_a_pool_serves(queues, launching, busy):
    """Model-queue work scales only the pools holding the model; plain work only reference pools."""
    cfg = config(*BOTH)
    p = plan(snap(queues), cfg, CATALOG, NOW)
    assert {d.pool for d in p.decisions if d.launches} == launching
    assert busy_pools(snap(queues), cfg, CATALOG) == busy


def test_a_model_pool_is_sized_by_its_model_queue():
    """10 tasks x 10 s on one slot within 30 s: 4 instances, capped at 3; the reason names the queue."""
    p = plan(snap({TINY_L4: 10}), config(*BOTH), CATALOG, NOW)
    d = next(d for d in p.decisions if d.pool == "llm-l4")
    assert d.desired == 3
    assert len(d.launches) == 3
    assert f"10 tasks x 10 s on {TINY_L4}" in d.launches[0].reason
    assert any("each new instance loads tiny-llama" in r for r in d.reasons)


@pytest.mark.parametrize(
    ("pools", "queue", "reason"),
    [
        (
            (pool("plain-l4"),),
            TINY_L4,
            "no nvidia-l4 pool holds model tiny-llama (pools: plain-l4)",
        ),
        (
            (pool("vllm-l4", models=("tiny-llama",), engine="vllm"),),
            "fine_tune.nvidia-l4@tiny-llama",
            "no nvidia-l4 pool runs fine_tune work for model tiny-llama (the engine of vllm-l4 does not)",
        ),
        (
            (pool("llm-l4", models=("tiny-llama",)),),
            L4,
            "no reference pool for accelerator nvidia-l4: its pools (llm-l4) serve only their models' queues",
        ),
        (
            (pool("llm-l4", models=("tiny-llama",)),),
            "inference.cpu@tiny-llama",
            "no pool for accelerator cpu",
        ),
    ],
)
def test_work_no_pool_can_serve_is_unsatisfiable_with_the_reason(pools, queue, reason):
    """A model queue without a holding pool, or plain work without a reference pool, is reported."""
    p = plan(snap({queue: 4}), config(*pools), CATALOG, NOW)
    assert [(u.queue, u.ready, u.reason) for u in p.unsatisfiable] == [(queue, 4, reason)]
    assert not p.launches


@pytest.mark.parametrize(("models", "kept"), [((), False), (("huge",), True)])
def test_the_launch_grace_includes_the_model_load_time(models, kept):
    """A pending launch 1,000 s old: past the 600 s grace, but not past 600 s + an 800 s load."""
    cfg = parse_config(
        HUGE
        + POOL
        + 'markets = ["on_demand"]\n'
        + (f"models = {list(models)!r}\n".replace("'", '"') if models else ""),
        env={},
    )
    assert cfg.pools[0].load_s(cfg.registry) == (800.0 if models else 0.0)
    pending = Instance("i-1", "p", L4_OD, InstanceState.PENDING, NOW - 1000, "t", 0.8048)
    work = {L4: 1, f"{L4}@huge": 1}  # busy either way: no scale-in
    p = plan(snap(work, [pending]), cfg, CATALOG, NOW)
    cleaned = [(t.instance_id, t.reason) for t in p.terminations]
    assert cleaned == ([] if kept else [("i-1", "launch never confirmed within 600 s")])
    if kept:
        later = plan(snap(work, [pending]), cfg, CATALOG, NOW + 401)
        assert [t.reason for t in later.terminations] == ["launch never confirmed within 1400 s"]


def test_placement_catalog_of_a_model_holds_only_the_pools_that_hold_it():
    """``catalog_for_model``: tiny-llama's work may go only where a pool holds tiny-llama."""
    cfg = config(
        pool("plain-l4"),
        {
            "name": "llm-cpu",
            "provider": "local",
            "accelerator": "cpu",
            "price_as": "aws/us-east-1/c6i.xlarge",
            "models": ("tiny-llama",),
        },
    )
    tiny = catalog_for_model(CATALOG, cfg, "tiny-llama")
    plain = catalog_for_model(CATALOG, cfg, None)
    assert {o.accelerator for o in tiny.offers} == {"cpu"}
    assert {o.accelerator for o in plain.offers} == {"nvidia-l4"}
    assert not catalog_for_model(CATALOG, cfg, "all-minilm-l6-v2").offers


# ------------------------------------------------------------------------------ observe


@pytest.mark.integration
def test_observe_reads_the_model_queues_of_the_registry():
    """With the config's registry a model queue's backlog is observed; without it, unseen."""
    from tests.integration.brokers import redis_url  # noqa: PLC0415 - only this test needs Redis

    cfg = config(pool("llm-l4", models=("tiny-llama",)))
    assert TINY_L4 in all_queue_names(CATALOG, models=cfg.registry)
    with redis_url() as url:
        client = redis.Redis.from_url(url)
        client.lpush(TINY_L4, b"not a kombu message", b"another")
        settings = Settings(url, url, "", Path("/tmp"))  # noqa: S108 - unused artifact dir
        seen = observe(
            settings=settings,
            catalog=CATALOG,
            app=None,  # type: ignore[arg-type] - Redis needs no Celery app
            providers={},
            now=NOW,
            models=cfg.registry,
        )
        blind = observe(settings=settings, catalog=CATALOG, app=None, providers={}, now=NOW)  # type: ignore[arg-type]
    assert seen.queues[TINY_L4].ready == 2
    assert TINY_L4 not in blind.queues
    p = plan(seen, cfg, CATALOG, NOW)
    assert p.launches


# ------------------------------------------------------------------------------ workers


@pytest.mark.parametrize(
    ("env", "engine", "models"),
    [
        ({}, None, ()),
        (
            {"FLEET_ENGINE": "transformers", "FLEET_MODELS": "tiny-llama"},
            "transformers",
            ("tiny-llama",),
        ),
        (
            {"FLEET_ENGINE": "vllm", "FLEET_MODELS": " tiny-llama, all-minilm-l6-v2 ,"},
            "vllm",
            ("tiny-llama", "all-minilm-l6-v2"),
        ),
        ({"FLEET_ENGINE": "", "FLEET_MODELS": ""}, None, ()),
    ],
)
def test_local_provider_reads_engine_and_models_from_the_launch_env(env, engine, models):
    """The launch's ``FLEET_ENGINE``/``FLEET_MODELS`` become the worker's engine and models."""
    assert worker_options(env) == (engine, models)


def test_local_worker_argv_includes_engine_and_models():
    """``fleet worker --accelerator X --engine E --model M --model N``, the rest unchanged."""
    argv = worker_argv(
        "nvidia-l4", "n@localhost", engine="transformers", models=("tiny-llama", "all-minilm-l6-v2")
    )
    assert argv[:4] == [sys.executable, "-m", "fleet", "worker"]
    assert argv[argv.index("--accelerator") + 1] == "nvidia-l4"
    assert argv[-6:] == [
        "--engine", "transformers", "--model", "tiny-llama", "--model", "all-minilm-l6-v2"
    ]  # fmt: skip
    plain = worker_argv("nvidia-l4", "n@localhost")
    assert "--engine" not in plain
    assert "--model" not in plain


def test_a_pool_with_models_launches_its_workers_with_them():
    """The pool's ``worker_env`` through the local provider's options gives the argv."""
    cfg = parse_config(POOL + 'models = ["tiny-llama"]\n', env={})
    engine, models = worker_options(cfg.pools[0].worker_env(cfg.registry))
    argv = worker_argv("nvidia-l4", "n@localhost", engine=engine, models=models)
    assert argv[-4:] == ["--engine", "transformers", "--model", "tiny-llama"]


BASH = shutil.which("bash")
HARNESS = """
set -euo pipefail
source "$1"
CLOUD=aws
aws_secret() { printf '%s\\n' "redis://10.0.0.5:6379/0"; }
instance_id() { echo i-0abc; }
load_config
write_env
"""


def run_bootstrap(tmp_path: Path, settings: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run fleet-bootstrap's load_config and write_env with ``settings`` as bootstrap.env."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "bootstrap.env").write_text(settings)
    script = (ROOT / "infra" / "bootstrap" / "fleet-bootstrap.sh").read_text()
    script = script.replace("/etc/fleet", str(etc)).replace('\nmain "$@"\n', "\n")
    (tmp_path / "bootstrap.sh").write_text(script)
    proc = subprocess.run(
        [BASH or "bash", "-c", HARNESS, "harness", str(tmp_path / "bootstrap.sh")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=False,
    )
    return proc, etc / "worker.env"


@pytest.mark.skipif(BASH is None, reason="bash not on PATH")
def test_cloud_bootstrap_passes_engine_and_models_to_the_worker(tmp_path):
    """bootstrap.env's FLEET_ENGINE/FLEET_MODELS reach worker.env, the unit's EnvironmentFile."""
    proc, env_file = run_bootstrap(
        tmp_path, "FLEET_ENGINE=transformers\nFLEET_MODELS=tiny-llama,all-minilm-l6-v2\n"
    )
    assert proc.returncode == 0, proc.stderr
    lines = env_file.read_text().splitlines()
    assert "FLEET_ENGINE='transformers'" in lines
    assert "FLEET_MODELS='tiny-llama,all-minilm-l6-v2'" in lines
    unit = (ROOT / "infra" / "bootstrap" / "fleet-worker.service").read_text()
    assert "EnvironmentFile=/etc/fleet/worker.env" in unit
    assert "Environment=HF_HUB_OFFLINE=1" in unit


@pytest.mark.skipif(BASH is None, reason="bash not on PATH")
@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ("FLEET_ENGINE=onnx\n", "FLEET_ENGINE: unknown engine"),
        ("FLEET_MODELS=tiny'llama\n", "FLEET_MODELS: not model names"),
        ("FLEET_MODELS=a b\n", "FLEET_MODELS: not model names"),
    ],
)
def test_cloud_bootstrap_refuses_a_bad_engine_or_model_list(tmp_path, settings, error):
    """A value that is not an engine or a list of names fails before worker.env is written."""
    proc, env_file = run_bootstrap(tmp_path, settings)
    assert proc.returncode != 0
    assert error in proc.stderr
    assert not env_file.exists()

"""Real `fleet worker` processes running real engines through Redis.

Embeddings, generation and LoRA fine-tuning on the transformers engine, and model-aware queues.

No engine is mocked: the worker loads all-MiniLM-L6-v2 (real weights) and tiny-llama (random
weights, built by fleet) in its pool process after the fork.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.queues import queue_name
from fleet.registry import live_workers
from fleet.settings import Settings
from fleet.stats import RedisStats
from tests.integration.brokers import redis_url

pytestmark = [pytest.mark.integration, pytest.mark.engine]

EXTRA_MODEL = """
[[models]]
name = "tiny-llama-b"
task = "generation"
params_b = 0.00316
dtype = "fp32"
max_context = 1024
engines = ["transformers"]
pretrained = false
source = { build = "tiny-llama", seed = 1 }
"""
CPU = {"accelerators": ["cpu"]}
PAIR = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
]


@dataclass(frozen=True)
class Stack:
    """A Redis broker, its environment for workers, a client and a log directory."""

    env: dict[str, str]
    settings: Settings
    fleet: Fleet
    logs: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, a config with one extra model, and a worker holding MiniLM and tiny-llama."""
    root = tmp_path_factory.mktemp("engines")
    config = root / "fleet.toml"
    config.write_text(EXTRA_MODEL)
    with redis_url() as url:
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(root / "artifacts"),
            "FLEET_MODEL_CACHE": str(root / "models"),
            "FLEET_CONFIG": str(config),
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings.from_env(env)
        app = create_app(settings)
        worker = spawn_worker(
            env,
            "cpu",
            root,
            engine="transformers",
            models=("all-minilm-l6-v2", "tiny-llama"),
        )
        try:
            wait_ready(app, [worker], timeout_s=180)
            with Fleet(settings, app=app, stats_interval_s=0.2) as client:
                yield Stack(env, settings, client, root)
        finally:
            stop_workers([worker])


def submit(stack: Stack, spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    stack.fleet.refresh_stats()
    return stack.fleet.submit(spec).get(timeout=timeout)


def test_embeddings_are_minilm_unit_vectors(stack: Stack) -> None:
    """An embedding task for MiniLM returns 384-d unit vectors from the transformers engine."""
    spec = {
        "kind": "embedding",
        "model": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "params_b": 0.0227,
            "dtype": "fp32",
        },
        "input": {"texts": PAIR},
        "tokens_in": 30,
        "requirements": CPU,
    }
    result = submit(stack, spec)
    assert result["queue"] == "embedding.cpu@all-minilm-l6-v2"
    assert result["engine"]["name"] == "transformers"
    assert result["reference"] is False
    assert result["model"]["name"] == "all-minilm-l6-v2"
    assert result["model"]["pretrained"] is True
    vectors = result["output"]["embeddings"]
    assert [len(v) for v in vectors] == [384, 384, 384]
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)
    close = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    far = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert close > far + 0.2
    assert result["tokens"]["in"] > 0


def test_generation_is_real_greedy_and_repeatable(stack: Stack) -> None:
    """tiny-llama greedy output through a worker is the same twice, with engine-counted tokens."""
    spec = {
        "kind": "inference",
        "model": {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"},
        "input": {"prompt": "The queue on the cluster", "temperature": 0},
        "tokens_in": 8,
        "tokens_out": 12,
        "requirements": CPU,
    }
    first = submit(stack, spec)
    second = submit(stack, {**spec, "slo": {"tpot_ms": 60_000}})  # a goal any CPU meets
    assert first["queue"] == second["queue"] == "inference.cpu@tiny-llama"
    assert first["output"]["token_ids"] == second["output"]["token_ids"]
    assert first["output"]["text"] == second["output"]["text"]
    assert first["tokens"]["out"] == 12
    assert first["ttft_s"] > 0
    assert first["tokens_per_s"] > 0
    assert 0 < first["tpot_ms"] < math.inf
    assert "slo_tpot_met" not in first  # no per-token goal, no verdict
    assert second["slo_tpot_met"] is True
    assert first["model"]["pretrained"] is False
    assert "RANDOM WEIGHTS" in first["model"]["note"]
    assert first["emulated"] is False  # a real CPU runs it


def test_lora_fine_tune_lowers_the_loss_and_writes_an_adapter(stack: Stack) -> None:
    """A LoRA fine-tune of tiny-llama lowers the loss and leaves an adapter that serves."""
    spec = {
        "kind": "fine_tune",
        "model": {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"},
        "input": {"steps": 12, "seed": 1},
        "tokens_in": 10_000,
        "requirements": CPU,
    }
    result = submit(stack, spec, timeout=300)
    out = result["output"]
    assert result["queue"] == "fine_tune.cpu@tiny-llama"
    assert out["loss_last"] < out["loss_first"]
    adapter = Path(out["artifact"])
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    served = submit(
        stack,
        {
            "kind": "inference",
            "model": {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"},
            "input": {"prompt": "The queue", "temperature": 0, "adapter": str(adapter)},
            "tokens_in": 4,
            "tokens_out": 6,
            "requirements": CPU,
        },
    )
    assert served["tokens"]["out"] == 6


def test_a_task_for_a_model_the_worker_lacks_waits_for_a_worker_with_it(stack: Stack) -> None:
    """Work for tiny-llama-b stays queued past a tiny-llama worker and runs on a -b worker."""
    spec = {
        "kind": "inference",
        "model": {"name": "tiny-llama-b", "params_b": 0.00316, "dtype": "fp32"},
        "input": {"prompt": "The queue", "temperature": 0},
        "tokens_in": 4,
        "tokens_out": 4,
        "requirements": CPU,
    }
    stack.fleet.refresh_stats()
    handle = stack.fleet.submit(spec)
    queue = queue_name("inference", "cpu", model="tiny-llama-b")
    client = redis.Redis.from_url(stack.settings.broker_url)
    time.sleep(3)
    assert handle.state == "PENDING"
    assert RedisStats(client).read([queue])[queue].ready == 1
    other = spawn_worker(
        stack.env, "cpu", stack.logs, engine="transformers", models=("tiny-llama-b",)
    )
    try:
        wait_ready(stack.fleet.app, [other], timeout_s=180)
        result = handle.get(timeout=120)
    finally:
        stop_workers([other])
    assert result["worker"] == other.node
    assert result["model"]["name"] == "tiny-llama-b"


def test_heartbeat_says_engine_models_and_ready(stack: Stack) -> None:
    """The registry entry (what fleet status reads) names engine, models and readiness."""
    client = redis.Redis.from_url(stack.settings.broker_url)
    workers = [w for w in live_workers(client) if w.engine == "transformers"]
    assert workers
    assert set(workers[0].models) == {"all-minilm-l6-v2", "tiny-llama"}
    deadline = time.monotonic() + 30
    while not all(w.ready for w in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = [w for w in live_workers(client) if w.engine == "transformers"]
    assert all(w.ready for w in workers)


def test_inspect_stats_and_so_flower_show_the_engine(stack: Stack) -> None:
    """Celery's stats reply (Flower's worker page) carries engine, models and readiness."""
    replies = stack.fleet.app.control.inspect(timeout=5).stats() or {}
    blocks = [
        r["fleet"] for r in replies.values() if r.get("fleet", {}).get("engine") == "transformers"
    ]
    assert blocks
    assert set(blocks[0]["models"]) == {"all-minilm-l6-v2", "tiny-llama"}
    assert blocks[0]["ready"] is True


def test_an_adapter_outside_the_artifact_dir_is_refused(stack: Stack, tmp_path: Path) -> None:
    """input.adapter cannot point a worker at an arbitrary directory."""
    (tmp_path / "adapter_config.json").write_text("{}")
    spec = {
        "kind": "inference",
        "model": {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"},
        "input": {"prompt": "x", "adapter": str(tmp_path)},
        "tokens_in": 2,
        "tokens_out": 2,
        "requirements": CPU,
    }
    stack.fleet.refresh_stats()
    with pytest.raises(Exception, match=r"input\.adapter"):
        stack.fleet.submit(spec).get(timeout=60)

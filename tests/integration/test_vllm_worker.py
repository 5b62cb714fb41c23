"""A real `fleet worker --engine vllm`: vLLM's CPU server supervised by the worker, through Redis.

The worker starts the server, consumes only after ``/v1/models`` lists tiny-llama, and
serves greedy generation that matches transformers token for token. Killing the server
while tasks run loses none: the supervisor restarts it, the running tasks are requeued
through the drain path (or retried by the guard) and every task completes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.models.registry import builtin_registry
from fleet.models.weights import resolve
from fleet.registry import live_workers
from fleet.settings import Settings
from tests.engines.vllm_env import vllm_python
from tests.integration.brokers import redis_url

pytestmark = [pytest.mark.integration, pytest.mark.engine]

PROMPT = "The queue on the cluster"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class Stack:
    """Redis, a client, and one vLLM worker."""

    settings: Settings
    fleet: Fleet
    worker: LocalWorker
    cache: Path


def server_pids() -> list[int]:
    """Pids of vLLM API servers running on this machine (ours: the test starts one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if SERVER_MODULE in cmdline and "tiny-llama" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker holding tiny-llama on vLLM's CPU build."""
    root = tmp_path_factory.mktemp("vllm-worker")
    python = str(vllm_python())
    with redis_url() as url:
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(root / "artifacts"),
            "FLEET_MODEL_CACHE": str(root / "models"),
            "FLEET_VLLM_PYTHON": python,
            "FLEET_RETRY_BACKOFF_S": "1",
            "FLEET_CLAIM_TTL_S": "5",
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings.from_env(env)
        app = create_app(settings)
        worker = spawn_worker(
            env, "cpu", root, engine="vllm", models=("tiny-llama",), concurrency=2
        )
        try:
            wait_ready(app, [worker], timeout_s=300)
            with Fleet(settings, app=app, stats_interval_s=0.2) as client:
                yield Stack(settings, client, worker, root / "models")
        finally:
            stop_workers([worker])
    assert not server_pids(), "the worker left its vLLM server running"


def spec(tokens_out: int = 12) -> dict[str, Any]:
    return {
        "kind": "inference",
        "model": {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"},
        "input": {"prompt": PROMPT, "temperature": 0},
        "tokens_in": 8,
        "tokens_out": tokens_out,
        "requirements": {"accelerators": ["cpu"]},
    }


def test_vllm_worker_serves_the_same_tokens_as_transformers(stack: Stack) -> None:
    """Greedy tiny-llama through the vLLM worker equals transformers' generate()."""
    stack.fleet.refresh_stats()
    result = stack.fleet.submit(spec()).get(timeout=120)
    assert result["engine"]["name"] == "vllm"
    assert result["queue"] == "inference.cpu@tiny-llama"
    import torch  # noqa: PLC0415 - the comparison runs in the test process
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    weights = resolve(builtin_registry().get("tiny-llama"), stack.cache)
    tok = AutoTokenizer.from_pretrained(weights, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert result["output"]["token_ids"] == out[0][ids.shape[1] :].tolist()
    client = redis.Redis.from_url(stack.settings.broker_url)
    (entry,) = [w for w in live_workers(client) if w.hostname == stack.worker.node]
    assert entry.engine == "vllm"
    assert entry.models == ("tiny-llama",)
    assert entry.ready is True


def test_killing_the_server_loses_no_task(stack: Stack) -> None:
    """SIGKILL of the vLLM server mid-work: it comes back and every task completes once."""
    stack.fleet.refresh_stats()
    handles = [stack.fleet.submit(spec(tokens_out=1000)) for _ in range(6)]
    time.sleep(1.5)  # two run at once (concurrency 2), a few seconds each
    assert sum(h.state == "SUCCESS" for h in handles) < len(handles)
    (pid,) = server_pids()
    os.kill(pid, signal.SIGKILL)
    results = [h.get(timeout=300) for h in handles]
    assert all(r["tokens"]["out"] > 0 for r in results)
    assert len({r["task_id"] for r in results}) == len(handles)
    new = server_pids()
    assert new
    assert pid not in new
    log = stack.worker.log_tail(2_000_000)
    assert "engine.server_down" in log
    assert "engine.waiting" in log
    assert "task.retrying" not in log  # the restart cost no attempt

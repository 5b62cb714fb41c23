"""A real worker's logs: JSON lines, the task id bound, emulated labelled, no broker password."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fleet.app import create_app
from fleet.client import Fleet
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
SPEC = {
    "kind": "embedding",
    "model": {"name": "hash-embed", "params_b": 0.0227, "dtype": "fp32"},
    "input": {"texts": ["a b"]},
    "tokens_in": 2,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


def test_worker_logs_are_structured_and_carry_the_task_id(tmp_path: Path) -> None:
    """The worker logs JSON: its start (emulated), and each task's finish with the task id bound."""
    with redis_url() as url:
        env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url, "FLEET_LOG_FORMAT": "json"}
        settings = Settings.from_env(env)
        worker = spawn_worker(env, "nvidia-l4", tmp_path)
        try:
            wait_ready(create_app(settings), [worker])
            logging.getLogger("fleet.client").setLevel(logging.INFO)
            with Fleet(settings) as fleet, capture_logs() as submitted:
                handle = fleet.submit(SPEC)
                handle.get(timeout=60)
                bad = fleet.app.send_task(
                    "fleet.run",
                    args=({"kind": "inference", "model": {}},),
                    queue="embedding.nvidia-l4",
                )
                with pytest.raises(Exception, match=r"invalid spec"):
                    bad.get(timeout=60)
        finally:
            stop_workers([worker])
            logging.getLogger("fleet.client").setLevel(logging.NOTSET)
    lines = [json.loads(x) for x in worker.log_path.read_text().splitlines() if x.startswith("{")]
    start = next(e for e in lines if e.get("event") == "worker.starting")
    assert start["emulated"] is True
    assert start["accelerator"] == "nvidia-l4"
    started = next(e for e in lines if e.get("event") == "task.started")
    assert started["task_id"] == handle.id
    assert started["accelerator"] == "nvidia-l4"
    finished = next(e for e in lines if e.get("event") == "task.finished")
    assert finished["task_id"] == handle.id
    assert finished["queue"] == "embedding.nvidia-l4"
    assert finished["accelerator"] == "nvidia-l4"
    failed = next(e for e in lines if e.get("event") == "task.failed")
    assert failed["task_id"] == bad.id
    # A refused task is dead-lettered at once; the event names the queue and the reason.
    assert failed["error"] == "DeadLetteredError"
    assert "reason refused" in failed["detail"]
    assert "invalid spec" in failed["detail"]
    sub = next(e for e in submitted if e["event"] == "task.submitted")
    assert sub["queue"] == "embedding.nvidia-l4"
    assert sub["reasons"]

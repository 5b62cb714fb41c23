"""Helpers for the fault tests: specs, worker log events, journals, state store, DLQ cleanup."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from fleet.dlq import dead_letter_queue
from fleet.execution import RedisExecutionStore
from fleet.queues import REDIS_PRIORITY_STEPS
from tests.integration.brokers import redis_url
from tests.integration.conftest import Broker

# Short knobs so each fault plays out in seconds (production defaults: 60 s, 3, 30 s, 300 s).
FAST = {
    "FLEET_CLAIM_TTL_S": "2",
    "FLEET_MAX_ATTEMPTS": "3",
    "FLEET_RETRY_BACKOFF_S": "0.3",
    "FLEET_VISIBILITY_TIMEOUT_S": "3",
    "FLEET_FAULT_OPS": "1",
}


def batch_spec(op_input: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """A batch task for the cpu workers running one op; ``key`` is its idempotency key."""
    return {
        "kind": "batch",
        "model": {"name": "fault-ops", "params_b": 0.001},
        "input": op_input,
        "requirements": {"accelerators": ["cpu"]},
        "idempotency_key": key or f"fault-{uuid.uuid4().hex}",
    }


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def journal(broker: Broker, task_id: str) -> list[tuple[str, int]]:
    """The journal op's lines for ``task_id``: (started|finished, pid)."""
    path = Path(broker.env["FLEET_ARTIFACT_DIR"]) / "journal" / task_id
    if not path.exists():
        return []
    return [
        (word, int(pid))
        for word, pid in (line.split() for line in path.read_text().split("\n") if line)
    ]


def count(lines: list[tuple[str, int]], word: str) -> int:
    """How many journal lines say ``word``."""
    return sum(1 for w, _ in lines if w == word)


@pytest.fixture(scope="module")
def state(broker: Broker) -> Iterator[tuple[dict[str, str], RedisExecutionStore]]:
    """Worker env (the fast knobs, the state store) and a handle on that store.

    Redis: the store is the broker's database (the default). RabbitMQ: a Redis database of
    its own, named by ``FLEET_STATE_URL``.
    """
    if broker.kind == "redis":
        url = broker.settings.broker_url
        yield {**broker.env, **FAST}, RedisExecutionStore.from_url(url, broker.settings.namespace)
        return
    with redis_url() as url:
        env = {**broker.env, **FAST, "FLEET_STATE_URL": url}
        yield env, RedisExecutionStore.from_url(url, broker.settings.namespace)


def purge_dead_letters(broker: Broker) -> None:
    """Empty the dead-letter queue (tests leave the broker as they found it)."""
    name = dead_letter_queue(broker.settings.namespace)
    with Connection(broker.settings.broker_url) as conn:
        channel = conn.channel()
        if broker.settings.is_redis:
            channel.client.delete(name, *(f"{name}:{p}" for p in REDIS_PRIORITY_STEPS[1:]))
        else:
            with contextlib.suppress(Exception):  # never declared: nothing to remove
                channel.queue_delete(name)


def sleep_spec(seconds: float, tag: str) -> dict[str, Any]:
    """A batch task that sleeps ``seconds`` on a cpu worker (``tag`` keeps tasks distinct)."""
    return {
        "kind": "batch",
        "model": {"name": f"sleeper-{tag}", "params_b": 0.001},
        "input": {"op": "sleep", "seconds": seconds},
        "requirements": {"accelerators": ["cpu"]},
    }


def worker_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON events called ``name`` in a worker's log (other lines are skipped)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def log_events(log_path: Path, event: str, task_id: str) -> int:
    """How many JSON log lines of a worker log are ``event`` for ``task_id``."""
    return sum(1 for r in worker_events(log_path, event) if r.get("task_id") == task_id)

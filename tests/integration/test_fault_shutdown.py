"""Fault 3: SIGTERM during a task, on real workers and both brokers.

A stopped worker stops taking work at once, gives running tasks ``FLEET_SHUTDOWN_GRACE_S``,
sends what is still running back to its queue unacked, and exits 0; a new worker
completes the requeued task. A task that finishes inside the grace is acked and never
runs again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fleet.client import Fleet
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.faultkit import sleep_spec, worker_events
from tests.integration.test_end_to_end import queue_depths

pytestmark = [pytest.mark.integration, pytest.mark.fault]

# Exit within the grace plus this: start-up of the drain, closing the connection, the
# pool's join. Far below the long task's length, so waiting for the task would fail.
EXIT_MARGIN_S = 8.0


def events(worker: LocalWorker, name: str) -> list[dict[str, Any]]:
    """The JSON log events called ``name`` in a worker's log."""
    return worker_events(worker.log_path, name)


def ran(worker: LocalWorker, task_id: str, event: str = "task.started") -> int:
    """How many times ``worker`` logged ``event`` for ``task_id``."""
    return sum(1 for e in events(worker, event) if e.get("task_id") == task_id)


def wait_started(worker: LocalWorker, task_id: str, timeout_s: float = 30.0) -> None:
    """Block until ``worker`` has started ``task_id``."""
    deadline = time.monotonic() + timeout_s
    while ran(worker, task_id) == 0:
        if time.monotonic() > deadline or worker.proc.poll() is not None:
            raise AssertionError(f"task {task_id} never started:\n{worker.log_tail()}")
        time.sleep(0.1)


def sigterm_and_wait(worker: LocalWorker, timeout_s: float) -> tuple[int, float]:
    """SIGTERM ``worker``; return its exit code and how long it took to exit."""
    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        rc = worker.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait()
        raise AssertionError(
            f"worker did not exit within {timeout_s:g} s of SIGTERM:\n{worker.log_tail()}"
        ) from None
    return rc, time.monotonic() - t0


def shutdown_env(broker: Broker, grace_s: float) -> dict[str, str]:
    """The broker's worker environment with a short grace and JSON logs."""
    return {**broker.env, "FLEET_SHUTDOWN_GRACE_S": str(grace_s), "FLEET_LOG_FORMAT": "json"}


def test_sigterm_requeues_a_long_task_and_a_new_worker_completes_it(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger
) -> None:
    """SIGTERM mid-task: exit 0 within grace + margin, task back on its queue, done once by another worker."""
    grace_s, task_s = 2.0, 14.0
    env = shutdown_env(broker, grace_s)
    first = spawn_worker(env, "cpu", logs)
    second: LocalWorker | None = None
    try:
        wait_ready(broker.app, [first])
        handle = fleet.submit(sleep_spec(task_s, "long"))
        wait_started(first, handle.id)
        faults.inject("sigterm-mid-task")
        rc, took = sigterm_and_wait(first, grace_s + EXIT_MARGIN_S)
        assert rc == 0, first.log_tail()
        assert took < task_s  # it did not wait for the task
        assert [e["tasks"] for e in events(first, "worker.requeued")] == [[handle.id]]
        assert ran(first, handle.id, "task.finished") == 0
        # Not acked, not lost: the message is ready on its queue again.
        assert queue_depths(broker, [handle.placement.queue]) == {handle.placement.queue: 1}

        second = spawn_worker(env, "cpu", logs)
        wait_ready(broker.app, [second])
        result = handle.get(timeout=task_s + 30)
        assert result["worker"] == second.node
        assert result["output"]["slept_s"] == task_s
        assert ran(second, handle.id) == 1
        assert ran(second, handle.id, "task.finished") == 1
        assert ran(first, handle.id, "task.finished") == 0  # one result, from one execution
        assert queue_depths(broker, [handle.placement.queue]) == {handle.placement.queue: 0}
        faults.account(submitted=1, completed=1)
    finally:
        stop_workers([w for w in (first, second) if w is not None])


def test_a_short_task_finishes_inside_the_grace_and_is_not_run_again(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger
) -> None:
    """SIGTERM during a 2 s task with a 10 s grace: it completes and is acked; queued work is not taken."""
    grace_s = 10.0
    env = shutdown_env(broker, grace_s)
    first = spawn_worker(env, "cpu", logs)
    second: LocalWorker | None = None
    try:
        wait_ready(broker.app, [first])
        short = fleet.submit(sleep_spec(2.0, "short"))
        wait_started(first, short.id)
        queued = fleet.submit(sleep_spec(0.0, "queued"))
        faults.inject("sigterm-mid-task")
        rc, took = sigterm_and_wait(first, grace_s + EXIT_MARGIN_S)
        assert rc == 0, first.log_tail()
        assert took < grace_s  # it left once the task was done, not at the end of the grace
        assert ran(first, short.id, "task.finished") == 1
        assert events(first, "worker.requeued") == []
        assert ran(first, queued.id) == 0  # stopped taking work at once
        assert short.get(timeout=10)["worker"] == first.node

        second = spawn_worker(env, "cpu", logs)
        wait_ready(broker.app, [second])
        assert queued.get(timeout=30)["worker"] == second.node
        assert ran(second, short.id) == 0  # acked: never delivered again
        assert queue_depths(broker, [short.placement.queue]) == {short.placement.queue: 0}
        faults.account(submitted=2, completed=2)
    finally:
        stop_workers([w for w in (first, second) if w is not None])

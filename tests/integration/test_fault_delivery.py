"""Faults 1, 2 and 4 (Redis): killed workers, killed pool children, tasks longer than the lease.

Real worker processes on real brokers, real signals. Every task runs the ``journal``
op, which writes ``started``/``finished`` lines per task id: the side effect that shows
how many executions began and how many completed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fleet.client import Fleet
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.faultkit import batch_spec, count, journal, state, wait_for
from tests.integration.procs import worker_process

pytestmark = [pytest.mark.integration, pytest.mark.fault]
__all__ = ["state"]  # the fixture, imported for pytest


def test_kill9_of_the_worker_mid_task_completes_it_once(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state
) -> None:
    """Kill -9 of the worker's main process mid-task: redelivered, a restarted worker completes it, one result."""
    env, store = state
    handle = fleet.submit(batch_spec({"op": "journal", "seconds": 3}))
    first = spawn_worker(env, "cpu", logs)
    try:
        wait_ready(broker.app, [first])
        wait_for("the first execution to start", lambda: journal(broker, handle.id))
        first.proc.kill()  # SIGKILL; the pool child follows (Celery sets PR_SET_PDEATHSIG)
        first.proc.wait()
        faults.inject("kill -9 worker")
        killed_at = time.monotonic()
        with worker_process(broker.app, env, "cpu", log_dir=logs) as (_, node):
            wait_for(
                "the redelivered execution to start",
                lambda: count(journal(broker, handle.id), "started") == 2,
            )
            redelivered_s = time.monotonic() - killed_at
            result = wait_for("the result", lambda: store.done(handle.id), timeout_s=30)
    finally:
        stop_workers([first])
    lines = journal(broker, handle.id)
    assert count(lines, "started") == 2  # the killed execution and the one that completed
    assert count(lines, "finished") == 1
    assert result["worker"] == node
    assert store.counts(handle.id)[1] == 2  # two attempts, one recorded result
    assert handle.get(timeout=10) == result
    if broker.kind == "redis":
        # One visibility timeout (3 s) plus a sweep and a worker start, not a day.
        assert redelivered_s < 20
    faults.account(submitted=1, completed=1)


def test_duplicate_messages_of_one_task_run_it_once(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state
) -> None:
    """The same task id published three times (two at once on a 2-process worker) runs once."""
    env, store = state
    spec = batch_spec({"op": "journal", "seconds": 1})
    handles = [fleet.submit(spec) for _ in range(3)]
    assert len({h.id for h in handles}) == 1
    faults.inject("duplicate delivery", times=2)
    task_id = handles[0].id
    with worker_process(broker.app, env, "cpu", concurrency=2, log_dir=logs):
        wait_for("a result", lambda: store.done(task_id))
        wait_for("all three deliveries", lambda: store.counts(task_id)[0] >= 3)
        time.sleep(3)  # a deferred duplicate (claim TTL 2 s) comes back and must not run
    lines = journal(broker, task_id)
    assert count(lines, "started") == 1
    assert count(lines, "finished") == 1
    assert store.counts(task_id)[1] == 1
    assert handles[0].get(timeout=10) == store.done(task_id)
    faults.account(submitted=1, completed=1)


def test_sigkill_of_a_pool_child_requeues_the_task(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state
) -> None:
    """SIGKILL of the pool child only: the worker lives on, the task is requeued (not acked) and completes."""
    env, store = state
    handle = fleet.submit(batch_spec({"op": "journal", "seconds": 3}))
    with worker_process(broker.app, env, "cpu", log_dir=logs) as (proc, node):
        started = wait_for("the execution to start", lambda: journal(broker, handle.id))
        child = started[0][1]
        assert child != proc.pid
        os.kill(child, signal.SIGKILL)
        faults.inject("SIGKILL pool child")
        result = wait_for("the result", lambda: store.done(handle.id), timeout_s=30)
        assert proc.poll() is None  # the worker survived
    lines = journal(broker, handle.id)
    assert count(lines, "started") == 2
    assert count(lines, "finished") == 1
    assert {pid for _, pid in lines} != {child}  # a new child ran it
    assert result["worker"] == node
    faults.account(submitted=1, completed=1)


def test_task_longer_than_the_visibility_timeout_runs_once_while_its_worker_lives(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state
) -> None:
    """Redis, visibility timeout 3 s: a 10 s task with an idle second worker polling is delivered once."""
    if broker.kind != "redis":
        pytest.skip("the visibility timeout is Redis's; RabbitMQ redelivers on connection loss")
    env, store = state
    workers = [spawn_worker(env, "cpu", logs) for _ in range(2)]
    try:
        wait_ready(broker.app, workers)
        handle = fleet.submit(batch_spec({"op": "journal", "seconds": 10}))
        faults.inject("task longer than the redelivery window")
        result = handle.get(timeout=40)
    finally:
        stop_workers(workers)
    assert store.counts(handle.id) == (1, 1)  # one delivery, one attempt: no redelivery at all
    assert count(journal(broker, handle.id), "started") == 1
    assert result["output"]["slept_s"] == 10
    faults.account(submitted=1, completed=1)

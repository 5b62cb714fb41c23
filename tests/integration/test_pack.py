"""Packed messages (``submit_many(pack=N)``): each spec stays its own task, through faults too.

A real cpu worker (one pool process, the fault tests' short knobs) on a database of the
machine's Redis. Packs apply where results are stored per task id (not ``rpc://``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.dlq import DeadLetteredError
from fleet.execution import RedisExecutionStore
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.brokers import rabbitmq_namespace, redis_url
from tests.integration.faultkit import FAST, batch_spec, log_events, wait_for, worker_events

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@dataclass(frozen=True)
class Stack:
    """A broker database, the worker environment, a client and the state store."""

    env: dict[str, str]
    fleet: Fleet
    store: RedisExecutionStore
    redis: redis.Redis
    logs: Path

    def journal(self, task_id: str) -> list[str]:
        """The journal op's lines for ``task_id`` (started/finished)."""
        path = Path(self.env["FLEET_ARTIFACT_DIR"]) / "journal" / task_id
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []

    def flag(self, name: str) -> None:
        """Set the flag file that fixes a ``fail``/``crash`` op."""
        flags = Path(self.env["FLEET_ARTIFACT_DIR"]) / "flags"
        flags.mkdir(parents=True, exist_ok=True)
        (flags / name).touch()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with redis_url() as url:
        env = {**FAST, "FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
        env["FLEET_ARTIFACT_DIR"] = str(tmp_path / "artifacts")
        settings = Settings.from_env(env)
        with Fleet(settings, app=create_app(settings), stats_interval_s=0.2) as fleet:
            yield Stack(
                env, fleet, RedisExecutionStore.from_url(url), redis.Redis.from_url(url), tmp_path
            )


def journal_spec(tag: str) -> dict[str, object]:
    return batch_spec({"op": "journal", "seconds": 0}, key=f"pack-{tag}-{time.time_ns()}")


def test_each_spec_of_a_pack_is_its_own_task(stack: Stack) -> None:
    """One message, eight tasks: each completes, fails or is retried under its own id.

    Five journal specs complete once each; a refused one (echo without a payload) is
    dead-lettered and its handle fails naming the queue; a failing one is published again
    on its own and completes once its cause is fixed; every result names its own task id.
    """
    flag = f"pack-fixed-{time.time_ns()}"
    specs = [journal_spec(str(i)) for i in range(5)]
    specs.insert(2, batch_spec({"op": "echo"}))  # refused at the worker: no payload
    specs.append(batch_spec({"op": "fail", "message": "not yet", "until": flag}))
    specs.append(journal_spec("last"))
    handles = stack.fleet.submit_many(specs, pack=8)
    queue = handles[0].placement.queue
    assert sum(int(stack.redis.llen(k)) for k in stack.redis.scan_iter(f"{queue}*")) == 1
    patient = {**stack.env, "FLEET_MAX_ATTEMPTS": "6"}  # time to fix the cause between attempts
    worker = spawn_worker(patient, "cpu", stack.logs)
    try:
        wait_ready(stack.fleet.app, [worker])
        failing = handles[6]
        wait_for("a failed attempt", lambda: stack.store.last_error(failing.id), timeout_s=30)
        stack.flag(flag)
        results = {h.id: h.get(timeout=60) for i, h in enumerate(handles) if i != 2}
        with pytest.raises(DeadLetteredError, match="dead-letter"):
            handles[2].get(timeout=30)
    finally:
        stop_workers([worker])
    for task_id, result in results.items():
        assert result["task_id"] == task_id
    for i in (0, 1, 3, 4, 5, 7):
        assert stack.journal(handles[i].id) == ["started", "finished"], i
    assert stack.store.dead(handles[2].id)["reason"] == "refused"
    assert results[failing.id]["output"]["recovered"] is True
    requeued = [e["requeued"] for e in worker_events(worker.log_path, "pack.requeued_task")]
    assert set(requeued) == {failing.id}  # retried on its own (once or more), the others not
    assert log_events(worker.log_path, "task.started", handles[0].id) == 1


def test_a_pack_whose_process_dies_runs_each_finished_spec_once(stack: Stack) -> None:
    """The pool process dies on the third spec: the pack comes back, finished specs are not run again.

    The redelivered pack returns the two recorded results, publishes the crashed spec on
    its own (its dead holder's claim still stands), which completes once its cause is
    fixed, and runs the last two: every journal spec started exactly once.
    """
    flag = f"pack-crash-fixed-{time.time_ns()}"
    specs = [journal_spec("a"), journal_spec("b")]
    specs.append(batch_spec({"op": "crash", "until": flag}))
    specs += [journal_spec("c"), journal_spec("d")]
    handles = stack.fleet.submit_many(specs, pack=8)
    worker = spawn_worker(stack.env, "cpu", stack.logs)
    try:
        wait_ready(stack.fleet.app, [worker])
        wait_for("the first two specs", lambda: all(stack.store.done(h.id) for h in handles[:2]))
        wait_for("the crash", lambda: stack.store.counts(handles[2].id)[1] >= 1)
        time.sleep(0.5)  # the crash op ends the process as soon as it starts
        stack.flag(flag)
        results = [h.get(timeout=60) for h in handles]
        assert worker.proc.poll() is None  # the worker lived through it
    finally:
        stop_workers([worker])
    assert [r["task_id"] for r in results] == [h.id for h in handles]
    for i in (0, 1, 3, 4):
        assert stack.journal(handles[i].id).count("started") == 1, i
    assert stack.store.counts(handles[2].id)[1] == 2  # crashed once, then ran


def test_packs_on_rabbitmq_with_a_redis_result_backend(tmp_path: Path) -> None:
    """RabbitMQ publishes a pack through Celery's producer (publisher confirms); each task completes.

    Packs need results stored per task id: here a Redis result backend and state store.
    """
    with rabbitmq_namespace() as (amqp_url, namespace), redis_url() as url:
        env = {
            **FAST,
            "FLEET_BROKER_URL": amqp_url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_STATE_URL": url,
            "FLEET_NAMESPACE": namespace,
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        }
        settings = Settings.from_env(env)
        with Fleet(settings, app=create_app(settings), stats_interval_s=0.2) as fleet:
            specs = [journal_spec(f"amqp-{i}") for i in range(5)]
            handles = fleet.submit_many(specs, pack=4)
            worker = spawn_worker(env, "cpu", tmp_path)
            try:
                wait_ready(fleet.app, [worker])
                results = [h.get(timeout=60) for h in handles]
            finally:
                stop_workers([worker])
    assert [r["task_id"] for r in results] == [h.id for h in handles]
    assert len(worker_events(worker.log_path, "pack.requeued")) == 0
    text = worker.log_path.read_text()
    assert text.count("fleet.run_pack[") == 2  # one pack of 4, received and succeeded
    assert text.count("fleet.run[") == 2  # the fifth task, on its own

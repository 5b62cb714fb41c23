"""Fault 7: poison tasks end in the dead-letter queue; `fleet dlq` lists, shows and requeues them.

Real workers on both brokers. ``crash`` ends the pool process on every delivery,
``fail`` raises on every delivery (until its flag file exists), ``echo`` without a
payload is refused. The worker keeps serving the tasks queued behind them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.client import Fleet
from fleet.dlq import DeadLetterQueue, dead_letter_queue
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.faultkit import batch_spec, log_events, purge_dead_letters, state, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]
__all__ = ["state"]  # the fixture, imported for pytest


def fleet_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fleet ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli_json(env: dict[str, str], *args: str) -> Any:
    out = fleet_cli(env, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def clean_dlq(broker: Broker):
    purge_dead_letters(broker)
    yield
    purge_dead_letters(broker)


def test_worker_killing_and_refused_tasks_are_dead_lettered(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state, clean_dlq
) -> None:
    """A task that kills its pool process every time is dead-lettered after 3 attempts; others complete."""
    env, store = state
    crash = fleet.submit(batch_spec({"op": "crash"}))
    refused = fleet.submit(batch_spec({"op": "echo"}))  # no payload: bad input
    behind = [fleet.submit(batch_spec({"op": "echo", "payload": i})) for i in range(2)]
    faults.inject("poison: kills its worker process", times=3)
    faults.inject("poison: refused input")
    worker = spawn_worker(env, "cpu", logs)
    try:
        wait_ready(broker.app, [worker])
        for i, h in enumerate(behind):
            assert wait_for(f"echo {i}", lambda h=h: store.done(h.id))["output"]["payload"] == i
        entries = wait_for(
            "two dead letters",
            lambda: (
                len(DeadLetterQueue(broker.settings, broker.app).entries()) >= 2
                and DeadLetterQueue(broker.settings, broker.app).entries()
            ),
            timeout_s=40,
        )
        assert worker.proc.poll() is None  # the worker lived through it all
    finally:
        stop_workers([worker])
    by_id = {e.task_id: e for e in entries}
    assert (by_id[crash.id].reason, by_id[crash.id].attempts) == ("worker-lost", 3)
    assert by_id[crash.id].spec["input"] == {"op": "crash"}
    assert by_id[crash.id].queue == crash.placement.queue
    assert log_events(worker.log_path, "task.started", crash.id) == 3  # exactly three attempts
    assert (by_id[refused.id].reason, by_id[refused.id].attempts) == ("refused", 1)
    assert "input.payload" in by_id[refused.id].error
    with pytest.raises(Exception, match="dead-lettered"):
        crash.get(timeout=10)
    status = cli_json(env, "status")
    assert status["dead_letters"] == 2
    faults.account(submitted=4, completed=4)


def test_failing_task_is_retried_dead_lettered_and_requeued_from_the_cli(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger, state, clean_dlq
) -> None:
    """A handler raising every time: retried with back-off, dead-lettered after 3; fleet dlq list/show/requeue."""
    env, store = state
    flag = f"fixed-{os.getpid()}-{broker.kind}"
    secret_url = "redis://fleet:hunter2@cache.internal:6379/0"  # noqa: S105 - a fake, to be masked
    spec = batch_spec({"op": "fail", "message": f"cannot reach {secret_url}", "until": flag})
    failing = fleet.submit(spec)
    faults.inject("poison: handler raises", times=3)
    worker = spawn_worker(env, "cpu", logs)
    try:
        wait_ready(broker.app, [worker])
        wait_for("the dead letter", lambda: store.dead(failing.id), timeout_s=30)
        with pytest.raises(Exception, match=r"dead-lettered to .*fleet\.dead-letter"):
            failing.get(timeout=10)
        assert log_events(worker.log_path, "task.started", failing.id) == 3

        listed = cli_json(env, "dlq", "list")
        assert [row["task_id"] for row in listed] == [failing.id]
        assert listed[0]["reason"] == "failed"
        shown = cli_json(env, "dlq", "show", failing.id[:8])
        assert shown["attempts"] == 3
        assert shown["queue"] == dead_letter_queue(broker.settings.namespace).replace(
            "fleet.dead-letter", "batch.cpu"
        )
        assert "RuntimeError" in shown["error"]
        assert "hunter2" not in shown["error"]  # the secret in the error was masked
        assert "fleet:***@cache.internal" in shown["error"]
        assert cli_json(env, "dlq", "list") == listed  # browsing lost nothing

        unknown = fleet_cli(env, "dlq", "show", "no-such-task")
        assert unknown.returncode == 2
        assert "no dead-letter entry" in unknown.stderr

        flags = Path(env["FLEET_ARTIFACT_DIR"]) / "flags"
        flags.mkdir(parents=True, exist_ok=True)
        (flags / flag).touch()  # the transient cause is fixed
        requeued = cli_json(env, "dlq", "requeue", failing.id)
        assert requeued == [
            {"old_task_id": failing.id, "task_id": failing.id, "queue": failing.placement.queue}
        ]
        done = wait_for("the requeued task's result", lambda: store.done(failing.id))
        assert done["output"]["recovered"] is True
        assert store.counts(failing.id)[1] == 1  # attempts were reset by the requeue
        assert cli_json(env, "dlq", "list") == []
    finally:
        stop_workers([worker])
    faults.account(submitted=1, completed=1)

"""Brokers under fault, on servers the tests start themselves (issue 6, faults 4, 5 and 9).

* Fault 4 (RabbitMQ part): a node with ``consumer_timeout = 5000`` (3.10: server-wide);
  the worker warns at start-up, and a task running past the timeout has its channel
  closed and is delivered again; the execution guard keeps it from running twice.
* Fault 5: Redis with AOF killed with SIGKILL and restarted, RabbitMQ shut down and
  restarted: queued tasks survive and the running worker reconnects and completes them;
  the autoscaler loop survives a Redis outage.
* Fault 9: publisher confirms: a publish the broker refuses (a reject-publish policy)
  raises ``SubmitError`` from ``submit`` and ``submit_many``; so does a broker that is down.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.app import TIME_LIMITS, create_app
from fleet.autoscaler.config import parse_config
from fleet.autoscaler.loop import StepReport, build_autoscaler
from fleet.client import Fleet
from fleet.execution import RedisExecutionStore
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from fleet.spec import TaskKind
from fleet.submiterrors import SubmitError
from tests.faults import FaultLedger
from tests.integration.brokers import redis_url
from tests.integration.faultkit import sleep_spec, worker_events
from tests.integration.servers import RabbitNode, rabbitmq_node, redis_server

pytestmark = [pytest.mark.integration, pytest.mark.fault]

CONSUMER_TIMEOUT_MS = 5000
# Check consumer timeouts every second instead of every minute, so 5 s means ~5 s.
FAST_TICK = "[{rabbit, [{channel_tick_interval, 1000}]}]."
RESULT_TIMEOUT_S = float("60")


def log_events(worker: LocalWorker, name: str) -> list[dict[str, Any]]:
    """The JSON events called ``name`` in the worker's log."""
    return worker_events(worker.log_path, name)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One private RabbitMQ node for the module (a start takes ~5 s here)."""
    with rabbitmq_node(
        tmp_path_factory.mktemp("rabbit"),
        config=f"consumer_timeout = {CONSUMER_TIMEOUT_MS}",
        advanced=FAST_TICK,
    ) as started:
        yield started


@pytest.fixture
def state_url() -> Iterator[str]:
    """A Redis DB for results and the execution guard's records."""
    with redis_url() as url:
        yield url


def rabbit_env(node: RabbitNode, results: str, logs: Path) -> dict[str, str]:
    """Worker and client environment on the private node (own queue namespace)."""
    return {
        "FLEET_BROKER_URL": node.url,
        "FLEET_RESULT_BACKEND": results,
        "FLEET_STATE_URL": results,
        "FLEET_NAMESPACE": f"t{uuid.uuid4().hex[:6]}.",
        "FLEET_ARTIFACT_DIR": str(logs / "artifacts"),
        "FLEET_LOG_FORMAT": "json",
        # How the worker's start-up check asks this node for its consumer_timeout.
        "FLEET_RABBITMQCTL": node.ctl_path,
        "FLEET_RABBITMQ_NODE": node.node,
        "HOME": node.env["HOME"],  # the node's Erlang cookie
    }


def test_short_consumer_timeout_is_warned_and_a_redelivery_does_not_run_twice(
    node: RabbitNode, state_url: str, tmp_path: Path, faults: FaultLedger
) -> None:
    """consumer_timeout 5 s: a warning at start-up; an 8 s task is redelivered but runs once.

    What RabbitMQ 3.10 and Celery 5 do with a task running past the server's timeout:
    the broker closes the channel (PRECONDITION_FAILED, "delivery acknowledgement ...
    timed out") and puts the message back on its queue; Celery treats that channel
    error as unrecoverable, lets the running task finish (its result is stored) and
    shuts the worker down. The next worker receives the copy; the execution guard
    (``workers/once.py``) sees the task done and returns its result without running it.
    """
    env = {**rabbit_env(node, state_url, tmp_path), "FLEET_CLAIM_TTL_S": "3"}
    settings = Settings.from_env(env)
    app = create_app(settings)
    first = spawn_worker(env, "cpu", tmp_path, concurrency=1)
    second: LocalWorker | None = None
    try:
        wait_ready(app, [first])
        (warning,) = log_events(first, "broker.consumer_timeout_short")
        assert warning["level"] == "warning"
        assert warning["consumer_timeout_ms"] == CONSUMER_TIMEOUT_MS
        assert warning["source"] == "rabbitmqctl eval on the local node"
        # the cpu worker serves every kind, training (24 h) included
        assert warning["longest_task_limit_s"] == TIME_LIMITS[TaskKind.TRAINING]
        assert "consumer_timeout" in warning["fix"]
        assert "3.12" in warning["fix"]
        with Fleet(settings, app=app, stats_interval_s=0.5) as fleet:
            faults.inject("rabbitmq-consumer-timeout")
            handle = fleet.submit(sleep_spec(8, "past-timeout"))
            result = handle.get(timeout=RESULT_TIMEOUT_S)
        assert result["output"]["slept_s"] == 8
        faults.account(submitted=1, completed=1)
        first.proc.wait(timeout=30)  # the channel error stops the worker
        assert "delivery acknowledgement on channel 1 timed out" in first.log_path.read_text()
        store = RedisExecutionStore.from_url(state_url, settings.namespace)
        assert store.counts(handle.id) == (1, 1)
        second = spawn_worker(env, "cpu", tmp_path, concurrency=1)
        wait_ready(app, [second])
        _wait(lambda: store.counts(handle.id)[0] >= 2, "the redelivered copy", timeout_s=30)
        _wait(lambda: bool(log_events(second, "task.duplicate")) or _acked(node, env), "the copy")
        assert store.counts(handle.id)[1] == 1, second.log_tail()  # the handler ran once
    finally:
        stop_workers([w for w in (first, second) if w is not None])


def _acked(node: RabbitNode, env: dict[str, str]) -> bool:
    """True when the task's queue holds no message, ready or unacknowledged."""
    out = node.ctl("list_queues", "name", "messages", "--no-table-headers", "--quiet")
    queue = f"{env['FLEET_NAMESPACE']}batch.cpu"
    return any(line.split() == [queue, "0"] for line in out.splitlines())


def test_rabbitmq_restart_keeps_queued_tasks_and_the_worker_reconnects(
    node: RabbitNode, state_url: str, tmp_path: Path, faults: FaultLedger
) -> None:
    """Durable queues, persistent messages: a full node restart loses nothing; the worker carries on."""
    env = rabbit_env(node, state_url, tmp_path)
    settings = Settings.from_env(env)
    app = create_app(settings)
    worker = spawn_worker(env, "cpu", tmp_path, concurrency=1)
    n = 6
    try:
        wait_ready(app, [worker])
        with Fleet(settings, app=app, stats_interval_s=0.5) as fleet:
            handles = fleet.submit_many([sleep_spec(0.5, f"r{i}") for i in range(n)])
            faults.inject("rabbitmq-restart")
            node.restart(full=True)
            results = [h.get(timeout=RESULT_TIMEOUT_S) for h in handles]
        faults.account(submitted=n, completed=len(results))
        assert [r["output"]["slept_s"] for r in results] == [0.5] * n
        assert worker.proc.poll() is None, worker.log_tail()  # reconnected, not exited
    finally:
        stop_workers([worker])


def test_redis_aof_restart_keeps_queued_tasks_and_the_worker_reconnects(
    tmp_path: Path, faults: FaultLedger
) -> None:
    """Redis with appendfsync always killed with SIGKILL: queued tasks survive; the worker completes all."""
    with redis_server(tmp_path, aof=True) as server:
        url = server.url()
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "FLEET_LOG_FORMAT": "json",
        }
        settings = Settings.from_env(env)
        app = create_app(settings)
        n = 6
        with Fleet(settings, app=app, stats_interval_s=0.5) as fleet:
            handles = fleet.submit_many([sleep_spec(0.3, f"a{i}") for i in range(n)])
            faults.inject("redis-kill-9")
            server.restart(hard=True)  # nothing consumed yet: all six are only in the AOF
            queued = sum(server.client().llen(k) for k in server.client().keys("batch.cpu*"))
            assert queued == n
            worker = spawn_worker(env, "cpu", tmp_path, concurrency=1)
            try:
                wait_ready(app, [worker])
                first = handles[0].get(timeout=RESULT_TIMEOUT_S)
                assert first["output"]["slept_s"] == 0.3
                faults.inject("redis-kill-9")
                server.restart(hard=True)  # now with the worker connected and tasks left
                results = [h.get(timeout=RESULT_TIMEOUT_S) for h in handles]
                assert worker.proc.poll() is None, worker.log_tail()
            finally:
                stop_workers([worker])
        faults.account(submitted=n, completed=len(results))
        assert all(r["output"]["slept_s"] == 0.3 for r in results)


AUTOSCALER_CONFIG = """
[fleet]
loop_interval_s = 0.5
[[pools]]
name = "cpu"
provider = "fake"
accelerator = "cpu"
price_as = "aws/us-east-1/c6i.xlarge"
markets = ["on_demand"]
max_instances = 2
"""


def test_autoscaler_loop_survives_a_redis_outage(tmp_path: Path, faults: FaultLedger) -> None:
    """While Redis is down the loop's iterations fail cleanly and quickly; afterwards they succeed."""
    with redis_server(tmp_path) as server:
        url = server.url()
        config = parse_config(AUTOSCALER_CONFIG, env={"FLEET_BROKER_URL": url})
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        scaler = build_autoscaler(config, settings, locked=True)
        reports: list[tuple[float, StepReport]] = []
        stop = threading.Event()
        loop = threading.Thread(
            target=scaler.run, args=(stop, lambda r: reports.append((time.monotonic(), r)))
        )
        loop.start()
        try:
            _wait(lambda: len(reports) >= 2, "two steps before the outage")
            faults.inject("redis-outage-autoscaler")
            server.kill()
            down_at = time.monotonic()
            time.sleep(2.0)  # several loop intervals with no Redis
            assert loop.is_alive()
            server.start()
            _wait(lambda: any(t > down_at + 2.0 for t, _ in reports), "a step after the restart")
            assert loop.is_alive()
            assert not any(down_at < t < down_at + 2.0 for t, _ in reports)  # none "succeeded"
            assert reports[-1][1].active  # lease taken again on the restarted server
        finally:
            stop.set()
            loop.join(timeout=15)
        assert not loop.is_alive()


def _wait(check: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_refused_publish_raises_from_submit_and_submit_many(
    node: RabbitNode, tmp_path: Path, faults: FaultLedger
) -> None:
    """Publisher confirms: a queue that rejects publishes makes submit raise, never pass silently."""
    env = rabbit_env(node, "rpc://", tmp_path)
    settings = Settings.from_env(env)
    with Fleet(settings, stats_interval_s=0.5) as fleet:
        fleet.submit(sleep_spec(0, "declares-the-queue"))  # lands: the queue exists now
        pattern = "^" + settings.namespace.replace(".", r"\.")
        node.ctl("set_policy", "--apply-to", "queues", "reject-all", pattern,
                 '{"max-length": 0, "overflow": "reject-publish"}')  # fmt: skip
        try:
            faults.inject("rabbitmq-publish-nack")
            _wait_policy_applies(fleet)
            with pytest.raises(SubmitError, match="refused the publish") as one:
                fleet.submit(sleep_spec(0, "refused"))
            assert one.value.refused
            assert "batch.cpu" in str(one.value)
            assert ":guest@" not in str(one.value)  # the password is masked
            with pytest.raises(SubmitError, match="refused the publish") as many:
                fleet.submit_many([sleep_spec(0, f"m{i}") for i in range(3)])
            assert many.value.refused
            assert "batch of 3 tasks" in str(many.value)
        finally:
            node.ctl("clear_policy", "reject-all")
    faults.account(submitted=0, completed=0)


def _wait_policy_applies(fleet: Fleet, timeout_s: float = 10.0) -> None:
    """Policies apply asynchronously: wait until a publish is refused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            fleet.submit(sleep_spec(0, "probe"))
        except SubmitError:
            return
        time.sleep(0.2)
    raise AssertionError("the reject-publish policy never applied")


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
@pytest.mark.timeout(90)
def test_submit_raises_promptly_when_the_broker_is_down(
    kind: str, node: RabbitNode, tmp_path: Path, faults: FaultLedger
) -> None:
    """A broker that is down makes submit and submit_many raise SubmitError, not hang."""
    if kind == "redis":
        with redis_server(tmp_path) as server:
            url = server.url()
            server.kill()
            env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
            _assert_submit_raises(Settings.from_env(env), faults)
        return
    env = rabbit_env(node, "rpc://", tmp_path)
    node.ctl("stop_app")
    try:
        _assert_submit_raises(Settings.from_env(env), faults)
    finally:
        node.ctl("start_app")


def _assert_submit_raises(settings: Settings, faults: FaultLedger) -> None:
    faults.inject("broker-down-at-submit")
    with Fleet(settings, stats_interval_s=0.5) as fleet:
        with pytest.raises(SubmitError, match="unreachable") as one:
            fleet.submit(sleep_spec(0, "down"))
        assert not one.value.refused
        with pytest.raises(SubmitError, match="unreachable"):
            fleet.submit_many([sleep_spec(0, "down-many")])
    faults.account(submitted=0, completed=0)

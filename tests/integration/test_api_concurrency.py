"""An API worker's concurrency set by remote control, and by a real autoscaler step.

Real Redis and RabbitMQ, a real ``fleet worker --api emu`` process (threads pool, 8
threads) and the emulated endpoint in this process with a per-request latency; its
in-flight counter is the witness for how many calls the worker had open at once. The
autoscaler reads the worker's concurrency as it always does: from the Redis registry, or
over remote control (``fleet_identity``) on RabbitMQ. The test catalog (an ``emu`` API
offer), key and base URL are ``test_api_workers``'s.
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from fleet.app import REDELIVERY_WINDOW_S, create_app
from fleet.autoscaler.apiactuator import ConcurrencyChange
from fleet.autoscaler.config import parse_config
from fleet.autoscaler.loop import Autoscaler
from fleet.catalog import load_catalog
from fleet.catalog.apis import API_FIELDS
from fleet.emulated.openai_server import EmulatedOpenAIServer
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.queues import api_queue_name, kombu_queue
from fleet.settings import Settings
from tests.integration.brokers import rabbitmq_namespace, redis_url
from tests.integration.servers import redis_server
from tests.integration.test_api_workers import KEY, Stack, chat, write_catalog

pytestmark = pytest.mark.integration

THREADS = 8
CALLS = 12
LATENCY_S = float(os.environ.get("FLEET_TEST_API_LATENCY_S", "0.5"))  # per request
REPLY_TIMEOUT_S = 5.0


def roomy_limits(catalog: Path) -> Path:
    """The emu offer with limits far above these tests' calls: the rate limiter never waits."""
    path = catalog / "api_offers.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.update(requests_per_min="60000", tokens_per_min="100000000")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=API_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return catalog


def client_app(settings: Settings, queue: str) -> Celery:
    """A client app that also knows ``queue`` (this process's catalog has no emu offer).

    On RabbitMQ a queue is declared with the worker's arguments or the broker refuses
    the publish, so it is added the way ``create_app`` builds every queue.
    """
    app = create_app(settings)
    extra = kombu_queue(queue)
    if not settings.is_redis:
        extra.queue_arguments = {"x-consumer-timeout": REDELIVERY_WINDOW_S * 1000}
    app.conf.task_queues = (*app.conf.task_queues, extra)
    return app


@contextmanager
def broker_url(kind: str) -> Iterator[tuple[str, str, str]]:
    """(broker URL, result backend, namespace) on a fresh Redis DB or a RabbitMQ namespace."""
    if kind == "redis":
        with redis_url() as url:
            yield url, url, f"t{uuid.uuid4().hex[:6]}."
        return
    with rabbitmq_namespace() as (url, namespace):
        try:
            yield url, "rpc://", namespace
        finally:
            with Connection(url) as conn:  # the namespace clean-up knows only the shipped catalog
                conn.channel().queue_delete(api_queue_name("emu", namespace))


@contextmanager
def api_stack(tmp_path: Path, url: str, backend: str, namespace: str) -> Iterator[Stack]:
    """The emulated endpoint (no rate limits) and the environment API workers need on ``url``."""
    (tmp_path / "catalog").mkdir()
    catalog = roomy_limits(write_catalog(tmp_path / "catalog"))
    with EmulatedOpenAIServer(api_key=KEY, models=["emu-llama-8b"]) as server:
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": backend,
            "FLEET_NAMESPACE": namespace,
            "FLEET_CATALOG_DIR": str(catalog),
            "FLEET_API_KEY_EMU": KEY,
            "FLEET_API_BASE_URL_EMU": server.base_url,
            "FLEET_LOG_FORMAT": "json",
        }
        settings = Settings.from_env(env)
        app = client_app(settings, api_queue_name("emu", namespace))
        yield Stack(url, server, env, app, tmp_path)


@pytest.fixture(params=["redis", "rabbitmq"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A fresh broker namespace and emulated endpoint per test, on each broker."""
    with (
        broker_url(request.param) as (url, backend, namespace),
        api_stack(tmp_path, url, backend, namespace) as made,
    ):
        yield made


def set_limit(stack: Stack, worker: LocalWorker, n: int) -> dict[str, Any]:
    """Send ``fleet_api_concurrency(n)`` to ``worker``; its reply."""
    replies = stack.app.control.broadcast(
        "fleet_api_concurrency",
        arguments={"n": n},
        destination=[worker.node],
        reply=True,
        timeout=REPLY_TIMEOUT_S,
    )
    assert replies, f"no reply from {worker.node}:\n{worker.log_tail()}"
    [reply] = replies
    return reply[worker.node]


def peak_for_a_burst(stack: Stack, tag: str) -> int:
    """Submit ``CALLS`` slow calls at once, wait for all; the most the endpoint served at once."""
    stack.server.peak_in_flight(reset=True)
    handles = [stack.send(chat(f"{tag} call {i}", tokens_out=4, seed=i)) for i in range(CALLS)]
    results = [h.get(timeout=60) for h in handles]
    assert all(r["accelerator"] == "api-emu" for r in results)
    return stack.server.peak_in_flight()


def observed_concurrency(scaler: Autoscaler, node: str) -> int | None:
    """``node``'s concurrency as the autoscaler observes it (Redis: the registry; RabbitMQ: inspect)."""
    snapshot = scaler.step(dry_run=True).snapshot
    assert snapshot is not None
    return next((w.concurrency for w in snapshot.workers if w.hostname == node), None)


def wait_observed(scaler: Autoscaler, node: str, expected: int, timeout_s: float = 10.0) -> None:
    """Until the autoscaler observes ``expected`` for ``node`` (the heartbeat writes on change)."""
    deadline = time.monotonic() + timeout_s
    while (seen := observed_concurrency(scaler, node)) != expected:
        assert time.monotonic() < deadline, f"observed {seen}, expected {expected}"
        time.sleep(0.1)


def autoscaler(stack: Stack, min_concurrency: int) -> Autoscaler:
    """A real Autoscaler with one API pool, ``emu``, idle, wanting ``min_concurrency`` calls."""
    text = f"""
[fleet]
namespace = "{stack.env["FLEET_NAMESPACE"]}"

[[api_pools]]
provider = "emu"
base_url = "{stack.server.base_url}"
external = false
min_concurrency = {min_concurrency}
max_concurrency = 16
[[api_pools.offers]]
model = "llama-3.1-8b-instruct"
api_model = "emu-llama-8b"
tokens_per_s = 500
"""
    config = parse_config(text, env={"FLEET_BROKER_URL": stack.url})
    catalog = load_catalog(Path(stack.env["FLEET_CATALOG_DIR"]))  # has inference.api-emu
    return Autoscaler(config, Settings.from_env(stack.env), catalog, stack.app, {}, None)


def spawn_api_worker(stack: Stack) -> LocalWorker:
    """One ``fleet worker --api emu`` with ``THREADS`` threads, answering ping."""
    worker = spawn_worker(stack.env, "cpu", stack.logs, api="emu", concurrency=THREADS)
    try:
        wait_ready(stack.app, [worker])
    except RuntimeError:
        stop_workers([worker])
        raise
    return worker


def test_in_flight_limit_follows_the_command_and_the_autoscaler(stack: Stack) -> None:
    """n=2: never more than 2 calls open; n=6: more at once; an autoscaler step sets the plan's value.

    12 calls of LATENCY_S each on an 8-thread worker. The endpoint's in-flight peak is
    the number of calls the worker held at once (late acks, prefetch = the limit).
    """
    stack.server.configure(ttft_s=LATENCY_S)
    worker = spawn_api_worker(stack)
    scaler = autoscaler(stack, min_concurrency=3)
    try:
        wait_observed(scaler, worker.node, THREADS)  # the pool size until told otherwise

        assert set_limit(stack, worker, 2) == {"ok": {"concurrency": 2, "previous": THREADS}}
        assert peak_for_a_burst(stack, "two") == 2

        assert set_limit(stack, worker, 6) == {"ok": {"concurrency": 6, "previous": 2}}
        assert 2 < peak_for_a_burst(stack, "six") <= 6
        wait_observed(scaler, worker.node, 6)

        report = scaler.step()
        [decision] = report.plan.api_pools
        assert decision.desired_concurrency == 3  # idle pool: its min_concurrency
        assert decision.current_concurrency == 6  # what the worker reported
        assert report.acted.api_changes == [ConcurrencyChange("emu", worker.node, 6, 3)]
        wait_observed(scaler, worker.node, decision.desired_concurrency)
        assert scaler.step().acted.api_changes == []  # converged: nothing more to send
        assert peak_for_a_burst(stack, "three") <= 3
    finally:
        stop_workers([worker])


def test_a_chip_worker_refuses_the_command(stack: Stack) -> None:
    """On a non-API worker the command answers an error (Celery's ``nok``) and sets nothing."""
    worker = spawn_worker(stack.env, "cpu", stack.logs, concurrency=1)
    try:
        wait_ready(stack.app, [worker])
        reply = set_limit(stack, worker, 4)
    finally:
        stop_workers([worker])
    assert reply == {"error": "cpu is not an API worker"}


def wait_reconnected(stack: Stack, worker: LocalWorker, timeout_s: float = 30.0) -> None:
    """Until ``worker`` answers ping after a broker restart (this client reconnects too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait_ready(stack.app, [worker], timeout_s=2.0)
        except (redis.RedisError, OperationalError, RuntimeError):
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.2)
        else:
            return


@pytest.mark.fault
def test_the_limit_survives_a_broker_restart(tmp_path: Path, faults: Any) -> None:
    """Redis killed (SIGKILL) and restarted under a worker limited to 2: once it reconnects, still 2.

    Celery's reconnect path would otherwise restore the prefetch to the pool size (8).
    """
    with (
        redis_server(tmp_path) as server,
        api_stack(tmp_path, server.url(), server.url(), "") as stack,
    ):
        stack.server.configure(ttft_s=LATENCY_S)
        worker = spawn_api_worker(stack)
        try:
            assert set_limit(stack, worker, 2)["ok"]["concurrency"] == 2
            faults.inject("redis-kill-9")
            server.restart(hard=True)
            wait_reconnected(stack, worker)
            peak = peak_for_a_burst(stack, "after")
            assert worker.proc.poll() is None, worker.log_tail()
        finally:
            stop_workers([worker])
        faults.account(submitted=CALLS, completed=CALLS)
        assert peak == 2

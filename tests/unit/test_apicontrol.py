"""``fleet_api_concurrency`` on a worker, the registry heartbeat that reports it, and the endpoint's in-flight counter.

The consumer here is a stand-in holding a real kombu ``QoS`` (the object Celery's
consumer keeps as ``consumer.qos``); the real worker is exercised end to end in
``tests/integration/test_api_concurrency.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from kombu.common import QoS

from fleet.autoscaler import apiactuator
from fleet.emulated.openai_server import EmulatedOpenAIServer
from fleet.registry import Heartbeat, WorkerInfo
from workers import apicontrol, identity

API = identity.WorkerIdentity("api-groq", 1, 0.0, False, "API forwarder to groq", ("q",), 8)
GPU = identity.WorkerIdentity("nvidia-l4", 1, 24.0, True, "emulated L4", ("q",), 1)


@pytest.fixture(autouse=True)
def fresh_limit() -> Iterator[None]:
    """Each test starts as a newly started worker: no limit set, no listener."""
    saved = (apicontrol._limit, list(apicontrol._listeners))
    apicontrol._limit = None
    apicontrol._listeners.clear()
    yield
    apicontrol._limit = saved[0]
    apicontrol._listeners[:] = saved[1]


def as_worker(monkeypatch: pytest.MonkeyPatch, me: identity.WorkerIdentity) -> None:
    """Run as a worker with identity ``me`` (what ``fleet worker`` puts in the environment)."""
    monkeypatch.setenv(identity.ENV_VAR, me.to_json())


def consumer(threads: int = 8) -> tuple[SimpleNamespace, list[int]]:
    """A consumer with a real kombu QoS at ``threads`` and the prefetch counts it applied."""
    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), threads)  # noqa: PLW0108 - kombu passes a keyword
    qos.update()
    c = SimpleNamespace(
        qos=qos, pool=SimpleNamespace(num_processes=threads), initial_prefetch_count=threads
    )
    return c, applied


@pytest.mark.parametrize(
    ("n", "threads", "expected"),
    [(2, 8, 2), (8, 8, 8), (20, 8, 8), (0, 8, 1), (-3, 8, 1), (5, 1, 1), (3, 0, 1)],
)
def test_clamp_limit_table(n, threads, expected):
    assert apicontrol.clamp_limit(n, threads) == expected


def test_api_worker_sets_its_prefetch_and_remembers_it(monkeypatch):
    """n=2 on 8 threads: prefetch 2 applied, kept as the value the loop re-applies and after reconnects."""
    as_worker(monkeypatch, API)
    c, applied = consumer(8)
    seen: list[int] = []
    apicontrol._listeners.append(seen.append)
    assert apicontrol.current_limit(API) == 8  # the pool size until set
    reply = apicontrol.fleet_api_concurrency(SimpleNamespace(consumer=c), n=2)
    assert reply == {"ok": {"concurrency": 2, "previous": 8}}
    assert applied == [8, 2]
    assert (c.qos.value, c.qos.prev, c.initial_prefetch_count) == (2, 2, 2)
    c.qos.update()  # what the event loop does when value != prev: nothing changes
    assert applied == [8, 2]
    assert apicontrol.current_limit(API) == 2
    assert seen == [2]


def test_more_than_the_threads_is_clamped(monkeypatch):
    """The threads pool cannot grow: n=50 on 8 threads sets 8."""
    as_worker(monkeypatch, API)
    c, applied = consumer(8)
    apicontrol.fleet_api_concurrency(SimpleNamespace(consumer=c), n=2)
    reply = apicontrol.fleet_api_concurrency(SimpleNamespace(consumer=c), n=50)
    assert reply == {"ok": {"concurrency": 8, "previous": 2}}
    assert applied[-1] == 8


def test_non_api_worker_answers_nok_and_changes_nothing(monkeypatch):
    """A chip worker's prefetch stays at its pool size."""
    as_worker(monkeypatch, GPU)
    c, applied = consumer(1)
    reply = apicontrol.fleet_api_concurrency(SimpleNamespace(consumer=c), n=4)
    assert reply == {"error": "nvidia-l4 is not an API worker"}
    assert applied == [1]
    assert apicontrol.current_limit(GPU) == 1


def test_before_consuming_the_command_answers_nok(monkeypatch):
    """No QoS yet (the consumer is still starting): an error reply, no limit remembered."""
    as_worker(monkeypatch, API)
    c = SimpleNamespace(qos=None, pool=SimpleNamespace(num_processes=8))
    reply = apicontrol.fleet_api_concurrency(SimpleNamespace(consumer=c), n=3)
    assert "error" in reply
    assert apicontrol.current_limit(API) == 8


def test_install_keeps_the_limit_across_reconnects():
    """Celery's reconnect prefetch reduction (which restores the pool size) is turned off."""
    app = SimpleNamespace(conf=SimpleNamespace(worker_enable_prefetch_count_reduction=True))
    seen: list[int] = []
    apicontrol.install(app, seen.append)
    assert app.conf.worker_enable_prefetch_count_reduction is False
    assert apicontrol._listeners == [seen.append]


class RecordingRedis:
    """The two calls the registry makes (``set``, ``delete``), recorded."""

    def __init__(self) -> None:
        """Nothing written yet."""
        self.values: list[dict] = []
        self.changed = threading.Event()

    def set(self, _key, value, ex=None):  # noqa: ARG002
        """Record a registration."""
        self.values.append(json.loads(value))
        self.changed.set()

    def delete(self, _key):
        """Record the removal."""
        self.values.append({})


def test_heartbeat_update_is_written_at_once_and_stop_removes():
    """update() wakes the heartbeat thread (no wait for the next 5 s beat)."""
    client = RecordingRedis()
    info = WorkerInfo("api-groq-1@h", "api-groq", 1, False, ("q",), 1, concurrency=8)
    beat = Heartbeat(client, info)
    beat.start()
    assert client.values[-1]["concurrency"] == 8
    client.changed.clear()
    beat.update(WorkerInfo("api-groq-1@h", "api-groq", 1, False, ("q",), 1, concurrency=3))
    assert client.changed.wait(4.0)  # under the 5 s beat: it was the update that wrote
    assert client.values[-1]["concurrency"] == 3
    assert beat.info.concurrency == 3
    beat.stop()
    assert client.values[-1] == {}


def test_emulated_server_counts_requests_in_flight():
    """Three concurrent slow calls: peak 3; after a reset, one call alone: peak 1."""
    with EmulatedOpenAIServer() as server:
        server.configure(ttft_s=0.4)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        def call() -> None:
            httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.peak_in_flight(reset=True) == 3
        assert server.in_flight() == 0
        call()
        assert server.peak_in_flight() == 1
        over_http = httpx.get(f"{server.base_url.removesuffix('/v1')}/emulated/in_flight").json()
        assert over_http == {"in_flight": 0, "peak": 1}


def test_the_command_the_autoscaler_sends_is_the_one_workers_register():
    """apiactuator.COMMAND names the remote-control function in workers.apicontrol."""
    assert apicontrol.fleet_api_concurrency.__name__ == apiactuator.COMMAND

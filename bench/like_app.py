"""A plain Celery worker configured like fleet (``celery -A bench.like_app``): the fair baseline.

Late acks with reject on worker loss, prefetch 1, ``track_started``, fleet's Redis
transport options (priority bands, visibility timeout, socket timeouts) and result-backend
settings, and ``BENCH_LIKE_QUEUES`` queues (default 5: as many as a CPU fleet worker
consumes) declared as fleet declares its own (``bench.like.0`` ...). What it lacks is
fleet itself: the at-most-once guard, the spec check, the device lease, the engine.

Reads ``FLEET_BROKER_URL`` (and ``FLEET_RESULT_BACKEND``) at import.
"""

from __future__ import annotations

import os

from celery import Celery

from fleet.app import broker_transport_options, resilience_conf
from fleet.queues import kombu_queue
from fleet.settings import Settings

PREFIX = "bench.like."
DEFAULT_QUEUES = 5


def queue_names(count: int) -> list[str]:
    """The like-fleet worker's queues; the benchmark loads the first."""
    return [f"{PREFIX}{i}" for i in range(count)]


_settings = Settings.from_env()
app = Celery("like", broker=_settings.broker_url, backend=_settings.result_backend)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_track_started=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_queues=[
        kombu_queue(n)
        for n in queue_names(int(os.environ.get("BENCH_LIKE_QUEUES") or DEFAULT_QUEUES))
    ],
    task_queue_max_priority=9,
    task_default_priority=0,
    broker_transport_options=broker_transport_options(_settings),
    result_backend_transport_options=broker_transport_options(_settings)
    if _settings.is_redis
    else {},
    **resilience_conf(),
    result_expires=24 * 3600,
    worker_hijack_root_logger=False,
)


@app.task(name="plain.noop")
def noop(spec: dict[str, object], placement: dict[str, object] | None = None) -> dict[str, object]:
    """Do nothing, like the fleet ``batch`` handler's ``noop`` op."""
    return {"output": {}, "placement": placement is not None, "kind": spec.get("kind")}

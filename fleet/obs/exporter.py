"""A standalone Prometheus exporter for the broker's queues and the live workers.

``run_exporter`` serves a ``FleetMetrics`` on ``addr:port`` (loopback by default) and, every
``interval_s``, reads the depth of every queue the catalog can need
(``fleet.queues.all_queue_names``) and the live-worker registry, then updates the gauges.
On Redis it uses ``RedisStats`` (ready and unacked) and the registry; on RabbitMQ
``AmqpStats`` (ready only) and no worker gauge, since RabbitMQ has no shared registry.

Contracts: a broker error during a refresh is logged and leaves the previous values in place
(retried next interval); the loop never dies on one. ``run_exporter`` returns once ``stop``
is set, after shutting its HTTP server down and closing the socket. ``refresh`` is the
pure step (no threads, no sleeping) the loop repeats, for tests and for callers that
already have a loop of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import redis
from kombu.exceptions import OperationalError

from fleet.app import app_models
from fleet.catalog import Catalog
from fleet.obs.metrics import UNPOOLED, FleetMetrics
from fleet.queues import all_queue_names
from fleet.registry import WorkerInfo, live_workers
from fleet.settings import Settings
from fleet.stats import AmqpStats, RedisStats, StatsSource, oldest_age_s
from fleet.tls import redis_client

__all__ = ["refresh", "run_exporter", "sources_for"]

log = logging.getLogger("fleet.obs.exporter")

WorkersSource = Callable[[], Iterable[WorkerInfo]]
BROKER_ERRORS = (redis.RedisError, OperationalError, OSError)


def _unpooled(_worker: WorkerInfo) -> str:
    return UNPOOLED


def refresh(
    metrics: FleetMetrics,
    source: StatsSource,
    names: Sequence[str],
    workers_source: WorkersSource | None,
    *,
    pool_of: Callable[[WorkerInfo], str] = _unpooled,
) -> None:
    """Read queue statistics for ``names`` and the live workers once; update ``metrics``.

    ``workers_source`` None (RabbitMQ) leaves ``fleet_workers`` untouched. Broker errors
    propagate (``run_exporter`` catches them); the queue gauges are only updated once the
    read has succeeded, so a failed read never publishes a half snapshot.
    """
    stats = source.read(names)
    workers = list(workers_source()) if workers_source is not None else None
    ages: dict[str, float] = {}
    if isinstance(source, RedisStats):  # RabbitMQ cannot peek without consuming
        now = time.time()
        for name, s in stats.items():
            if s.ready and (age := oldest_age_s(source.client, name, now)) is not None:
                ages[name] = age
    metrics.observe_queues(stats, ages)
    if workers is not None:
        metrics.observe_workers(workers, pool_of)


def sources_for(settings: Settings) -> tuple[StatsSource, WorkersSource | None]:
    """The queue-statistics source and live-worker reader for ``settings``' broker."""
    if settings.is_redis:
        client = redis_client(settings.broker_url, settings.tls)
        namespace = settings.namespace
        return RedisStats(client, namespace), lambda: live_workers(client, namespace)
    return AmqpStats(settings.broker_url, settings.tls), None


def run_exporter(
    settings: Settings,
    catalog: Catalog,
    port: int,
    addr: str = "127.0.0.1",
    interval_s: float = 5.0,
    stop: threading.Event | None = None,
    *,
    metrics: FleetMetrics | None = None,
    pool_of: Callable[[WorkerInfo], str] = _unpooled,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve fleet metrics on ``addr:port`` and refresh them every ``interval_s`` until ``stop``.

    ``port`` 0 picks a free port; ``on_listening`` (optional) is called with the bound port
    once the server is up. ``metrics`` defaults to a fresh ``FleetMetrics``. Without ``stop``
    it runs until the process ends (KeyboardInterrupt returns cleanly).
    """
    metrics = metrics or FleetMetrics()
    stop = stop or threading.Event()
    names = all_queue_names(catalog, settings.namespace, app_models(settings))
    source, workers_source = sources_for(settings)
    server, thread = metrics.serve(port, addr)
    try:
        if on_listening is not None:
            on_listening(server.server_port)
        while not stop.is_set():
            try:
                refresh(metrics, source, names, workers_source, pool_of=pool_of)
            except BROKER_ERRORS as exc:
                log.warning(
                    "metrics refresh failed, retrying next interval: %s", type(exc).__name__
                )
            stop.wait(interval_s)
    except KeyboardInterrupt:
        stop.set()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

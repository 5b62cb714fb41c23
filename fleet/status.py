"""What ``fleet status`` reports: queue depths and live workers (I/O at the edge)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

from fleet.app import app_models
from fleet.autoscaler.config import AutoscalerConfig
from fleet.catalog import Catalog
from fleet.queues import all_queue_names
from fleet.registry import live_workers
from fleet.settings import Settings, masked
from fleet.stats import AmqpStats, QueueStats, RedisStats, oldest_age_s
from fleet.tls import redis_client

INSPECT_TIMEOUT_S = 1.5


def _active_counts(app: Celery, nodes: list[str]) -> dict[str, int]:
    """Tasks running on each node (Celery remote control; nodes that do not answer are left out)."""
    if not nodes:
        return {}
    answer = app.control.inspect(destination=nodes, timeout=INSPECT_TIMEOUT_S).active() or {}
    return {node: len(tasks or ()) for node, tasks in answer.items()}


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One live worker."""

    hostname: str
    accelerator: str
    devices: int
    emulated: bool
    queues: int
    active: int | None = None
    engine: str = "reference"
    models: tuple[str, ...] = ()
    ready: bool = True


@dataclass(frozen=True, slots=True)
class PoolRow:
    """One autoscaler pool (with ``--config``): instances now, desired, spend."""

    pool: str
    instances: int
    desired: int
    usd_per_hour: float


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Queues with anything in them (or consumers), live workers, pools and dead letters."""

    broker: str
    queues: tuple[QueueStats, ...]
    workers: tuple[WorkerRow, ...]
    oldest_age_s: dict[str, float] = field(default_factory=dict)
    pools: tuple[PoolRow, ...] = ()
    dead_letters: int = 0
    taken_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "broker": self.broker,
            "queues": [
                {
                    **asdict(q),
                    "by_priority": {str(k): v for k, v in q.by_priority.items()},
                    "oldest_age_s": self.oldest_age_s.get(q.name),
                }
                for q in self.queues
            ],
            "workers": [asdict(w) for w in self.workers],
            "pools": [asdict(p) for p in self.pools],
            "dead_letters": self.dead_letters,
        }


def collect(
    settings: Settings,
    catalog: Catalog,
    app: Celery,
    *,
    all_queues: bool = False,
    config: AutoscalerConfig | None = None,
) -> StatusReport:
    """Read queue statistics and workers from the broker.

    Redis: depths of every queue and priority sub-queue, unacked deliveries, and the
    worker registry. RabbitMQ: ready messages and consumers per queue, and workers
    answering Celery's remote control.
    """
    names = all_queue_names(catalog, settings.namespace, app_models(settings))
    workers: list[WorkerRow]
    if settings.is_redis:
        client = redis_client(settings.broker_url, settings.tls)
        stats = RedisStats(client, settings.namespace).read(names)
        registered = live_workers(client, settings.namespace)
        active = _active_counts(app, [w.hostname for w in registered])
        workers = [
            WorkerRow(
                w.hostname,
                w.accelerator,
                w.devices,
                w.emulated,
                len(w.queues),
                active.get(w.hostname),
                w.engine,
                w.models,
                w.ready,
            )
            for w in registered
        ]
    else:
        stats = AmqpStats(settings.broker_url, settings.tls).read(names)
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        # Celery's documented way to call a custom inspect command is _request.
        raw: Any = inspect._request("fleet_identity") or {}  # noqa: SLF001
        replies: dict[str, dict[str, Any]] = raw if isinstance(raw, dict) else {}
        workers = [
            WorkerRow(
                host,
                r["accelerator"],
                r["devices"],
                r["emulated"],
                len(r["queues"]),
                r.get("active"),
                str(r.get("engine", "reference")),
                tuple(r.get("models", ())),
                bool(r.get("ready", True)),
            )
            for host, r in sorted(replies.items())
        ]
    shown = tuple(s for s in stats.values() if all_queues or s.ready or s.unacked or s.consumers)
    now = time.time()
    ages: dict[str, float] = {}
    dead = 0
    if settings.is_redis:
        client = redis_client(settings.broker_url, settings.tls)
        for s in shown:
            if s.ready and (age := oldest_age_s(client, s.name, now)) is not None:
                ages[s.name] = age
        dead = (
            RedisStats(client, settings.namespace)
            .read([dead_letter_queue(settings.namespace)])[dead_letter_queue(settings.namespace)]
            .ready
        )
    else:
        dlq = dead_letter_queue(settings.namespace)
        dead = AmqpStats(settings.broker_url, settings.tls).read([dlq])[dlq].ready
    return StatusReport(
        masked(settings.broker_url), shown, tuple(workers), ages, pools_now(config), dead, now
    )


def dead_letter_queue(namespace: str = "") -> str:
    """The queue poison tasks go to (``fleet.dlq``)."""
    return f"{namespace}fleet.dead-letter"


def pools_now(config: AutoscalerConfig | None) -> tuple[PoolRow, ...]:
    """Each pool's instances, desired count and $/h after the plan the autoscaler would make now."""
    if config is None:
        return ()
    from fleet.autoscaler.loop import build_autoscaler  # noqa: PLC0415 - only with --config

    report = build_autoscaler(config, Settings.from_env(), locked=False).step(dry_run=True)
    if report.plan is None:
        return ()
    return tuple(
        PoolRow(d.pool, d.current, d.desired, d.usd_per_hour_after) for d in report.plan.decisions
    )

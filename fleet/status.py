"""What ``fleet status`` reports: queue depths and live workers (I/O at the edge)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery import Celery

from fleet.catalog import Catalog
from fleet.queues import all_queue_names
from fleet.registry import live_workers
from fleet.settings import Settings, masked
from fleet.stats import AmqpStats, QueueStats, RedisStats

INSPECT_TIMEOUT_S = 1.5


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One live worker."""

    hostname: str
    accelerator: str
    devices: int
    emulated: bool
    queues: int
    active: int | None = None


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Queues with anything in them (or consumers), and live workers."""

    broker: str
    queues: tuple[QueueStats, ...]
    workers: tuple[WorkerRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "broker": self.broker,
            "queues": [
                {**asdict(q), "by_priority": {str(k): v for k, v in q.by_priority.items()}}
                for q in self.queues
            ],
            "workers": [asdict(w) for w in self.workers],
        }


def collect(
    settings: Settings, catalog: Catalog, app: Celery, *, all_queues: bool = False
) -> StatusReport:
    """Read queue statistics and workers from the broker.

    Redis: depths of every queue and priority sub-queue, unacked deliveries, and the
    worker registry. RabbitMQ: ready messages and consumers per queue, and workers
    answering Celery's remote control.
    """
    names = all_queue_names(catalog, settings.namespace)
    workers: list[WorkerRow]
    if settings.is_redis:
        client = redis.Redis.from_url(settings.broker_url)
        stats = RedisStats(client, settings.namespace).read(names)
        workers = [
            WorkerRow(w.hostname, w.accelerator, w.devices, w.emulated, len(w.queues))
            for w in live_workers(client, settings.namespace)
        ]
    else:
        stats = AmqpStats(settings.broker_url).read(names)
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
            )
            for host, r in sorted(replies.items())
        ]
    shown = tuple(s for s in stats.values() if all_queues or s.ready or s.unacked or s.consumers)
    return StatusReport(masked(settings.broker_url), shown, tuple(workers))

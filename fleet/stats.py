"""Queue statistics from the broker (I/O), and a cache the router reads without I/O.

``RedisStats`` counts ready messages per queue and priority sub-queue, unacked
deliveries (kombu keeps them in the ``unacked`` hash) and consumers (from the worker
registry). ``AmqpStats`` asks RabbitMQ with a passive ``queue.declare``: ready
messages and consumers. ``StatsCache`` refreshes one of them in a background thread so
``Fleet.submit`` adds no broker round trip.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from kombu import Connection
from kombu.exceptions import ChannelError, OperationalError

from fleet.placement import QueueLoad
from fleet.queues import REDIS_PRIORITY_STEPS
from fleet.registry import live_workers
from fleet.tls import TlsFiles, amqp_ssl_options, uses_tls

REDIS_PRIORITY_SEP = ":"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue: ready messages (by priority where the broker says), unacked, consumers."""

    name: str
    ready: int = 0
    unacked: int = 0
    consumers: int = 0
    by_priority: dict[int, int] = field(default_factory=dict)

    @property
    def load(self) -> QueueLoad:
        """The part placement uses: waiting work and who serves it."""
        return QueueLoad(depth=self.ready, consumers=self.consumers)


class StatsSource(Protocol):
    """Reads statistics for the named queues."""

    def read(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Current statistics by queue name."""
        ...


class RedisStats:
    """Statistics from a Redis broker (kombu's key layout)."""

    def __init__(self, client: redis.Redis, namespace: str = "") -> None:
        """Use ``client`` (a connection to the broker's database)."""
        self._client = client
        self._namespace = namespace

    @property
    def client(self) -> redis.Redis:
        """The Redis connection (for peeks such as ``oldest_age_s``)."""
        return self._client

    def read(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """One pipelined round trip for depths, one for unacked, one scan for workers."""
        pipe = self._client.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
            for p in REDIS_PRIORITY_STEPS[1:]:
                pipe.llen(f"{q}{REDIS_PRIORITY_SEP}{p}")
        counts = pipe.execute()
        unacked = self._unacked()
        consumers: dict[str, int] = {}
        for w in live_workers(self._client, self._namespace):
            for q in w.queues:
                consumers[q] = consumers.get(q, 0) + 1
        out = {}
        width = len(REDIS_PRIORITY_STEPS)
        for i, q in enumerate(queues):
            row = counts[i * width : (i + 1) * width]
            # Redis band p holds fleet priorities 9 - p and below (kombu: 0 is the most urgent).
            by_pri = {9 - p: int(n) for p, n in zip(REDIS_PRIORITY_STEPS, row, strict=True) if n}
            out[q] = QueueStats(q, sum(row), unacked.get(q, 0), consumers.get(q, 0), by_pri)
        return out

    def _unacked(self) -> dict[str, int]:
        per_queue: dict[str, int] = {}
        for raw in self._client.hvals("unacked"):
            try:
                _, _, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            per_queue[routing_key] = per_queue.get(routing_key, 0) + 1
        return per_queue


class AmqpStats:
    """Statistics from RabbitMQ by passive declare (a missing queue counts as empty)."""

    def __init__(self, url: str, tls: TlsFiles | None = None) -> None:
        """Connect lazily to ``url`` (``amqps://`` verifies the server with ``tls``)."""
        self._url = url
        self._ssl: dict[str, Any] | bool = (
            amqp_ssl_options(tls or TlsFiles(), url) if uses_tls(url) else False
        )

    def read(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Message and consumer counts per queue."""
        out: dict[str, QueueStats] = {}
        with Connection(self._url, ssl=self._ssl, connect_timeout=5) as conn:
            channel = conn.channel()
            for q in queues:
                try:
                    # kombu's StdChannel stub lacks queue_declare; the AMQP channel has it.
                    _, ready, consumers = channel.queue_declare(queue=q, passive=True)  # type: ignore[attr-defined]
                except ChannelError:
                    channel = conn.channel()  # a 404 closes the channel
                    out[q] = QueueStats(q)
                    continue
                out[q] = QueueStats(q, ready=int(ready), consumers=int(consumers))
        return out


class StatsCache:
    """The latest statistics, refreshed every ``interval_s`` by a daemon thread.

    ``loads()`` never does I/O: it returns the last snapshot, or None until the first
    read succeeds (placement then assumes no wait). Broker errors keep the previous
    snapshot and are retried on the next tick.
    """

    def __init__(
        self,
        source: StatsSource,
        queues: Sequence[str],
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare; the thread starts on the first ``loads()`` call."""
        self._source = source
        self._queues = tuple(queues)
        self._interval = interval_s
        self._clock = clock
        self._loads: dict[str, QueueLoad] | None = None
        self.updated_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read once now (also what the thread does each tick)."""
        try:
            stats = self._source.read(self._queues)
        except (redis.RedisError, OperationalError, OSError):
            return
        self._loads = {name: s.load for name, s in stats.items()}
        self.updated_at = self._clock()

    def loads(self) -> dict[str, QueueLoad] | None:
        """The last snapshot of queue loads (no I/O)."""
        if self._thread is None:
            self._start()
        return self._loads

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="fleet-stats", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self._interval)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()


def decode_task(raw: bytes | str) -> tuple[list[Any], dict[str, Any]] | None:
    """The ``(args, kwargs)`` of one kombu-on-Redis ``fleet.run`` message, or None if it is not one."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs = json.loads(body)[:2]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    return args, kwargs


def _submitted_at(raw: bytes | str) -> float | None:
    """The ``submitted_at`` fleet puts in each message's placement, or None."""
    decoded = decode_task(raw)
    placement = decoded[1].get("placement") if decoded is not None else None
    value = placement.get("submitted_at") if isinstance(placement, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def oldest_age_s(client: redis.Redis, queue: str, now: float) -> float | None:
    """Age of the oldest message waiting on a Redis queue (any priority band), or None."""
    oldest: float | None = None
    for step in REDIS_PRIORITY_STEPS:
        key = queue if step == 0 else f"{queue}{REDIS_PRIORITY_SEP}{step}"
        raw = client.lindex(key, -1)  # LPUSH/BRPOP: the oldest is at the right end
        if raw is None:
            continue
        at = _submitted_at(raw)
        if at is not None and (oldest is None or at < oldest):
            oldest = at
    return None if oldest is None else max(0.0, now - oldest)

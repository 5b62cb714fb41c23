"""Lease extension on Redis: a live worker's messages are never redelivered under it.

kombu emulates acks on Redis: a delivered message sits in the ``unacked`` hash and its
delivery tag in the ``unacked_index`` sorted set, scored with the delivery time; any
consumer's sweep (``QoS.restore_visible``) puts back every message whose score is older
than the visibility timeout. fleet keeps that timeout short (``fleet.app``) so a dead
worker's task comes back quickly, and this module keeps a *live* worker's messages out
of the sweep: a thread in the worker's main process re-scores, every third of the
timeout, the delivery tag of each message the worker holds (running, reserved, or
waiting for its ETA) with ``ZADD XX`` and the current time. ``XX`` only updates members
that exist, so a message acked in the meantime is never brought back.

When the worker dies (``kill -9``, lost machine) the thread dies with it, the scores
age, and the next sweep by any other worker (or the restarted one) redelivers.
RabbitMQ needs none of this: it redelivers when the consumer's connection closes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import Celery, signals
from celery.worker import state as worker_state

from fleet.obs.logs import get_logger
from fleet.settings import Settings
from fleet.tls import redis_client

__all__ = ["LeaseExtender", "extend", "held_delivery_tags", "install", "unacked_index_key"]

log = get_logger("fleet.lease")
_SNAPSHOT_TRIES = 5


def unacked_index_key(transport_options: dict[str, Any]) -> str:
    """The sorted set kombu scores deliveries in (its ``global_keyprefix`` included)."""
    prefix = str(transport_options.get("global_keyprefix") or "")
    return prefix + str(transport_options.get("unacked_index_key") or "unacked_index")


def extend(client: redis.Redis, key: str, tags: Iterable[str], now: float) -> int:
    """Re-score existing ``tags`` in ``key`` to ``now`` (ZADD XX CH); how many changed."""
    mapping = dict.fromkeys(tags, now)
    if not mapping:
        return 0
    return int(client.zadd(key, mapping, xx=True, ch=True))  # type: ignore[arg-type]


def held_delivery_tags() -> list[str]:
    """Delivery tags of the requests this worker holds: active, reserved and scheduled (ETA).

    Celery mutates these sets on its event loop thread; a snapshot taken from another
    thread may meet a change mid-copy and is simply taken again.
    """
    for _ in range(_SNAPSHOT_TRIES):
        try:
            requests = [
                *worker_state.active_requests,
                *worker_state.reserved_requests,
                *getattr(worker_state, "scheduled_requests", ()),  # not in the type stubs
            ]
            break
        except RuntimeError:  # "Set changed size during iteration"
            continue
    else:
        return []
    tags = {getattr(r.message, "delivery_tag", None) for r in requests}
    return sorted(str(t) for t in tags if t)


class LeaseExtender:
    """A daemon thread extending this worker's leases every ``interval_s`` seconds."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        interval_s: float,
        tags: Callable[[], list[str]] = held_delivery_tags,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Extend the tags ``tags()`` returns in ``key`` on ``client``; ``clock`` is wall time."""
        self._client, self._key, self._interval = client, key, interval_s
        self._tags, self._clock = tags, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> int:
        """One extension pass; Redis errors are logged and retried on the next tick."""
        try:
            return extend(self._client, self._key, self._tags(), self._clock())
        except redis.RedisError as exc:
            log.warning("lease.extend_failed", error=type(exc).__name__)
            return 0

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread (the leases then age and lapse after one visibility timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.tick()


def install(app: Celery, settings: Settings) -> LeaseExtender | None:
    """Extend leases from ``worker_ready`` to ``worker_shutdown`` (Redis brokers only)."""
    if not settings.is_redis:
        return None
    options = dict(app.conf.broker_transport_options or {})
    visibility = float(options.get("visibility_timeout") or settings.visibility_timeout_s)
    extender = LeaseExtender(
        redis_client(settings.broker_url, settings.tls, socket_timeout=5, socket_connect_timeout=5),
        unacked_index_key(options),
        interval_s=max(0.5, visibility / 3),
    )

    @signals.worker_ready.connect(weak=False)
    def _start(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        extender.start()
        log.info("lease.started", visibility_timeout_s=visibility, every_s=visibility / 3)

    @signals.worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        extender.stop()

    return extender

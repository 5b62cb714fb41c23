"""``fleet_api_concurrency``: the remote-control command that sets an API worker's in-flight limit.

API workers run Celery's threads pool, which cannot grow or shrink (``pool_grow`` and
``pool_shrink`` do nothing there), so the autoscaler's concurrency for an API pool is
carried out on the consumer instead: with late acks and ``worker_prefetch_multiplier=1``
a message stays unacked until its task returns, so the consumer's prefetch count is the
number of calls a worker has in flight. The command sets it to
``clamp(n, 1, threads in the pool)`` (Celery's ``Consumer.qos``, the same object
``pool_grow`` adjusts through ``_update_prefetch_count``) and both brokers honour it:
RabbitMQ with ``basic.qos``, kombu's Redis transport by not fetching while
``QoS.can_consume()`` is false.

The limit is remembered (``current_limit``) and reported where the autoscaler reads
workers: ``fleet_identity``'s ``concurrency`` and, on Redis, the worker registry
(``install`` wires a callback to the heartbeat). On a non-API worker the command
answers ``nok`` and changes nothing.

A worker reconnecting to its broker keeps the limit: ``install`` turns off Celery's
prefetch reduction on reconnect (which would restore the prefetch to the pool size) and
the limit is kept as the consumer's ``initial_prefetch_count``, which the consumer
reuses when it starts again. Until the tasks that were running across the reconnect
end, up to ``limit`` more calls may be in flight (the new channel does not know them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.control import control_command

from fleet.obs.logs import get_logger
from workers import identity

log = get_logger("fleet.worker")


_lock = threading.Lock()
_limit: int | None = None  # None: never set, the pool size applies
_listeners: list[Callable[[int], None]] = []


def clamp_limit(n: int, threads: int) -> int:
    """The in-flight limit for a requested ``n`` on a pool of ``threads`` (pure): 1..threads."""
    return max(1, min(n, max(1, threads)))


def current_limit(me: identity.WorkerIdentity) -> int:
    """The in-flight limit of this worker: the last one set, else its pool size."""
    with _lock:
        return me.concurrency if _limit is None else _limit


def install(app: Celery, on_change: Callable[[int], None] | None = None) -> None:
    """Prepare an API worker (before it starts): keep the limit across reconnects, report changes.

    ``on_change`` is called with each new limit (from the consumer's thread; it must not
    block: the heartbeat only takes note and writes on its own thread).
    """
    app.conf.worker_enable_prefetch_count_reduction = False
    if on_change is not None:
        _listeners.append(on_change)


def apply_limit(consumer: Any, n: int) -> int:  # noqa: ANN401 - Celery's Consumer
    """Set ``consumer``'s prefetch count to ``clamp(n, 1, threads)``; returns the limit set.

    Raises:
        RuntimeError: the consumer has not started consuming yet (no QoS object).

    """
    global _limit  # noqa: PLW0603 - one limit per worker process, like Celery's own state
    qos = consumer.qos
    if qos is None:
        raise RuntimeError("the consumer is not consuming yet")
    target = clamp_limit(n, int(consumer.pool.num_processes))
    with qos._mutex:  # noqa: SLF001 - kombu's QoS lock, as Celery's consumer takes it
        # ``value`` too: the event loop re-applies ``value`` whenever it differs from
        # what was last set, and reuses ``initial_prefetch_count`` after a reconnect.
        qos.value = consumer.initial_prefetch_count = target
        qos.set(target)
    with _lock:
        _limit = target
        listeners = list(_listeners)
    for listener in listeners:
        listener(target)
    return target


@control_command(args=[("n", int)], signature="<N>")
def fleet_api_concurrency(state: Any, n: int, **_: Any) -> dict[str, Any]:  # noqa: ANN401 - Celery's control API
    """Remote-control command: at most ``n`` calls in flight on this API worker (see module)."""
    me = identity.current()
    if me.api_provider is None:
        return {"error": f"{me.accelerator} is not an API worker"}  # Celery's ``nok``
    previous = current_limit(me)
    try:
        target = apply_limit(state.consumer, int(n))
    except RuntimeError as exc:
        return {"error": str(exc)}
    log.info(
        "worker.api_concurrency",
        provider=me.api_provider,
        requested=n,
        previous=previous,
        now=target,
    )
    return {"ok": {"concurrency": target, "previous": previous}}  # Celery's ``ok``

"""Graceful stop with a bounded grace: SIGTERM (or a spot notice) never waits hours.

Celery's own warm shutdown (SIGTERM) stops consuming at once and then waits for every
running task to finish, however long that takes; its cold shutdown (SIGQUIT) cancels
running tasks so their unacked messages go back to the queue, but only after sleeping
the whole ``worker_soft_shutdown_timeout``, and exits 1. fleet keeps Celery's warm path
and bounds it:

1. SIGTERM: Celery's warm shutdown begins (consumers cancelled, nothing new is taken)
   and its ``worker_shutting_down`` signal starts this module's drain thread.
2. The running tasks get a grace period (``FLEET_SHUTDOWN_GRACE_S``, default 60 s). A
   task that finishes inside it is acked as usual and is not run again; the worker
   exits as soon as nothing runs, not at the end of the grace.
3. At the end of the grace, whatever still runs is cancelled with the same call
   Celery's cold shutdown makes (``Consumer.cancel_active_requests``): the pool child is
   terminated and, with late acks, the message is never acked, so the broker gives it
   back to its queue (RabbitMQ requeues a closed channel's unacked messages; kombu's
   Redis transport restores them when the channel closes). The worker exits 0.

A spot notice (``workers.preemption``) goes through the same path with a shorter
budget: ``begin(budget_s, "preempted")`` then SIGTERM to this process (``stop_process``);
the earlier deadline wins.

Timeline per stop, with ``g`` the budget::

    t0 SIGTERM ─ consumers cancelled ─ tasks run ─┬─ all done before t0+g: exit 0, all acked
                                                  └─ t0+g: cancel the rest (unacked, requeued)
                                                           ─ exit 0

The decisions (``drain_budget``, ``stop_decision``) are pure; ``GracefulStop`` is the thin
thread around them, with its clock injected.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from celery import signals
from celery.worker import state as worker_state

from fleet.obs.logs import get_logger

log = get_logger("fleet.worker")

ENV_GRACE = "FLEET_SHUTDOWN_GRACE_S"
DEFAULT_GRACE_S = 60.0
POLL_S = 0.2


def grace_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``FLEET_SHUTDOWN_GRACE_S`` in seconds (default 60).

    Raises:
        ValueError: the value is not a number >= 0.

    """
    raw = (os.environ if environ is None else environ).get(ENV_GRACE, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    value = float(raw)
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{ENV_GRACE} must be a number >= 0, got {raw!r}")
    return value


def drain_budget(
    grace_s: float, now: float, deadline: float | None = None, margin_s: float = 0.0
) -> float:
    """Seconds the running tasks may still use: ``min(grace, deadline - now - margin)``, >= 0.

    ``deadline`` (same clock as ``now``) is when the machine goes away, from a spot notice;
    ``None`` means only the grace applies (a plain SIGTERM).
    """
    if deadline is None:
        return max(0.0, grace_s)
    return max(0.0, min(grace_s, deadline - now - margin_s))


class Step(Enum):
    """What the drain thread does next."""

    WAIT = "wait"  # tasks still run and there is budget left
    DONE = "done"  # nothing runs: Celery's warm shutdown completes by itself
    REQUEUE = "requeue"  # the budget is spent: cancel what runs, unacked


def stop_decision(active: int, now: float, until: float) -> Step:
    """The drain thread's next step for ``active`` running tasks at ``now`` (pure)."""
    if active == 0:
        return Step.DONE
    if now >= until:
        return Step.REQUEUE
    return Step.WAIT


class _Consumer(Protocol):
    def cancel_active_requests(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Stopped:
    """How a drain ended: why, the budget it had, and the tasks sent back to their queue."""

    reason: str
    budget_s: float
    requeued: tuple[str, ...]


class GracefulStop:
    """The drain thread for one worker process (its main process, never a pool child).

    ``begin`` is idempotent: the first call starts the thread; a later call may only
    bring the deadline closer (a spot notice arriving after a SIGTERM). ``on_stopped``
    is called once with the outcome (for logs and tests).
    """

    def __init__(
        self,
        grace_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        active_ids: Callable[[], Collection[str]] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        """Prepare; nothing runs until ``attach`` and ``begin``."""
        self.grace_s = grace_s
        self._clock = clock
        self._active_ids = active_ids or _celery_active_ids
        self._poll_s = poll_s
        self._consumer: _Consumer | None = None
        self._lock = threading.Lock()
        self._until: float | None = None
        self._reason = ""
        self._thread: threading.Thread | None = None
        self._budget = 0.0
        self.outcome: Stopped | None = None
        self.finished = threading.Event()

    def attach(self, consumer: _Consumer) -> None:
        """Bind to the Celery consumer whose running requests a drain may cancel."""
        self._consumer = consumer

    def begin(self, budget_s: float | None = None, reason: str = "sigterm") -> None:
        """Start (or shorten) the drain: running tasks get ``budget_s`` (default: the grace).

        Safe to call from a signal handler: it only sets the deadline and starts the thread
        (which does the logging).
        """
        budget = max(0.0, self.grace_s if budget_s is None else budget_s)
        until = self._clock() + budget
        with self._lock:
            if self._until is None or until < self._until:
                self._until, self._budget = until, budget
            if self._thread is not None:
                return
            self._reason = reason
            self._thread = threading.Thread(target=self._run, name="fleet-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = self._clock()
        log.info("worker.draining", reason=self._reason, budget_s=round(self._budget, 3))
        while True:
            with self._lock:
                until = self._until if self._until is not None else started
            step = stop_decision(len(self._active_ids()), self._clock(), until)
            if step is Step.DONE:
                self._finish(())
                return
            if step is Step.REQUEUE:
                ids = tuple(sorted(self._active_ids()))
                if self._consumer is not None:
                    # Celery's own cold-shutdown step: terminate the pool children that run
                    # unacked late-ack requests; the broker redelivers those messages.
                    try:
                        self._consumer.cancel_active_requests()
                    except NotImplementedError:
                        # threads/solo pools cannot stop a running task: it finishes.
                        log.warning("worker.requeue_unsupported", tasks=list(ids))
                        ids = ()
                self._finish(ids)
                return
            time.sleep(self._poll_s)

    def _finish(self, requeued: tuple[str, ...]) -> None:
        self.outcome = Stopped(self._reason, round(self._budget, 3), requeued)
        if requeued:
            log.warning(
                "worker.requeued",
                reason=self._reason,
                tasks=list(requeued),
                note="grace spent: running tasks cancelled unacked, back on their queues",
            )
        else:
            log.info("worker.drained", reason=self._reason)
        self.finished.set()


def _celery_active_ids() -> Collection[str]:
    return [r.id for r in worker_state.active_requests]


def stop_process() -> None:
    """Send SIGTERM to this process: Celery's warm shutdown, bounded by ``GracefulStop``."""
    os.kill(os.getpid(), signal.SIGTERM)


def install(grace_s: float | None = None) -> GracefulStop:
    """Wire a ``GracefulStop`` into this worker process's Celery signals and return it.

    Call in the worker's main process before ``worker_main``; the receivers run in the
    main process only (``worker_shutting_down`` is sent from the MainProcess handler).
    """
    stop = GracefulStop(grace_from_env() if grace_s is None else grace_s)

    @signals.worker_ready.connect(weak=False)
    def _attach(sender: Any = None, **_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        stop.attach(sender)

    @signals.worker_shutting_down.connect(weak=False)
    def _begin(how: str = "Warm", **_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        if how == "Warm":
            stop.begin()

    return stop

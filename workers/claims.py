"""Keeping claims alive: one refresher thread per process, not one thread per task.

A delivery that wins a task's claim (``workers.once``) holds it for ``ttl_s`` seconds;
while its handler runs the claim must be extended, or another delivery could take it.
``ClaimRefresher`` is a single daemon thread per process that refreshes every claim the
process holds every third of the TTL (one store call per claim). ``ClaimKeeper`` is the
per-task part: entering registers the claim, leaving unregisters and releases it, and
``finish`` records the result and releases in one store step. Neither starts a thread
or talks to the store on entry, so a task that takes milliseconds pays nothing for it.

When the process dies, its refresher dies with it and the claims lapse after ``ttl_s``:
that is how a killed worker's task becomes runnable again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import cache
from typing import Any, Self

import redis

from fleet.execution import ExecutionStore, StatusRecord
from fleet.obs.logs import get_logger

__all__ = ["ClaimKeeper", "ClaimRefresher", "process_refresher"]

log = get_logger("fleet.once")


class ClaimRefresher:
    """One thread per process keeping every claim the process holds alive.

    Every ``interval_s`` (a third of the claim TTL) it refreshes each registered claim
    to its TTL; a claim found taken by someone else (it lapsed: the process stalled
    longer than the TTL) is logged as ``task.claim_lost``. The thread starts with the
    first ``hold`` and is a daemon: it dies with the process, and so do the claims'
    refreshes, which is how a dead holder's claim lapses.

    The registry is a dict guarded by a lock; the refreshes run outside the lock, so
    ``hold`` and ``drop`` on the task's thread never wait for the store.
    """

    def __init__(self, interval_s: float) -> None:
        """Refresh every ``interval_s`` seconds once started."""
        self._interval = interval_s
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], tuple[ExecutionStore, float]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def hold(self, store: ExecutionStore, task_id: str, holder: str, ttl_s: float) -> None:
        """Keep ``holder``'s claim on ``task_id`` in ``store`` alive until ``drop``."""
        with self._lock:
            self._held[task_id, holder] = (store, ttl_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fleet-claims", daemon=True)
                self._thread.start()

    def drop(self, task_id: str, holder: str) -> None:
        """Stop refreshing that claim (releasing it is the caller's business)."""
        with self._lock:
            self._held.pop((task_id, holder), None)

    def held(self) -> list[tuple[str, str]]:
        """The ``(task_id, holder)`` pairs registered now."""
        with self._lock:
            return list(self._held)

    def tick(self) -> int:
        """Refresh every registered claim once; returns how many were still held.

        A store error is logged (``once.refresh_failed``) and the claim stays
        registered: the next tick tries again while the TTL lasts.
        """
        with self._lock:
            claims = list(self._held.items())
        kept = 0
        for (task_id, holder), (store, ttl_s) in claims:
            try:
                if store.refresh(task_id, holder, ttl_s):
                    kept += 1
                elif self._still_held(task_id, holder):  # not merely finished meanwhile
                    log.warning("task.claim_lost", detail="another delivery may run it too")
            except redis.RedisError as err:
                log.warning("once.refresh_failed", error=type(err).__name__)
        return kept

    def stop(self) -> None:
        """Stop the thread (tests; a worker's thread simply dies with its process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _still_held(self, task_id: str, holder: str) -> bool:
        with self._lock:
            return (task_id, holder) in self._held

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.tick()


def process_refresher(ttl_s: float) -> ClaimRefresher:
    """The calling process's refresher for claims of ``ttl_s`` (a forked child gets its own)."""
    return _refresher(os.getpid(), ttl_s)


@cache
def _refresher(pid: int, ttl_s: float) -> ClaimRefresher:
    del pid  # only part of the cache key: a fork must not inherit the parent's (dead) thread
    return ClaimRefresher(ttl_s / 3)


class ClaimKeeper:
    """Keep a claim alive while a block runs, then release it (unless ``finish`` did).

    The claim is registered with the process's ``ClaimRefresher`` (or ``refresher``), so
    entering and leaving the block costs no thread and no round trip; leaving it costs
    one release, which ``finish`` and ``release`` make unnecessary.
    """

    def __init__(
        self,
        store: ExecutionStore,
        task_id: str,
        holder: str,
        ttl_s: float,
        refresher: ClaimRefresher | None = None,
    ) -> None:
        """Keep ``holder``'s claim on ``task_id`` alive (``ttl_s`` at each refresh)."""
        self.store = store
        self._task_id, self._holder, self._ttl = task_id, holder, ttl_s
        self._refresher = refresher or process_refresher(ttl_s)
        self._released = False

    def __enter__(self) -> Self:
        """Start refreshing."""
        self._refresher.hold(self.store, self._task_id, self._holder, self._ttl)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop refreshing and release the claim (a no-op after ``finish`` or ``release``)."""
        self._refresher.drop(self._task_id, self._holder)
        if not self._released:
            self.release()

    def finish(self, result: dict[str, Any], status: StatusRecord | None = None) -> bool:
        """Record ``result`` as the task's one result and release the claim (one store step).

        ``status`` (Celery's SUCCESS record) is written in the same step. Returns whether
        the step ran. A store error is logged, not raised: the result still goes back to
        the caller, and at worst a redelivery runs the task again.
        """
        self._refresher.drop(self._task_id, self._holder)
        self._released = True
        try:
            self.store.finish(self._task_id, self._holder, result, status)
        except redis.RedisError as err:
            log.warning("once.finish_failed", error=type(err).__name__)
            return False
        return True

    def begin_finish(
        self, result: dict[str, Any], status: StatusRecord | None = None
    ) -> Callable[[], bool]:
        """``finish`` without waiting: sent now; the returned function waits and says whether it ran.

        Errors are logged, as for ``finish``. Call the returned function exactly once.
        """
        self._refresher.drop(self._task_id, self._holder)
        self._released = True
        try:
            wait = self.store.begin_finish(self._task_id, self._holder, result, status)
        except redis.RedisError as err:
            log.warning("once.finish_failed", error=type(err).__name__)
            return lambda: False

        def done() -> bool:
            try:
                wait()
            except redis.RedisError as err:
                log.warning("once.finish_failed", error=type(err).__name__)
                return False
            return True

        return done

    def release(self) -> None:
        """Release the claim now (a retry may then claim at once); errors are logged."""
        self._refresher.drop(self._task_id, self._holder)
        self._released = True
        try:
            self.store.release(self._task_id, self._holder)
        except redis.RedisError as err:
            log.warning("once.release_failed", error=type(err).__name__)

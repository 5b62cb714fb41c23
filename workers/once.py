"""Run once, result once; poison tasks end in the dead-letter queue.

``fleet.run`` calls ``guarded(...)`` around its body. With a state store configured
(``fleet.execution.state_url``) every delivery of a task id goes through ``admit``:

1. the task already completed (a ``done`` record): the delivery does **not** run the
   handler; it returns the recorded result. The result store then holds that one
   result (Redis keeps a SUCCESS; the RabbitMQ rpc reply carries the same value). This
   was chosen over ``Ignore`` because it also covers a worker killed between recording
   the result and storing it: the redelivery still delivers it;
2. another live delivery holds the claim: the duplicate is not run (log
   ``task.duplicate``); it is retried after the claim's remaining TTL, so it returns
   the result once the holder finished, or runs if the holder died (its claim lapses);
3. it was dead-lettered already (a redelivery after the entry was published): it fails
   again with the same message, without a second entry;
4. otherwise the delivery claims it (SET NX, TTL ``FLEET_CLAIM_TTL_S``, refreshed every
   third of it by a thread while the handler runs) and counts one attempt. Past
   ``FLEET_MAX_ATTEMPTS`` attempts it is dead-lettered instead of run: that is how a
   task that kills its worker process on every delivery ends (reason ``worker-lost``).

A handler raising an unexpected exception is retried (Celery ``retry``) after
``FLEET_RETRY_BACKOFF_S`` x 2^(attempt-1) seconds (capped at 15 minutes) until the
last attempt, then dead-lettered (reason ``failed``). A refused task (invalid spec,
does not fit, bad input) is dead-lettered at once (reason ``refused``). The client
sees a FAILURE whose message names the dead-letter queue (``DeadLetteredError``).

Without a state store the guard is off (said once in a log line): refused and failing
tasks still end in the dead-letter queue (attempts counted by Celery's retries), but a
task that kills its worker is redelivered without limit and a redelivery runs again.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any, NoReturn, Self

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from fleet.dlq import DeadLetter, DeadLetteredError, dead_letter_queue, publish, redact
from fleet.execution import ExecutionStore, RedisExecutionStore, state_url
from fleet.obs.logs import get_logger
from fleet.settings import Settings

__all__ = ["Admission", "ClaimKeeper", "OncePolicy", "Verdict", "admit", "backoff_s", "guarded"]

log = get_logger("fleet.once")
UNLIMITED_RETRIES = sys.maxsize  # attempts are counted by fleet, not by Celery's max_retries
BACKOFF_CAP_S = 900.0
DEFAULT_CLAIM_TTL_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 30.0
_CELERY_FLOW = (Retry, Ignore, Reject)


@dataclass(frozen=True, slots=True)
class OncePolicy:
    """Knobs, from ``FLEET_CLAIM_TTL_S`` (60), ``FLEET_MAX_ATTEMPTS`` (3), ``FLEET_RETRY_BACKOFF_S`` (30)."""

    claim_ttl_s: float = DEFAULT_CLAIM_TTL_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OncePolicy:
        """Read the variables (``env`` defaults to ``os.environ``).

        Raises:
            ValueError: a value is not a positive number.

        """
        env = os.environ if env is None else env
        policy = cls(
            claim_ttl_s=float(env.get("FLEET_CLAIM_TTL_S") or DEFAULT_CLAIM_TTL_S),
            max_attempts=int(env.get("FLEET_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS),
            backoff_s=float(env.get("FLEET_RETRY_BACKOFF_S") or DEFAULT_BACKOFF_S),
        )
        if policy.claim_ttl_s <= 0 or policy.max_attempts < 1 or policy.backoff_s < 0:
            raise ValueError(f"invalid retry/claim settings: {policy}")
        return policy


def backoff_s(policy: OncePolicy, attempt: int) -> float:
    """Seconds before retrying after failed attempt number ``attempt`` (1-based)."""
    return float(min(BACKOFF_CAP_S, policy.backoff_s * 2 ** max(0, attempt - 1)))


class Verdict(StrEnum):
    """What a delivery does (see the module docstring)."""

    RUN = "run"
    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead-letter"
    ALREADY_DEAD = "already-dead"


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict and what goes with it.

    ``attempt``: this attempt's number (RUN) or the attempts made (DEAD_LETTER);
    ``result``: the recorded result (COMPLETED); ``wait_s``: when to look again
    (DUPLICATE); ``entry``: the dead-letter entry (ALREADY_DEAD); ``last_error``: the
    last recorded error (DEAD_LETTER).
    """

    verdict: Verdict
    attempt: int = 0
    result: dict[str, Any] | None = None
    wait_s: float = 0.0
    entry: dict[str, Any] | None = None
    last_error: str | None = None


def admit(
    store: ExecutionStore, task_id: str, holder: str, *, ttl_s: float, max_attempts: int
) -> Admission:
    """Decide what this delivery of ``task_id`` does; on RUN and DEAD_LETTER ``holder`` holds the claim.

    The done check is repeated after the claim is won: a holder records its result and
    then releases, so a claim won just after that release still sees the result.
    """
    if (done := store.done(task_id)) is not None:
        return Admission(Verdict.COMPLETED, result=done)
    if not store.claim(task_id, holder, ttl_s):
        left = store.claim_ttl_s(task_id)
        return Admission(Verdict.DUPLICATE, wait_s=ttl_s if left is None else left)
    if (done := store.done(task_id)) is not None:
        store.release(task_id, holder)
        return Admission(Verdict.COMPLETED, result=done)
    if (dead := store.dead(task_id)) is not None:
        store.release(task_id, holder)
        return Admission(Verdict.ALREADY_DEAD, entry=dead)
    attempt = store.count_attempt(task_id)
    if attempt > max_attempts:
        return Admission(
            Verdict.DEAD_LETTER, attempt=attempt - 1, last_error=store.last_error(task_id)
        )
    return Admission(Verdict.RUN, attempt=attempt)


class ClaimKeeper:
    """Refresh a claim every third of its TTL while a block runs; release it on exit."""

    def __init__(self, store: ExecutionStore, task_id: str, holder: str, ttl_s: float) -> None:
        """Keep ``holder``'s claim on ``task_id`` alive (``ttl_s`` at each refresh)."""
        self._store, self._task_id, self._holder, self._ttl = store, task_id, holder, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-claim", daemon=True)

    def __enter__(self) -> Self:
        """Start refreshing."""
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop refreshing and release the claim (a no-op after ``finish``)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._store.release(self._task_id, self._holder)
        except redis.RedisError as err:
            log.warning("once.release_failed", error=type(err).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                if not self._store.refresh(self._task_id, self._holder, self._ttl):
                    log.warning("task.claim_lost", detail="another delivery may run it too")
            except redis.RedisError as err:
                log.warning("once.refresh_failed", error=type(err).__name__)


@cache
def _policy() -> OncePolicy:
    return OncePolicy.from_env()


@cache
def _store() -> ExecutionStore | None:
    settings = Settings.from_env()
    url = state_url(os.environ, settings.broker_url)
    if url is None:
        log.warning(
            "once.guard_off",
            detail="no state store (FLEET_STATE_URL, a Redis broker or FLEET_LOCK_URL): "
            "redeliveries may run a task again and worker-killing tasks are not counted",
        )
        return None
    return RedisExecutionStore.from_url(url, settings.namespace, settings.tls)


@dataclass(frozen=True, slots=True)
class _Job:
    task: Task[Any, Any]
    task_id: str
    spec: dict[str, Any]
    placement: dict[str, Any] | None

    @property
    def namespace(self) -> str:
        return str(getattr(self.task.app.conf, "fleet_namespace", "") or "")

    def dead_letter(
        self, store: ExecutionStore | None, reason: str, error: str, attempts: int
    ) -> NoReturn:
        """Publish the entry, remember it, and fail the task naming it."""
        entry = DeadLetter.build(
            self.task_id,
            self.spec,
            self.placement,
            (self.task.request.delivery_info or {}).get("routing_key"),
            reason,
            error,
            attempts,
            now=time.time(),
            worker=self.task.request.hostname,
        )
        # Publish first: a lost mark then costs a duplicate entry, never a lost one.
        publish(self.task.app, entry, self.namespace)
        if store is not None:
            store.mark_dead(self.task_id, entry.to_dict())
        dlq = dead_letter_queue(self.namespace)
        log.error("task.dead_lettered", reason=reason, attempts=attempts, queue=dlq)
        raise DeadLetteredError(entry.message(dlq))


def guarded(
    task: Task[Any, Any],
    spec: dict[str, Any],
    placement: dict[str, Any] | None,
    execute: Callable[[], dict[str, Any]],
    *,
    refused: tuple[type[Exception], ...] = (),
) -> dict[str, Any]:
    """Run ``execute`` at most once per task id to completion; see the module docstring.

    ``refused`` are the exception types that mean "never retry" (dead-lettered at once).

    Raises:
        DeadLetteredError: the task was dead-lettered (now or before).
        celery.exceptions.Retry: retried later (failure with attempts left, duplicate,
            state store unreachable).

    """
    job = _Job(task, str(task.request.id), spec, placement)
    policy, store = _policy(), _store()
    if store is None:
        return _attempt(job, None, "", int(task.request.retries or 0) + 1, execute, refused)
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        store.count_delivery(job.task_id)
        adm = admit(
            store,
            job.task_id,
            holder,
            ttl_s=policy.claim_ttl_s,
            max_attempts=policy.max_attempts,
        )
    except redis.RedisError as err:
        log.warning("once.store_unavailable", error=type(err).__name__, retry_in_s=policy.backoff_s)
        raise task.retry(countdown=policy.backoff_s, max_retries=UNLIMITED_RETRIES) from None
    if adm.verdict is Verdict.COMPLETED and adm.result is not None:
        log.info("task.already_done", detail="returning the recorded result; not run again")
        return adm.result
    if adm.verdict is Verdict.DUPLICATE:
        log.info("task.duplicate", detail="another delivery holds the claim", retry_in_s=adm.wait_s)
        raise task.retry(countdown=adm.wait_s + 0.25, max_retries=UNLIMITED_RETRIES)
    if adm.verdict is Verdict.ALREADY_DEAD and adm.entry is not None:
        raise DeadLetteredError(
            DeadLetter.from_dict(adm.entry).message(dead_letter_queue(job.namespace))
        )
    if adm.verdict is Verdict.DEAD_LETTER:
        with ClaimKeeper(store, job.task_id, holder, policy.claim_ttl_s):
            if adm.last_error:
                job.dead_letter(store, "failed", adm.last_error, adm.attempt)
            job.dead_letter(
                store,
                "worker-lost",
                f"the worker process died while running it, {adm.attempt} time(s)",
                adm.attempt,
            )
    with ClaimKeeper(store, job.task_id, holder, policy.claim_ttl_s):
        result = _attempt(job, store, holder, adm.attempt, execute, refused)
        try:
            store.finish(job.task_id, holder, result)
        except redis.RedisError as err:  # the result still goes back; a redelivery could rerun it
            log.warning("once.finish_failed", error=type(err).__name__)
        return result


def _attempt(
    job: _Job,
    store: ExecutionStore | None,
    holder: str,
    attempt: int,
    execute: Callable[[], dict[str, Any]],
    refused: tuple[type[Exception], ...],
) -> dict[str, Any]:
    """Run the body once: refused -> dead letter; other errors -> retry, or dead letter at the limit."""
    policy = _policy()
    try:
        return execute()
    except _CELERY_FLOW:
        raise
    except refused as exc:
        job.dead_letter(store, "refused", str(exc), attempt)
    except Exception as exc:  # noqa: BLE001 - any unexpected error is a failed attempt
        error = redact(f"{type(exc).__name__}: {exc}")
        if store is not None:
            store.record_error(job.task_id, error)
        if attempt >= policy.max_attempts:
            job.dead_letter(store, "failed", error, attempt)
        wait = backoff_s(policy, attempt)
        log.warning("task.retrying", attempt=attempt, error=error, retry_in_s=wait)
        if store is not None:
            store.release(job.task_id, holder)  # the retry may claim at once
        raise job.task.retry(countdown=wait, max_retries=UNLIMITED_RETRIES) from None

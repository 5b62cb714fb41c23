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
   third of it while the handler runs) and counts one attempt. Past
   ``FLEET_MAX_ATTEMPTS`` attempts it is dead-lettered instead of run: that is how a
   task that kills its worker process on every delivery ends (reason ``worker-lost``).

A handler raising an unexpected exception is retried (Celery ``retry``) after
``FLEET_RETRY_BACKOFF_S`` x 2^(attempt-1) seconds (capped at 15 minutes) until the
last attempt, then dead-lettered (reason ``failed``). A refused task (invalid spec,
does not fit, bad input) is dead-lettered at once (reason ``refused``). The client
sees a FAILURE whose message names the dead-letter queue (``DeadLetteredError``).

Cost on the hot path: the store's ``try_claim`` does all of ``admit``'s reading and
writing in one atomic step (one Lua script on Redis), ``decide`` is the pure decision
table over what it saw, and ``finish`` records the result and releases the claim in one
more: two round trips per task. For ``fleet.run`` (``status=True``) the guard also owns
Celery's STARTED and SUCCESS records: on a Redis result backend in the store's own
database they are written inside those two steps (``workers.records``), so Celery's four
round trips for them disappear. Claims are kept alive by one ``ClaimRefresher`` thread
per process, started on first use, which refreshes every claim the process holds every
third of the TTL; ``ClaimKeeper`` only registers and unregisters a claim there.

Without a state store the guard is off (said once in a log line): refused and failing
tasks still end in the dead-letter queue (attempts counted by Celery's retries), but a
task that kills its worker is redelivered without limit and a redelivery runs again.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from fleet.dlq import DeadLetter, DeadLetteredError, dead_letter_queue, publish, redact
from fleet.execution import ExecutionStore, RedisExecutionStore, state_url
from fleet.obs.logs import get_logger
from fleet.settings import Settings
from workers import records
from workers.admission import Admission, OncePolicy, Verdict, admit, backoff_s, decide
from workers.claims import ClaimKeeper, ClaimRefresher, process_refresher

__all__ = [
    "Admission",
    "Admitted",
    "ClaimKeeper",
    "ClaimRefresher",
    "Job",
    "OncePolicy",
    "Outcome",
    "Requeue",
    "Verdict",
    "abandon",
    "admit",
    "admit_jobs",
    "backoff_s",
    "decide",
    "guard",
    "guarded",
]

log = get_logger("fleet.once")
UNLIMITED_RETRIES = sys.maxsize  # attempts are counted by fleet, not by Celery's max_retries
_CELERY_FLOW = (Retry, Ignore, Reject)
_HOST = socket.gethostname()


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


@cache
def _records(backend: object) -> records.Records | None:
    """How this process writes Celery's records in the store's steps (None: it cannot)."""
    store = _store()
    client = store.client if isinstance(store, RedisExecutionStore) else None
    return records.for_backend(backend, client)


class Requeue(Exception):  # noqa: N818 - an instruction, like Celery's Retry
    """A packed task to publish again on its own (``workers.pack``): where ``fleet.run`` retries.

    ``countdown``: seconds to wait; ``attempt``: the attempts made; ``timed_out``: the
    packed message's soft time limit ended the attempt (the rest of the pack is requeued too).
    """

    def __init__(self, countdown: float, attempt: int, *, timed_out: bool = False) -> None:
        """Requeue after ``countdown`` seconds."""
        super().__init__(f"requeue in {countdown:g} s after attempt {attempt}")
        self.countdown, self.attempt, self.timed_out = countdown, attempt, timed_out


@dataclass(frozen=True, slots=True)
class Outcome:
    """A completed task's result.

    ``recorded``: its SUCCESS record goes with the finish step; ``wait`` (``finish_later``
    only): waits for that step, True when it ran. Without ``wait`` the step has run already.
    """

    result: dict[str, Any]
    recorded: bool = False
    wait: Callable[[], bool] | None = None

    def written(self) -> bool:
        """Wait for the finish step, if still going, and say whether SUCCESS was written with it."""
        ran = True if self.wait is None else self.wait()
        return self.recorded and ran


@dataclass(frozen=True, slots=True)
class Job:
    """One fleet task under the guard: the running Celery task, its fleet task id and spec.

    ``packed``: one of several specs in one message (``workers.pack``), whose task id is not
    the Celery message's: "look again later" raises ``Requeue`` instead of Celery's retry,
    and its records are written under ``task_id`` with no Celery request behind them.
    """

    task: Task[Any, Any]
    task_id: str
    spec: dict[str, Any]
    placement: dict[str, Any] | None
    packed: bool = False

    @property
    def namespace(self) -> str:
        """The fleet's queue namespace (the dead-letter queue's prefix)."""
        return str(getattr(self.task.app.conf, "fleet_namespace", "") or "")

    @property
    def request(self) -> Any:  # noqa: ANN401 - Celery's request Context
        """The Celery request the task's records belong to (None for a packed task)."""
        return None if self.packed else self.task.request

    def retry(self, countdown: float, attempt: int, *, timed_out: bool = False) -> Exception:
        """What to raise to run the task again after ``countdown`` seconds."""
        if self.packed:
            return Requeue(countdown, attempt, timed_out=timed_out)
        return self.task.retry(countdown=countdown, max_retries=UNLIMITED_RETRIES)

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
    status: bool = False,
) -> dict[str, Any]:
    """Run ``execute`` at most once per task id to completion; see the module docstring.

    ``refused`` are the exception types that mean "never retry" (dead-lettered at once).
    ``status``: the task is registered with ``track_started=False`` and the guard writes
    its STARTED record (and, where ``workers.records`` can, its SUCCESS record: then
    Celery is told not to) itself.

    Raises:
        DeadLetteredError: the task was dead-lettered (now or before).
        celery.exceptions.Retry: retried later (failure with attempts left, duplicate,
            state store unreachable).

    """
    job = Job(task, str(task.request.id), spec, placement)
    outcome = guard(job, execute, refused=refused, status=status)
    if outcome.recorded:
        records.skip_celery_success(task)
    return outcome.result


@dataclass(frozen=True, slots=True)
class Admitted:
    """A job admitted ahead of its guard (``admit_jobs``): the verdict and the claim's holder."""

    admission: Admission
    holder: str


def _holder() -> str:
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def admit_jobs(jobs: Sequence[Job], *, status: bool = False) -> list[Admitted] | None:
    """Admit several jobs (a pack) in one store step; the claims of those to run are kept alive.

    Each job then goes through ``guard(job, ..., admitted=...)``; a job that never gets
    there must be ``abandon``-ed. ``status`` as for ``guarded`` (STARTED written with each
    claim). Returns None without a store or when it failed: each guard then admits its own.
    """
    policy, store = _policy(), _store()
    if store is None or not jobs:
        return None
    writer = _records(jobs[0].task.backend) if status else None
    holder = _holder()
    claims = [
        (j.task_id, None if writer is None else writer.started(j.task_id, j.task.request.hostname))
        for j in jobs
    ]
    try:
        seen = store.try_claim_many(claims, holder, policy.claim_ttl_s, policy.max_attempts)
    except redis.RedisError as err:
        log.warning("once.store_unavailable", error=type(err).__name__, jobs=len(jobs))
        return None
    refresher = process_refresher(policy.claim_ttl_s)
    out = []
    for job, outcome in zip(jobs, seen, strict=True):
        adm = decide(outcome, ttl_s=policy.claim_ttl_s, max_attempts=policy.max_attempts)
        if adm.verdict in (Verdict.RUN, Verdict.DEAD_LETTER):
            refresher.hold(store, job.task_id, holder, policy.claim_ttl_s)
        out.append(Admitted(adm, holder))
    return out


def abandon(job: Job, admitted: Admitted) -> None:
    """Give back the claim ``admit_jobs`` took for a job that will not be guarded now."""
    store = _store()
    if store is not None and admitted.admission.verdict in (Verdict.RUN, Verdict.DEAD_LETTER):
        ClaimKeeper(store, job.task_id, admitted.holder, _policy().claim_ttl_s).release()


def guard(
    job: Job,
    execute: Callable[[], dict[str, Any]],
    *,
    refused: tuple[type[Exception], ...] = (),
    status: bool = False,
    admitted: Admitted | None = None,
    finish_later: bool = False,
) -> Outcome:
    """``guarded`` for one ``Job``; the outcome says whether SUCCESS was recorded with it.

    ``admitted``: the job was admitted already (``admit_jobs``), so the guard takes that
    verdict and claim instead of a store step of its own. ``finish_later``: the finish
    step is sent but not waited for (``Outcome.wait``): the caller overlaps it with other
    work. The step is sent the moment the body returns, either way.

    Raises:
        DeadLetteredError: the task was dead-lettered (now or before).
        celery.exceptions.Retry, Requeue: run it again later (``Job.retry``).

    """
    task = job.task
    policy, store = _policy(), _store()
    if store is None:
        if status:
            records.write_started(task.backend, job.task_id, task.request.hostname, job.request)
        first = 1 if job.packed else int(task.request.retries or 0) + 1
        return Outcome(_attempt(job, None, first, execute, refused))
    writer = _records(task.backend) if status else None
    if admitted is not None:
        adm, holder = admitted.admission, admitted.holder
    else:
        holder = _holder()
        try:
            adm = admit(
                store,
                job.task_id,
                holder,
                ttl_s=policy.claim_ttl_s,
                max_attempts=policy.max_attempts,
                started=None
                if writer is None
                else writer.started(job.task_id, task.request.hostname, job.request),
            )
        except redis.RedisError as err:
            log.warning(
                "once.store_unavailable", error=type(err).__name__, retry_in_s=policy.backoff_s
            )
            raise job.retry(policy.backoff_s, 0) from None
    done = _unless_run(job, store, holder, adm, policy)
    if done is not None:
        return Outcome(done)
    if status and writer is None:
        records.write_started(task.backend, job.task_id, task.request.hostname, job.request)
    with ClaimKeeper(store, job.task_id, holder, policy.claim_ttl_s) as keeper:
        result = _attempt(job, keeper, adm.attempt, execute, refused)
        success = None if writer is None else writer.success(job.task_id, result, job.request)
        if finish_later:
            return Outcome(result, success is not None, keeper.begin_finish(result, success))
        ran = keeper.finish(result, success)
        return Outcome(result, recorded=success is not None and ran)


def _unless_run(
    job: Job, store: ExecutionStore, holder: str, adm: Admission, policy: OncePolicy
) -> dict[str, Any] | None:
    """Carry out a verdict that does not run the body: the recorded result, or a raise.

    Returns None on RUN.

    Raises:
        DeadLetteredError: dead-lettered now or before.
        celery.exceptions.Retry: a duplicate, to look again once the claim may be free.

    """
    if adm.verdict is Verdict.COMPLETED and adm.result is not None:
        log.info("task.already_done", detail="returning the recorded result; not run again")
        return adm.result
    if adm.verdict is Verdict.DUPLICATE:
        log.info("task.duplicate", detail="another delivery holds the claim", retry_in_s=adm.wait_s)
        raise job.retry(adm.wait_s + 0.25, adm.attempt)
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
    return None


def _attempt(
    job: Job,
    keeper: ClaimKeeper | None,
    attempt: int,
    execute: Callable[[], dict[str, Any]],
    refused: tuple[type[Exception], ...],
) -> dict[str, Any]:
    """Run the body once: refused -> dead letter; other errors -> retry, or dead letter at the limit."""
    policy = _policy()
    store = None if keeper is None else keeper.store
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
        if keeper is not None:
            keeper.release()  # the retry may claim at once
        timed_out = isinstance(exc, SoftTimeLimitExceeded)
        raise job.retry(wait, attempt, timed_out=timed_out) from None

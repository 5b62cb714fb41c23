"""``fleet.run_pack``: several small specs in one message, each still its own fleet task.

A message costs a worker the same whatever it carries: the fetch, Celery's unacked
bookkeeping and ack, a request and its trace. For tasks of a few milliseconds that is most
of the time, so ``Fleet.submit_many(specs, pack=N)`` may put up to ``N`` specs of one
placement in one message (body ``[[specs], {"placement": ..., "ids": [...]}, ...]``), and
this task runs them one after another in one pool process. Each spec keeps everything a
``fleet.run`` task has, under its own task id: the at-most-once guard (claim, attempts,
dead-lettering, a redelivered pack returning recorded results instead of running them
again), its STARTED and SUCCESS records (the ``TaskHandle`` of that id sees them), its log
lines and metrics. The whole pack is admitted in one store step (every spec's claim, and
its STARTED record, from the start of the pack); each spec's finish step is sent the
moment it completes, and the replies are read once the pack has run.

Where ``fleet.run`` would raise Celery's ``Retry`` (a failed attempt with attempts left, a
duplicate delivery, the state store unreachable), a packed spec is published again on its
own, as a ``fleet.run`` message with the same task id, queue, priority and time limits and
the same countdown; after the pack's soft time limit the specs not yet run are published
that way at once. A dead-lettered spec gets its FAILURE record (``DeadLetteredError``). The
pack's own message is acked only when every spec has completed, failed or been published
again; if publishing again fails, or anything unexpected fails, the whole pack is rejected
back to its queue, and its redelivery skips what completed.

Packs are for short tasks: they share one pool process and one set of time limits (the
kind's), and a queue depth counts a pack as one message.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, states
from celery.exceptions import Reject

from fleet.app import PACK_TASK_NAME, TASK_NAME, app
from fleet.dlq import DeadLetteredError
from fleet.obs.logs import get_logger
from workers import identity, once
from workers import metrics as worker_metrics
from workers.intake import GUARDED_STRATEGY
from workers.tasks import TaskRefusedError, execute

__all__ = ["run_pack"]

log = get_logger("fleet.task")


class PackError(Exception):
    """A pack message of the wrong shape (as many ids as specs, each a string)."""


@app.task(
    name=PACK_TASK_NAME,
    bind=True,
    resultrepr_maxsize=0,
    Strategy=GUARDED_STRATEGY,
    track_started=False,
)
def run_pack(
    self: Task[Any, Any],
    specs: list[dict[str, Any]],
    placement: dict[str, Any] | None = None,
    ids: list[str] | None = None,
) -> dict[str, Any]:
    """Run each of ``specs`` as the fleet task ``ids[i]``; see the module docstring.

    Returns counts: ``tasks``, ``completed``, ``dead_lettered``, ``requeued``.

    Raises:
        PackError: ``ids`` do not match ``specs`` (nothing is run).
        celery.exceptions.Reject: requeue the whole pack (publishing a spec again failed,
            or an unexpected error).

    """
    ids = list(ids or [])
    if len(ids) != len(specs) or not all(isinstance(i, str) and i for i in ids):
        raise PackError(f"a pack needs one task id per spec ({len(ids)} ids, {len(specs)} specs)")
    jobs = [
        once.Job(self, i, spec, placement, packed=True) for i, spec in zip(ids, specs, strict=True)
    ]
    run = _PackRun(jobs, once.admit_jobs(jobs, status=True))  # one store step for the pack
    try:
        run.run_all()
        _publish_again(self, specs, ids, placement, run.again)
    except Exception as exc:
        run.abort()
        if isinstance(exc, Reject):
            raise
        log.exception("pack.requeued", error=type(exc).__name__, tasks=len(ids))
        raise Reject(exc, requeue=True) from exc
    finally:
        structlog.contextvars.bind_contextvars(task_id=self.request.id)
    return {
        "tasks": len(ids),
        "completed": run.completed,
        "dead_lettered": run.dead,
        "requeued": len(run.again),
    }


class _PackRun:
    """The specs of one pack, run in order.

    Each spec's finish step is sent the moment it completes (its result is recorded then);
    the replies are read once the pack has run, so no spec waits for the one before it.
    """

    def __init__(self, jobs: list[once.Job], admitted: list[once.Admitted] | None) -> None:
        self.jobs, self.admitted = jobs, admitted
        self.completed = self.dead = 0
        self.again: list[tuple[int, float, int]] = []  # (index, countdown, attempts made)
        self.current = 0  # the spec being run: from it on, claims go back on an error
        self._pending: list[tuple[once.Job, once.Outcome]] = []  # finish replies due

    def run_all(self) -> None:
        """Run every spec (or up to a soft time limit: the rest are requeued at once)."""
        for i, job in enumerate(self.jobs):
            self.current = i
            structlog.contextvars.bind_contextvars(task_id=job.task_id)
            adm = None if self.admitted is None else self.admitted[i]
            outcome = _run_one(job, adm)
            if isinstance(outcome, once.Outcome):
                self._pending.append((job, outcome))
                self.completed += 1
            elif isinstance(outcome, once.Requeue):
                self.again.append((i, outcome.countdown, outcome.attempt))
                if outcome.timed_out:
                    self.again += [(j, 0.0, 0) for j in range(i + 1, len(self.jobs))]
                    _give_back(self.jobs, self.admitted, i + 1)
                    break
            else:
                self.dead += 1
        self._settle()

    def abort(self) -> None:
        """After an error: settle the finishes sent, give back the claims not finished."""
        self._settle()
        _give_back(self.jobs, self.admitted, self.current)

    def _settle(self) -> None:
        """Read the finish replies in order; write SUCCESS through Celery where a step did not."""
        pending, self._pending = self._pending, []
        for job, outcome in pending:
            if not outcome.written():
                job.task.backend.store_result(job.task_id, outcome.result, states.SUCCESS)


def _give_back(jobs: list[once.Job], admitted: list[once.Admitted] | None, start: int) -> None:
    """Release the claims ``admit_jobs`` took for ``jobs[start:]`` (a no-op for finished ones)."""
    if admitted is not None:
        for job, adm in zip(jobs[start:], admitted[start:], strict=True):
            once.abandon(job, adm)


def _run_one(job: once.Job, admitted: once.Admitted | None) -> once.Outcome | once.Requeue | None:
    """One packed spec under the guard: its outcome (finish sent), a ``Requeue``, or None (dead)."""
    task, task_id = job.task, job.task_id
    try:
        return once.guard(
            job,
            lambda: execute(task, job.spec, job.placement, task_id),
            refused=(TaskRefusedError,),
            status=True,
            admitted=admitted,
            finish_later=True,
        )
    except once.Requeue as later:
        return later
    except DeadLetteredError as exc:
        task.backend.mark_as_failure(task_id, exc)
        worker_metrics.record_task(identity.current().accelerator, "unknown", "failure", None, None)
        return None


def _publish_again(
    task: Task[Any, Any],
    specs: list[dict[str, Any]],
    ids: list[str],
    placement: dict[str, Any] | None,
    again: list[tuple[int, float, int]],
) -> None:
    """Publish each requeued spec as its own ``fleet.run`` message (same id, queue, priority).

    Raises:
        celery.exceptions.Reject: a publish failed; the whole pack goes back to its queue.

    """
    if not again:
        return
    request = task.request
    delivery = request.delivery_info or {}
    queue = delivery.get("routing_key")
    hard, soft = [*(request.timelimit or ()), None, None][:2]
    try:
        for i, countdown, attempts in again:
            spec = specs[i]
            model = spec.get("model")
            name = model.get("name") if isinstance(model, dict) else None
            task.app.send_task(
                TASK_NAME,
                args=(spec,),
                kwargs={"placement": placement},
                task_id=ids[i],
                countdown=countdown or None,
                queue=queue,
                routing_key=queue,
                priority=delivery.get("priority"),
                retries=attempts,
                time_limit=hard,
                soft_time_limit=soft,
                argsrepr=f"(<TaskSpec {spec.get('kind')} {name}>,)",
                kwargsrepr=f"{{'placement': '{queue}'}}",
            )
            log.info("pack.requeued_task", requeued=ids[i], retry_in_s=countdown)
    except Exception as exc:
        raise Reject(exc, requeue=True) from exc

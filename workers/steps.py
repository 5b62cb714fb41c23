"""``fleet.step``: one step of a workflow, thin like ``fleet.run`` and sharing its body.

Celery's canvas hands a step the result of the previous level (``upstream``: None for
the first level, one step result after a chain link, a list after a chord's group).
The step merges the step records those results carry, resolves the ``$from`` / ``$join``
references in its spec's input against the upstream outputs (``fleet.workflow``), runs
the spec through ``workers.tasks.execute`` (exactly what ``fleet.run`` does: fit check,
device lease, handler) inside the same at-most-once guard (``workers.once``: a
redelivered step returns its recorded result; a poison step is retried, then
dead-lettered with its resolved spec), and returns::

    {"workflow_id": ..., "step_id": ..., "steps": {<step id>: <record>, ...}}

where ``steps`` holds every finished step's record, this one included; a record is the
``fleet.run`` result plus ``workflow_id``, ``step_id`` and ``actual_cost_usd`` (the
billed cost where the worker reports one, e.g. API workers; else None).

Any failure raises ``WorkflowStepError`` naming the workflow and the step; Celery then
marks the rest of the chain failed, so later steps never run.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from fleet.app import app
from fleet.workflow import (
    STEP_TASK_NAME,
    ResolveError,
    WorkflowStepError,
    actual_cost,
    merge_upstream,
    resolve_input,
)
from workers import once
from workers.intake import GUARDED_STRATEGY
from workers.tasks import TaskRefusedError, execute

CELERY_CONTROL = (Retry, Ignore, Reject, SoftTimeLimitExceeded)


@app.task(name=STEP_TASK_NAME, bind=True, resultrepr_maxsize=128, Strategy=GUARDED_STRATEGY)
def run_step(
    self: Task[Any, Any], upstream: object = None, *, step: dict[str, Any]
) -> dict[str, Any]:
    """Run one workflow step; see the module docstring.

    ``step`` holds ``workflow_id``, ``step_id``, ``spec`` (JSON, references unresolved)
    and ``placement`` (the same dict ``fleet.run`` receives).

    Raises:
        WorkflowStepError: the step's input did not resolve, or running it failed.

    """
    workflow_id, step_id = str(step["workflow_id"]), str(step["step_id"])
    records = merge_upstream(upstream)
    spec = dict(step["spec"])
    placement = step.get("placement")
    try:
        outputs = {sid: record.get("output") for sid, record in records.items()}
        spec["input"] = resolve_input(spec.get("input"), outputs)
        # The same guard as fleet.run: at most once per step task id, poison steps
        # dead-lettered with their resolved spec (a requeue runs the step on its own).
        result = once.guarded(
            self,
            spec,
            placement,
            lambda: execute(self, spec, placement),
            refused=(TaskRefusedError,),
        )
    except ResolveError as exc:
        raise WorkflowStepError(workflow_id, step_id, f"input: {exc}") from None
    except CELERY_CONTROL:  # retries and time limits steer Celery; they are not failures here
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the shared body fails this step
        raise WorkflowStepError(workflow_id, step_id, f"{type(exc).__name__}: {exc}") from None
    record = {
        **result,
        "workflow_id": workflow_id,
        "step_id": step_id,
        "actual_cost_usd": actual_cost(result),
    }
    return {"workflow_id": workflow_id, "step_id": step_id, "steps": {**records, step_id: record}}

"""Running a workflow: place each step on its own, build the Celery canvas, wait for it.

``place_steps`` is pure given a ``route`` function (``Fleet.route`` when submitting,
``fleet.placement.place`` for a dry run). ``build_canvas`` turns the workflow's levels
(``fleet.workflow``) into Celery canvas: a level of one step is a signature, a level of
several a ``group``; the levels are chained, and Celery makes a group followed by
anything a ``chord`` (the join). Every signature is a ``fleet.step`` message carrying
its own queue, priority and time limits from its placement, and a task id of the form
``<run id>-<step id>`` so a failure can be traced to its step.

``submit_workflow`` publishes the canvas and returns a ``WorkflowRun``; its ``get``
returns the final step's output and one record per step (accelerator, queue, estimated
and actual cost), or raises ``WorkflowStepError`` naming the workflow and the failed
step. Joins need a result backend that supports chords (Redis); with RabbitMQ's
``rpc://`` backend a workflow with a join is refused before anything is published.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import chain, group
from celery.canvas import Signature
from celery.result import AsyncResult

from fleet.placement import NoPlacementError, Placement, Policy
from fleet.workflow import STEP_TASK_NAME, Step, Workflow, WorkflowError, WorkflowStepError

if TYPE_CHECKING:
    from celery import Celery

    from fleet.client import Fleet
    from fleet.spec import TaskSpec

POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A step, where it goes, and the Celery task id it runs under."""

    step: Step
    placement: Placement
    task_id: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: step id, after, task id and the placement (``fleet route`` shape)."""
        return {
            "step": self.step.id,
            "after": list(self.step.after),
            "task_id": self.task_id,
            **self.placement.to_dict(),
        }


def place_steps(
    workflow: Workflow, route: Callable[[TaskSpec], Placement], run_id: str = ""
) -> tuple[PlannedStep, ...]:
    """Place every step on its own, in execution order; nothing is sent.

    Raises:
        NoPlacementError: a step cannot run anywhere; the message starts with
            ``workflow <id>: step <id>:`` (the rejections are kept).

    """
    planned = []
    for sid in workflow.order:
        step = workflow.step(sid)
        try:
            placement = route(step.spec)
        except NoPlacementError as exc:
            exc.args = (f"workflow {workflow.id}: step {sid}: {exc}",)
            raise
        planned.append(PlannedStep(step, placement, f"{run_id or 'dry'}-{sid}"))
    return tuple(planned)


def step_signature(
    app: Celery, workflow_id: str, planned: PlannedStep, message: Mapping[str, Any]
) -> Signature[Any]:
    """The ``fleet.step`` signature of one step; ``message`` is ``Fleet.message_options``."""
    payload = {
        "workflow_id": workflow_id,
        "step_id": planned.step.id,
        "spec": planned.step.spec.model_dump(mode="json"),
        "placement": message["kwargs"]["placement"],
    }
    options = {
        **message["options"],
        "task_id": planned.task_id,
        "kwargsrepr": f"{{'step': '{workflow_id}/{planned.step.id}'}}",
    }
    return app.signature(STEP_TASK_NAME, kwargs={"step": payload}, **options)


def build_canvas(
    app: Celery,
    workflow: Workflow,
    signatures: Mapping[str, Signature[Any]],
) -> Signature[Any]:
    """Chain the levels: one step is its signature, several a group (a chord with what follows)."""
    elements: list[Signature[Any]] = []
    for level in workflow.levels:
        sigs = [signatures[sid] for sid in level]
        elements.append(sigs[0] if len(sigs) == 1 else group(sigs, app=app))
    if len(elements) == 1:
        return elements[0]
    return chain(*elements, app=app)


def check_backend(app: Celery, workflow: Workflow) -> None:
    """Refuse, before publishing, a join on a result backend without chords (``rpc://``).

    Raises:
        WorkflowError: naming the steps that join and the backend's scheme.

    """
    if not workflow.needs_join:
        return
    try:
        app.backend.ensure_chords_allowed()
    except NotImplementedError:
        joins = [
            lvl[0] if len(lvl) == 1 else ",".join(lvl)
            for prev, lvl in zip(workflow.levels, workflow.levels[1:], strict=False)
            if len(prev) > 1
        ]
        scheme = str(app.conf.result_backend or "").split(":", 1)[0] or "none"
        raise WorkflowError(
            [
                (
                    "steps",
                    (
                        f"step(s) {'; '.join(joins)} join parallel steps (a Celery chord), "
                        "which needs a result backend with chords such as Redis "
                        f"(FLEET_RESULT_BACKEND=redis://...); this one ({scheme}://) has none"
                    ),
                )
            ]
        ) from None


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """A submitted workflow: its steps (placements, task ids) and a way to wait for it."""

    workflow: Workflow
    run_id: str
    steps: tuple[PlannedStep, ...]
    app: Celery

    def _result(self, planned: PlannedStep) -> AsyncResult[Any]:
        return AsyncResult(planned.task_id, app=self.app)

    def states(self) -> dict[str, str]:
        """Celery's state per step id (PENDING, STARTED, SUCCESS, FAILURE)."""
        return {p.step.id: str(self._result(p).state) for p in self.steps}

    def _failed_step(self, exc: BaseException) -> WorkflowStepError:
        """The step failure behind ``exc`` (a chord reports it as a dependency's task id)."""
        if isinstance(exc, WorkflowStepError):
            return exc
        text = str(exc)
        by_task = {p.task_id: p.step.id for p in self.steps}
        for task_id, sid in by_task.items():
            if task_id in text:
                try:
                    self._result(self.steps_by_id[sid]).get(timeout=1.0, propagate=True)
                except WorkflowStepError as found:
                    return found
                except Exception:  # noqa: BLE001, S110 - fall through to the generic error below
                    pass
                return WorkflowStepError(self.workflow.id, sid, text)
        return WorkflowStepError(self.workflow.id, "unknown", f"{type(exc).__name__}: {text}")

    @property
    def steps_by_id(self) -> dict[str, PlannedStep]:
        """Planned steps by step id."""
        return {p.step.id: p for p in self.steps}

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the last level and return the workflow's result.

        Returns:
            ``{"workflow_id", "run_id", "output", "steps", "estimated_cost_usd",
            "actual_cost_usd"}``: ``output`` is the final step's output (a dict by step
            id when the last level has several steps); ``steps`` one record per step in
            execution order (see ``workers.steps``); ``actual_cost_usd`` sums the steps
            that reported a billed cost (None if none did).

        Raises:
            WorkflowStepError: a step failed (names the workflow id and the step id);
                the steps after it did not run.
            celery.exceptions.TimeoutError: not finished within ``timeout`` seconds.

        """
        from celery.exceptions import TimeoutError as CeleryTimeoutError  # noqa: PLC0415

        deadline = None if timeout is None else time.monotonic() + timeout
        finals = [self.steps_by_id[sid] for sid in self.workflow.final]
        records: dict[str, dict[str, Any]] = {}
        for planned in finals:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                value = self._result(planned).get(timeout=left, propagate=True)
            except CeleryTimeoutError:
                raise
            except Exception as exc:  # any failure: find the step, name it
                raise self._failed_step(exc) from exc
            records.update(value["steps"])
        return workflow_result(self.workflow, self.run_id, records)


def workflow_result(
    workflow: Workflow, run_id: str, records: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The workflow's result from its step records (pure; see ``WorkflowRun.get``)."""
    ordered = [dict(records[sid]) for sid in workflow.order if sid in records]
    final = workflow.final
    output = (
        records[final[0]].get("output")
        if len(final) == 1
        else {sid: records[sid].get("output") for sid in final}
    )
    actual = [r["actual_cost_usd"] for r in ordered if r.get("actual_cost_usd") is not None]
    return {
        "workflow_id": workflow.id,
        "run_id": run_id,
        "output": output,
        "steps": ordered,
        "estimated_cost_usd": sum(r.get("estimated_cost_usd") or 0.0 for r in ordered),
        "actual_cost_usd": sum(actual) if actual else None,
    }


def submit_workflow(
    fleet: Fleet, workflow: Workflow, *, policy: Policy = Policy.COST
) -> WorkflowRun:
    """Place every step on its own, then publish the workflow as one Celery canvas.

    All-or-nothing before publishing: if a step cannot be placed or the result backend
    cannot join, nothing is sent.

    Raises:
        NoPlacementError: a step cannot run anywhere (names the workflow and step).
        WorkflowError: the workflow needs a chord and the result backend has none.
        kombu.exceptions.OperationalError: the broker cannot be reached.

    """
    check_backend(fleet.app, workflow)
    run_id = uuid.uuid4().hex
    planned = place_steps(workflow, lambda spec: fleet.route(spec, policy), run_id)
    signatures = {
        p.step.id: step_signature(
            fleet.app, workflow.id, p, fleet.message_options(p.step.spec, p.placement)
        )
        for p in planned
    }
    build_canvas(fleet.app, workflow, signatures).apply_async()
    return WorkflowRun(workflow, run_id, planned, fleet.app)

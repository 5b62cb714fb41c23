"""``fleet submit --workflow FILE`` and ``fleet route --workflow FILE``.

``route`` (dry run, no broker) prints each step's placement: queue, accelerator, offer,
estimated cost. ``submit`` places every step on its own, publishes the workflow as one
Celery canvas, prints the placements, and with ``--wait S`` shows progress, then each
step's result (where it ran, run time, estimated and actual cost) and the totals.

Exit codes as the rest of the CLI: 0 ok; 1 a step failed (the message names the workflow
and the step), the wait timed out, or the broker is unreachable; 2 an invalid workflow
(every error names the step and field) or a step nothing can run. Nothing is published
unless every step is valid and placed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.markup import escape
from rich.table import Table

from fleet.cli import EXIT_INPUT, console, err
from fleet.placement import NoPlacementError, Policy, place
from fleet.settings import Settings, masked
from fleet.workflow import Workflow, WorkflowError, WorkflowStepError, read_workflow
from fleet.workflow_run import PlannedStep, place_steps

if TYPE_CHECKING:
    from fleet.catalog import Catalog
    from fleet.workflow_run import WorkflowRun

POLL_S = 0.25
SUMMARY_CHARS = 80


def load(path: str) -> Workflow:
    """Read and validate a workflow file; exit 2 listing every error (step and field)."""
    try:
        return read_workflow(path)
    except WorkflowError as exc:
        err.print(f"[red]invalid workflow {escape(path)}:[/]")
        for field, msg in exc.errors:
            err.print(f"  {escape(field or '(workflow)')}: {escape(msg)}")
    except OSError as exc:
        err.print(f"[red]cannot read {escape(path)}:[/] {exc.strerror}")
    sys.exit(EXIT_INPUT)


def _unplaceable(exc: NoPlacementError, *, as_json: bool) -> NoReturn:
    if as_json:
        rejected = [{"accelerator": r.accelerator, "reason": r.reason} for r in exc.rejected]
        click.echo(json.dumps({"error": str(exc).split(": no ", 1)[0], "detail": str(exc),
                               "rejected": rejected}, indent=2))  # fmt: skip
    else:
        err.print(f"[red]{escape(str(exc))}[/]")
        for r in exc.rejected:
            err.print(f"  {r.accelerator:18} {escape(r.reason)}")
    sys.exit(EXIT_INPUT)


def print_placements(workflow: Workflow, planned: tuple[PlannedStep, ...]) -> None:
    """One row per step, in execution order: where it goes and what it should cost."""
    table = Table(
        "step", "after", "queue", "accelerator", "offer", "est. $", "est. run s",
        title=f"workflow {workflow.id}: where each step goes",
    )  # fmt: skip
    for p in planned:
        o = p.placement.offer
        table.add_row(
            p.step.id,
            ",".join(p.step.after),
            p.placement.queue,
            p.placement.accelerator,
            f"{o.cloud} {o.instance_type} {o.market.value}",
            f"{p.placement.estimated_cost_usd:.6g}",
            f"{p.placement.estimated_duration_s:,.3g}",
        )
    console.print(table)
    total = sum(p.placement.estimated_cost_usd for p in planned)
    console.print(f"estimated total ${total:.6g} over {len(planned)} steps")


def route_workflow(path: str, catalog: Catalog, policy: Policy, *, as_json: bool) -> None:
    """Dry run: each step's placement, no broker."""
    workflow = load(path)
    try:
        planned = place_steps(workflow, lambda spec: place(spec, catalog, None, policy))
    except NoPlacementError as exc:
        _unplaceable(exc, as_json=as_json)
    if as_json:
        click.echo(json.dumps({"workflow_id": workflow.id, "levels": workflow.levels,
                               "steps": [p.to_dict() for p in planned]}, indent=2))  # fmt: skip
        return
    print_placements(workflow, planned)


def _summary(output: object) -> str:
    text = json.dumps(output, default=str)
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."


def print_results(result: dict[str, Any]) -> None:
    """Per-step results and costs, then the totals."""
    table = Table("step", "ran on", "run s", "est. $", "actual $", "output", title="results")
    for r in result["steps"]:
        actual = r.get("actual_cost_usd")
        output = r.get("output")
        # A chip stood in for by a CPU process, or an API step answered by the emulated server.
        emulated = r.get("emulated") or (isinstance(output, dict) and output.get("emulated"))
        table.add_row(
            r["step_id"],
            f"{r['accelerator']}{' (emulated)' if emulated else ''}",
            f"{r.get('run_s') or 0:.3f}",
            f"{r.get('estimated_cost_usd') or 0:.6g}",
            "" if actual is None else f"{actual:.6g}",
            escape(_summary(r.get("output"))),
        )
    console.print(table)
    actual_total = result.get("actual_cost_usd")
    console.print(
        f"workflow {result['workflow_id']} done: estimated ${result['estimated_cost_usd']:.6g}"
        + ("" if actual_total is None else f", billed ${actual_total:.6g}")
    )


def wait_with_progress(run: WorkflowRun, wait_s: float) -> dict[str, Any]:
    """Show steps finishing (stderr), then return ``run.get``'s result (its errors propagate)."""
    from rich.progress import Progress  # noqa: PLC0415

    deadline = time.monotonic() + wait_s
    total = len(run.steps)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"workflow {run.workflow.id}", total=total)
        while time.monotonic() < deadline:
            states = run.states()
            bar.update(task, completed=sum(s == "SUCCESS" for s in states.values()))
            if "FAILURE" in states.values() or all(
                states[sid] == "SUCCESS" for sid in run.workflow.final
            ):
                break
            time.sleep(POLL_S)
    return run.get(timeout=max(0.1, deadline - time.monotonic()))


def submit_workflow_cli(path: str, policy: Policy, wait_s: float | None, *, as_json: bool) -> None:
    """``fleet submit --workflow``; see the module docstring for output and exit codes."""
    from celery.exceptions import TimeoutError as CeleryTimeoutError  # noqa: PLC0415
    from kombu.exceptions import OperationalError  # noqa: PLC0415

    from fleet.client import Fleet  # noqa: PLC0415

    workflow = load(path)
    settings = Settings.from_env()
    out: dict[str, Any] = {"workflow_id": workflow.id}
    with Fleet(settings) as fleet:
        try:
            run: WorkflowRun = fleet.submit_workflow(workflow, policy=policy)
        except NoPlacementError as exc:
            _unplaceable(exc, as_json=as_json)
        except WorkflowError as exc:
            err.print(f"[red]cannot run workflow {workflow.id}:[/] {escape(str(exc))}")
            sys.exit(EXIT_INPUT)
        except OperationalError as exc:
            err.print(f"[red]cannot reach the broker at {masked(settings.broker_url)}:[/] {type(exc).__name__}")  # fmt: skip
            sys.exit(1)
        out |= {"run_id": run.run_id, "steps": [p.to_dict() for p in run.steps]}
        if not as_json:
            print_placements(workflow, run.steps)
        if wait_s is None:
            if as_json:
                click.echo(json.dumps(out, indent=2))
            return
        try:
            out["result"] = wait_with_progress(run, wait_s)
        except WorkflowStepError as exc:
            out |= {"error": str(exc), "failed_step": exc.step_id}
            _fail(out, str(exc), as_json=as_json)
        except CeleryTimeoutError:
            out |= {"error": f"workflow {workflow.id}: not finished within {wait_s:g} s"}
            _fail(out, out["error"], as_json=as_json)
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        print_results(out["result"])


def _fail(out: dict[str, Any], message: str, *, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        err.print(f"[red]{escape(message)}[/]")
    sys.exit(1)

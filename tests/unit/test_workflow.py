"""Workflows without a broker: parsing and validation, layout, canvas shape, input resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, group
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fleet.app import create_app
from fleet.catalog import default_catalog
from fleet.cli import main
from fleet.placement import NoPlacementError, place
from fleet.settings import Settings
from fleet.workflow import (
    ResolveError,
    WorkflowError,
    WorkflowStepError,
    actual_cost,
    load_workflow_text,
    merge_upstream,
    parse_workflow,
    read_workflow,
    resolve_input,
)
from fleet.workflow_run import (
    build_canvas,
    check_backend,
    place_steps,
    step_signature,
    workflow_result,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"}


def step(sid: str, *after: str, **extra: Any) -> dict[str, Any]:
    """A small valid inference step."""
    return {"id": sid, "after": list(after), "kind": "inference", "model": MODEL,
            "tokens_in": 10, "tokens_out": 5, **extra}  # fmt: skip


def errors_of(data: object) -> list[tuple[str, str]]:
    """The (field, message) pairs parse_workflow refuses ``data`` with."""
    with pytest.raises(WorkflowError) as exc:
        parse_workflow(data)
    return exc.value.errors


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ([], "", "an object with id and steps"),
        ({"steps": [step("a")]}, "id", "required"),
        ({"id": "w", "steps": []}, "steps", "non-empty list"),
        ({"id": "w", "steps": [step("a")], "stesp": 1}, "stesp", "unknown field"),
        ({"id": "w", "steps": [step("a"), step("a")]}, "steps[1](a).id", "duplicate: steps[0](a)"),
        ({"id": "w", "steps": [{"kind": "inference"}]}, "steps[0].id", "required"),
        ({"id": "w", "steps": [step("a", "ghost")]}, "steps[0](a).after", "unknown step 'ghost'"),
        ({"id": "w", "steps": [step("a", "a")]}, "steps[0](a).after", "cannot wait for itself"),
        ({"id": "w", "steps": [step("a", "b"), step("b", "a")]}, "steps[0](a).after", "cycle: a -> b -> a"),
        ({"id": "w", "steps": [step("a", tokens_in=-1)]}, "steps[0](a).tokens_in", "greater than or equal"),
        ({"id": "w", "steps": [step("a", colour="red")]}, "steps[0](a).colour", "Extra inputs"),
        ({"id": "w", "steps": [step("a", input={"p": {"$from": "zz"}})]}, "steps[0](a).input", "$from 'zz': unknown step"),
        ({"id": "w", "steps": [step("a"), step("b", input={"p": {"$from": "a"}})]},
         "steps[1](b).input", "$from 'a': not upstream"),
        ({"id": "w", "steps": [step("a"), step("b", "a", input={"p": {"$from": "a", "pth": "x"}})]},
         "steps[1](b).input.p", "unexpected key 'pth'"),
        ({"id": "w", "steps": [step("a"), step("b", "a", input={"p": {"$join": "x"}})]},
         "steps[1](b).input.p.$join", "expected a list"),
    ],
)  # fmt: skip
def test_invalid_workflows_name_the_step_and_field(data: object, field: str, message: str) -> None:
    """Every refusal names where it is (step by position and id, then field) and why."""
    errors = errors_of(data)
    assert any(f == field and message in m for f, m in errors), errors


def test_every_error_is_reported_at_once() -> None:
    """Two bad steps: both named in one error, not one per run of the CLI."""
    errors = errors_of({"id": "w", "steps": [step("a", "x"), step("b", tokens_out=-1)]})
    assert {f for f, _ in errors} == {"steps[0](a).after", "steps[1](b).tokens_out"}


def test_a_longer_cycle_is_shown_as_a_path() -> None:
    """The cycle message walks the loop, so it can be fixed from the message alone."""
    data = {"id": "w", "steps": [step("a", "c"), step("b", "a"), step("c", "b"), step("d")]}
    [(field, message)] = errors_of(data)
    assert field.endswith(".after")
    assert message in {
        "cycle: a -> c -> b -> a",
        "cycle: c -> b -> a -> c",
        "cycle: b -> a -> c -> b",
    }


@pytest.mark.parametrize(
    ("steps", "levels"),
    [
        ([step("a")], (("a",),)),
        ([step("a"), step("b", "a"), step("c", "b")], (("a",), ("b",), ("c",))),
        ([step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")], (("a",), ("b", "c"), ("d",))),
        # lopsided: d waits only for a but its level is the longest path (1), with b
        ([step("a"), step("b", "a"), step("c", "b"), step("d", "a")], (("a",), ("b", "d"), ("c",))),
        ([step("x"), step("y")], (("x", "y"),)),
    ],
)  # fmt: skip
def test_levels_are_longest_path_layers(
    steps: list[dict[str, Any]], levels: tuple[Any, ...]
) -> None:
    """A step's level is its longest distance from a root; file order within a level."""
    assert parse_workflow({"id": "w", "steps": steps}).levels == levels


@given(st.lists(st.sets(st.integers(0, 11), max_size=3), min_size=1, max_size=12))
def test_levels_put_every_dependency_first(deps: list[set[int]]) -> None:
    """Any DAG (edges only to earlier steps): each step once, every dependency in an earlier level."""
    steps = [step(f"s{i}", *(f"s{d}" for d in sorted(ds) if d < i)) for i, ds in enumerate(deps)]
    wf = parse_workflow({"id": "w", "steps": steps})
    level_of = {sid: n for n, level in enumerate(wf.levels) for sid in level}
    assert sorted(level_of) == sorted(s["id"] for s in steps)
    for s in wf.steps:
        assert all(level_of[d] < level_of[s.id] for d in s.after)
        assert level_of[s.id] == 0 or any(level_of[d] == level_of[s.id] - 1 for d in s.after)


OUTPUTS: dict[str, Any] = {
    "plan": {"text": "do x", "items": [{"n": 1}, {"n": 2}]},
    "emb": {"dim": 8},
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"$from": "plan", "path": "text"}, "do x"),
        ({"$from": "plan"}, OUTPUTS["plan"]),
        ({"$from": "plan", "path": "items.1.n"}, 2),
        ({"$from": "plan", "path": "items.-1"}, {"n": 2}),
        ({"$join": ["critique: ", {"$from": "plan", "path": "text"}, " dim=", {"$from": "emb", "path": "dim"}]},
         "critique: do x dim=8"),
        ({"$join": ["all: ", {"$from": "emb"}]}, 'all: {"dim":8}'),
        ({"texts": [{"$from": "plan", "path": "text"}, "fixed"], "seed": 3}, {"texts": ["do x", "fixed"], "seed": 3}),
        ("plain", "plain"),
        (None, None),
    ],
)  # fmt: skip
def test_resolve_input_replaces_references(value: Any, expected: Any) -> None:
    """``$from`` reads an upstream output at a path; ``$join`` concatenates; the rest is kept."""
    assert resolve_input(value, OUTPUTS) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"$from": "ghost"}, "no output from that step"),
        ({"$from": "plan", "path": "txt"}, "no 'txt' at path 'txt'"),
        ({"$from": "plan", "path": "items.5"}, "no '5'"),
        ({"$from": "plan", "path": "text.x"}, "no 'x'"),
    ],
)
def test_unresolvable_references_say_which(value: Any, message: str) -> None:
    """A reference that does not resolve fails with the step and path in the message."""
    with pytest.raises(ResolveError, match=message):
        resolve_input(value, OUTPUTS)


def test_merge_upstream_accepts_what_celery_hands_a_step() -> None:
    """None (first level), one result (after a chain link), a list (after a chord's group)."""
    a = {"steps": {"a": {"output": 1}}}
    b = {"steps": {"a": {"output": 1}, "b": {"output": 2}}}
    c = {"steps": {"a": {"output": 1}, "c": {"output": 3}}}
    assert merge_upstream(None) == {}
    assert merge_upstream(a) == {"a": {"output": 1}}
    assert set(merge_upstream([b, c])) == {"a", "b", "c"}


def test_actual_cost_prefers_what_the_worker_billed() -> None:
    """An API worker's billed cost is used wherever it reports it; emulated chips report none."""
    assert actual_cost({"actual_cost_usd": 0.5, "output": {"cost_usd": 9}}) == 0.5
    assert actual_cost({"output": {"cost_usd": 0.25}}) == 0.25
    assert actual_cost({"output": {"text": "x"}}) is None


def test_step_error_survives_celerys_json_exception_encoding() -> None:
    """Celery rebuilds the exception from its args: workflow id, step id and detail come back."""
    err = WorkflowStepError("wf", "critic", "TaskRefusedError: bad input")
    rebuilt = WorkflowStepError(*json.loads(json.dumps(err.args)))
    assert str(rebuilt) == "workflow wf: step critic failed: TaskRefusedError: bad input"
    assert (rebuilt.workflow_id, rebuilt.step_id) == ("wf", "critic")


def _app(backend: str = "redis://127.0.0.1:1/0") -> Celery:
    return create_app(Settings.from_env({"FLEET_BROKER_URL": "redis://127.0.0.1:1/0",
                                         "FLEET_RESULT_BACKEND": backend}))  # fmt: skip


def _canvas(steps: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    app = _app()
    wf = parse_workflow({"id": "w", "steps": steps})
    catalog = default_catalog()
    planned = place_steps(wf, lambda s: place(s, catalog), "run1")
    message = {
        "options": {"queue": "q", "routing_key": "q", "priority": 0},
        "kwargs": {"placement": {}},
    }
    sigs = {}
    for p in planned:
        opts = {**message, "options": {**message["options"], "queue": p.placement.queue}}
        sigs[p.step.id] = step_signature(app, wf.id, p, opts)
    return build_canvas(app, wf, sigs), sigs


def test_canvas_linear_is_a_chain_of_steps() -> None:
    """A linear workflow is a chain; each link carries its own queue and a traceable task id."""
    canvas, sigs = _canvas([step("a"), step("b", "a"), step("c", "b")])
    assert isinstance(canvas, chain)
    assert [t.options["task_id"] for t in canvas.tasks] == ["run1-a", "run1-b", "run1-c"]
    assert all(t.task == "fleet.step" for t in canvas.tasks)
    assert sigs["a"].kwargs["step"]["step_id"] == "a"
    assert sigs["a"].kwargs["step"]["workflow_id"] == "w"
    assert sigs["a"].options["queue"].startswith("inference.")


def test_canvas_fan_out_and_join_is_a_group_then_the_join() -> None:
    """Parallel steps are a group; the step after them joins them (Celery makes that a chord)."""
    canvas, _ = _canvas([step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")])
    first, middle, last = canvas.tasks
    assert first.options["task_id"] == "run1-a"
    assert isinstance(middle, group)
    assert [t.options["task_id"] for t in middle.tasks] == ["run1-b", "run1-c"]
    assert last.options["task_id"] == "run1-d"


def test_canvas_of_one_step_is_its_signature() -> None:
    """One step needs no chain."""
    canvas, sigs = _canvas([step("only")])
    assert canvas is sigs["only"]


def test_join_on_rpc_backend_is_refused_before_publishing() -> None:
    """rpc:// has no chords: a workflow with a join is refused, naming the joining step; a chain passes."""
    app = _app("rpc://")
    join = parse_workflow({"id": "w", "steps": [step("a"), step("b"), step("c", "a", "b")]})
    with pytest.raises(WorkflowError, match=r"step\(s\) c join parallel steps.*rpc://"):
        check_backend(app, join)
    check_backend(app, parse_workflow({"id": "w", "steps": [step("a"), step("b", "a")]}))
    check_backend(_app(), join)


def test_unplaceable_step_names_workflow_and_step() -> None:
    """Placement errors keep their rejections and say which step could not be placed."""
    wf = parse_workflow(
        {"id": "w", "steps": [step("a"), step("huge", "a", model={"name": "x", "params_b": 9000})]}
    )
    catalog = default_catalog()
    with pytest.raises(NoPlacementError, match="workflow w: step huge") as exc:
        place_steps(wf, lambda s: place(s, catalog))
    assert exc.value.rejected


def test_workflow_result_is_final_output_plus_records_in_order() -> None:
    """One final step: its output; several: outputs by step id; costs summed."""
    wf = parse_workflow({"id": "w", "steps": [step("a"), step("b", "a"), step("c", "a")]})
    records = {
        "a": {"step_id": "a", "output": 1, "estimated_cost_usd": 0.1, "actual_cost_usd": None},
        "c": {"step_id": "c", "output": 3, "estimated_cost_usd": 0.3, "actual_cost_usd": 0.05},
        "b": {"step_id": "b", "output": 2, "estimated_cost_usd": 0.2, "actual_cost_usd": None},
    }
    result = workflow_result(wf, "r", records)
    assert result["output"] == {"b": 2, "c": 3}
    assert [r["step_id"] for r in result["steps"]] == ["a", "b", "c"]
    assert result["estimated_cost_usd"] == pytest.approx(0.6)
    assert result["actual_cost_usd"] == pytest.approx(0.05)


def test_yaml_and_json_files_parse_the_same(tmp_path: Path) -> None:
    """YAML (with unquoted $from keys) and JSON give the same workflow."""
    yaml_text = (EXAMPLES / "review-workflow.yaml").read_text()
    wf = load_workflow_text(yaml_text, "review-workflow.yaml")
    as_json = tmp_path / "wf.json"
    as_json.write_text(json.dumps({"id": wf.id, "description": wf.description, "steps": [
        {"id": s.id, "after": list(s.after), **s.spec.model_dump(mode="json")} for s in wf.steps]}))  # fmt: skip
    assert read_workflow(as_json) == wf
    assert wf.levels == (("plan",), ("critic", "index"), ("judge",))


def test_syntax_errors_are_workflow_errors() -> None:
    """Broken YAML or JSON is refused with the file name, not a traceback."""
    with pytest.raises(WorkflowError, match=r"x\.yaml: invalid YAML"):
        load_workflow_text("id: [unclosed", "x.yaml")
    with pytest.raises(WorkflowError, match=r"x\.json: invalid JSON"):
        load_workflow_text("{", "x.json")


def test_route_workflow_cli_prints_every_step_without_a_broker() -> None:
    """`fleet route --workflow` places each step on its own; --json lists them in order."""
    result = CliRunner().invoke(
        main, ["route", "--workflow", str(EXAMPLES / "review-workflow.yaml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["step"] for s in report["steps"]] == ["plan", "critic", "index", "judge"]
    assert len({s["accelerator"] for s in report["steps"]}) >= 2


def test_invalid_workflow_file_exits_2_naming_step_and_field(tmp_path: Path) -> None:
    """`fleet submit --workflow` with a bad file publishes nothing and exits 2 with each error."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "id: w\nsteps:\n  - {id: a, kind: inference, model: {name: m, params_b: 1}, after: [nope]}\n"
    )
    result = CliRunner().invoke(main, ["submit", "--workflow", str(bad)])
    assert result.exit_code == 2
    assert "steps[0](a).after" in result.output
    assert "unknown step 'nope'" in result.output


def test_spec_file_and_workflow_together_are_refused(tmp_path: Path) -> None:
    """Exactly one of SPEC_FILE and --workflow."""
    result = CliRunner().invoke(main, ["route", "x.json", "--workflow", "y.yaml"])
    assert result.exit_code == 2

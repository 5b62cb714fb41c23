"""Workflows, pure: parse and validate a DAG of TaskSpecs, lay it out, resolve step inputs.

A workflow file (YAML or JSON) holds an ``id`` and ``steps``; each step is a TaskSpec
plus ``id`` (unique, ``[A-Za-z0-9_-]``) and ``after`` (the ids of the steps it waits
for)::

    id: review-incident
    steps:
      - id: plan
        kind: inference
        model: {name: llama-3.3-70b-instruct, params_b: 70, dtype: fp8}
        input: {prompt: "a plan for the incident review"}
        tokens_in: 3000
        tokens_out: 64
      - id: critic
        after: [plan]
        kind: inference
        model: {name: llama-3.1-8b-instruct, params_b: 8}
        input:
          prompt: {$join: ["Critique this plan: ", {$from: plan, path: text}]}
        tokens_in: 600
        tokens_out: 32

**Referencing upstream outputs.** Anywhere inside a step's ``input``:

* ``{"$from": "<step id>", "path": "a.b.0"}`` is replaced by that step's handler output
  at ``path`` (dot-separated keys and list indices; no ``path``: the whole output);
* ``{"$join": [part, ...]}`` is replaced by the concatenation of its parts, each
  resolved first; a part that is not a string is written as compact JSON.

The referenced step must be an ancestor (reachable through ``after``). References are
checked when the file is parsed and resolved on the worker just before the step runs
(``resolve_input``); a reference that does not resolve fails that step.

**Layout.** ``levels`` groups the steps by their longest distance from a step with no
``after``; the runner (``fleet.workflow_run``) runs the levels in order, the steps of
one level in parallel: a level of one step is a chain link, a level of several a group,
and a level after a group is the body of a chord. A step therefore also waits for the
other steps of the previous level (a barrier per level): correct for every DAG, at the
price of some parallelism in lopsided graphs.

Everything here is pure: no broker, no Celery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from fleet.spec import SpecError, TaskSpec, parse_spec

STEP_TASK_NAME = "fleet.step"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
FROM, PATH, JOIN = "$from", "path", "$join"
TOP_LEVEL_KEYS = frozenset({"id", "description", "steps"})
MAX_STEPS = 1000


class WorkflowError(ValueError):
    """A workflow file is invalid; ``errors`` lists ``(field, message)`` pairs.

    Fields name the step by position and id, e.g. ``steps[1](critic).after``.
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        """Build from ``(field path, message)`` pairs."""
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in errors))


class WorkflowStepError(Exception):
    """A step failed on its worker. Raised by ``fleet.step``; rebuilt by the client.

    ``args`` is ``(workflow_id, step_id, detail)`` so Celery's JSON exception encoding
    carries all three.
    """

    def __init__(self, workflow_id: str, step_id: str, detail: str) -> None:
        """Name the workflow and the step; ``detail`` says what went wrong."""
        super().__init__(workflow_id, step_id, detail)
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.detail = detail

    def __str__(self) -> str:
        """``workflow <id>: step <id> failed: <detail>``."""
        return f"workflow {self.workflow_id}: step {self.step_id} failed: {self.detail}"


@dataclass(frozen=True, slots=True)
class Step:
    """One step: a TaskSpec (its ``input`` may hold references), its id and dependencies."""

    id: str
    spec: TaskSpec
    after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Workflow:
    """A validated DAG of steps, in file order; ``levels`` is its layout for the canvas."""

    id: str
    steps: tuple[Step, ...]
    levels: tuple[tuple[str, ...], ...]
    description: str = ""

    def step(self, step_id: str) -> Step:
        """The step called ``step_id`` (KeyError if none)."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    @property
    def order(self) -> tuple[str, ...]:
        """Step ids in execution order (level by level)."""
        return tuple(sid for level in self.levels for sid in level)

    @property
    def final(self) -> tuple[str, ...]:
        """The steps of the last level: their results carry every step's record."""
        return self.levels[-1]

    @property
    def needs_join(self) -> bool:
        """True when a level of several steps is followed by another (a chord)."""
        return any(len(level) > 1 for level in self.levels[:-1])


def _label(i: int, raw: object) -> str:
    sid = raw.get("id") if isinstance(raw, dict) else None
    return f"steps[{i}]({sid})" if isinstance(sid, str) and sid else f"steps[{i}]"


def _check_from(value: dict[str, object], where: str, errors: list[tuple[str, str]]) -> set[str]:
    """The step id of one ``$from`` placeholder (empty if malformed; errors appended)."""
    extra = sorted(set(value) - {FROM, PATH})
    if extra:
        errors.append((where, f"unexpected key {extra[0]!r} beside $from (allowed: path)"))
    if PATH in value and not isinstance(value[PATH], str):
        errors.append((f"{where}.path", "expected a dot-separated string"))
    ref = value[FROM]
    if isinstance(ref, str) and ref:
        return {ref}
    errors.append((where, "$from: expected a step id"))
    return set()


def _references(value: object, where: str, errors: list[tuple[str, str]]) -> set[str]:
    """Step ids referenced by ``$from`` inside ``value``; malformed placeholders go to errors."""
    if isinstance(value, list):
        return set().union(*(_references(v, f"{where}[{n}]", errors) for n, v in enumerate(value)))
    if not isinstance(value, dict):
        return set()
    if FROM in value:
        return _check_from(value, where, errors)
    if JOIN in value:
        if len(value) != 1:
            errors.append((where, "$join stands alone in its object"))
        if isinstance(value[JOIN], list):
            return _references(value[JOIN], f"{where}.$join", errors)
        errors.append((f"{where}.$join", "expected a list of parts"))
        return set()
    return set().union(*(_references(v, f"{where}.{k}", errors) for k, v in value.items()))


def _find_cycle(after: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, white/grey/black)."""
    colour: dict[str, int] = dict.fromkeys(after, 0)
    for root in after:
        if colour[root]:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                colour[node] = 1
                path.append(node)
            deps = [d for d in after[node] if d in after]
            if i < len(deps):
                stack.append((node, i + 1))
                nxt = deps[i]
                if colour[nxt] == 1:
                    return [*path[path.index(nxt) :], nxt]
                if colour[nxt] == 0:
                    stack.append((nxt, 0))
            else:
                colour[node] = 2
                path.pop()
    return None


def _levels(
    order: Sequence[str], after: Mapping[str, tuple[str, ...]]
) -> tuple[tuple[str, ...], ...]:
    """Longest-path layering of an acyclic graph; file order within a level."""
    depth: dict[str, int] = {}

    def level_of(sid: str) -> int:
        stack = [sid]
        while stack:
            top = stack[-1]
            pending = [d for d in after[top] if d not in depth]
            if pending:
                stack.extend(pending)
                continue
            depth[top] = 1 + max((depth[d] for d in after[top]), default=-1)
            stack.pop()
        return depth[sid]

    for sid in order:
        level_of(sid)
    out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for sid in order:
        out[depth[sid]].append(sid)
    return tuple(tuple(level) for level in out)


def _ancestors(sid: str, after: Mapping[str, tuple[str, ...]]) -> set[str]:
    seen: set[str] = set()
    stack = list(after[sid])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(after[node])
    return seen


def _parse_step(
    i: int, raw: object, errors: list[tuple[str, str]]
) -> tuple[str, tuple[str, ...], TaskSpec | None] | None:
    """(id, after, spec or None if the spec is invalid) for one raw step; errors appended."""
    label = _label(i, raw)
    if not isinstance(raw, dict):
        errors.append((label, "expected an object (a TaskSpec plus id and after)"))
        return None
    sid = raw.get("id")
    if not isinstance(sid, str) or not ID_RE.match(sid):
        errors.append((f"{label}.id", "required: 1-100 of A-Z a-z 0-9 _ - (starting alphanumeric)"))
        return None
    after_raw = raw.get("after", [])
    if isinstance(after_raw, str):
        after_raw = [after_raw]
    if not isinstance(after_raw, list) or not all(isinstance(a, str) for a in after_raw):
        errors.append((f"{label}.after", "expected a list of step ids"))
        after_raw = []
    spec_data = {k: v for k, v in raw.items() if k not in {"id", "after"}}
    try:
        spec: TaskSpec | None = parse_spec(spec_data)
    except SpecError as exc:
        errors.extend((f"{label}.{f}" if f else label, m) for f, m in exc.errors)
        spec = None
    return sid, tuple(dict.fromkeys(after_raw)), spec


def _check_top(data: dict[str, Any], errors: list[tuple[str, str]]) -> list[Any]:
    """Top-level fields (errors appended); returns the raw steps, empty when unusable."""
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    errors.extend((key, "unknown field (valid: description, id, steps)") for key in unknown)
    wid = data.get("id")
    if not isinstance(wid, str) or not ID_RE.match(wid):
        errors.append(("id", "required: 1-100 of A-Z a-z 0-9 _ - (starting alphanumeric)"))
    if not isinstance(data.get("description", ""), str):
        errors.append(("description", "expected a string"))
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        errors.append(("steps", "expected a non-empty list of steps"))
        return []
    if len(raw_steps) > MAX_STEPS:
        errors.append(("steps", f"at most {MAX_STEPS} steps"))
        return []
    return raw_steps


_Parsed = list[tuple[str, tuple[str, ...], TaskSpec | None]]


def _collect_steps(
    raw_steps: list[Any], errors: list[tuple[str, str]]
) -> tuple[_Parsed, dict[str, str]]:
    """Each step parsed once, duplicates refused; (steps, label by step id)."""
    parsed: _Parsed = []
    labels: dict[str, str] = {}
    for i, raw in enumerate(raw_steps):
        one = _parse_step(i, raw, errors)
        if one is None:
            continue
        sid = one[0]
        if sid in labels:
            errors.append((f"{_label(i, raw)}.id", f"duplicate: {labels[sid]} has the same id"))
            continue
        labels[sid] = _label(i, raw)
        parsed.append(one)
    return parsed, labels


def _check_after(
    after_of: Mapping[str, tuple[str, ...]], labels: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Unknown or self references in ``after``, then (only if none) one cycle."""
    errors = []
    for sid, after in after_of.items():
        for dep in after:
            if dep == sid:
                errors.append((f"{labels[sid]}.after", "a step cannot wait for itself"))
            elif dep not in after_of:
                known = ", ".join(sorted(after_of))
                errors.append((f"{labels[sid]}.after", f"unknown step {dep!r} (steps: {known})"))
    if not errors:
        cycle = _find_cycle(after_of)
        if cycle is not None:
            errors.append((f"{labels[cycle[0]]}.after", f"cycle: {' -> '.join(cycle)}"))
    return errors


def parse_workflow(data: object) -> Workflow:
    """Validate a decoded workflow document.

    Checks: an ``id``; at least one step; each step a valid TaskSpec with a unique
    ``id``; every ``after`` names another existing step; no cycle; every ``$from``
    names an ancestor and every placeholder is well formed.

    Raises:
        WorkflowError: every problem found, each naming the step and field.

    """
    if not isinstance(data, dict):
        raise WorkflowError([("", "a workflow is an object with id and steps")])
    errors: list[tuple[str, str]] = []
    raw_steps = _check_top(data, errors)
    if not raw_steps:
        raise WorkflowError(errors)
    parsed, labels = _collect_steps(raw_steps, errors)
    after_of = {sid: after for sid, after, _ in parsed}
    errors += _check_after(after_of, labels)
    if errors:
        raise WorkflowError(errors)
    for sid, _, spec in parsed:
        refs = _references(spec.input if spec else None, f"{labels[sid]}.input", errors)
        for ref in sorted(refs - _ancestors(sid, after_of)):
            why = "unknown step" if ref not in after_of else "not upstream (add it to after)"
            errors.append((f"{labels[sid]}.input", f"$from {ref!r}: {why}"))
    if errors:
        raise WorkflowError(errors)
    steps = tuple(Step(sid, spec, after) for sid, after, spec in parsed if spec is not None)
    levels = _levels([s.id for s in steps], after_of)
    return Workflow(str(data["id"]), steps, levels, str(data.get("description", "")))


def load_workflow_text(text: str, name: str = "workflow") -> Workflow:
    """Parse YAML or JSON text (JSON when ``name`` ends in ``.json``) into a Workflow.

    Raises:
        WorkflowError: unreadable syntax (with the position) or any invalid field.

    """
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkflowError([("", f"{name}: invalid JSON: {exc}")]) from None
    else:
        import yaml  # noqa: PLC0415 - only workflow files need it

        try:
            # safe_load: plain data only, never Python objects from tags.
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise WorkflowError([("", f"{name}: invalid YAML: {exc}")]) from None
    return parse_workflow(data)


def read_workflow(path: str | Path) -> Workflow:
    """Read and parse a workflow file (``.json``: JSON; anything else: YAML, a JSON superset).

    Raises:
        WorkflowError: see ``load_workflow_text``.
        OSError: the file cannot be read.

    """
    path = Path(path)
    return load_workflow_text(path.read_text(), path.name)


class ResolveError(ValueError):
    """A reference in a step's input does not resolve against the upstream outputs."""


def _at_path(value: JsonValue, path: str, ref: str) -> JsonValue:
    current = value
    for part in (p for p in path.split(".") if p):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif (
            isinstance(current, list)
            and part.lstrip("-").isdigit()
            and -len(current) <= int(part) < len(current)
        ):
            current = current[int(part)]
        else:
            raise ResolveError(f"$from {ref!r}: no {part!r} at path {path!r} in its output")
    return current


def resolve_input(value: JsonValue, outputs: Mapping[str, JsonValue]) -> JsonValue:
    """``value`` with every ``$from`` and ``$join`` replaced, given upstream outputs by step id.

    Raises:
        ResolveError: a referenced step has no output here, or its path does not exist.

    """
    if isinstance(value, list):
        return [resolve_input(v, outputs) for v in value]
    if not isinstance(value, dict):
        return value
    if FROM in value:
        ref = str(value[FROM])
        if ref not in outputs:
            raise ResolveError(f"$from {ref!r}: no output from that step")
        return _at_path(outputs[ref], str(value.get(PATH, "")), ref)
    joined = value.get(JOIN)
    if isinstance(joined, list):
        parts = [resolve_input(p, outputs) for p in joined]
        return "".join(
            p if isinstance(p, str) else json.dumps(p, separators=(",", ":")) for p in parts
        )
    return {k: resolve_input(v, outputs) for k, v in value.items()}


def merge_upstream(upstream: object) -> dict[str, dict[str, Any]]:
    """The step records carried by the previous level's result(s), by step id.

    ``upstream`` is what Celery hands a step: None for the first level, one step result
    after a single step, a list of them after a group (a chord's join). Each step result
    carries ``steps``, the records of every step finished so far.
    """
    results = upstream if isinstance(upstream, list) else [upstream] if upstream else []
    merged: dict[str, dict[str, Any]] = {}
    for result in results:
        if isinstance(result, dict) and isinstance(result.get("steps"), dict):
            merged.update(result["steps"])
    return merged


def actual_cost(result: Mapping[str, Any]) -> float | None:
    """The billed cost a worker reported (API workers), else None.

    Looks at ``actual_cost_usd`` in the task result, then ``cost_usd`` /
    ``actual_cost_usd`` in the handler output.
    """
    output = result.get("output")
    for source, key in (
        (result, "actual_cost_usd"),
        (output, "actual_cost_usd"),
        (output, "cost_usd"),
    ):
        if isinstance(source, Mapping) and isinstance(source.get(key), (int, float)):
            return float(source[key])
    return None

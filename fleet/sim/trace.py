"""The trace format: JSON lines, one task a line.

``{"t": 12.5, "spec": {...TaskSpec...}, "workflow": "wf-7", "step": "plan"}`` where ``t`` is
seconds since the start of the trace (non-decreasing), ``spec`` a TaskSpec, and
``workflow`` / ``step`` optional ids tying multi-step work together. Blank lines are
ignored; anything else that is not a valid event is an error naming its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleet.spec import SpecError, TaskSpec, parse_spec, spec_json


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One task arriving at ``t`` seconds."""

    t: float
    spec: TaskSpec
    workflow: str | None = None
    step: str | None = None


class TraceError(ValueError):
    """A trace line is not a valid event; the message names the line and the field."""


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[TraceEvent]:
    """Events from JSON lines, checked to be in time order.

    Raises:
        TraceError: a line is not JSON, lacks ``t`` or ``spec``, or goes back in time.

    """
    events: list[TraceEvent] = []
    last = 0.0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            t = float(raw["t"])
            spec = parse_spec(raw["spec"])
        except json.JSONDecodeError as exc:
            raise TraceError(f"{source} line {n}: not JSON: {exc}") from None
        except (KeyError, TypeError) as exc:
            raise TraceError(f"{source} line {n}: missing or malformed {exc}") from None
        except SpecError as exc:
            raise TraceError(f"{source} line {n}: spec: {exc}") from None
        except ValueError as exc:
            raise TraceError(f"{source} line {n}: t: {exc}") from None
        if t < last or t < 0:
            raise TraceError(f"{source} line {n}: t={t} goes back in time (previous {last})")
        last = t
        events.append(TraceEvent(t, spec, raw.get("workflow"), raw.get("step")))
    return events


def read_trace(path: Path) -> list[TraceEvent]:
    """Read a trace file."""
    with path.open() as fh:
        return parse_trace(fh, str(path))


def event_json(event: TraceEvent) -> str:
    """One trace line."""
    out: dict[str, object] = {"t": round(event.t, 6), "spec": json.loads(spec_json(event.spec))}
    if event.workflow is not None:
        out["workflow"] = event.workflow
    if event.step is not None:
        out["step"] = event.step
    return json.dumps(out, separators=(",", ":"))


def write_trace(events: Iterable[TraceEvent], path: Path) -> None:
    """Write a trace file."""
    with path.open("w") as fh:
        for e in events:
            fh.write(event_json(e) + "\n")

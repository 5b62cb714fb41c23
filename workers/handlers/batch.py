"""Batch operations that need no model: ``echo`` and ``noop``.

``run_handler`` routes a ``batch`` task on ``input.op`` (``workers.handlers.BATCH_OPS``);
``embed`` lives in ``workers.handlers.embedding``. This module imports no numpy, so
``noop`` costs only the dispatch: benchmarks use it to measure the queue, not the work.

* ``{"op": "echo", "payload": <any JSON>}`` returns ``{"payload": <the same>}``.
* ``{"op": "noop"}`` returns no outputs.
* ``{"op": "sleep", "seconds": S}`` waits S seconds (0 to 3600) and returns ``{"slept_s": S}``:
  test and operations tooling, a stand-in for a long task (shutdown and preemption tests).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from workers.handlers import HandlerError, get_float, input_object

if TYPE_CHECKING:
    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

ENGINE_ECHO = "cpu-reference:echo-v1"
ENGINE_NOOP = "cpu-reference:noop-v1"
ENGINE_SLEEP = "cpu-reference:sleep-v1"
MAX_SLEEP_S = 3600.0
_NOOP: dict[str, JsonValue] = {"engine": ENGINE_NOOP, "tokens_in": 0, "tokens_out": 0}


def echo(spec: TaskSpec, _ctx: HandlerContext) -> dict[str, JsonValue]:
    """Return ``input.payload`` unchanged."""
    data = input_object(spec, ("op", "payload"))
    if "payload" not in data:
        raise HandlerError("input.payload: required for op echo (any JSON value)")
    return {"engine": ENGINE_ECHO, "tokens_in": 0, "tokens_out": 0, "payload": data["payload"]}


def noop(spec: TaskSpec, _ctx: HandlerContext) -> dict[str, JsonValue]:
    """Do nothing, as cheaply as possible."""
    data = spec.input
    if not isinstance(data, dict) or len(data) != 1:
        input_object(spec, ("op",))  # raises, naming the extra field
    return dict(_NOOP)


def sleep(spec: TaskSpec, _ctx: HandlerContext) -> dict[str, JsonValue]:
    """Wait ``input.seconds`` (test and operations tooling: a long task that does nothing)."""
    seconds = get_float(input_object(spec, ("op", "seconds")), "seconds", 1.0, 0.0, MAX_SLEEP_S)
    time.sleep(seconds)
    return {"engine": ENGINE_SLEEP, "tokens_in": 0, "tokens_out": 0, "slept_s": seconds}

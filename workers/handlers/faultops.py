"""Batch ops for fault tests and operations drills: ``journal``, ``fail``, ``crash``.

Test and ops tooling, not workloads. ``fail`` and ``crash`` do harm on purpose, so
they only run on a worker started with ``FLEET_FAULT_OPS=1``; elsewhere they are
refused as bad input.

* ``{"op": "journal", "seconds": S}`` appends ``started <pid>`` to
  ``<artifact_dir>/journal/<task id>``, waits S seconds (0 to 600), then appends
  ``finished <pid>``: a side effect a test can count to see how many executions
  started and how many completed.
* ``{"op": "fail", "message": M, "until": F}`` raises ``RuntimeError(M)``: an
  unexpected error, as from a handler bug. With ``until``, it succeeds once the
  flag file ``<artifact_dir>/flags/<F>`` exists (a transient failure, fixed later).
* ``{"op": "crash", "until": F}`` ends the worker's pool process at once
  (``os._exit``), as a segfault or an out-of-memory kill would; ``until`` as above.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

from workers.handlers import HandlerError, get_float, input_object, show

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

ENGINE = "cpu-reference:fault-ops-v1"
ENABLE_VAR = "FLEET_FAULT_OPS"
MAX_JOURNAL_S = 600.0
CRASH_EXIT_CODE = 70
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _enabled(op: str) -> None:
    if os.environ.get(ENABLE_VAR) != "1":
        raise HandlerError(
            f"input.op: {op} is a fault-test op; this worker runs it only with {ENABLE_VAR}=1"
        )


def _safe_name(value: JsonValue, field: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise HandlerError(
            f"{field}: expected a plain file name (letters, digits, . _ -), got {show(value)}"
        )
    return value


def _flag_set(ctx: HandlerContext, data: dict[str, JsonValue]) -> bool:
    if "until" not in data:
        return False
    flag: Path = ctx.artifact_dir / "flags" / _safe_name(data["until"], "input.until")
    return flag.exists()


def _ok(**extra: JsonValue) -> dict[str, JsonValue]:
    return {"engine": ENGINE, "tokens_in": 0, "tokens_out": 0, **extra}


def journal(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Record the start, wait ``input.seconds``, record the finish (see the module docstring)."""
    seconds = get_float(input_object(spec, ("op", "seconds")), "seconds", 0.0, 0.0, MAX_JOURNAL_S)
    directory = ctx.artifact_dir / "journal"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _safe_name(ctx.task_id, "task id")
    with path.open("a") as f:
        f.write(f"started {os.getpid()}\n")
    time.sleep(seconds)
    with path.open("a") as f:
        f.write(f"finished {os.getpid()}\n")
    return _ok(journal=path.name, slept_s=seconds)


def fail(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Raise an unexpected error, unless the ``until`` flag exists."""
    _enabled("fail")
    data = input_object(spec, ("op", "message", "until"))
    if _flag_set(ctx, data):
        return _ok(recovered=True)
    message = data.get("message", "fault op: failing on purpose")
    raise RuntimeError(str(message))


def crash(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """End this process at once (no cleanup, no result), unless the ``until`` flag exists."""
    _enabled("crash")
    data = input_object(spec, ("op", "until"))
    if _flag_set(ctx, data):
        return _ok(recovered=True)
    os._exit(CRASH_EXIT_CODE)

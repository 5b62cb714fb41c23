"""Handlers: CPU reference implementations that do a task's real work.

Contract:

* ``run_handler(spec, ctx)`` dispatches on ``spec.kind`` (and, for ``batch``, on
  ``spec.input["op"]``) and returns a JSON-serialisable dict holding ``kind``,
  ``model``, ``engine``, ``emulated``, ``tokens_in`` and ``tokens_out`` plus the
  outputs of that kind.
* Bad input raises ``HandlerError``; its message starts with the field at fault
  (``input.texts: expected a list of strings``). The task fails, the worker lives
  on. Any other exception escaping a handler is a bug.
* On an API worker (accelerator ``api-<provider>``) every task goes to ``api.handle``,
  which forwards it to the provider's endpoint; an endpoint that keeps failing raises
  ``workers.apiclient.ApiCallError`` (retried later by the task's guard).
* Input is inline only: a spec that gives ``input_uri`` is refused. Unknown keys in
  ``input`` are refused too, so that a misspelt option never passes silently.
* Importing this package is cheap: it loads neither numpy nor the handler modules;
  each handler module is imported on its first use.
"""

from __future__ import annotations

import importlib
import json
import zlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from pathlib import Path

    from pydantic import JsonValue

    from fleet.spec import TaskSpec

    Handler = Callable[[TaskSpec, "HandlerContext"], dict[str, JsonValue]]

__all__ = [
    "BATCH_OPS",
    "MAX_TEXTS",
    "MAX_TEXT_CHARS",
    "HandlerContext",
    "HandlerError",
    "describe",
    "get_float",
    "get_int",
    "get_texts",
    "input_field",
    "input_object",
    "run_handler",
    "show",
    "stable_hash",
]

MAX_TEXTS = 10_000
MAX_TEXT_CHARS = 100_000
_SHOW_CHARS = 60

# kind -> (module, function); batch is routed further on input.op.
_ROUTES: dict[str, tuple[str, str]] = {
    "embedding": ("embedding", "handle"),
    "inference": ("generation", "handle"),
    "training": ("training", "handle"),
    "fine_tune": ("training", "handle"),
}
BATCH_OPS: dict[str, tuple[str, str]] = {
    "echo": ("batch", "echo"),
    "embed": ("embedding", "handle_batch"),
    "noop": ("batch", "noop"),
    "sleep": ("batch", "sleep"),
    # Fault-test ops (fail and crash only with FLEET_FAULT_OPS=1): workers.handlers.faultops
    "journal": ("faultops", "journal"),
    "fail": ("faultops", "fail"),
    "crash": ("faultops", "crash"),
}


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """Where and as what a handler runs.

    ``accelerator`` is the family the worker serves (``nvidia-l4``); ``emulated`` is
    True when a CPU process stands in for that chip; ``artifact_dir`` is where
    handlers may write files (created on demand); ``devices`` are the device indices
    leased to the task.
    """

    task_id: str
    accelerator: str
    emulated: bool
    artifact_dir: Path
    devices: tuple[int, ...] = (0,)


class HandlerError(Exception):
    """Bad task input; the message names the field. The task fails, the worker survives."""


def run_handler(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Run the handler for ``spec`` and return its JSON-serialisable result.

    Raises:
        HandlerError: the input is missing, malformed or out of bounds.

    """
    if spec.input_uri is not None:
        raise HandlerError("input_uri: the CPU reference handlers take inline input only")
    kind = spec.kind.value
    if ctx.accelerator.startswith("api-"):  # an API worker forwards to its provider
        route: tuple[str, str] | None = ("api", "handle")
    else:
        route = _batch_route(spec.input) if kind == "batch" else _ROUTES.get(kind)
    if route is None:
        raise HandlerError(f"kind: no CPU reference handler for {kind!r}")
    body = _resolve(*route)(spec, ctx)
    return {"kind": kind, "model": spec.model.name, "emulated": ctx.emulated, **body}


def _batch_route(data: JsonValue) -> tuple[str, str]:
    op = data.get("op") if isinstance(data, dict) else None
    route = BATCH_OPS.get(op) if isinstance(op, str) else None
    if route is None:
        valid = ", ".join(BATCH_OPS)
        raise HandlerError(f"input.op: expected one of {valid}, got {show(op)}")
    return route


@cache
def _resolve(module: str, function: str) -> Handler:
    handler: Handler = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return handler


def stable_hash(text: str) -> int:
    """Return the CRC-32 of ``text`` in UTF-8: the same in every process, unlike ``hash()``."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def show(value: JsonValue) -> str:
    """Render a JSON value for an error message, cut to a readable length."""
    text = json.dumps(value, default=str)
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def input_field(key: str) -> str:
    """Name ``input[key]`` for an error message: ``input.steps``, or ``input["a b"]``."""
    return f"input.{key}" if key.isidentifier() else f"input[{json.dumps(key)}]"


def describe(value: object) -> str:
    """Name a JSON value's type for an error message (``null``, ``integer``, ...)."""
    if value is None:
        return "null"
    names = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))
    for cls, name in (*names, (list, "array"), (dict, "object")):
        if isinstance(value, cls):
            return name
    return type(value).__name__


def input_object(
    spec: TaskSpec, allowed: Collection[str], *, required: bool = True
) -> dict[str, JsonValue]:
    """Return ``spec.input`` as an object whose keys are all in ``allowed``.

    A missing input is an error when ``required``, else an empty object.
    """
    data = spec.input
    if data is None and not required:
        return {}
    if not isinstance(data, dict):
        raise HandlerError(f"input: expected an object, got {describe(data)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed))
        raise HandlerError(f"{input_field(unknown[0])}: unknown field (valid: {valid})")
    return data


def get_int(data: dict[str, JsonValue], key: str, default: int, lo: int, hi: int) -> int:
    """Return integer ``data[key]`` (``default`` when absent), checked to lie in ``[lo, hi]``."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HandlerError(f"input.{key}: expected an integer from {lo} to {hi}, got {show(value)}")
    return value


def get_float(data: dict[str, JsonValue], key: str, default: float, lo: float, hi: float) -> float:
    """Return number ``data[key]`` (``default`` when absent), checked to lie in ``[lo, hi]``."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise HandlerError(
            f"input.{key}: expected a number from {lo:g} to {hi:g}, got {show(value)}"
        )
    return float(value)


def get_texts(data: dict[str, JsonValue]) -> list[str]:
    """Return the texts of ``{"texts": [...]}`` or ``{"text": "..."}``, checked against limits."""
    if "texts" in data and "text" in data:
        raise HandlerError("input.text: give texts or text, not both")
    if "text" in data:
        raw: JsonValue = [data["text"]]
        field = "input.text"
    else:
        raw = data.get("texts")
        field = "input.texts"
    if not isinstance(raw, list):
        raise HandlerError(f"{field}: expected a list of strings, got {describe(raw)}")
    if len(raw) > MAX_TEXTS:
        raise HandlerError(f"{field}: at most {MAX_TEXTS:,} texts, got {len(raw):,}")
    texts: list[str] = []
    for i, text in enumerate(raw):
        where = field if field == "input.text" else f"{field}[{i}]"
        if not isinstance(text, str):
            raise HandlerError(f"{where}: expected a string, got {describe(text)}")
        if len(text) > MAX_TEXT_CHARS:
            raise HandlerError(f"{where}: at most {MAX_TEXT_CHARS:,} characters, got {len(text):,}")
        texts.append(text)
    return texts

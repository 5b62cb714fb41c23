"""A Celery router so Celery-native use (``apply_async``, canvas) of ``fleet.run`` is routed too.

``celery`` calls ``route_task`` for every message it sends; for ``fleet.run`` without an
explicit queue it places the spec (first positional argument) and returns its queue.
Invalid specs raise ``SpecError`` here, so they never reach the broker.
"""

from __future__ import annotations

from typing import Any

from fleet.catalog import default_catalog
from fleet.placement import place
from fleet.spec import parse_spec

TASK_NAME = "fleet.run"


def route_task(
    name: str,
    args: tuple[Any, ...],
    _kwargs: dict[str, Any],
    options: dict[str, Any],
    task: Any = None,  # noqa: ANN401, ARG001 - Celery passes its Task object, untyped
    *,
    namespace: str = "",
    **_: Any,  # noqa: ANN401 - Celery may add keyword arguments in later versions
) -> dict[str, Any] | None:
    """Return ``{"queue": ...}`` for ``fleet.run`` messages that name no queue.

    ``namespace`` is bound by ``fleet.app.create_app`` (``functools.partial``).
    """
    if name != TASK_NAME or options.get("queue") or not args:
        return None
    spec = parse_spec(args[0])
    placement = place(spec, default_catalog(), namespace=namespace)
    return {"queue": placement.queue, "routing_key": placement.queue}

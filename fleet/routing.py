"""A Celery router so Celery-native use (``apply_async``, canvas) of ``fleet.run`` is routed too.

``celery`` calls ``route_task`` for every message it sends; for ``fleet.run`` without an
explicit queue it places the spec (first positional argument) and returns its queue.
Invalid specs raise ``SpecError`` here, so they never reach the broker. Placement uses the
model registry (``models``, bound by the app; default ``env_registry()``: the built-ins plus
the ``[[models]]`` of ``FLEET_CONFIG``), so work for a registry model goes to its model's
queue (``embedding.cpu@all-minilm-l6-v2``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fleet.catalog import default_catalog
from fleet.models.registry import ModelRegistry, registry_from_file
from fleet.placement import place
from fleet.settings import Settings
from fleet.spec import parse_spec

TASK_NAME = "fleet.run"


@cache
def env_registry() -> ModelRegistry:
    """The registry of ``FLEET_CONFIG`` (``Settings.config_path``), read once per process.

    Raises:
        ModelConfigError: the file is unreadable or a ``[[models]]`` entry is invalid.

    """
    return registry_from_file(Settings.from_env().config_path)


def route_task(
    name: str,
    args: tuple[Any, ...],
    _kwargs: dict[str, Any],
    options: dict[str, Any],
    task: Any = None,  # noqa: ANN401, ARG001 - Celery passes its Task object, untyped
    *,
    namespace: str = "",
    models: ModelRegistry | None = None,
    **_: Any,  # noqa: ANN401 - Celery may add keyword arguments in later versions
) -> dict[str, Any] | None:
    """Return ``{"queue": ...}`` for ``fleet.run`` messages that name no queue.

    ``namespace`` and ``models`` are bound by ``fleet.app.create_app``
    (``functools.partial``); ``models`` None uses ``env_registry()``.

    Raises:
        SpecError: the spec is invalid.
        NoPlacementError: nothing can run it (``ContextError``: longer than its model's
            context).

    """
    if name != TASK_NAME or options.get("queue") or not args:
        return None
    spec = parse_spec(args[0])
    registry = models if models is not None else env_registry()
    placement = place(spec, default_catalog(), namespace=namespace, models=registry)
    return {"queue": placement.queue, "routing_key": placement.queue}

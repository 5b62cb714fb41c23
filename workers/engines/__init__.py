"""Engines: the code that does a worker's AI work (see ``workers.engines.base``).

``engine_class(name)`` imports one engine's module on demand: importing this package loads
neither torch nor any engine library, so the worker's parent process stays light and never
touches a device before the prefork fork.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engines.base import Engine

# name -> (module, class)
ENGINES: dict[str, tuple[str, str]] = {
    "transformers": ("workers.engines.transformers_engine", "TransformersEngine"),
    "vllm": ("workers.engines.vllm", "VllmEngine"),
    "reference": ("workers.engines.reference", "ReferenceEngine"),
}


def engine_class(name: str) -> type[Engine]:
    """The engine class called ``name``.

    Raises:
        KeyError: unknown engine; the message lists the known ones.

    """
    try:
        module, cls = ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})") from None
    engine: type[Engine] = getattr(importlib.import_module(module), cls)
    return engine

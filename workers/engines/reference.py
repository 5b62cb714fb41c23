"""The ``reference`` engine: fleet's CPU reference handlers (``workers.handlers``) as an engine.

Kept for emulated chips, the fault suite and models no real engine holds. Its output is
never a real model's: every result says ``reference: true`` and names the handler
(``cpu-reference:trigram-lm-v1`` ...). It serves every kind on every runtime, needs no
weights and is always ready.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fleet.spec import Runtime, TaskKind
from workers.engines.base import Engine, EngineOutput, EngineRequest
from workers.handlers import HandlerContext, run_handler

if TYPE_CHECKING:
    from fleet.models.registry import ModelEntry


class ReferenceEngine(Engine):
    """Runs the CPU reference handlers; see the module docstring."""

    name: ClassVar[str] = "reference"
    kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)
    runtimes: ClassVar[frozenset[Runtime]] = frozenset(Runtime)

    def __init__(self, accelerator: str = "cpu", *, emulated: bool = True) -> None:
        """Run handlers as ``accelerator`` (``emulated`` when a CPU process stands in for it)."""
        self.accelerator = accelerator
        self.emulated = emulated

    @classmethod
    def unavailable(cls, runtime: Runtime) -> str | None:  # noqa: ARG003 - always available
        """Never unavailable: the handlers are pure Python and numpy."""
        return None

    @classmethod
    def version(cls) -> str:
        """The handlers' version tag."""
        return "fleet reference handlers v1"

    def load(self, model: ModelEntry, weights: Path) -> None:
        """Nothing to load: the handlers hold no weights."""

    def ready(self, model: str) -> bool:  # noqa: ARG002 - every model is served
        """Always ready."""
        return True

    def run(self, request: EngineRequest) -> EngineOutput:
        """Run the handler of ``request.spec``; its output carries ``reference: true``.

        Raises:
            workers.handlers.HandlerError: bad input, the field named.

        """
        ctx = HandlerContext(
            task_id=request.task_id,
            accelerator=self.accelerator,
            emulated=self.emulated,
            artifact_dir=request.artifact_dir or Path(".fleet/artifacts"),
            devices=request.devices,
        )
        t0 = time.perf_counter()
        out = run_handler(request.spec, ctx)
        run_s = time.perf_counter() - t0
        tokens_in = out.get("tokens_in")
        tokens_out = out.get("tokens_out")
        n_in = tokens_in if isinstance(tokens_in, int) else 0
        n_out = tokens_out if isinstance(tokens_out, int) else 0
        return EngineOutput(
            output={**out, "reference": True},
            tokens_in=n_in,
            tokens_out=n_out,
            run_s=run_s,
            tokens_per_s=(n_out or n_in) / run_s if run_s > 0 else None,
        )

"""The engine contract: what every engine (transformers, vllm, reference) promises.

An engine runs the AI work of one worker process (or, for a server engine, of one host):

* It declares its ``name``, the task ``kinds`` and the ``runtimes`` (cuda, rocm, neuron,
  xla, cpu) it serves.
* ``unavailable(runtime)`` says why it cannot run here (a missing package, no device, a
  runtime it does not serve), or None. It must not import torch or touch a device: the
  worker's parent process calls it before the prefork fork.
* ``load(model, weights)`` loads one model (once: a second call for the same model is a
  no-op) from a local directory; it never reaches a model hub (``HF_HUB_OFFLINE=1``).
* ``ready(model)`` is True once that model serves.
* ``run(request)`` does one task and returns an ``EngineOutput``; bad input raises
  ``workers.handlers.HandlerError`` (the field named), a broken engine raises
  ``EngineError`` (the task is retried through the worker's guard, never lost).
* ``stop()`` releases the model and any process the engine started; idempotent.

Results say how they were made: the task adds the engine name and version, the model name
and revision, and ``emulated`` to what ``run`` returns (``fleet.run``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from fleet.spec import Runtime, TaskKind

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import JsonValue

    from fleet.models.registry import ModelEntry
    from fleet.spec import TaskSpec


class EngineError(RuntimeError):
    """The engine failed (server died, out of memory): not the input's fault; retried."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One task handed to an engine.

    ``device`` is the torch-style device the task may use (``cpu``, ``cuda:0``); ``devices``
    the leased device indices (tensor parallel spans them); ``artifact_dir`` where training
    writes checkpoints and adapters; ``weights`` the local directory of the model's weights.
    """

    spec: TaskSpec
    model: ModelEntry
    weights: Path
    task_id: str
    device: str = "cpu"
    devices: tuple[int, ...] = (0,)
    artifact_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What an engine made: the outputs of the kind plus how it made them.

    ``tokens_in``/``tokens_out`` are counted by the engine's own tokenizer;
    ``ttft_s`` is the measured time to the first generated token (None where nothing is
    generated); ``tokens_per_s`` the generated (or, for embeddings and training, processed)
    tokens per second of the run.

    Generation (inference) also reports ``tpot_ms``, the measured decode time per output
    token after the first in milliseconds (``workers.engines.timing``; each engine's
    docstring says which instants it measures), and, exactly when the spec sets
    ``slo.tpot_ms``, ``slo_tpot_met`` (``tpot_ms <= slo.tpot_ms``). Both stay None for
    embeddings and training, and out of ``output``: two runs of one seed give equal outputs.
    """

    output: dict[str, JsonValue]
    tokens_in: int
    tokens_out: int
    run_s: float
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    extra: dict[str, JsonValue] = field(default_factory=dict)
    tpot_ms: float | None = None
    slo_tpot_met: bool | None = None


class Engine(abc.ABC):
    """One engine; see the module docstring for the contract."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[TaskKind]]
    runtimes: ClassVar[frozenset[Runtime]]
    loads_on_demand: ClassVar[frozenset[TaskKind]] = frozenset()
    """Kinds this engine may load a model for when a task asks (training amortises the load)."""

    @classmethod
    @abc.abstractmethod
    def unavailable(cls, runtime: Runtime) -> str | None:
        """Why this engine cannot run on ``runtime`` here, or None. Imports nothing heavy."""

    @classmethod
    def version(cls) -> str:
        """The engine library's version (``transformers 5.25.0``)."""
        return cls.name

    @abc.abstractmethod
    def load(self, model: ModelEntry, weights: Path) -> None:
        """Load ``model`` from ``weights``; a no-op when already loaded."""

    @abc.abstractmethod
    def ready(self, model: str) -> bool:
        """True once the model named ``model`` serves."""

    @abc.abstractmethod
    def run(self, request: EngineRequest) -> EngineOutput:
        """Run one task; see the module docstring for what it raises."""

    def stop(self) -> None:  # noqa: B027 - engines without resources need no stop
        """Release models and processes; idempotent."""

    def serves(self, runtime: Runtime, kind: TaskKind) -> bool:
        """Whether this engine runs ``kind`` work on ``runtime`` at all."""
        return runtime in self.runtimes and kind in self.kinds


def reason_missing(*modules: str) -> str | None:
    """``missing package X (pip install ...)`` for the first module that is not importable.

    Uses ``importlib.util.find_spec``: nothing is imported.
    """
    import importlib.util  # noqa: PLC0415 - only when an engine is checked

    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"missing package {module} (pip install 'fleet[engines]')"
    return None

"""What a worker serves: its engine, the models it holds, and the queues that follow from them.

``serving_plan`` is pure: given the registry, an engine class, the models asked for and the
worker's family, it returns model name -> the task kinds this worker takes for it, or raises
``ServingError`` saying what is wrong (unknown model, engine not allowed for it, nothing to
serve). Models given with ``--model`` are held (loaded before the worker consumes); for the
kinds an engine ``loads_on_demand`` (training, fine-tuning: a run amortises the load) the
worker also takes work for every other registry model that allows the engine.

``setup`` runs once per process that does the work (a prefork pool child, after the fork; or
the main process of a solo/threads worker): it builds the engine and loads the held models.
``current`` returns that state to ``fleet.run``. Readiness: each process that finished loading
writes a marker in ``ready_dir``; the heartbeat counts them (``ready_processes``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.models.registry import ModelEntry, ModelRegistry
from fleet.models.weights import resolve
from fleet.spec import Runtime, TaskKind, TaskSpec
from workers.engines import engine_class
from workers.engines.base import EngineRequest

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fleet.catalog import Family
    from workers.engines.base import Engine


class ServingError(ValueError):
    """The worker cannot serve what it was asked to; the message says why."""


def engine_runtime(family: Family, engine: type[Engine], *, emulated: bool) -> Runtime:
    """The runtime ``engine`` runs on for ``family``: cpu when emulated, else the family's own.

    Raises:
        ServingError: the engine serves none of the family's runtimes.

    """
    if emulated:
        return Runtime.CPU
    for runtime in family.runtimes:
        if Runtime(runtime) in engine.runtimes:
            return Runtime(runtime)
    raise ServingError(
        f"engine {engine.name} does not run on {family.name} (runtimes {', '.join(family.runtimes)};"
        f" {engine.name} serves {', '.join(sorted(engine.runtimes))})"
    )


def serving_plan(
    registry: ModelRegistry,
    engine: type[Engine],
    models: Sequence[str],
    family: Family,
) -> dict[str, frozenset[TaskKind]]:
    """Model name -> kinds this worker takes for it; see the module docstring.

    Raises:
        ServingError: an unknown model, a model that does not allow the engine, a model none
            of whose kinds the engine or family runs, or a real engine with no model.

    """
    family_kinds = {TaskKind(k) for k in family.kinds}
    plan: dict[str, frozenset[TaskKind]] = {}
    for name in models:
        try:
            entry = registry.get(name)
        except KeyError as exc:
            raise ServingError(str(exc.args[0])) from None
        if engine.name not in entry.engines:
            raise ServingError(
                f"model {entry.name} allows engines {', '.join(entry.engines)}, not {engine.name}"
            )
        kinds = entry.kinds & engine.kinds & family_kinds
        if not kinds:
            raise ServingError(
                f"engine {engine.name} on {family.name} runs none of {entry.name}'s kinds"
                f" ({', '.join(sorted(entry.kinds))})"
            )
        plan[entry.name] = frozenset(kinds)
    if engine.name != "reference" and not plan:
        raise ServingError(f"engine {engine.name} needs at least one --model")
    for entry in registry:
        if entry.name in plan or engine.name not in entry.engines:
            continue
        kinds = entry.kinds & engine.loads_on_demand & family_kinds
        if kinds:
            plan[entry.name] = frozenset(kinds)
    return plan


@dataclass
class Serving:
    """One process's engine and the models it holds (see ``setup``)."""

    engine: Engine
    registry: ModelRegistry
    cache: Path
    device: str = "cpu"
    held: dict[str, ModelEntry] = field(default_factory=dict)
    weights: dict[str, Path] = field(default_factory=dict)

    def model_for(self, name: str, kind: TaskKind) -> ModelEntry | None:
        """The registry entry serving ``kind`` work for ``name``, or None."""
        return self.registry.serving(name, kind)

    def weights_of(self, entry: ModelEntry) -> Path:
        """The local weights of ``entry``, resolved once (fetched or built if need be)."""
        path = self.weights.get(entry.name)
        if path is None:
            path = self.weights[entry.name] = resolve(entry, self.cache)
        return path

    def hold(self, entry: ModelEntry) -> None:
        """Load ``entry`` into the engine (a no-op when already held).

        A LoRA adapter entry (``format = "lora"``) holds its base model; the adapter is
        applied per request (``request_for``).
        """
        if entry.name in self.held:
            return
        if entry.format == "lora":
            base = self.registry.get(entry.base or "")
            self.hold(base)
            self.weights_of(entry)  # fetched now, not on the first request
        else:
            self.engine.load(entry, self.weights_of(entry))
        self.held[entry.name] = entry

    def request_for(
        self,
        entry: ModelEntry,
        spec: TaskSpec,
        task_id: str,
        devices: tuple[int, ...] = (0,),
        artifact_dir: Path | None = None,
    ) -> EngineRequest:
        """The engine request for ``spec`` on ``entry``.

        A LoRA adapter entry runs on its base model with ``input.adapter`` set to the
        adapter's weights (the engine caches the adapted model).
        """
        if entry.format == "lora":
            base = self.registry.get(entry.base or "")
            data = dict(spec.input) if isinstance(spec.input, dict) else {}
            data["adapter"] = str(self.weights_of(entry))
            spec = spec.model_copy(update={"input": data})
            entry = base
        return EngineRequest(
            spec=spec,
            model=entry,
            weights=self.weights_of(entry),
            task_id=task_id,
            device=self.device,
            devices=devices,
            artifact_dir=artifact_dir,
        )


_current: Serving | None = None


def setup(
    engine: Engine,
    registry: ModelRegistry,
    cache: Path,
    models: Sequence[str],
    device: str = "cpu",
) -> Serving:
    """Make ``engine`` this process's engine and load ``models`` into it (before serving).

    Raises:
        KeyError: an unknown model.
        fleet.models.weights.WeightsError: weights missing or not fetchable.
        workers.engines.base.EngineError: the engine failed to load a model.

    """
    global _current  # noqa: PLW0603 - one engine per process, set once at process start
    state = Serving(engine, registry, cache, device)
    for name in models:
        state.hold(registry.get(name))
    _current = state
    return state


def current() -> Serving | None:
    """The serving state of this process, or None in a reference worker."""
    return _current


def ready_dir(parent_pid: int | None = None) -> Path:
    """Where this worker's processes mark themselves ready (one directory per worker)."""
    pid = os.getppid() if parent_pid is None else parent_pid
    override = os.environ.get("FLEET_READY_DIR")
    return Path(override) if override else Path(tempfile.gettempdir()) / f"fleet-ready-{pid}"


def mark_ready(directory: Path) -> None:
    """Say that this process has loaded its models."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).touch()


def ready_processes(directory: Path) -> int:
    """How many live processes of this worker have loaded their models."""
    if not directory.is_dir():
        return 0
    live = 0
    for marker in directory.iterdir():
        if marker.name.isdigit() and Path(f"/proc/{marker.name}").exists():
            live += 1
    return live


def build_engine(name: str, device: str, **kwargs: object) -> Engine:
    """An instance of engine ``name`` for ``device`` (``cpu``, ``cuda:0``)."""
    cls = engine_class(name)
    if name == "reference":
        return cls(**kwargs)
    return cls(device=device, **kwargs)  # type: ignore[call-arg]

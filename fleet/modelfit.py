"""Model fit, pure: which registry model a task runs, whether it fits, where its engines run.

One rule per function, shared by placement (``fleet.placement``), the autoscaler's pool
validation (``fleet.autoscaler.config``), the simulator and the client's submit check:

* ``served_entry``: the registry entry that serves a task (its ``spec.model.name`` or an
  alias, for a kind the entry serves), or None: that task keeps the plain queue, served by
  reference workers.
* ``context_problem``: an ``inference`` request whose ``tokens_in + tokens_out`` exceeds the
  model's ``max_context`` is refused, naming both numbers. Only inference: an embedding's
  ``tokens_in`` counts every text of the batch (each is cut at the context on its own) and a
  training task's is the size of its data set.
* ``ENGINE_KINDS``: the task kinds each engine runs, as data (a vLLM pool takes no training).
* ``ENGINE_RUNTIMES``: the runtimes (``fleet.spec.Runtime``) each engine runs on, as data;
  ``engine_problem`` rejects a family none of whose runtimes an allowed engine serves (a
  model allowed only on ``transformers`` never lands on a TPU or an Inferentia).
* ``models_load_s``: a cold worker reads its models' weights before it consumes
  (``ModelEntry.load_s`` at the registry's load bandwidth): the time a model adds to a
  cold start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleet.catalog import Family
from fleet.models.registry import ModelEntry, ModelRegistry
from fleet.spec import Runtime, TaskKind, TaskSpec

# What each engine runs on. transformers: torch's cpu, cuda and rocm builds; vLLM: its CUDA,
# ROCm, Neuron, TPU (xla) and CPU builds; reference: the CPU handlers, on any chip (emulated).
ENGINE_RUNTIMES: dict[str, frozenset[Runtime]] = {
    "transformers": frozenset({Runtime.CPU, Runtime.CUDA, Runtime.ROCM}),
    "vllm": frozenset({Runtime.CUDA, Runtime.ROCM, Runtime.NEURON, Runtime.XLA, Runtime.CPU}),
    "reference": frozenset(Runtime),
}
# The kinds each engine runs (the engines' own ``kinds``, ``workers.engines``): a worker of
# engine E holding model M consumes M's queues of the kinds M serves and E runs.
ENGINE_KINDS: dict[str, frozenset[TaskKind]] = {
    "transformers": frozenset(
        {TaskKind.EMBEDDING, TaskKind.INFERENCE, TaskKind.TRAINING, TaskKind.FINE_TUNE}
    ),
    "vllm": frozenset({TaskKind.INFERENCE, TaskKind.EMBEDDING}),
    "reference": frozenset(TaskKind),
}
# Engines that serve one model per worker (a vLLM server holds one model).
ONE_MODEL_ENGINES = frozenset({"vllm"})
CONTEXT_KINDS = frozenset({TaskKind.INFERENCE})


def served_entry(spec: TaskSpec, registry: ModelRegistry | None) -> ModelEntry | None:
    """The entry serving ``spec`` (by model name or alias, for its kind), or None.

    None also when ``registry`` is None (no registry: every task keeps the plain queue).
    """
    if registry is None:
        return None
    return registry.serving(spec.model.name, spec.kind)


def context_problem(spec: TaskSpec, registry: ModelRegistry | None) -> str | None:
    """Why ``spec`` does not fit its model's context, or None (fits, or not checked).

    Checked only for ``inference`` on a registry model; the message names both numbers:
    ``tokens_in + tokens_out = 5,000 > max_context 1,024 of tiny-llama``.
    """
    entry = served_entry(spec, registry)
    if entry is None or spec.kind not in CONTEXT_KINDS:
        return None
    if entry.fits_context(spec.tokens_in, spec.tokens_out):
        return None
    total = spec.tokens_in + spec.tokens_out
    return f"tokens_in + tokens_out = {total:,} > max_context {entry.max_context:,} of {entry.name}"


def engine_runs_on(engine: str, runtimes: Iterable[str]) -> bool:
    """Whether ``engine`` runs on any of ``runtimes`` (a family's runtime names)."""
    served = {r.value for r in ENGINE_RUNTIMES[engine]}
    return any(r in served for r in runtimes)


def usable_engines(entry: ModelEntry, family: Family) -> tuple[str, ...]:
    """The engines allowed for ``entry`` that run on ``family``, in the entry's order."""
    return tuple(e for e in entry.engines if engine_runs_on(e, family.runtimes))


def engine_problem(entry: ModelEntry, family: Family) -> str | None:
    """Why no engine allowed for ``entry`` runs on ``family``, or None when one does."""
    if usable_engines(entry, family):
        return None
    allowed = "; ".join(
        f"{e} on {', '.join(sorted(r.value for r in ENGINE_RUNTIMES[e]))}" for e in entry.engines
    )
    return (
        f"runtime {', '.join(sorted(family.runtimes))}: no engine allowed for {entry.name}"
        f" runs on it (allowed: {allowed})"
    )


def default_engine(entries: Sequence[ModelEntry], family: Family | None = None) -> str:
    """The engine a worker holding ``entries`` runs when none is named.

    ``reference`` with no models; else, in the first entry's order, the first engine every
    entry allows that runs on ``family`` (any family when None), then the first every
    entry allows, then the first entry's first (pool validation names what is wrong).
    """
    if not entries:
        return "reference"
    shared = [e for e in entries[0].engines if all(e in other.engines for other in entries)]
    here = [e for e in shared if family is None or engine_runs_on(e, family.runtimes)]
    return (here or shared or list(entries[0].engines))[0]


def models_load_s(entries: Iterable[ModelEntry], load_gbps: float) -> float:
    """Seconds a cold worker spends reading every model of ``entries`` (one after another)."""
    return sum(e.load_s(load_gbps) for e in entries)


def warmth_reason(
    model: str | None, cold_start_s: float, load_s: float, consumers: int | None
) -> tuple[str, ...]:
    """The reason line on a model queue's warmth; none for the plain queue (``model`` None).

    ``consumers`` None: the queue's load is unknown (counted warm, as placement does).
    """
    if model is None:
        return ()
    if consumers is None:
        return (f"model {model}: queue load unknown, counted warm",)
    if consumers > 0:
        return (f"warm: {consumers} worker(s) hold {model}",)
    return (f"cold: boot {seconds(cold_start_s)} s + load {model} {seconds(load_s)} s",)


def seconds(x: float) -> str:
    """Seconds for reasons: ``120``, ``2.5``, ``0.01``, ``<0.01``."""
    if x >= 100:  # noqa: PLR2004 - whole seconds from here on
        return f"{x:,.0f}"
    if 0 < x < 0.005:  # noqa: PLR2004 - below what two decimals show
        return "<0.01"
    return f"{x:.2f}".rstrip("0").rstrip(".")

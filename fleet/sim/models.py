"""The simulation's model awareness: what an instance holds, how long it loads, where work goes.

The same rules as the live fleet, read from the config: a pool's instances serve the queues
of the registry models the pool declares, of the kinds its engine runs, or the plain queues
when it declares none (``PoolConfig.serving``); a new instance reads its models' weights after it boots
(``PoolConfig.load_s``), so it serves that much later. Work for model M is placed on the
catalog of the pools that serve its kind of work for M (``catalog_for_model``), with the registry, so it lands on
an ``...@M`` queue some pool serves (or on an API pool that serves it); work nothing can
take is rejected, with the reason that no pool holds its model when none does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet.autoscaler.config import AutoscalerConfig, catalog_for_model, pools_serving
from fleet.catalog import Catalog
from fleet.modelfit import served_entry
from fleet.models.registry import ModelEntry
from fleet.spec import TaskKind, TaskSpec

PLAIN: Mapping[str | None, frozenset[TaskKind]] = {None: frozenset(TaskKind)}


@dataclass(frozen=True, slots=True)
class Holds:
    """What one pool's instances serve and how long they load before serving."""

    serving: Mapping[str | None, frozenset[TaskKind]] = field(default_factory=lambda: PLAIN)
    load_s: float = 0.0

    def serves(self, model: str | None, kind: TaskKind) -> bool:
        """Whether they serve ``kind`` queues of ``model`` (None: the plain queues)."""
        return kind in self.serving.get(model, ())


def pool_holds(config: AutoscalerConfig) -> dict[str, Holds]:
    """``{pool name: Holds}`` for every pool of ``config``."""
    registry = config.registry
    return {p.name: Holds(p.serving(registry), p.load_s(registry)) for p in config.pools}


@dataclass
class ModelCatalogs:
    """Per-model placement catalogs of one config, built on first use."""

    catalog: Catalog
    config: AutoscalerConfig
    _by_model: dict[tuple[str | None, TaskKind], Catalog] = field(default_factory=dict)
    _unheld: dict[tuple[str | None, TaskKind], str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Read the registry once."""
        self.registry = self.config.registry

    def model_of(self, spec: TaskSpec) -> str | None:
        """The registry model whose queue ``spec`` goes to, or None (the plain queue)."""
        entry = served_entry(spec, self.registry)
        return None if entry is None else entry.name

    def for_model(self, model: str | None, kind: TaskKind) -> Catalog:
        """The catalog that places ``kind`` work for ``model`` (``catalog_for_model``)."""
        key = (model, kind)
        if key not in self._by_model:
            self._by_model[key] = catalog_for_model(self.catalog, self.config, model, kind)
        return self._by_model[key]

    def unheld(self, model: str | None, kind: TaskKind) -> str | None:
        """Why no pool can take ``kind`` work for ``model``, or None when one serves it."""
        key = (model, kind)
        if key not in self._unheld:
            self._unheld[key] = self._why_unheld(model, kind)
        return self._unheld[key]

    def _why_unheld(self, model: str | None, kind: TaskKind) -> str | None:
        if pools_serving(self.config, model, kind):
            return None
        if model is None:
            return "no reference pool serves the plain queues (every pool holds models only)"
        if pools_serving(self.config, model):
            return f"no pool runs {kind.value} work for model {model}"
        return f"no pool holds model {model}"

    def entries(self, specs: list[TaskSpec]) -> tuple[ModelEntry, ...]:
        """The registry entries the pools hold or ``specs`` name (whose queues matter)."""
        names = {m for p in self.config.pools for m in p.serving(self.registry) if m is not None}
        names |= {m for s in specs if (m := self.model_of(s)) is not None}
        return tuple(e for e in self.registry if e.name in names)

"""Demand: which pools can serve which queue, and how many devices each pool is given.

Pure helpers of ``fleet.autoscaler.planner`` (whose docstring is the contract); nothing
here does I/O or reads a clock. Units: demand is measured in *devices* (a rate: devices
busy at once). A queue of tier ``N`` asks for

* the devices its running tasks occupy (``running_devices``, else
  ``unacked x N x share``: a generation stream of a batch of 40 holds 1/40 of a device,
  not a whole one), with headroom: ``max(load / TARGET_UTILISATION, load + Z x
  sqrt(load x N x share))`` (Poisson noise in how many tasks run at once), plus
* its backlog drained within the pool's ``drain_target_s``:
  ``ready x N x service_s / drain_target_s`` (``service_s``: device time per task).

Running tasks measure the arrival rate (Little's law: tasks in flight = rate x time in
flight), so a pool keeping up with steady traffic is sized to that traffic, and one
falling behind sees its backlog grow. A pool instance with ``D`` devices gives
``(D // N) x N`` devices to tier ``N`` (cpu instances: one).

A model queue (``...@<model>``) is served only by pools that hold the model (for the kinds
their engine runs); a plain queue only by pools without models (``PoolView.serves``, from
``PoolConfig.serving``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleet.autoscaler.config import PoolConfig, PricedOffer
from fleet.autoscaler.model import OfferRef, QueueObservation, Unsatisfiable
from fleet.catalog import Catalog, Offer
from fleet.queues import parse_queue
from fleet.spec import TaskKind
from fleet.throughput import TARGET_UTILISATION

CPU = "cpu"
EPS = 1e-9
Z = 2.0  # standard deviations of in-flight noise kept as headroom

DEFAULT_SERVICE_S: dict[TaskKind, float] = {
    TaskKind.INFERENCE: 10.0,
    TaskKind.EMBEDDING: 2.0,
    TaskKind.BATCH: 60.0,
    TaskKind.FINE_TUNE: 1800.0,
    TaskKind.TRAINING: 3600.0,
}


def pool_devices(pool: PoolConfig, offer: Offer) -> int:
    """Devices per instance of ``pool`` bought as ``offer``.

    ``pool.devices`` when set (a local pool emulating a larger box), else the offer's
    accelerator count. A cpu instance counts as one device whatever its size: cpu
    workers consume only the single-device tier (``fleet.queues.queues_for_worker``).
    """
    if offer.accelerator == CPU:
        return 1
    return pool.devices if pool.devices is not None else offer.accelerator_count


def offer_ref(priced: PricedOffer) -> OfferRef:
    """The ``OfferRef`` of a priced offer (local and fake pools: their ``price_as`` offer)."""
    o = priced.offer
    return OfferRef(o.cloud, o.region, o.instance_type, priced.market.value)


@dataclass(frozen=True, slots=True)
class QueueDemand:
    """A parsed queue with work: ``tasks`` (ready + unacked), ``service_s`` of device time each.

    ``share``: the part of its ``devices`` one running task occupies (1: all of them);
    ``running_devices``: devices its running tasks occupy, when observed.
    """

    name: str
    kind: TaskKind
    accelerator: str
    devices: int
    tasks: int
    ready: int
    service_s: float
    model: str | None = None  # the registry model of a ``...@<model>`` queue
    share: float = 1.0
    running_devices: float | None = None

    @property
    def in_flight_devices(self) -> float:
        """Devices the queue's running tasks occupy now."""
        if self.running_devices is not None:
            return self.running_devices
        return (self.tasks - self.ready) * self.devices * self.share

    def devices_wanted(self, drain_target_s: float) -> float:
        """Devices to keep: in-flight load with headroom, plus the backlog over ``drain_target_s``."""
        load = self.in_flight_devices
        unit = self.devices * self.share
        steady = max(load / TARGET_UTILISATION, load + Z * math.sqrt(load * unit)) if load else 0.0
        return steady + self.ready * self.devices * self.service_s / drain_target_s


def parse_demands(queues: Mapping[str, QueueObservation], namespace: str) -> list[QueueDemand]:
    """Queues of the naming scheme that have work, sorted by name; others are ignored."""
    out = []
    for name in sorted(queues):
        q = queues[name]
        tasks = q.ready + q.unacked
        ref = parse_queue(name, namespace) if tasks > 0 else None
        if ref is None:
            continue
        sample = q.sample_service_s
        service = sample if sample is not None and sample > 0 else DEFAULT_SERVICE_S[ref.kind]
        share = q.sample_share if q.sample_share is not None and q.sample_share > 0 else 1.0
        out.append(
            QueueDemand(
                name,
                ref.kind,
                ref.accelerator,
                ref.devices,
                tasks,
                q.ready,
                service,
                ref.model,
                share=min(share, 1.0),
                running_devices=q.running_devices,
            )
        )
    return out


@dataclass(slots=True)
class PoolView:
    """Facts about one configured pool, derived once per plan, plus the work assigned to it.

    ``capacity``: PENDING/RUNNING instances not cleaned up by this plan. ``spend``: the
    hourly cost of every instance of the pool the provider still reports (TERMINATING
    ones bill until gone), which budgets are checked against. ``serving``: the queues it
    serves, ``{model (None: the plain queues): kinds}`` (``PoolConfig.serving``);
    ``load_s``: what reading its models adds to an instance's cold start.
    """

    pool: PoolConfig
    offers: tuple[PricedOffer, ...]
    blocked: frozenset[str]
    capacity: int
    spend: float
    serving: Mapping[str | None, frozenset[TaskKind]] = field(
        default_factory=lambda: {None: frozenset(TaskKind)}
    )
    load_s: float = 0.0
    max_devices: int = 0
    used: float = 0.0  # devices assigned (with headroom and backlog drain)
    in_flight: float = 0.0  # devices the assigned running tasks occupy now
    top_tier: int = 0
    shares: list[tuple[QueueDemand, float]] = field(default_factory=list)
    choices: dict[int, PricedOffer | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Largest instance any allowed offer gives, ignoring backoff (what the pool *can* serve)."""
        self.max_devices = max((pool_devices(self.pool, p.offer) for p in self.offers), default=0)

    def serves(self, model: str | None, kind: TaskKind) -> bool:
        """Whether the pool serves ``kind`` queues of ``model`` (None: the plain queues)."""
        return kind in self.serving.get(model, ())

    @property
    def models(self) -> tuple[str, ...]:
        """The registry models the pool holds, sorted."""
        return tuple(sorted(m for m in self.serving if m is not None))

    def offer_for(self, tier: int) -> PricedOffer | None:
        """The offer a launch for ``tier`` would buy (see the planner's rule 4), or None."""
        if tier not in self.choices:
            self.choices[tier] = choose_offer(self.pool, self.offers, self.blocked, tier)
        return self.choices[tier]

    def tier_devices(self, tier: int) -> int:
        """Devices one instance gives tier ``tier``: ``(D // tier) x tier``, at least ``tier``."""
        chosen = self.offer_for(tier)
        devices = pool_devices(self.pool, chosen.offer) if chosen else self.max_devices
        return max(1, devices // tier) * tier

    def device_cost(self, tier: int) -> float:
        """USD per device-hour of the offer chosen for ``tier``; infinite when none is usable."""
        chosen = self.offer_for(tier)
        return math.inf if chosen is None else chosen.usd_per_hour / self.tier_devices(tier)

    def room(self, tier: int) -> float:
        """Devices still free before ``max_instances`` or the pool budget binds."""
        pool, chosen = self.pool, self.offer_for(tier)
        if chosen is None:
            affordable: float = 0
        elif pool.budget_usd_per_hour is None or chosen.usd_per_hour <= 0:
            affordable = math.inf
        else:
            headroom = pool.budget_usd_per_hour - self.spend
            affordable = max(0, math.floor(headroom / chosen.usd_per_hour + EPS))
        cap = min(pool.max_instances, self.capacity + affordable)
        return cap * self.tier_devices(tier) - self.used

    def take(self, demand: QueueDemand, devices: float, wanted: float) -> None:
        """Assign ``devices`` of the ``wanted`` devices ``demand`` asks for to this pool."""
        self.used += devices
        frac = devices / wanted if wanted > 0 else 1.0
        self.in_flight += demand.in_flight_devices * frac
        self.top_tier = max(self.top_tier, demand.devices)
        if self.shares and self.shares[-1][0] is demand:  # the overflow of a queue it took
            frac += self.shares.pop()[1]
        self.shares.append((demand, frac))


def choose_offer(
    pool: PoolConfig, offers: Iterable[PricedOffer], blocked: frozenset[str], tier: int
) -> PricedOffer | None:
    """The first preferred market's cheapest-per-device usable offer with >= ``tier`` devices.

    ``offers`` come in the pool's market preference order (``pool_offers``); an offer in
    ``blocked`` (capacity backoff) or too small is skipped; the next market is used only
    when the preferred one has no usable offer. Ties: lower price, then the offer key.
    """
    best: PricedOffer | None = None
    best_score: tuple[float, float, str] = (math.inf, math.inf, "")
    for priced in offers:
        if best is not None and priced.market is not best.market:
            break
        devices = pool_devices(pool, priced.offer)
        if devices < tier or (blocked and offer_ref(priced).key in blocked):
            continue
        score = (priced.usd_per_hour / devices, priced.usd_per_hour, priced.offer.key)
        if score < best_score:
            best, best_score = priced, score
    return best


# (accelerator, model (None for the plain queues), kind): the queues one set of pools serves
BusyKey = tuple[str, str | None, TaskKind]


def busy_tiers(demands: Iterable[QueueDemand], catalog: Catalog) -> dict[BusyKey, int]:
    """``{(accelerator, model, kind): smallest tier with work}`` (see ``has_work``)."""
    out: dict[BusyKey, int] = {}
    for d in demands:
        family = catalog.families.get(d.accelerator)
        if family is not None and d.kind.value in family.kinds:
            key = (d.accelerator, d.model, d.kind)
            out[key] = min(out.get(key, d.devices), d.devices)
    return out


def has_work(
    busy: Mapping[BusyKey, int],
    accelerator: str,
    serving: Mapping[str | None, Iterable[TaskKind]],
    max_devices: int,
) -> bool:
    """Whether a pool of ``accelerator`` serving ``serving`` has work at a tier it can hold."""
    return any(
        busy.get((accelerator, model, kind), max_devices + 1) <= max_devices
        for model, kinds in serving.items()
        for kind in kinds
    )


def assign(
    demands: list[QueueDemand], by_acc: Mapping[str, list[PoolView]], catalog: Catalog
) -> list[Unsatisfiable]:
    """Give each queue's work to its cheapest adequate pools; return the work nobody can serve.

    Queues go largest tier first (they have the fewest adequate pools), then by name.
    For each, adequate pools (serving the queue's model, or the plain queues) are ranked by
    (USD per device-hour for the tier, name) once per (accelerator, model, kind, tier); the
    devices a queue wants (``QueueDemand.devices_wanted``, backlog over the cheapest pool's
    drain target) fill a pool up to its ``room`` and spill to the next.
    Work left when every adequate pool is full goes to the cheapest one (its desired
    count is clamped by ``max_instances`` anyway). A cursor per ranking skips pools that
    are full, so the whole pass is linear in queues plus pools (plus the sorts).
    ``by_acc`` must list each accelerator's pools sorted by name.
    """
    ranked: dict[tuple[BusyKey, int], list[PoolView]] = {}
    cursor: dict[tuple[BusyKey, int], int] = {}
    serving: dict[BusyKey, list[PoolView]] = {}
    largest: dict[BusyKey, PoolView | None] = {}
    unserved: list[Unsatisfiable] = []
    for d in sorted(demands, key=lambda d: (-d.devices, d.name)):
        group = (d.accelerator, d.model, d.kind)
        if group not in serving:  # views are sorted by name: max keeps the first
            serving[group] = [v for v in by_acc.get(d.accelerator, []) if v.serves(d.model, d.kind)]
            largest[group] = max(serving[group], key=lambda v: v.max_devices, default=None)
        views = serving[group]
        reason = _unserved_reason(d, by_acc.get(d.accelerator, []), largest[group], catalog)
        if reason is not None:
            unserved.append(Unsatisfiable(d.name, d.ready, reason))
            continue
        key = (group, d.devices)
        if key not in ranked:
            fit = [v for v in views if v.max_devices >= d.devices]
            ranked[key] = sorted(fit, key=lambda v: (v.device_cost(d.devices), v.pool.name))
            cursor[key] = 0
        cands, i = ranked[key], cursor[key]
        wanted = d.devices_wanted(cands[0].pool.drain_target_s)
        remaining = wanted
        while remaining > EPS and i < len(cands):
            view = cands[i]
            room = view.room(d.devices)
            if room <= EPS:
                i += 1
                continue
            part = min(remaining, room)
            view.take(d, part, wanted)
            remaining -= part
        cursor[key] = i
        if remaining > EPS or not wanted:
            cands[0].take(d, remaining, wanted)
    unserved.sort(key=lambda u: u.queue)
    return unserved


def _unserved_reason(
    d: QueueDemand, views: list[PoolView], largest: PoolView | None, catalog: Catalog
) -> str | None:
    """Why no pool can serve ``d`` (``largest``: the largest pool serving its model), or None."""
    family = catalog.families.get(d.accelerator)
    if family is None:
        return f"unknown accelerator {d.accelerator!r}: no pool can serve it"
    if d.kind.value not in family.kinds:
        return f"{d.accelerator} does not run {d.kind.value} work"
    if not views:
        return f"no pool for accelerator {d.accelerator}"
    if largest is None:
        return _no_serving_pool(d, views)
    if largest.max_devices < d.devices:
        return (
            f"needs {d.devices} {d.accelerator} devices per instance; the largest pool"
            f" ({largest.pool.name}) offers {largest.max_devices}"
        )
    return None


def _no_serving_pool(d: QueueDemand, views: list[PoolView]) -> str:
    names = ", ".join(v.pool.name for v in views)
    if d.model is None:
        return (
            f"no reference pool for accelerator {d.accelerator}: its pools ({names})"
            " serve only their models' queues"
        )
    holding = [v.pool.name for v in views if d.model in v.serving]
    if holding:
        return (
            f"no {d.accelerator} pool runs {d.kind.value} work for model {d.model}"
            f" (the engine of {', '.join(holding)} does not)"
        )
    return f"no {d.accelerator} pool holds model {d.model} (pools: {names})"

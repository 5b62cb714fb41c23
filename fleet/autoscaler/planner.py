"""The planner: ``plan(snapshot, config, catalog, now) -> Plan``, pure.

No I/O, no clock reads, no randomness: ``now`` is an argument and the same input gives
the same plan (every set and dict is iterated sorted). An actuator carries the plan out.

Contract:

1. **Serving.** A queue ``<kind>.<accelerator>[.xN][@model]`` (``parse_queue`` with the
   fleet namespace; other names are ignored) can be served by a pool of that accelerator
   whose family runs ``kind``, which has an allowed offer of at least ``N`` devices
   (``pool_devices``: ``pool.devices`` if set, else the offer's count; cpu: 1), and which
   serves that queue (``PoolConfig.serving``): it holds the queue's model and its engine
   runs ``kind``, or, for a plain queue, it holds no models. Work (ready + unacked > 0)
   nobody can serve is reported as ``Unsatisfiable`` with the reason: unknown accelerator,
   family does not run the kind, no pool for the accelerator, no pool of it holding the
   model (or running the kind for it, or a pool without models for plain work), or the
   largest serving pool's device count.
2. **Demand.** In devices (``fleet.autoscaler.demand``): a queue of tier ``N`` wants the
   devices its running tasks occupy (``running_devices``, else ``unacked x N x
   sample_share``; a batching server's stream holds a fraction of a device) with headroom
   (``max(load / 0.8, load + 2 sqrt(load x N x share))``), plus its backlog
   ``ready x N x service_s`` drained within ``drain_target_s``; ``service_s`` is the
   queue's ``sample_service_s`` (device time per task) if positive, else
   ``DEFAULT_SERVICE_S[kind]``. Running tasks measure the arrival rate (Little's law), so
   steady traffic sizes a pool to that traffic. An instance gives tier ``N``
   ``(devices // N) x N`` devices, counted on the offer it would launch for ``N`` (rule
   4). Queues (largest tier first, then by name) go to the adequate pool with the lowest
   USD per device-hour of that offer (ties: pool name); a pool takes devices up to
   ``min(max_instances, current + instances its budget still affords)`` instances, the
   rest spills to the next pool; what is left when all are full goes to the cheapest.
   Pools whose offers are all in backoff rank last and hold only their current
   instances. The fleet budget and the launch cap do not cause spilling.
3. **Sizing.** ``desired = ceil(devices assigned / devices per instance)`` for the pool's
   largest assigned tier, at least 1 with assigned work, clamped to ``[min_instances,
   max_instances]``; with no work, ``min_instances``. ``current`` = PENDING + RUNNING
   instances; DRAINING and TERMINATING ones are not capacity but their spend counts
   against budgets until gone.
4. **Scale-out** when ``desired > current`` and the scale-out cooldown has passed (or the
   pool never scaled out): up to ``desired - current`` launches of one offer, the one
   ``choose_offer`` picks for the pool's largest assigned tier (1 with no work): in the
   pool's market order (spot first), skipping offers with a CAPACITY, QUOTA or
   UNSUPPORTED error for this pool, or a spot interruption of that offer in any pool
   (``Snapshot.interruptions``), less than ``capacity_backoff_s`` ago, and offers too
   small, the lowest USD per device in the first market that has one. Each launch must
   keep the pool's spend (every instance it still has, plus launches) within its budget
   and the fleet's spend (every instance) within ``fleet.budget_usd_per_hour``; at most
   ``fleet.max_launches_per_loop`` launches per plan, handed out one per pool per round
   in pool-name order so one pool cannot starve the rest. Token:
   ``f"{pool}-{int(now * 1000)}-{i}"``.
5. **Scale-in.** (a) With no work a pool can serve, once idle for
   ``idle_before_scale_in_s`` (since ``history.last_busy_at``, else its earliest launch,
   else forever) and past the scale-in cooldown: PENDING/RUNNING instances terminate
   down to ``min_instances``, newest first. (b) Under load, when ``current`` exceeds
   ``desired`` by more than 10% (hysteresis), the last scale-out is at least
   ``idle_before_scale_in_s`` old (stabilisation) and the scale-in cooldown has passed:
   half the excess (at least one), newest first, never below the instances the running
   work occupies (``ceil(in-flight devices / devices per instance)``) or
   ``min_instances``. Terminated instances drain: running tasks finish.
6. **Clean-up** ignores cooldowns: instances of pools not in the config are terminated
   ("orphan: ..."); PENDING ones older than ``fleet.launch_grace_s`` plus the time the
   pool's workers take to read their models (``PoolConfig.load_s``: weights over the
   registry's load bandwidth) with no worker naming them ("launch never confirmed within
   N s"). A pool never launches and terminates in
   the same plan: after a clean-up its launches wait for the next plan. DRAINING and
   TERMINATING instances are never terminated again.
7. **Output.** One ``PoolDecision`` per configured pool plus one per orphan pool, sorted
   by name; ``usd_per_hour_before`` sums the pool's instances that are not TERMINATING,
   ``after = before + launches - terminations``. ``Unsatisfiable`` sorted by queue.
8. **API pools** (``[[api_pools]]``, ``fleet.autoscaler.apiplan``): their queues
   (``inference.api-<provider>``) are not instance demand. Each gets an
   ``ApiPoolDecision`` (desired worker concurrency within its rate limit); only the
   backlog its rate limit cannot drain within its drain target becomes demand, for its
   ``overflow_pool``'s accelerator. ``Plan.api_pools`` is sorted by provider.

Cost: linear in pools + queues + instances + errors (plus sorts); ``pool_offers`` runs
once per pool per call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from fleet.autoscaler.apiplan import plan_api_pools, split_api_demands
from fleet.autoscaler.config import (
    AutoscalerConfig,
    FleetConfig,
    PoolConfig,
    PricedOffer,
    pool_offers,
)
from fleet.autoscaler.demand import (
    DEFAULT_SERVICE_S,
    EPS,
    PoolView,
    assign,
    busy_tiers,
    has_work,
    offer_ref,
    parse_demands,
    pool_devices,
)
from fleet.autoscaler.model import (
    ErrorKind,
    Instance,
    InstanceState,
    Interruption,
    Launch,
    Plan,
    PoolDecision,
    PoolHistory,
    ProviderError,
    Snapshot,
    Termination,
)
from fleet.catalog import Catalog
from fleet.modelfit import seconds
from fleet.models.registry import ModelRegistry

__all__ = ["DEFAULT_SERVICE_S", "busy_pools", "plan", "pool_devices"]

BACKOFF_KINDS = frozenset({ErrorKind.CAPACITY, ErrorKind.QUOTA, ErrorKind.UNSUPPORTED})
CAPACITY_STATES = frozenset({InstanceState.PENDING, InstanceState.RUNNING})
MAX_QUEUES_IN_REASON = 4
SCALE_IN_HYSTERESIS = 0.1  # under load, shed only when capacity exceeds need by more
ROUND_TOLERANCE = 0.05  # reasons show whole seconds unless a tenth matters
WHOLE_ABOVE = 100.0


def plan(snapshot: Snapshot, config: AutoscalerConfig, catalog: Catalog, now: float) -> Plan:
    """Decide launches and terminations for every pool (the module docstring is the contract).

    Args:
        snapshot: queues, instances, workers, recent provider errors and pool history.
        config: the validated autoscaler config; its pools are the ones planned.
        catalog: accelerator families and priced offers.
        now: the current time, in the same clock as the snapshot's timestamps.

    Returns:
        The plan: per-pool decisions sorted by pool name, plus unsatisfiable demand.

    """
    fleet = config.fleet
    by_pool: dict[str, list[Instance]] = defaultdict(list)
    for inst in snapshot.instances:
        by_pool[inst.pool].append(inst)
    confirmed = frozenset(w.instance_id for w in snapshot.workers if w.instance_id)
    blocked = _blocked_offers(snapshot.errors, config, now, snapshot.interruptions)
    registry = config.registry
    drafts: list[_Draft] = []
    by_acc: dict[str, list[PoolView]] = defaultdict(list)
    facts = _Facts(catalog, registry, blocked, confirmed, fleet)
    for pool in sorted(config.pools, key=lambda p: p.name):
        draft = _draft(pool, by_pool.get(pool.name, []), facts, now)
        by_acc[pool.accelerator].append(draft.view)
        drafts.append(draft)
    demands, api_demands = split_api_demands(parse_demands(snapshot.queues, fleet.namespace))
    api_decisions, overflow, api_unserved = plan_api_pools(
        api_demands, config, catalog, snapshot.workers
    )
    demands += overflow
    unsatisfiable = assign(demands, by_acc, catalog) + api_unserved
    unsatisfiable.sort(key=lambda u: u.queue)
    busy = busy_tiers(demands, catalog)
    for draft in drafts:
        view = draft.view
        busy_here = has_work(busy, view.pool.accelerator, view.serving, view.max_devices)
        _size(draft, has_work=busy_here, history=snapshot.history.get(view.pool.name), now=now)
    _launch(drafts, config, spend=sum(i.usd_per_hour for i in snapshot.instances), now=now)
    decisions = [d.decision() for d in drafts]
    configured = {p.name for p in config.pools}
    decisions += [_orphan(name, insts) for name, insts in by_pool.items() if name not in configured]
    decisions.sort(key=lambda d: d.pool)
    return Plan(
        at=now,
        decisions=tuple(decisions),
        unsatisfiable=tuple(unsatisfiable),
        api_pools=api_decisions,
    )


def busy_pools(snapshot: Snapshot, config: AutoscalerConfig, catalog: Catalog) -> frozenset[str]:
    """Names of the configured pools that have work by rule 5 (for ``PoolHistory.last_busy_at``).

    A pool is busy when a queue it can serve (rule 1: its accelerator, a kind its family
    runs, a tier no larger than its largest allowed offer, its models or the plain queues)
    has ready or unacked messages. The loop should record ``last_busy_at`` with this
    predicate so that the planner's idle clock and its own agree.
    """
    busy = busy_tiers(parse_demands(snapshot.queues, config.fleet.namespace), catalog)
    registry = config.registry
    out = set()
    for pool in config.pools:
        largest = max((pool_devices(pool, o.offer) for o in pool_offers(pool, catalog)), default=0)
        if has_work(busy, pool.accelerator, pool.serving(registry), largest):
            out.add(pool.name)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class _Facts:
    """What every pool's draft reads: the catalog, the registry, offers in backoff, workers."""

    catalog: Catalog
    registry: ModelRegistry
    blocked: dict[str, set[str]]
    confirmed: frozenset[str]
    fleet: FleetConfig


def _draft(pool: PoolConfig, insts: list[Instance], facts: _Facts, now: float) -> _Draft:
    """A pool's facts for this plan, with unconfirmed launches already marked for clean-up."""
    load = pool.load_s(facts.registry)
    grace = facts.fleet.launch_grace_s + load
    confirmed = facts.confirmed
    cleanup = [
        Termination(
            pool.name, i.id, i.usd_per_hour, f"launch never confirmed within {_num(grace)} s"
        )
        for i in sorted(insts, key=lambda i: i.id)
        if i.state is InstanceState.PENDING
        and now - i.launched_at > grace
        and i.id not in confirmed
    ]
    gone = {t.instance_id for t in cleanup}
    live = [i for i in insts if i.state in CAPACITY_STATES and i.id not in gone]
    view = PoolView(
        pool=pool,
        offers=tuple(pool_offers(pool, facts.catalog)),
        blocked=frozenset(facts.blocked.get(pool.name, ())),
        capacity=len(live),
        spend=sum(i.usd_per_hour for i in insts),
        serving=pool.serving(facts.registry),
        load_s=load,
    )
    return _Draft(view, insts, live, cleanup, len(live) + len(cleanup))


@dataclass(slots=True)
class _Draft:
    """One pool's decision while it is being made."""

    view: PoolView
    instances: list[Instance]
    live: list[Instance]  # capacity: PENDING/RUNNING, less this plan's clean-up
    terminations: list[Termination]
    current: int
    desired: int = 0
    want: int = 0
    offer: PricedOffer | None = None
    launch_reason: str = ""
    stopped: str = ""
    reasons: list[str] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)

    def decision(self) -> PoolDecision:
        """The finished ``PoolDecision``."""
        if self.want > len(self.launches):
            self.reasons.append(f"{self.stopped}: launched {len(self.launches)} of {self.want}")
        before = sum(
            i.usd_per_hour for i in self.instances if i.state is not InstanceState.TERMINATING
        )
        added = sum(launch.usd_per_hour for launch in self.launches)
        removed = sum(t.usd_per_hour for t in self.terminations)
        return PoolDecision(
            pool=self.view.pool.name,
            current=self.current,
            desired=self.desired,
            launches=tuple(self.launches),
            terminations=tuple(self.terminations),
            reasons=tuple(self.reasons),
            usd_per_hour_before=before,
            usd_per_hour_after=before + added - removed,
        )


def _size(draft: _Draft, *, has_work: bool, history: PoolHistory | None, now: float) -> None:
    """Set desired, the launches wanted (before limits) or the scale-in terminations."""
    view, pool = draft.view, draft.view.pool
    cur = len(draft.live)
    if draft.terminations:
        draft.reasons.append(f"cleaned up {len(draft.terminations)} unconfirmed launch(es)")
    per_instance = view.tier_devices(max(view.top_tier, 1))
    floor = math.ceil(view.in_flight / per_instance - EPS)  # what running work holds
    if has_work:
        need = math.ceil(view.used / per_instance - EPS)
        need = max(need, 1) if view.shares else need
        draft.desired = min(max(need, pool.min_instances), pool.max_instances)
        tier = max(view.top_tier, 1)
        if (
            view.shares
            and 0 < cur < pool.max_instances
            and not any(i.devices >= tier for i in draft.live)
        ):
            # Instances too small for the largest tier in demand are no capacity for it.
            draft.desired = max(draft.desired, cur + 1)
            draft.reasons.append(f"no instance has the {tier} devices the x{tier} tier needs")
    else:
        draft.desired = pool.min_instances
    if draft.desired > cur:
        last = history.last_scale_out_at if history else None
        if draft.terminations:
            draft.reasons.append(
                f"{cur} -> {draft.desired} instances waits for the next plan after clean-up"
            )
        elif last is not None and now - last < pool.scale_out_cooldown_s:
            draft.reasons.append(
                f"scale-out cooldown: {_num(now - last)} s < {_num(pool.scale_out_cooldown_s)} s ({cur} -> {draft.desired} waits)"
            )
        else:
            draft.want = draft.desired - cur
            draft.offer = view.offer_for(max(view.top_tier, 1))
            draft.launch_reason = _backlog_reason(view, cur, draft.desired)
            draft.reasons.append(draft.launch_reason)
            if view.models:
                draft.reasons.append(
                    f"each new instance loads {', '.join(view.models)}"
                    f" ({seconds(view.load_s)} s) before it serves"
                )
    elif draft.desired < cur and has_work:
        _scale_in_under_load(draft, history, floor, now)
    elif draft.desired < cur:
        _scale_in(
            draft,
            history.last_busy_at if history else None,
            history.last_scale_in_at if history else None,
            now,
        )
    else:
        draft.reasons.append(f"steady: {cur} instances for {draft.desired} desired")


def _scale_in_under_load(
    draft: _Draft, history: PoolHistory | None, floor: int, now: float
) -> None:
    """Rule 5b: shed capacity above need while work continues, gradually and never below ``floor``."""
    pool, cur = draft.view.pool, len(draft.live)
    target = max(draft.desired, floor, pool.min_instances)
    last_out = history.last_scale_out_at if history else None
    last_in = history.last_scale_in_at if history else None
    if cur <= target or cur <= draft.desired * (1 + SCALE_IN_HYSTERESIS):
        draft.reasons.append(
            f"holding {cur} instances for {draft.desired} desired"
            + (f": running work holds {floor}" if floor >= cur else ": within the hysteresis")
        )
        return
    if last_out is not None and now - last_out < pool.idle_before_scale_in_s:
        draft.reasons.append(
            f"scaled out {_num(now - last_out)} s ago < {_num(pool.idle_before_scale_in_s)} s:"
            f" keeping {cur} instances for {draft.desired} desired"
        )
        return
    if _in_cooldown(draft, last_in, now):
        return
    step = max(1, math.ceil((cur - target) / 2))  # halve the excess per cooldown
    reason = (
        f"capacity above need under load: {cur} instances for {draft.desired} desired"
        f" (running work holds {floor})"
    )
    _terminate_newest(draft, step, reason)


def _in_cooldown(draft: _Draft, last_in: float | None, now: float) -> bool:
    """Whether the pool's scale-in cooldown still runs (the reason is recorded)."""
    pool = draft.view.pool
    if last_in is not None and now - last_in < pool.scale_in_cooldown_s:
        draft.reasons.append(
            f"scale-in cooldown: {_num(now - last_in)} s < {_num(pool.scale_in_cooldown_s)} s"
        )
        return True
    return False


def _terminate_newest(draft: _Draft, count: int, reason: str) -> None:
    """Terminate ``count`` live instances, newest first, for ``reason``."""
    cur = len(draft.live)
    newest = sorted(draft.live, key=lambda i: (i.launched_at, i.id), reverse=True)
    draft.terminations += [
        Termination(draft.view.pool.name, i.id, i.usd_per_hour, reason) for i in newest[:count]
    ]
    draft.reasons.append(f"{reason}: {cur} -> {cur - count} instances")


def _scale_in(draft: _Draft, last_busy: float | None, last_in: float | None, now: float) -> None:
    pool, cur = draft.view.pool, len(draft.live)
    if last_busy is None and draft.instances:
        last_busy = min(i.launched_at for i in draft.instances)
    idle = math.inf if last_busy is None else now - last_busy
    idle_text = "idle (never busy)" if last_busy is None else f"idle {_num(idle)} s"
    if idle < pool.idle_before_scale_in_s:
        draft.reasons.append(
            f"{idle_text} < {_num(pool.idle_before_scale_in_s)} s: keeping {cur} instances"
        )
        return
    if _in_cooldown(draft, last_in, now):
        return
    _terminate_newest(
        draft, cur - draft.desired, f"{idle_text} >= {_num(pool.idle_before_scale_in_s)} s"
    )


def _launch(drafts: list[_Draft], config: AutoscalerConfig, *, spend: float, now: float) -> None:
    """Hand out launches one per pool per round, within budgets and the per-plan cap."""
    fleet = config.fleet
    waiting: list[tuple[_Draft, PricedOffer]] = []
    for d in drafts:
        if d.want and d.offer is None:
            d.stopped = f"no usable offer with >= {max(d.view.top_tier, 1)} devices ({len(d.view.blocked)} in capacity backoff)"
        elif d.want and d.offer is not None:
            waiting.append((d, d.offer))
    total = 0
    while waiting:
        still = []
        for d, offer in waiting:
            pool = d.view.pool
            price = offer.usd_per_hour
            if total >= fleet.max_launches_per_loop:
                d.stopped = f"max_launches_per_loop {fleet.max_launches_per_loop} reached"
            elif (
                pool.budget_usd_per_hour is not None
                and d.view.spend + price > pool.budget_usd_per_hour + EPS
            ):
                d.stopped = f"pool budget ${pool.budget_usd_per_hour:.2f}/h reached (spend ${d.view.spend:.2f}/h + ${price:.2f}/h)"
            elif (
                fleet.budget_usd_per_hour is not None
                and spend + price > fleet.budget_usd_per_hour + EPS
            ):
                d.stopped = f"fleet budget ${fleet.budget_usd_per_hour:.2f}/h reached (spend ${spend:.2f}/h + ${price:.2f}/h)"
            else:
                token = f"{pool.name}-{int(now * 1000)}-{len(d.launches)}"
                devices = pool_devices(pool, offer.offer)
                d.launches.append(
                    Launch(pool.name, offer_ref(offer), token, price, devices, d.launch_reason)
                )
                total += 1
                spend += price
                d.view.spend += price
                if len(d.launches) < d.want:
                    still.append((d, offer))
        waiting = still


def _backlog_reason(view: PoolView, cur: int, desired: int) -> str:
    drain = _num(view.pool.drain_target_s)
    if not view.shares:
        return f"below min_instances: {cur} -> {desired} instances"
    shares = sorted(view.shares, key=lambda s: s[0].name)
    parts = []
    for d, frac in shares[:MAX_QUEUES_IN_REASON]:
        here = f" ({frac:.0%} here)" if frac < 1 - EPS else ""
        running = d.tasks - d.ready
        busy = f", {running} running on {d.in_flight_devices:.3g} devices" if running else ""
        parts.append(f"{d.ready} tasks x {d.service_s:.3g} s on {d.name}{busy}{here}")
    if len(shares) > MAX_QUEUES_IN_REASON:
        parts.append(f"{len(shares) - MAX_QUEUES_IN_REASON} more queues")
    return (
        f"backlog {'; '.join(parts)}: {cur} -> {desired} instances to drain within {drain} s"
        f" ({view.used:.3g} devices with headroom for running work)"
    )


def _blocked_offers(
    errors: tuple[ProviderError, ...],
    config: AutoscalerConfig,
    now: float,
    interruptions: tuple[Interruption, ...] = (),
) -> dict[str, set[str]]:
    """``{pool: offer keys}`` with a capacity-like error or a spot interruption within the backoff.

    An interruption blocks its offer in every pool (spot capacity of that instance type
    in that region is being reclaimed, whichever pool bought it), each for its own
    ``capacity_backoff_s``.
    """
    backoff = {p.name: p.capacity_backoff_s for p in config.pools}
    out: dict[str, set[str]] = defaultdict(set)
    for i in interruptions:
        for pool, pool_window in backoff.items():
            if now - i.at < pool_window:
                out[pool].add(i.offer.key)
    for e in errors:
        window = backoff.get(e.pool)
        if (
            e.offer is not None
            and e.kind in BACKOFF_KINDS
            and window is not None
            and now - e.at < window
        ):
            out[e.pool].add(e.offer.key)
    return out


def _orphan(name: str, insts: list[Instance]) -> PoolDecision:
    reason = f"orphan: pool {name} is not in the config"
    terms = tuple(
        Termination(name, i.id, i.usd_per_hour, reason)
        for i in sorted(insts, key=lambda i: i.id)
        if i.state in CAPACITY_STATES
    )
    before = sum(i.usd_per_hour for i in insts if i.state is not InstanceState.TERMINATING)
    return PoolDecision(
        pool=name,
        current=0,
        desired=0,
        launches=(),
        terminations=terms,
        reasons=(f"{reason}: terminating {len(terms)} of {len(insts)} instances",),
        usd_per_hour_before=before,
        usd_per_hour_after=before - sum(t.usd_per_hour for t in terms),
    )


def _num(x: float) -> str:
    """Seconds for reasons: ``120``, ``2.5``, ``340``."""
    return (
        f"{x:.0f}" if abs(x - round(x)) < ROUND_TOLERANCE or abs(x) >= WHOLE_ABOVE else f"{x:.1f}"
    )

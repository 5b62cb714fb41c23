"""Placement, pure: choose the queue (accelerator family and device tier) for a task.

``place(spec, catalog, loads)`` considers every family: it rejects the ones that can
never run the task (requirements, kind, dtype, runtime) or that no priced offer can
hold, estimates the others on their best offer with the throughput model, adds the
expected wait from the live queue loads, then picks by policy:

* ``cost`` (default): the lowest expected cost that meets the deadline and budget;
* ``fastest``: the earliest expected finish within the budget;
* ``pinned``: the named accelerator, still subject to fit.

Every decision carries its reasons and, for each other family, why it was not chosen.
The spec-dependent part is cached per (spec shape, catalog), so routing a repeated
shape costs a dictionary lookup; queue loads are applied after the cache.

Token-priced API pools (``fleet.apiplacement``) compete in the same decision when the
catalog routes to them: their cost is the tokens at list price, their duration time to
first token plus output at stream speed, their wait the backlog against the rate limit.

Waking a chip: a self-hosted queue with no consumer waits the family's cold start, and
the instance is paid while it boots. That boot cost (the offer's hourly price for the cold
start, shared by the tasks already waiting on that queue) is added when the ``cost``
policy ranks candidates, so a short call goes to an API rather than paying for a GPU to
boot; ``estimated_cost_usd`` stays the task's own share and is what ``budget.max_usd``
caps (a fleet scaled to zero must still take budget-bound work). The boot cost is
reported as ``cold_start_cost_usd``. The same term works between chips: one short call
does not wake a cold family when a warm one is nearly as cheap, which keeps a fleet on
fewer, busier pools (in the simulator it lifted the training-mix trace's SLO attainment
from 60% to 79% and cut batch-embedding cost 4x; see the README's benchmarks).

Registry models (``models``, a ``fleet.models.ModelRegistry``; ``fleet.modelfit`` holds the
rules): a task whose model the registry serves for its kind goes to that model's queue
(``inference.nvidia-l4@tiny-llama``), which only workers holding the model consume. Such a
queue with a consumer is warm; a cold one waits the family's cold start plus the model's
load time (weights over the registry's load bandwidth), and its boot cost is paid for both.
Families on which no engine the model allows runs are rejected, and an inference request
longer than the model's context is refused (``ContextError``). Without ``models`` every task
keeps the plain queue.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from fleet.apiplacement import api_candidates, api_wait_s, is_api_accelerator
from fleet.catalog import Catalog, Market, Offer
from fleet.catalog.apis import ApiOffer, jurisdiction
from fleet.compat import family_rejection, memory_needed_gb, offer_fit
from fleet.modelfit import context_problem, engine_problem, served_entry, warmth_reason
from fleet.models.registry import ModelRegistry
from fleet.queues import queue_name
from fleet.spec import TaskSpec
from fleet.throughput import TARGET_UTILISATION, estimate


class Policy(StrEnum):
    """How to choose among compatible accelerators."""

    COST = "cost"
    FASTEST = "fastest"
    PINNED = "pinned"


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """What the broker says of one queue: messages waiting and consumers serving it."""

    depth: int = 0
    consumers: int = 0


@dataclass(frozen=True, slots=True)
class Traffic:
    """Recent arrivals like a task: ``rate_per_s`` of its model and kind, and what they take.

    ``busy_s`` maps an accelerator to the mean device time per task of that traffic on it
    (``busy_by_accelerator`` of each task, averaged by a ``fleet.rates.RateMeter``): the
    instances the traffic needs on a chip are sized from it, so a rare long request does not
    size them by itself, and heavy-tailed sizes count at their mean device time.
    """

    rate_per_s: float
    busy_s: Mapping[str, float]

    @classmethod
    def of(
        cls, rate_per_s: float | None, mean: tuple[float, ...] | None, accelerators: Sequence[str]
    ) -> Traffic | None:
        """From a meter's rate and mean sizes recorded in ``accelerators`` order (None: none known)."""
        if rate_per_s is None or rate_per_s <= 0 or not mean:
            return None
        return cls(rate_per_s, dict(zip(accelerators, mean, strict=False)))


def busy_by_accelerator(spec: TaskSpec, catalog: Catalog) -> dict[str, float]:
    """``{accelerator: device time}`` of ``spec`` on each family that can hold it (cached)."""
    return {c.accelerator: c.busy_s for c in _analyse(spec, catalog)[1]}


@dataclass(frozen=True, slots=True)
class OfferChoice:
    """The offer a cost estimate is based on."""

    cloud: str
    region: str
    instance_type: str
    market: Market
    usd_per_hour: float
    accelerator_count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "cloud": self.cloud,
            "region": self.region,
            "instance_type": self.instance_type,
            "market": self.market.value,
            "usd_per_hour": self.usd_per_hour,
            "accelerator_count": self.accelerator_count,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """A family that can run the task, on its cheapest adequate offer."""

    accelerator: str
    devices: int
    offer: OfferChoice
    service_s: float
    busy_s: float  # device time per task on a busy server (what queued work costs in wait)
    cost_usd: float
    cold_start_s: float
    api: ApiOffer | None = None  # set for a token-priced API pool
    model: str | None = None  # the registry model whose queue it is (None: the plain queue)
    load_s: float = 0.0  # reading that model's weights, on top of the cold start
    tpot_s: float = 0.0  # time per output token at the server's batch (0: not generation)

    @property
    def boot_s(self) -> float:
        """What a cold queue of this candidate waits before a worker takes work."""
        return self.cold_start_s + self.load_s


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one accelerator family was not chosen."""

    accelerator: str
    reason: str


@dataclass(frozen=True, slots=True)
class Placement:
    """The routing decision for one task."""

    queue: str
    accelerator: str
    devices: int
    offer: OfferChoice
    estimated_cost_usd: float
    estimated_duration_s: float
    estimated_wait_s: float
    memory_needed_gb: float
    policy: Policy
    reasons: tuple[str, ...]
    rejected: tuple[Rejection, ...] = field(default=())
    deadline_at_risk: bool = False
    api: ApiOffer | None = None
    cold_start_cost_usd: float = 0.0
    model: str | None = None
    cold_start_s: float = 0.0
    model_load_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the shape ``fleet route --json`` prints).

        ``api`` is null for a chip; for an API pool it names the provider, model and
        per-million-token prices (``offer`` then describes the pool: cloud ``api``,
        region its residency, ``usd_per_hour`` 0). ``model`` is the registry model whose
        queue was chosen (null: the plain queue); ``cold_start_s`` the boot the wait
        counts (0 for a warm or unknown queue), ``model_load_s`` the part of it that
        reads the model's weights.
        """
        return {
            "queue": self.queue,
            "accelerator": self.accelerator,
            "devices": self.devices,
            "offer": self.offer.to_dict(),
            "estimated_cost_usd": self.estimated_cost_usd,
            "estimated_duration_s": self.estimated_duration_s,
            "estimated_wait_s": self.estimated_wait_s,
            "memory_needed_gb": self.memory_needed_gb,
            "policy": self.policy.value,
            "reasons": list(self.reasons),
            "deadline_at_risk": self.deadline_at_risk,
            "rejected": [{"accelerator": r.accelerator, "reason": r.reason} for r in self.rejected],
            "api": api_summary(self.api),
            "cold_start_cost_usd": self.cold_start_cost_usd,
            "model": self.model,
            "cold_start_s": self.cold_start_s,
            "model_load_s": self.model_load_s,
        }


def api_summary(offer: ApiOffer | None) -> dict[str, Any] | None:
    """JSON-ready summary of an API choice (provider, model, prices), None for a chip."""
    if offer is None:
        return None
    return {
        "provider": offer.provider,
        "model": offer.model,
        "api_model": offer.api_model,
        "usd_per_m_input": offer.usd_per_m_input,
        "usd_per_m_output": offer.usd_per_m_output,
        "tokens_per_s": offer.tokens_per_s,
        "ttft_s": offer.ttft_s,
        "residency": offer.residency,
        "external": offer.external,
    }


class NoPlacementError(ValueError):
    """Nothing can run the task; ``rejected`` says why for each accelerator family."""

    def __init__(
        self, rejected: tuple[Rejection, ...], summary: str = "no accelerator can run this task"
    ) -> None:
        """Keep the per-family reasons."""
        self.rejected = rejected
        lines = "; ".join(f"{r.accelerator}: {r.reason}" for r in rejected)
        super().__init__(f"{summary}: {lines}" if lines else summary)


class ContextError(NoPlacementError):
    """The request is longer than its model's context: no accelerator can change that.

    ``rejected`` is empty; the message (``fleet.modelfit.context_problem``) names both
    numbers.
    """

    def __init__(self, problem: str) -> None:
        """Keep the problem as the message."""
        super().__init__((), problem)
        self.problem = problem


def _offer_markets(spec: TaskSpec, offer: Offer) -> list[tuple[Market, float]]:
    req = spec.requirements
    if req.clouds and offer.cloud not in req.clouds:
        return []
    # Instances the fleet runs are self-hosted: "self" admits them wherever they are.
    if (
        req.residency
        and "self" not in req.residency
        and jurisdiction(offer.cloud, offer.region) not in req.residency
    ):
        return []
    out = []
    for market in offer.markets():
        if req.markets and market.value not in req.markets:
            continue
        price = offer.price(market)
        if price is not None:
            out.append((market, price))
    return out


def _best_offer(
    spec: TaskSpec, catalog: Catalog, family_name: str, need_gb: float
) -> tuple[Candidate | None, str]:
    """The family's cheapest priced offer that holds the task, or the reason none does."""
    family = catalog.families[family_name]
    best: Candidate | None = None
    reason = "no priced offer in the catalog"
    # (a memory rejection, what the offer holds in GB, reason): the numbers come from the
    # offer, never back out of the reason text.
    fit_reasons: list[tuple[bool, float, str]] = []
    minimum = spec.requirements.min_accelerator_memory_gb
    for offer in catalog.offers_by_family.get(family_name, ()):
        priced = _offer_markets(spec, offer)
        if not priced:
            if offer.markets():
                reason = "no offer in the allowed clouds or markets" + (
                    " or residency" if spec.requirements.residency else ""
                )
            continue
        fit = offer_fit(spec, offer, need_gb)
        if fit.devices is None:
            by_memory = minimum is None or offer.accelerator_memory_gb >= minimum
            held = offer.accelerator_memory_gb * offer.accelerator_count
            fit_reasons.append((by_memory, held, fit.reason))
            continue
        est = estimate(spec, family, fit.devices, offer.vcpus)
        for market, price in priced:
            share = price if family.per_vcpu else price * fit.devices / offer.accelerator_count
            cost = share * est.busy_s / 3600.0
            if best is None or (cost, est.service_s) < (best.cost_usd, best.service_s):
                best = Candidate(
                    accelerator=family_name,
                    devices=1 if family.per_vcpu else fit.devices,
                    offer=OfferChoice(
                        offer.cloud,
                        offer.region,
                        offer.instance_type,
                        market,
                        price,
                        offer.accelerator_count,
                    ),
                    service_s=est.service_s,
                    busy_s=est.busy_s,
                    cost_usd=cost,
                    cold_start_s=family.cold_start_s,
                    tpot_s=est.tpot_s,
                )
    if best is None and fit_reasons:
        # The most informative reason is the largest offer's: it shows the gap.
        reason = max(fit_reasons, key=lambda f: f[:2])[2]
    return best, reason


_MEMO_LIMIT = 4096
CONSOLIDATE = 1.15  # a warmer queue within 15% of the cheapest takes the task
BOOT_SHARED_S = 300.0  # with an arrival rate, a boot is shared by the tasks of this long
# (candidate, queue, expected wait in seconds, cost of booting a cold queue's instance,
#  the idle share a task pays at the arrival rate)
Option = tuple[Candidate, str, float, float, float]
Analysis = tuple[float, tuple[Candidate, ...], tuple[Rejection, ...]]


def _shape(spec: TaskSpec) -> tuple[Any, ...]:
    """The fields placement analysis depends on (not inputs, keys or priority).

    The SLO is among them: the throughput model sizes a server's batch to its goals.
    """
    return (
        spec.kind,
        spec.model,
        spec.tokens_in,
        spec.tokens_out,
        spec.requirements,
        spec.method,
        spec.slo,
    )


def _analyse(spec: TaskSpec, catalog: Catalog) -> Analysis:
    key = ("placement", _shape(spec))
    memo = catalog.memo
    hit: Analysis | None = memo.get(key)
    if hit is not None:
        return hit
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    result = _analyse_uncached(spec, catalog)
    memo[key] = result
    return result


def _analyse_uncached(spec: TaskSpec, catalog: Catalog) -> Analysis:
    need = memory_needed_gb(spec)
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for name in catalog.names():
        why = family_rejection(spec, catalog.families[name])
        if why is not None:
            rejected.append(Rejection(name, why))
            continue
        best, reason = _best_offer(spec, catalog, name, need)
        if best is None:
            rejected.append(Rejection(name, reason))
        else:
            candidates.append(best)
    apis, api_rejected = api_candidates(spec, catalog)
    candidates += [
        Candidate(
            accelerator=a.offer.accelerator,
            devices=1,
            offer=OfferChoice("api", a.offer.residency, a.offer.key, Market.ON_DEMAND, 0.0, 1),
            service_s=a.service_s,
            busy_s=a.busy_s,
            cost_usd=a.cost_usd,
            cold_start_s=0.0,
            api=a.offer,
        )
        for a in apis
    ]
    rejected += [Rejection(acc, why) for acc, why in api_rejected]
    return need, tuple(candidates), tuple(rejected)


def _wait_s(c: Candidate, queue: str, loads: Mapping[str, QueueLoad] | None) -> float:
    if loads is None:
        return 0.0
    load = loads.get(queue)
    if load is None:
        return 0.0
    if c.api is not None:
        return api_wait_s(c.busy_s, load.depth, load.consumers)
    if load.consumers <= 0:
        # The planner buys enough instances to drain a cold queue's backlog within its
        # drain target, so the backlog adds at most about one more boot's time, not all of
        # it on one instance.
        return c.boot_s + min(load.depth * c.busy_s, c.boot_s)
    # A consumer works through its backlog at device-time speed: a batching server
    # overlaps generation streams, so queued work waits busy_s each, not service_s.
    return load.depth * c.busy_s / load.consumers


def _boot_cost_usd(
    c: Candidate,
    queue: str,
    loads: Mapping[str, QueueLoad] | None,
    rate_per_s: float | None = None,
) -> float:
    """What booting an instance for a queue with no consumer costs this task.

    The whole instance is paid for the family's cold start and the model's load; the
    tasks already waiting on that queue share it, and, with an arrival rate, the tasks
    like it expected over the next ``BOOT_SHARED_S`` (the instance goes on serving them).
    Zero for API pools, warm queues and unknown loads.
    """
    if not _cold(c, queue, loads):
        return 0.0
    depth = loads[queue].depth if loads is not None else 0
    coming = (rate_per_s or 0.0) * BOOT_SHARED_S
    return c.offer.usd_per_hour * c.boot_s / 3600.0 / (depth + 1 + coming)


def _cold(c: Candidate, queue: str, loads: Mapping[str, QueueLoad] | None) -> bool:
    """Whether ``queue`` is known to have no consumer (an API pool is never cold)."""
    if c.api is not None or loads is None:
        return False
    load = loads.get(queue)
    return load is not None and load.consumers <= 0


def _for_model(
    spec: TaskSpec,
    candidates: tuple[Candidate, ...],
    registry: ModelRegistry,
    catalog: Catalog,
    rejected: list[Rejection],
) -> tuple[Candidate, ...]:
    """Candidates on the model's queue with its load time; families no engine of it runs on out.

    Unchanged when the registry does not serve the task. API pools stay as they are: they
    forward to a remote endpoint, not a worker holding the model.

    Raises:
        ContextError: an inference request longer than the model's context.

    """
    entry = served_entry(spec, registry)
    if entry is None:
        return candidates
    problem = context_problem(spec, registry)
    if problem is not None:
        raise ContextError(problem)
    kept: list[Candidate] = []
    load = entry.load_s(registry.load_gbps)
    for c in candidates:
        if c.api is not None:
            kept.append(c)
            continue
        why = engine_problem(entry, catalog.families[c.accelerator])
        if why is None:
            kept.append(replace(c, model=entry.name, load_s=load))
        else:
            rejected.append(Rejection(c.accelerator, why))
    return tuple(kept)


def _pinned(
    spec: TaskSpec,
    catalog: Catalog,
    candidates: tuple[Candidate, ...],
    pin: str | None,
    rejected: list[Rejection],
) -> tuple[Candidate, ...]:
    """Keep only the pinned family (or API pool); record the others as rejected.

    Raises:
        ValueError: no pin and no ``requirements.accelerators``.
        KeyError: the pin is neither a family nor an API pool of the catalog.

    """
    reqs = spec.requirements.accelerators
    target = pin or (reqs[0] if reqs else None)
    if target is None:
        raise ValueError(
            "policy pinned needs an accelerator: pass pin or requirements.accelerators"
        )
    if not is_api_accelerator(catalog, target):
        catalog.family(target)
    rejected += [
        Rejection(c.accelerator, f"not the pinned accelerator {target}")
        for c in candidates
        if c.accelerator != target
    ]
    return tuple(c for c in candidates if c.accelerator == target)


def _feasible(
    spec: TaskSpec,
    candidates: tuple[Candidate, ...],
    loads: Mapping[str, QueueLoad] | None,
    namespace: str,
    rejected: list[Rejection],
    traffic: Traffic | None = None,
) -> tuple[list[Option], list[Option]]:
    """Candidates within budget, deadline and ``slo.tpot_ms``, and those that miss only by waiting.

    Returns ``(feasible, at_risk)``, each ``(candidate, queue, expected wait, boot cost,
    idle share at the arrival rate)``.
    A candidate whose run alone exceeds the deadline is rejected outright, as is one whose
    time per output token, even at batch 1, is above ``slo.tpot_ms``.
    """
    feasible: list[Option] = []
    at_risk: list[Option] = []
    deadline = spec.slo.deadline_s
    budget = spec.budget.max_usd
    tpot_ms = spec.slo.tpot_ms
    for c in candidates:
        queue = queue_name(spec.kind, c.accelerator, c.devices, namespace, c.model)
        wait = _wait_s(c, queue, loads)
        boot = _boot_cost_usd(c, queue, loads, traffic.rate_per_s if traffic else None)
        idle = _idle_usd(c, traffic, loads.get(queue) if loads is not None else None)
        if tpot_ms is not None and c.tpot_s * 1000.0 > tpot_ms:
            ms = c.tpot_s * 1000.0
            shown = f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"  # noqa: PLR2004 - 3 digits
            rejected.append(
                Rejection(
                    c.accelerator, f"misses slo.tpot_ms: {shown} ms per token > {tpot_ms:g} ms"
                )
            )
        elif budget is not None and c.cost_usd > budget:
            rejected.append(
                Rejection(
                    c.accelerator, f"estimated ${c.cost_usd:.6g} over budget.max_usd ${budget:g}"
                )
            )
        elif deadline is not None and wait + c.service_s > deadline:
            if c.service_s <= deadline:
                at_risk.append((c, queue, wait, boot, idle))
            rejected.append(
                Rejection(
                    c.accelerator,
                    f"misses deadline: wait {wait:,.1f} s + run {c.service_s:,.1f} s > {deadline:g} s",
                )
            )
        else:
            feasible.append((c, queue, wait, boot, idle))
    return feasible, at_risk


def _idle_usd(c: Candidate, traffic: Traffic | None, load: QueueLoad | None) -> float:
    """The idle part of the instances this task's traffic needs, per task (0 without one).

    Not charged on a warm queue with nothing waiting (``load``): its instances are paid
    for and have room, so the task's own share is its marginal cost. A cold queue, or one
    with a backlog, would buy instances: there the task pays its traffic's idle part.
    (Charging warm queues too sent each traffic to one chip, better on the Mélange
    workloads, but kept an idle box beside the 8-GPU one a 70B model held on the chat
    trace: 1.5x the cost.) The traffic (``rate_per_s`` tasks of this model and kind, each
    taking ``typical_busy_s`` of device time on this chip on average) keeps ``busy = rate
    x instance-seconds per task`` instances busy; the planner buys ``ceil(busy /
    TARGET_UTILISATION)`` (at least one), so each task's device-time share is paid at that
    utilisation: ``share x (bought / busy - 1)`` is the idle part. API pools are billed per
    token, and per-vCPU offers are not sized this way: no idle part.
    """
    if load is not None and load.consumers > 0 and load.depth == 0:
        return 0.0
    typical_busy_s = traffic.busy_s.get(c.accelerator) if traffic is not None else None
    if traffic is None or not typical_busy_s or c.api is not None:
        return 0.0
    count = c.offer.accelerator_count
    if count <= 0:
        return 0.0
    whole = 1.0 if c.devices >= count else c.devices / count
    busy = traffic.rate_per_s * typical_busy_s * whole  # instances the traffic keeps busy
    if busy <= 0:
        return 0.0
    bought = max(1, math.ceil(busy / TARGET_UTILISATION - 1e-9))
    return c.cost_usd * max(0.0, bought / busy - 1.0)


def _consolidated(feasible: list[Option], loads: Mapping[str, QueueLoad] | None) -> Option:
    """The cheapest option, or, within ``CONSOLIDATE`` of it, the one with the most consumers.

    Two chips nearly as cheap would otherwise split one traffic into two pools, each
    rounded up to whole instances and each kept alive by a trickle of work.
    """
    cheapest = min(feasible, key=lambda f: (_ranked(f), f[2] + f[0].service_s))
    if loads is None:
        return cheapest
    limit = _ranked(cheapest) * CONSOLIDATE

    def consumers(f: Option) -> int:
        load = loads.get(f[1])
        return load.consumers if load is not None else 0

    near = [f for f in feasible if _ranked(f) <= limit and f[0].api is None]
    if not near or consumers(cheapest) >= max(consumers(f) for f in near):
        return cheapest
    return max(near, key=lambda f: (consumers(f), -_ranked(f)))


def _ranked(option: Option) -> float:
    """What the ``cost`` policy ranks by: the task's share, boot and idle parts."""
    return option[0].cost_usd + option[3] + option[4]


def _extras(option: Option, traffic: Traffic | None) -> str:
    """The boot and idle parts of a ranked cost, for reasons ("" when both are zero)."""
    c, _, _, boot, idle = option
    parts = [f"task ${c.cost_usd:.6g}"]
    if boot:
        parts.append(f"${boot:.6g} to boot a cold instance")
    if idle and traffic is not None:
        parts.append(f"${idle:.6g} idle at {traffic.rate_per_s:.3g} tasks/s")
    return f" ({' + '.join(parts)})" if len(parts) > 1 else ""


def _at_risk_choice(at_risk: list[Option]) -> tuple[list[Option], str]:
    """The one candidate to take when every queue misses the deadline by waiting, and why.

    When every one is cold, the cheapest (task plus boot) is woken: each task picking its
    own fastest family would wake every family at once. When a warm queue is only busy,
    the earliest expected finish.
    """
    if all(f[3] > 0 for f in at_risk):
        cheapest = min(at_risk, key=lambda f: (_ranked(f), f[2] + f[0].service_s))
        return [cheapest], "every queue cold; woke the cheapest"
    earliest = min(at_risk, key=lambda f: (f[2] + f[0].service_s, f[0].cost_usd))
    return [earliest], "cold or busy; chose the earliest expected finish"


def place(
    spec: TaskSpec,
    catalog: Catalog,
    loads: Mapping[str, QueueLoad] | None = None,
    policy: Policy = Policy.COST,
    pin: str | None = None,
    namespace: str = "",
    *,
    models: ModelRegistry | None = None,
    traffic: Traffic | None = None,
) -> Placement:
    """Choose where ``spec`` runs.

    Args:
        spec: the validated task.
        catalog: families and priced offers.
        loads: live queue depth and consumers by queue name; None when unknown, which
            counts as no wait. A queue with no consumer adds the family's cold start.
        policy: ``cost``, ``fastest`` or ``pinned``.
        pin: the accelerator for ``pinned`` (default: the first of
            ``requirements.accelerators``).
        namespace: queue-name prefix.
        models: the model registry; None places every task on its plain queue. With it, a
            task the registry serves goes to its model's queue (see the module docstring).
        traffic: the recent traffic of this task's model and kind (``fleet.rates``); the
            ``cost`` policy then ranks each chip by what the task costs on the whole
            instances that traffic needs (idle part included) and shares a cold queue's
            boot with the tasks expected. None: the task's own share only.

    Raises:
        ContextError: an inference request longer than its registry model's context.
        NoPlacementError: no family can run the task within its requirements, deadline and
            budget; the exception lists the reason for each.

    """
    need, candidates, rejected_static = _analyse(spec, catalog)
    rejected = list(rejected_static)
    if models is not None:
        candidates = _for_model(spec, candidates, models, catalog, rejected)
    if policy is Policy.PINNED:
        candidates = _pinned(spec, catalog, candidates, pin, rejected)

    feasible, at_risk = _feasible(spec, candidates, loads, namespace, rejected, traffic)
    risk_note = ""
    if not feasible and at_risk:
        # Every queue is cold or busy, but the work itself fits the deadline somewhere:
        # refusing would make a fleet scaled to zero refuse all deadline-bound work.
        feasible, how = _at_risk_choice(at_risk)
        rejected = [r for r in rejected if r.accelerator != feasible[0][0].accelerator]
        policy_used = Policy.FASTEST
        risk_note = (
            f"deadline at risk: no queue is expected to finish within {spec.slo.deadline_s:g} s"
            f" ({how})"
        )
    else:
        policy_used = policy
    if not feasible:
        raise NoPlacementError(tuple(sorted(rejected, key=lambda r: r.accelerator)))

    if policy_used is Policy.FASTEST:
        best = min(feasible, key=lambda f: (f[2] + f[0].service_s, f[0].cost_usd))
        chosen, queue, wait, boot, _ = best
        why = f"fastest: expected finish {wait + chosen.service_s:,.3g} s"
    else:
        best = _consolidated(feasible, loads)
        chosen, queue, wait, boot, _ = best
        why = f"cheapest that meets the deadline: ${_ranked(best):.6g}" + _extras(best, traffic)
    for option in feasible:
        c, _, w, _, _ = option
        if c is chosen:
            continue
        if policy_used is Policy.FASTEST:
            rejected.append(
                Rejection(c.accelerator, f"slower: expected finish {w + c.service_s:,.3g} s")
            )
        else:
            rejected.append(
                Rejection(
                    c.accelerator,
                    f"costlier: ${_ranked(option):.6g}{_extras(option, traffic)}"
                    f" vs ${_ranked(best):.6g}",
                )
            )
    cold = _cold(chosen, queue, loads)
    load = loads.get(queue) if loads is not None else None
    reasons = (
        risk_note or why,
        *_where(chosen, need),
        f"expected wait {wait:,.3g} s, run {chosen.service_s:,.3g} s",
        *warmth_reason(
            chosen.model,
            chosen.cold_start_s,
            chosen.load_s,
            None if load is None else load.consumers,
        ),
    )
    return Placement(
        queue=queue,
        accelerator=chosen.accelerator,
        devices=chosen.devices,
        offer=chosen.offer,
        estimated_cost_usd=chosen.cost_usd,
        estimated_duration_s=chosen.service_s,
        estimated_wait_s=wait if math.isfinite(wait) else float("inf"),
        memory_needed_gb=need,
        policy=policy,
        reasons=reasons,
        deadline_at_risk=bool(risk_note),
        rejected=tuple(sorted(rejected, key=lambda r: r.accelerator)),
        api=chosen.api,
        cold_start_cost_usd=boot,
        model=chosen.model,
        cold_start_s=chosen.boot_s if cold else 0.0,
        model_load_s=chosen.load_s if cold else 0.0,
    )


def _where(chosen: Candidate, need: float) -> tuple[str, str]:
    """The two reason lines that say what runs the task: memory and offer, or the API."""
    api = chosen.api
    if api is not None:
        where = "external" if api.external else "self-hosted"
        return (
            f"api: {api.provider} serves {api.model} as {api.api_model} ({where}, data in {api.residency})",
            (
                f"price: ${api.usd_per_m_input:g}/M input, ${api.usd_per_m_output:g}/M output tokens;"
                f" {api.tokens_per_s:g} tokens/s, first token {api.ttft_s:g} s"
            ),
        )
    return (
        (
            f"memory: needs {need:,.1f} GB; {chosen.devices} x {chosen.accelerator} on"
            f" {chosen.offer.instance_type} ({chosen.offer.accelerator_count} devices)"
        ),
        (
            f"offer: {chosen.offer.cloud} {chosen.offer.region} {chosen.offer.instance_type}"
            f" {chosen.offer.market.value} ${chosen.offer.usd_per_hour:g}/h"
        ),
    )

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleet.catalog import Catalog, Market, Offer
from fleet.compat import family_rejection, memory_needed_gb, offer_fit
from fleet.queues import queue_name
from fleet.spec import TaskSpec
from fleet.throughput import estimate


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the shape ``fleet route --json`` prints)."""
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
        }


class NoPlacementError(ValueError):
    """Nothing can run the task; ``rejected`` says why for each accelerator family."""

    def __init__(
        self, rejected: tuple[Rejection, ...], summary: str = "no accelerator can run this task"
    ) -> None:
        """Keep the per-family reasons."""
        self.rejected = rejected
        lines = "; ".join(f"{r.accelerator}: {r.reason}" for r in rejected)
        super().__init__(f"{summary}: {lines}")


def _offer_markets(spec: TaskSpec, offer: Offer) -> list[tuple[Market, float]]:
    req = spec.requirements
    if req.clouds and offer.cloud not in req.clouds:
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
    fit_reasons: list[str] = []
    for offer in catalog.offers_by_family.get(family_name, ()):
        priced = _offer_markets(spec, offer)
        if not priced:
            if offer.markets():
                reason = "no offer in the allowed clouds or markets"
            continue
        fit = offer_fit(spec, offer, need_gb)
        if fit.devices is None:
            fit_reasons.append(fit.reason)
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
                )
    if best is None and fit_reasons:
        # The most informative reason is the largest offer's: it shows the gap.
        reason = fit_reasons[-1] if len(fit_reasons) == 1 else _largest(fit_reasons)
    return best, reason


def _largest(reasons: list[str]) -> str:
    def held(r: str) -> float:
        try:
            return float(r.rsplit("=", 1)[1].split(maxsplit=1)[0].replace(",", ""))
        except (IndexError, ValueError):
            return -1.0

    return max(reasons, key=held)


_MEMO_LIMIT = 4096
Option = tuple[Candidate, str, float]  # (candidate, queue, expected wait in seconds)
Analysis = tuple[float, tuple[Candidate, ...], tuple[Rejection, ...]]


def _shape(spec: TaskSpec) -> tuple[Any, ...]:
    """The fields placement analysis depends on (not inputs, keys or priority)."""
    return (
        spec.kind,
        spec.model,
        spec.tokens_in,
        spec.tokens_out,
        spec.requirements,
        spec.method,
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
    return need, tuple(candidates), tuple(rejected)


def _wait_s(c: Candidate, queue: str, loads: Mapping[str, QueueLoad] | None) -> float:
    if loads is None:
        return 0.0
    load = loads.get(queue)
    if load is None:
        return 0.0
    if load.consumers <= 0:
        return c.cold_start_s + load.depth * c.busy_s
    # A consumer works through its backlog at device-time speed: a batching server
    # overlaps generation streams, so queued work waits busy_s each, not service_s.
    return load.depth * c.busy_s / load.consumers


def _pinned(
    spec: TaskSpec,
    catalog: Catalog,
    candidates: tuple[Candidate, ...],
    pin: str | None,
    rejected: list[Rejection],
) -> tuple[Candidate, ...]:
    """Keep only the pinned family; record the others as rejected."""
    reqs = spec.requirements.accelerators
    target = pin or (reqs[0] if reqs else None)
    if target is None:
        raise ValueError(
            "policy pinned needs an accelerator: pass pin or requirements.accelerators"
        )
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
) -> tuple[list[Option], list[Option]]:
    """Candidates within budget and deadline, and those that miss it only by waiting.

    Returns ``(feasible, at_risk)``, each ``(candidate, queue, expected wait)``. A
    candidate whose run alone exceeds the deadline is rejected outright.
    """
    feasible: list[Option] = []
    at_risk: list[Option] = []
    deadline = spec.slo.deadline_s
    budget = spec.budget.max_usd
    for c in candidates:
        queue = queue_name(spec.kind, c.accelerator, c.devices, namespace)
        wait = _wait_s(c, queue, loads)
        if budget is not None and c.cost_usd > budget:
            rejected.append(
                Rejection(
                    c.accelerator, f"estimated ${c.cost_usd:.6g} over budget.max_usd ${budget:g}"
                )
            )
        elif deadline is not None and wait + c.service_s > deadline:
            if c.service_s <= deadline:
                at_risk.append((c, queue, wait))
            rejected.append(
                Rejection(
                    c.accelerator,
                    f"misses deadline: wait {wait:,.1f} s + run {c.service_s:,.1f} s > {deadline:g} s",
                )
            )
        else:
            feasible.append((c, queue, wait))
    return feasible, at_risk


def place(
    spec: TaskSpec,
    catalog: Catalog,
    loads: Mapping[str, QueueLoad] | None = None,
    policy: Policy = Policy.COST,
    pin: str | None = None,
    namespace: str = "",
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

    Raises:
        NoPlacementError: no family can run the task within its requirements, deadline and
            budget; the exception lists the reason for each.

    """
    need, candidates, rejected_static = _analyse(spec, catalog)
    rejected = list(rejected_static)
    if policy is Policy.PINNED:
        target = pin or (
            spec.requirements.accelerators[0] if spec.requirements.accelerators else None
        )
        if target is None:
            raise ValueError(
                "policy pinned needs an accelerator: pass pin or requirements.accelerators"
            )
        catalog.family(target)
        pinned = [c for c in candidates if c.accelerator == target]
        rejected += [
            Rejection(c.accelerator, f"not the pinned accelerator {target}")
            for c in candidates
            if c.accelerator != target
        ]
        candidates = tuple(pinned)

    feasible, at_risk = _feasible(spec, candidates, loads, namespace, rejected)
    risk_note = ""
    if not feasible and at_risk:
        # Every queue is cold or busy, but the work itself fits the deadline somewhere:
        # refusing would make a fleet scaled to zero refuse all deadline-bound work.
        feasible = [min(at_risk, key=lambda f: (f[2] + f[0].service_s, f[0].cost_usd))]
        rejected = [r for r in rejected if r.accelerator != feasible[0][0].accelerator]
        policy_used = Policy.FASTEST
        risk_note = (
            f"deadline at risk: no queue is expected to finish within {spec.slo.deadline_s:g} s"
            " (cold or busy); chose the earliest expected finish"
        )
    else:
        policy_used = policy
    if not feasible:
        raise NoPlacementError(tuple(sorted(rejected, key=lambda r: r.accelerator)))

    if policy_used is Policy.FASTEST:
        chosen, queue, wait = min(feasible, key=lambda f: (f[2] + f[0].service_s, f[0].cost_usd))
        why = f"fastest: expected finish {wait + chosen.service_s:,.3g} s"
    else:
        chosen, queue, wait = min(feasible, key=lambda f: (f[0].cost_usd, f[2] + f[0].service_s))
        why = f"cheapest that meets the deadline: ${chosen.cost_usd:.6g}"
    for c, _, w in feasible:
        if c is chosen:
            continue
        if policy_used is Policy.FASTEST:
            rejected.append(
                Rejection(c.accelerator, f"slower: expected finish {w + c.service_s:,.3g} s")
            )
        else:
            rejected.append(
                Rejection(c.accelerator, f"costlier: ${c.cost_usd:.6g} vs ${chosen.cost_usd:.6g}")
            )
    reasons = (
        risk_note or why,
        (
            f"memory: needs {need:,.1f} GB; {chosen.devices} x {chosen.accelerator} on"
            f" {chosen.offer.instance_type} ({chosen.offer.accelerator_count} devices)"
        ),
        (
            f"offer: {chosen.offer.cloud} {chosen.offer.region} {chosen.offer.instance_type}"
            f" {chosen.offer.market.value} ${chosen.offer.usd_per_hour:g}/h"
        ),
        f"expected wait {wait:,.3g} s, run {chosen.service_s:,.3g} s",
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
    )

"""An offline lower bound on what any policy can pay for a trace: a linear program.

Every task needs device-time on some offer that holds it; the LP buys that device-time
as cheaply as possible, knowing the whole trace in advance. Variables, for offer-markets
``o``, task classes ``c`` and time buckets ``b`` of ``bucket_s`` seconds:

* ``x[o,b] >= 0``: device-seconds of ``o`` bought in ``b`` (for cpu offers, which count
  the whole instance as one device, instance-seconds);
* ``y[c,o,b] >= 0``: tasks of ``c`` served on ``o`` in ``b``, only where ``c`` fits ``o``.

Minimise ``sum price[o] / 3600 / devices_per_instance[o] * x[o,b]`` subject to capacity,
``sum_c a[c,o] * y[c,o,b] <= x[o,b]`` with ``a[c,o]`` the device-seconds one task of
``c`` occupies on ``o`` (``busy_s`` on ``d`` devices, times ``d``: the cost model of
:mod:`fleet.placement`), and demand: a task is served in its arrival bucket or later,
``sum_{b'<=b} sum_o y[c,o,b'] <= arrivals of c up to b`` for every ``b``, with equality
over the whole trace (written with backlog variables, see :func:`_solve`).

Why it is a lower bound: any real schedule (fleet, homogeneous, cheapest) pays at least
the device-time its tasks occupy at the price of the offers it runs them on, and that
schedule is a feasible point of the LP. The LP relaxes whole instances (fractions may
be bought), boot and cold-start time, minimum billing, idle time, queueing and
deadlines; ignoring deadlines only lowers it further. Without capacity limits the
optimum is the closed form of :func:`greedy_bound` (each task on its cheapest
device-time); the LP is kept for extensions that cap capacity per bucket.

It is far below what a fleet of whole instances can pay when work is sparse (one task
an hour still needs an instance for a while). :mod:`fleet.sim.ilp` is the tight
reference beside it: the offline optimum that buys whole instances per bucket with boot
time charged, never below this LP.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# scipy ships no type stubs; the two calls used here are checked by the tests.
from scipy.optimize import linprog  # type: ignore[import-untyped]
from scipy.sparse import coo_matrix  # type: ignore[import-untyped]

from fleet.autoscaler.config import AutoscalerConfig, pool_offers
from fleet.catalog import Catalog, Market, Offer
from fleet.compat import family_rejection, memory_needed_gb, offer_fit
from fleet.sim.trace import TraceEvent
from fleet.spec import TaskSpec
from fleet.throughput import estimate

# Token grids tried when there are more classes than ``max_classes``: ratio between grid
# points, finest first (1.0: exact token counts).
TOKEN_GRIDS = (1.0, 1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0, 16.0, 256.0)
_STATUS = {
    0: "optimal",
    1: "iteration_limit",
    2: "infeasible",
    3: "unbounded",
    4: "numerical_difficulties",
}

PricedOfferMarket = tuple[Offer, Market, float]  # (offer, market, USD per hour)
ClassKey = tuple[Any, ...]  # see class_key


@dataclass(frozen=True)
class LowerBound:
    """The LP's answer.

    ``cost_usd`` is NaN unless ``status`` is ``optimal``; ``buckets``, ``classes`` and
    ``offers`` size the LP (classes that fit some offer; offer-markets); tasks of classes
    that fit no offer are counted in ``infeasible_tasks`` and left out of the cost.
    """

    cost_usd: float
    status: str
    buckets: int
    classes: int
    offers: int
    infeasible_tasks: int


def priced_offers(
    catalog: Catalog, config: AutoscalerConfig | None = None
) -> list[PricedOfferMarket]:
    """Offer-markets the bound may buy: the config's pools' (each once), else every priced one."""
    if config is None:
        return [(o, m, p) for o in catalog.offers for m in Market if (p := o.price(m)) is not None]
    seen: dict[tuple[Offer, Market], float] = {}
    for pool in config.pools:
        for po in pool_offers(pool, catalog):
            seen.setdefault((po.offer, po.market), po.usd_per_hour)
    return [(o, m, p) for (o, m), p in seen.items()]


def _shape(spec: TaskSpec) -> tuple[Any, ...]:
    """The fields that decide fit and run time besides token counts and goals: never merged.

    The model's name is among them: a throughput model may look its architecture up by name.
    """
    return (
        spec.kind,
        spec.model.name,
        spec.model.params_b,
        spec.model.dtype,
        spec.method,
        spec.requirements,
    )


def _round_down(tokens: int, ratio: float) -> int:
    """``tokens`` rounded down to the grid ``ratio**k`` (unchanged for ratio 1 or 0 tokens)."""
    if ratio <= 1.0 or tokens <= 1:
        return tokens
    return min(tokens, int(ratio ** math.floor(math.log(tokens) / math.log(ratio))))


def _round_up(goal: float | None, ratio: float) -> float | None:
    """A positive ``goal`` rounded up to the grid ``ratio**k`` (unchanged for ratio 1 or None)."""
    if goal is None or ratio <= 1.0:
        return goal
    return max(goal, ratio ** math.ceil(math.log(goal) / math.log(ratio)))


def class_key(spec: TaskSpec, ratio: float) -> ClassKey:
    """The class of ``spec`` on the grid ``ratio``: shape, goals rounded up, tokens rounded down.

    The goals are ``slo.deadline_s`` and ``slo.tpot_ms``: the throughput model sizes a
    server's batch to meet them, and a looser goal never makes a task occupy more device
    time, as fewer tokens never do. Key layout: ``(*shape, deadline_s, tpot_ms, tokens_in,
    tokens_out)``.
    """
    return (
        *_shape(spec),
        _round_up(spec.slo.deadline_s, ratio),
        _round_up(spec.slo.tpot_ms, ratio),
        _round_down(spec.tokens_in, ratio),
        _round_down(spec.tokens_out, ratio),
    )


def unit_price(catalog: Catalog, offer: Offer, usd_per_hour: float) -> float:
    """USD per device-second (per instance-second for cpu offers)."""
    per_vcpu = catalog.families[offer.accelerator].per_vcpu
    return usd_per_hour / 3600.0 / (1 if per_vcpu else offer.accelerator_count)


class ClassCost(NamedTuple):
    """What one task of a class costs on one offer-market it fits."""

    offer: int  # index into the offer list
    device_s: float  # device-seconds it occupies (cpu offers: instance-seconds)
    unit_usd: float  # USD per device-second there
    service_s: float  # its wall time there


def class_costs(
    spec: TaskSpec, key: ClassKey, catalog: Catalog, offers: Sequence[PricedOfferMarket]
) -> list[ClassCost]:
    """One :class:`ClassCost` per offer in ``offers`` that holds the class, in offer order.

    The class representative is ``spec`` with the class's token counts and goals.
    Allowed clouds and markets are honoured as :mod:`fleet.placement` does. The device
    time is ``fleet.throughput.estimate(...).busy_s`` on the devices the offer would use,
    times that device count; an offer where the estimate is not finite is left out.
    """
    deadline_s, tpot_ms, tokens_in, tokens_out = key[-4:]
    goals = spec.slo.model_copy(update={"deadline_s": deadline_s, "tpot_ms": tpot_ms})
    rep = spec.model_copy(update={"tokens_in": tokens_in, "tokens_out": tokens_out, "slo": goals})
    need = memory_needed_gb(rep)
    req = rep.requirements
    runs: dict[tuple[str, int, int | None], tuple[float, float]] = {}
    out = []
    for j, (offer, market, price) in enumerate(offers):
        family = catalog.families[offer.accelerator]
        if (req.clouds and offer.cloud not in req.clouds) or (
            req.markets and market.value not in req.markets
        ):
            continue
        if family_rejection(rep, family) is not None:
            continue
        d = offer_fit(rep, offer, need).devices
        if d is None:
            continue
        group = (family.name, d, offer.vcpus)
        if group not in runs:
            est = estimate(rep, family, d, offer.vcpus)
            runs[group] = (est.busy_s, est.service_s)
        busy, service = runs[group]
        # cpu offers: the whole instance is the device, whatever vCPU count ran the task.
        a = busy * (1 if family.per_vcpu else d)
        if math.isfinite(a) and math.isfinite(service):
            out.append(ClassCost(j, a, unit_price(catalog, offer, price), service))
    return out


def token_grid(trace: Sequence[TraceEvent], max_classes: int) -> float:
    """The finest token grid (a ratio of ``TOKEN_GRIDS``) giving at most ``max_classes`` classes.

    Merging rounds token counts DOWN and goals UP to a logarithmic grid
    (:func:`class_key`), so a class's representative never occupies more device time
    than any of its tasks (fit depends only on the shape): the bound stays a lower bound,
    only looser. Shapes are never merged; if even the coarsest grid leaves more classes,
    the LP is simply larger.
    """
    for ratio in TOKEN_GRIDS:
        if len({class_key(e.spec, ratio) for e in trace}) <= max_classes:
            return ratio
    return TOKEN_GRIDS[-1]


def greedy_bound(
    trace: Sequence[TraceEvent], catalog: Catalog, config: AutoscalerConfig | None = None
) -> float:
    """Closed form of the bound: each task's cheapest device-time over the offers, summed.

    Uses exact token counts, so it equals :func:`lower_bound` when no classes are merged
    and is at least it otherwise. Tasks that fit no offer add nothing.
    """
    offers = priced_offers(catalog, config)
    counts = Counter(class_key(e.spec, 1.0) for e in trace)
    specs = {class_key(e.spec, 1.0): e.spec for e in trace}
    total = 0.0
    for key, n in counts.items():
        costs = class_costs(specs[key], key, catalog, offers)
        if costs:
            total += n * min(c.device_s * c.unit_usd for c in costs)
    return total


def lower_bound(
    trace: Sequence[TraceEvent],
    catalog: Catalog,
    config: AutoscalerConfig | None = None,
    *,
    bucket_s: float = 300.0,
    max_classes: int = 200,
) -> LowerBound:
    """Solve the LP of this module for ``trace`` on ``config``'s offers (default: all priced).

    Buckets count from the first event. An empty trace, or one where nothing fits, costs
    0 and is ``optimal`` without calling the solver.

    Raises:
        ValueError: ``bucket_s`` not positive or ``max_classes`` below 1.

    """
    if bucket_s <= 0 or max_classes < 1:
        raise ValueError(f"bucket_s {bucket_s} must be > 0 and max_classes {max_classes} >= 1")
    offers = priced_offers(catalog, config)
    t0 = min((e.t for e in trace), default=0.0)
    bucket_of = [int((e.t - t0) // bucket_s) for e in trace]
    n_b = max(bucket_of, default=0) + 1
    ratio = token_grid(trace, max_classes)
    keys = [class_key(e.spec, ratio) for e in trace]
    specs = dict(zip(keys, (e.spec for e in trace), strict=True))
    fitting: dict[ClassKey, list[ClassCost]] = {}
    for key, spec in specs.items():
        costs = class_costs(spec, key, catalog, offers)
        if costs:
            fitting[key] = costs
    index = {key: c for c, key in enumerate(fitting)}
    arrivals = np.zeros((len(index), n_b))
    infeasible = 0
    for key, b in zip(keys, bucket_of, strict=True):
        if key in index:
            arrivals[index[key], b] += 1
        else:
            infeasible += 1
    sizes = (n_b, len(index), len(offers), infeasible)
    if not index:
        return LowerBound(0.0, "optimal", *sizes)
    pairs = [(index[key], c.offer, c.device_s) for key, costs in fitting.items() for c in costs]
    unit = np.array([unit_price(catalog, o, p) for o, _, p in offers])
    cost, status = _solve(pairs, unit, arrivals)
    return LowerBound(cost, status, *sizes)


def _solve(
    pairs: list[tuple[int, int, float]], unit: np.ndarray[Any, Any], arrivals: np.ndarray[Any, Any]
) -> tuple[float, str]:
    """Build the sparse LP and solve it with HiGHS; ``(cost, status)``, cost NaN unless optimal.

    Columns: ``y[p,b]`` at ``p * B + b`` for each (class, offer) pair ``p``; backlog
    ``s[c,b]`` (tasks of ``c`` arrived by the end of ``b`` and not yet served) for
    ``b < B - 1``; then ``x[o,b]``. ``A_ub`` rows: capacity ``(o, b)``. ``A_eq`` rows
    ``(c, b)``: ``sum_o y[c,o,b] + s[c,b] - s[c,b-1] = arrivals[c,b]``, ``s[c,-1] =
    s[c,B-1] = 0``. With ``s >= 0`` this is exactly the cumulative demand constraint
    (served by ``b`` = arrived by ``b`` - ``s[c,b]``) and the total equality, in
    ``O(P * B)`` non-zeros instead of ``O(P * B^2)``.
    """
    n_c, n_b = arrivals.shape
    n_o, n_p = len(unit), len(pairs)
    pc = np.array([p[0] for p in pairs])
    pj = np.array([p[1] for p in pairs])
    pa = np.array([p[2] for p in pairs])
    bs = np.arange(n_b)
    n_y, n_s = n_p * n_b, n_c * (n_b - 1)
    n_cols = n_y + n_s + n_o * n_b
    y_cols = (np.arange(n_p)[:, None] * n_b + bs[None, :]).ravel()
    # Capacity: sum_p a_p y[p,b] - x[o,b] <= 0.
    a_ub = coo_matrix(
        (
            np.concatenate([np.repeat(pa, n_b), -np.ones(n_o * n_b)]),
            (
                np.concatenate([(pj[:, None] * n_b + bs[None, :]).ravel(), np.arange(n_o * n_b)]),
                np.concatenate([y_cols, n_y + n_s + np.arange(n_o * n_b)]),
            ),
        ),
        shape=(n_o * n_b, n_cols),
    ).tocsr()
    # Flow of demand through the backlog.
    cs, bk = np.divmod(np.arange(n_s), max(n_b - 1, 1))  # s[c,b] for b < B - 1
    a_eq = coo_matrix(
        (
            np.concatenate([np.ones(n_y), np.ones(n_s), -np.ones(n_s)]),
            (
                np.concatenate(
                    [(pc[:, None] * n_b + bs[None, :]).ravel(), cs * n_b + bk, cs * n_b + bk + 1]
                ),
                np.concatenate([y_cols, n_y + np.arange(n_s), n_y + np.arange(n_s)]),
            ),
        ),
        shape=(n_c * n_b, n_cols),
    ).tocsr()
    objective = np.concatenate([np.zeros(n_y + n_s), np.repeat(unit, n_b)])
    res = linprog(
        objective,
        A_ub=a_ub,
        b_ub=np.zeros(n_o * n_b),
        A_eq=a_eq,
        b_eq=arrivals.ravel(),
        method="highs",
        # HiGHS's default 1e-7 slack lets the optimum overshoot the closed form by ~1e-8.
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    status = _STATUS.get(res.status, f"status {res.status}")
    if res.status != 0:
        return math.nan, f"{status}: {res.message}"
    return float(res.fun), status

"""The tight reference: the offline optimum that buys whole instances per time bucket (an ILP).

:mod:`fleet.sim.lowerbound`'s LP buys device-seconds in any fraction, so it is a true
lower bound on every policy but far below what any fleet of whole instances can pay. This
module's mixed-integer program buys whole instances for whole buckets and charges their
boot, knowing the whole trace in advance: what a clairvoyant fleet of the same offers
would pay. The contract:

* **Buckets** of ``bucket_s`` seconds count from the first arrival; after the last
  arrival's bucket come ``T`` trailing buckets (the caller's ``trailing_buckets``, or
  the longest boot-plus-run wall time of any class on its fastest fitting offer, in
  buckets rounded up, at most the simulator's 6 hours after the last arrival), and never
  fewer than a launch at the start needs to boot.
* **Offers** ``o`` are buyables: the offer-markets the config's pools may buy
  (``pool_offers``), each with what that pool serves (``PoolConfig.serving``: its models'
  queues, or the plain ones); without a config every priced offer-market, serving any
  task. A buyable another one dominates (no dearer, no slower to boot, at least as many
  devices, holding every class it holds in no more device time) is dropped, which
  leaves the optimum unchanged.
* **Whole instances**: integer ``n[o,b] >= 0`` instances held in bucket ``b``, each paid
  for the whole bucket, ``price_o x bucket_s / 3600``. Launches ``l[o,b] >= n[o,b] -
  n[o,b-1]``, ``l >= 0``, ``n[o,-1] = 0``: the fleet starts cold, as the simulator does.
* **Boot is charged**: a launch in ``b`` is paid from the start of ``b`` and unusable
  for ``boot_o`` seconds (the family's ``cold_start_s``, or the caller's ``boot_s``, plus
  the pool's ``PoolConfig.load_s`` when it holds models). With ``boot_o = k x bucket_s
  + r``, ``0 <= r < bucket_s``, a launch loses buckets ``b .. b+k-1`` whole and ``r``
  seconds of ``b+k``: work in a bucket needs launches at least ``k`` buckets before it.
* **Capacity**: ``sum_c a[c,o] y[c,o,b] <= U_o (n[o,b] bucket_s - bucket_s sum_{j<k}
  l[o,b-j] - r l[o,b-k])``, ``U_o`` the devices of an instance (1 for cpu offers, which
  count the instance as one device) and ``a[c,o]`` the device-seconds one task of ``c``
  occupies on ``o``, from ``fleet.throughput.estimate`` exactly as in the LP.
* **Demand**: ``y[c,o,b] >= 0`` tasks of class ``c`` served on ``o`` in ``b`` (tasks are
  fluid: one may be split over buckets and instances), with a backlog ``s[c,b] >= 0``
  (arrived, not yet served) that is 0 after the last bucket. A task arriving at ``t``
  with ``slo.deadline_s`` may be served from its arrival's bucket to the one holding
  ``t + deadline_s``, ``D`` buckets later; ``D`` is part of the class, so within a class
  FIFO is earliest-deadline-first and ``s[c,b] <= arrivals of c in buckets b-D+1 .. b``
  states the deadlines exactly. A deadline before the first bucket in which an instance
  launched at the start could serve the task is moved to that bucket (no policy meets
  it; the simulator counts it missed). Tasks without a deadline may wait to the end, or
  get the caller's ``default_deadline_s``.
* **Classes**: the LP's (shape and token counts on the token grid that keeps at most
  ``max_classes`` of them), split by the registry model that serves the task (when there
  is a config) and by ``D``.

Minimise ``sum_{o,b} price_o x bucket_s / 3600 x n[o,b]``.

What it is, honestly. The optimum of this bucketed whole-instance model: a tight
reference, not a strict lower bound on the simulator's cost. The simulator pays per
second from launch to end, so a policy that holds instances for parts of buckets can pay
less: any schedule that meets every deadline is a solution of the model once each
instance run is rounded out to whole buckets, which adds at most two buckets per run
(less as ``bucket_s`` shrinks). Elsewhere the model is generous: tasks are fluid and not
packed onto instances, a task may use its arrival bucket's capacity before it arrives and
its deadline's bucket after the deadline, and pools' ``min_instances``,
``max_instances``, budgets, spot interruptions and API pools are ignored (a fleet that
sends work to token-priced API pools can cost less than this). It is never below the LP
on the same offers: a solution of it gives the LP a solution paying for no more than the
device-time it buys (the classes use the LP's token grid).

The solver is ``scipy.optimize.milp`` (HiGHS) with a time limit and a relative gap:
``status`` ``optimal`` means HiGHS proved the incumbent within ``mip_rel_gap`` of its
dual bound. On any other outcome ``cost_usd`` is NaN and ``status`` says why, while the
incumbent (if any) and the dual bound are still reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# scipy ships no type stubs; the calls used here are checked by the tests.
from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]

from fleet.autoscaler.config import AutoscalerConfig, pool_offers
from fleet.catalog import Catalog, Market, Offer
from fleet.sim.ilp_problem import Buy, Buyable, Problem, Serves
from fleet.sim.lowerbound import priced_offers, token_grid
from fleet.sim.trace import TraceEvent

__all__ = ["Buy", "Buyable", "TightBound", "buyable_offers", "tight_bound"]
_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "other"}


@dataclass(frozen=True)
class TightBound:
    """The ILP's answer (see the module docstring for what it is and is not).

    ``cost_usd`` is the incumbent when ``status`` is ``optimal`` (within ``mip_rel_gap``),
    else NaN; ``incumbent_usd`` is the best solution found whatever the status (NaN if
    none), ``dual_bound_usd`` the solver's proven lower bound on the optimum, ``gap``
    their relative difference. ``buys`` lists, per buyable, the instances held per
    bucket (only those holding any). ``buckets`` includes ``trailing_buckets``;
    ``classes`` and ``offers`` size the problem (after merging); tasks that fit no
    buyable are counted in ``infeasible_tasks`` and left out; ``solve_s`` is wall time.
    """

    cost_usd: float
    status: str
    incumbent_usd: float
    dual_bound_usd: float
    gap: float
    bucket_s: float
    buckets: int
    trailing_buckets: int
    classes: int
    offers: int
    infeasible_tasks: int
    buys: tuple[Buy, ...] = ()
    solve_s: float = 0.0


def buyable_offers(
    catalog: Catalog, config: AutoscalerConfig | None = None, boot_s: float | None = None
) -> list[Buyable]:
    """The config's pools' offer-markets with what each pool serves (without: every priced one).

    Boot is ``boot_s`` (None: the family's ``cold_start_s``) plus the pool's model load
    time; an offer-market two pools serve alike keeps the shorter boot.
    """

    def boot(offer: Offer) -> float:
        return catalog.families[offer.accelerator].cold_start_s if boot_s is None else boot_s

    if config is None:
        return [Buyable(o, m, p, boot(o)) for o, m, p in priced_offers(catalog)]
    registry = config.registry
    seen: dict[tuple[str, Market, Serves], Buyable] = {}
    for pool in config.pools:
        serves = frozenset((m, k) for m, kinds in pool.serving(registry).items() for k in kinds)
        models = tuple(e.name for e in pool.model_entries(registry))
        load = pool.load_s(registry)
        for po in pool_offers(pool, catalog):
            b = Buyable(po.offer, po.market, po.usd_per_hour, boot(po.offer) + load, models, serves)
            key = (po.offer.key, po.market, serves)
            if key not in seen or b.boot_s < seen[key].boot_s:
                seen[key] = b
    return list(seen.values())


def tight_bound(
    trace: Sequence[TraceEvent],
    catalog: Catalog,
    config: AutoscalerConfig | None = None,
    *,
    bucket_s: float = 300.0,
    max_classes: int = 200,
    boot_s: float | None = None,
    trailing_buckets: int | None = None,
    time_limit_s: float = 60.0,
    mip_rel_gap: float = 0.01,
    default_deadline_s: float | None = None,
) -> TightBound:
    """Solve the ILP of this module for ``trace`` on ``config``'s pools (default: every offer).

    Args:
        trace: the tasks, in time order.
        catalog: families and offers.
        config: its pools are what may be bought (None: every priced offer-market).
        bucket_s: bucket length, seconds; instances are bought per bucket.
        max_classes: cap on token classes before splitting by model and deadline span.
        boot_s: boot time of every family (None: each family's ``cold_start_s``), as the
            simulator's option of the same name; pools' model load time is added.
        trailing_buckets: buckets after the last arrival's (None: the module's rule).
        time_limit_s: the solver's wall-clock limit.
        mip_rel_gap: the relative gap at which the solver stops, calling it optimal.
        default_deadline_s: the deadline of tasks that set none (None: they may wait to
            the end of the trace). Online traffic without deadlines otherwise lets the
            optimum defer requests for as long as it likes.

    Returns:
        A :class:`TightBound`; an empty trace, or one where nothing fits, costs 0 and is
        ``optimal`` without calling the solver. Solver failures are reported, not raised.

    Raises:
        ValueError: a non-positive ``bucket_s`` or ``time_limit_s``, ``max_classes``
            below 1, a negative ``trailing_buckets``, ``boot_s`` or ``mip_rel_gap``, or a
            non-positive ``default_deadline_s``.

    """
    if bucket_s <= 0 or max_classes < 1 or time_limit_s <= 0:
        raise ValueError(
            f"bucket_s {bucket_s} and time_limit_s {time_limit_s} must be > 0,"
            f" max_classes {max_classes} >= 1"
        )
    if min(trailing_buckets or 0, boot_s or 0.0, mip_rel_gap) < 0:
        raise ValueError("trailing_buckets, boot_s and mip_rel_gap must not be negative")
    if default_deadline_s is not None and default_deadline_s <= 0:
        raise ValueError(f"default_deadline_s {default_deadline_s} must be > 0")
    buyables = buyable_offers(catalog, config, boot_s)
    registry = config.registry if config is not None else None
    ratio = token_grid(trace, max_classes)
    problem = Problem.build(
        trace, ratio, registry, buyables, catalog, bucket_s, trailing_buckets, default_deadline_s
    )
    if problem.arrivals.size == 0:
        return TightBound(0.0, "optimal", 0.0, 0.0, 0.0, bucket_s, *problem.sizes())
    started = time.perf_counter()
    res = _solve(problem, time_limit_s, mip_rel_gap)
    solve_s = time.perf_counter() - started
    status = _STATUS.get(res.status, f"status {res.status}")
    dual = float(res.mip_dual_bound) if res.mip_dual_bound is not None else math.nan
    if res.x is None:
        return TightBound(
            math.nan,
            f"{status}: {res.message}",
            math.nan,
            dual,
            math.nan,
            bucket_s,
            *problem.sizes(),
            solve_s=solve_s,
        )
    incumbent = float(res.fun)
    gap = float(res.mip_gap) if res.mip_gap is not None else math.nan
    return TightBound(
        incumbent if res.status == 0 else math.nan,
        status if res.status == 0 else f"{status}: {res.message}",
        incumbent,
        dual,
        gap,
        bucket_s,
        *problem.sizes(),
        buys=problem.buys(res.x),
        solve_s=solve_s,
    )


def _solve(problem: Problem, time_limit_s: float, mip_rel_gap: float) -> Any:  # noqa: ANN401 - scipy's OptimizeResult
    """Call HiGHS on the problem's arrays, within the time limit and gap."""
    arrays = problem.arrays()
    return milp(
        arrays.objective,
        integrality=arrays.integrality,
        bounds=Bounds(arrays.lower, arrays.upper),
        constraints=LinearConstraint(arrays.matrix, arrays.row_lower, arrays.row_upper),
        options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap, "disp": False},
    )

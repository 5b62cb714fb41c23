"""The tight bound's data: task classes x buyables x buckets, and the ILP's sparse arrays.

:func:`fleet.sim.ilp.tight_bound` builds a :class:`Problem` and solves its arrays; the
model, which is the contract, is stated in :mod:`fleet.sim.ilp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# scipy ships no type stubs; the matrix is checked by the tests through the solver.
from scipy.sparse import coo_matrix  # type: ignore[import-untyped]

from fleet.catalog import Catalog, Market, Offer
from fleet.modelfit import served_entry
from fleet.models.registry import ModelRegistry
from fleet.sim.lowerbound import ClassCost, ClassKey, class_costs, class_key
from fleet.sim.trace import TraceEvent
from fleet.spec import TaskKind

SIM_TAIL_S = 6 * 3600.0  # the simulator stops 6 h after the last arrival

Serves = frozenset[tuple[str | None, TaskKind]]  # (registry model or None: plain, kind)


@dataclass(frozen=True, slots=True)
class Buyable:
    """An offer-market the optimum may buy, with its boot and what its instances serve."""

    offer: Offer
    market: Market
    usd_per_hour: float
    boot_s: float
    models: tuple[str, ...] = ()  # the registry models its pool holds (empty: plain)
    serves: Serves | None = None  # None: any task

    def takes(self, model: str | None, kind: TaskKind) -> bool:
        """Whether its instances serve ``kind`` work for ``model`` (None: the plain queues)."""
        return self.serves is None or (model, kind) in self.serves


@dataclass(frozen=True, slots=True)
class Buy:
    """What the optimum holds of one buyable: instances per bucket, and what they cost."""

    offer: str  # cloud/region/instance_type
    market: str
    models: tuple[str, ...]
    counts: tuple[int, ...]
    cost_usd: float

    @property
    def peak(self) -> int:
        """The most instances held in one bucket."""
        return max(self.counts, default=0)


class MilpArrays(NamedTuple):
    """``scipy.optimize.milp``'s inputs: objective, integrality, variable and row bounds."""

    objective: np.ndarray[Any, Any]
    integrality: np.ndarray[Any, Any]
    lower: np.ndarray[Any, Any]
    upper: np.ndarray[Any, Any]
    matrix: Any  # scipy.sparse.csr_matrix
    row_lower: np.ndarray[Any, Any]
    row_upper: np.ndarray[Any, Any]


@dataclass
class Problem:
    """The ILP's data: classes x buyables x buckets, before it becomes matrices."""

    bucket_s: float
    buyables: list[Buyable]
    units: np.ndarray[Any, Any]  # devices per instance, per buyable
    pairs: list[tuple[int, int, float]]  # (class, buyable, device-seconds a task occupies)
    spans: list[int | None]  # per class: buckets after arrival it may wait (None: any)
    arrivals: np.ndarray[Any, Any]  # (classes, buckets)
    trailing: int
    infeasible: int

    @classmethod
    def build(
        cls,
        trace: Sequence[TraceEvent],
        ratio: float,
        registry: ModelRegistry | None,
        buyables: list[Buyable],
        catalog: Catalog,
        bucket_s: float,
        trailing: int | None,
        default_deadline_s: float | None = None,
    ) -> Problem:
        """Classes, their costs on each buyable (dominated ones dropped), arrivals.

        A deadline that falls before any buyable holding the task can serve from a cold
        start (``floor(boot / bucket_s)`` buckets in) is moved to that bucket: no policy
        meets it, the simulator counts it missed, and the optimum stays feasible. Tasks
        without a deadline get ``default_deadline_s`` (None: they may wait to the end).
        """
        priced = [(b.offer, b.market, b.usd_per_hour) for b in buyables]
        t0 = min((e.t for e in trace), default=0.0)
        arrive = [int((e.t - t0) // bucket_s) for e in trace]
        costs: dict[tuple[ClassKey, str | None], list[ClassCost]] = {}
        keys: list[tuple[ClassKey, str | None, int | None]] = []
        for e, b in zip(trace, arrive, strict=True):
            entry = served_entry(e.spec, registry)
            group = (class_key(e.spec, ratio), None if entry is None else entry.name)
            if group not in costs:
                costs[group] = [
                    c
                    for c in class_costs(e.spec, group[0], catalog, priced)
                    if buyables[c.offer].takes(group[1], e.spec.kind)
                ]
            deadline = e.spec.slo.deadline_s
            deadline = default_deadline_s if deadline is None else deadline
            span = None
            if deadline is not None and costs[group]:
                ready = min(int(buyables[c.offer].boot_s // bucket_s) for c in costs[group])
                span = max(int((e.t - t0 + deadline) // bucket_s), ready) - b
            keys.append((*group, span))
        fitting = {key: costs[key[:2]] for key in keys}
        index = {key: i for i, key in enumerate(k for k, c in fitting.items() if c)}
        units = np.array([_units(catalog, b.offer) for b in buyables])
        fits: list[list[tuple[int, float]]] = [[] for _ in buyables]
        for key, cs in fitting.items():
            for c in cs:
                fits[c.offer].append((index[key], c.device_s))
        keep = _undominated(buyables, units, fits)
        renum = {j: i for i, j in enumerate(keep)}
        pairs = [(c, renum[j], a) for j in keep for c, a in fits[j]]
        last = max(arrive, default=0)
        if trailing is None:
            walls = [min(buyables[c.offer].boot_s + c.service_s for c in fitting[k]) for k in index]
            longest = math.ceil(max(walls, default=0.0) / bucket_s)
            trailing = min(longest, math.ceil(SIM_TAIL_S / bucket_s))
        # Never end before a launch at the start could serve (then everything is feasible).
        ready = max((int(buyables[j].boot_s // bucket_s) for j in keep), default=0)
        n_b = max(last + 1 + trailing, ready + 1) if index else 0
        arrivals = np.zeros((len(index), n_b))
        infeasible = 0
        for key, at in zip(keys, arrive, strict=True):
            if key in index:
                arrivals[index[key], at] += 1
            else:
                infeasible += 1
        spans = [k[2] for k in index]
        return cls(
            bucket_s,
            [buyables[j] for j in keep],
            units[keep],
            pairs,
            spans,
            arrivals,
            n_b - last - 1 if index else 0,
            infeasible,
        )

    def sizes(self) -> tuple[int, int, int, int, int]:
        """``(buckets, trailing buckets, classes, buyables, infeasible tasks)``."""
        n_c, n_b = self.arrivals.shape
        return n_b, self.trailing, n_c, len(self.buyables), self.infeasible

    def buys(self, x: np.ndarray[Any, Any]) -> tuple[Buy, ...]:
        """The instances the solution ``x`` holds, per buyable with any."""
        n_c, n_b = self.arrivals.shape
        n_o = len(self.buyables)
        start = len(self.pairs) * n_b + n_c * (n_b - 1)
        counts = np.rint(x[start : start + n_o * n_b]).astype(int).reshape(n_o, n_b)
        return tuple(
            Buy(
                b.offer.key,
                b.market.value,
                b.models,
                tuple(int(v) for v in counts[j]),
                float(counts[j].sum()) * b.usd_per_hour * self.bucket_s / 3600.0,
            )
            for j, b in enumerate(self.buyables)
            if counts[j].any()
        )

    def arrays(self) -> MilpArrays:
        """The ILP as sparse arrays for ``scipy.optimize.milp``.

        Columns: ``y[p,b]`` at ``p * B + b`` per (class, buyable) pair ``p``; backlog
        ``s[c,b]`` for ``b < B - 1`` (``s[c,B-1] = 0``); ``n[o,b]`` (integer); ``l[o,b]``.
        Rows: capacity ``(o,b)``, divided by ``U_o x bucket_s`` so every coefficient is near
        1; launches ``(o,b)``: ``n[o,b] - n[o,b-1] - l[o,b] <= 0``; demand ``(c,b)``:
        ``sum_o y[c,o,b] + s[c,b] - s[c,b-1] = arrivals[c,b]``; then linking rows
        ``y[p,b] <= avail[c,b] n[o,b]`` (valid for whole ``n``: with no instance nothing is
        served, and never more than the tasks of ``c`` that ``b`` may serve), only where that
        is below one instance's capacity (elsewhere the capacity row implies it). They make
        the relaxation buy a whole instance for a class served alone, which cuts solve time.
        """
        arrivals, bucket = self.arrivals, self.bucket_s
        n_c, n_b = arrivals.shape
        n_o, n_p = len(self.buyables), len(self.pairs)
        n_y, n_s, n_ob = n_p * n_b, n_c * (n_b - 1), n_o * n_b
        s0, n0, l0 = n_y, n_y + n_s, n_y + n_s + n_ob
        bs = np.arange(n_b)
        pc, pj, pa = (np.array([p[i] for p in self.pairs]) for i in range(3))
        ob = np.arange(n_ob).reshape(n_o, n_b)
        y_at = (np.arange(n_p)[:, None] * n_b + bs).ravel()
        a = _Sparse()
        # Capacity rows 0 .. n_ob - 1: work, minus instances, plus what launches lose to boot.
        a.put(
            (pj[:, None] * n_b + bs).ravel(), y_at, np.repeat(pa / (self.units[pj] * bucket), n_b)
        )
        a.put(ob, n0 + ob, -1.0)
        for j, b in enumerate(self.buyables):
            whole, part = divmod(b.boot_s, bucket)
            lags = [(lag, 1.0) for lag in range(min(int(whole), n_b))]
            if part > 0 and whole < n_b:
                lags.append((int(whole), part / bucket))
            for lag, lost in lags:
                a.put(ob[j, lag:], l0 + ob[j, : n_b - lag], lost)
        # Launch rows n_ob .. 2 n_ob - 1.
        a.put(n_ob + ob, n0 + ob, 1.0)
        a.put(n_ob + ob[:, 1:], n0 + ob[:, :-1], -1.0)
        a.put(n_ob + ob, l0 + ob, -1.0)
        # Demand rows from 2 n_ob.
        cb = 2 * n_ob + np.arange(n_c * n_b).reshape(n_c, n_b)
        a.put(cb[pc].ravel(), y_at, 1.0)
        sk = s0 + np.arange(n_s).reshape(n_c, n_b - 1)
        a.put(cb[:, :-1], sk, 1.0)
        a.put(cb[:, 1:], sk, -1.0)
        # Deadlines: the backlog of a class never exceeds its arrivals of the last D buckets,
        # and the tasks of c that b may serve are those that arrived in buckets b-D .. b.
        cum = np.cumsum(arrivals, axis=1)
        s_max = np.full((n_c, n_b - 1), np.inf)
        avail = cum.copy()
        for c, span in enumerate(self.spans):
            if span is not None:
                s_max[c] = (cum[c] - _lagged(cum[c], span))[:-1]
                avail[c] = cum[c] - _lagged(cum[c], span + 1)
        lp, lb = np.nonzero(avail[pc] * pa[:, None] < self.units[pj][:, None] * bucket)
        first = 2 * n_ob + n_c * n_b
        a.put(first + np.arange(len(lp)), lp * n_b + lb, 1.0)
        a.put(first + np.arange(len(lp)), n0 + pj[lp] * n_b + lb, -avail[pc[lp], lb])
        demand = arrivals.ravel()
        lower = np.concatenate([np.full(2 * n_ob, -np.inf), demand, np.full(len(lp), -np.inf)])
        upper = np.concatenate([np.zeros(2 * n_ob), demand, np.zeros(len(lp))])
        price = np.array([b.usd_per_hour * bucket / 3600.0 for b in self.buyables])
        return MilpArrays(
            objective=np.concatenate([np.zeros(n_y + n_s), np.repeat(price, n_b), np.zeros(n_ob)]),
            integrality=np.concatenate([np.zeros(n_y + n_s), np.ones(n_ob), np.zeros(n_ob)]),
            lower=np.zeros(l0 + n_ob),
            upper=np.concatenate([np.full(n_y, np.inf), s_max.ravel(), np.full(2 * n_ob, np.inf)]),
            matrix=a.csr((first + len(lp), l0 + n_ob)),
            row_lower=lower,
            row_upper=upper,
        )


def _undominated(
    buyables: list[Buyable], units: np.ndarray[Any, Any], fits: list[list[tuple[int, float]]]
) -> list[int]:
    """Indices of the buyables that hold some class and that no other one dominates.

    ``i`` dominates ``j`` when it is no dearer, boots no slower, has at least as many
    devices and holds every class ``j`` holds in no more device time: each instance of
    ``j`` in a solution can become one of ``i`` at no more cost, so dropping ``j`` leaves
    the optimum unchanged. Of buyables that dominate each other one is kept.
    """
    occupancy = [dict(f) for f in fits]

    def dominates(i: int, j: int) -> bool:
        return (
            buyables[i].usd_per_hour <= buyables[j].usd_per_hour
            and buyables[i].boot_s <= buyables[j].boot_s
            and units[i] >= units[j]
            and all(occupancy[i].get(c, math.inf) <= a for c, a in fits[j])
        )

    order = sorted(
        (j for j in range(len(buyables)) if fits[j]),
        key=lambda j: (buyables[j].usd_per_hour, buyables[j].boot_s, -units[j], -len(fits[j])),
    )
    keep: list[int] = []
    for j in order:  # a dominator sorts first, and domination is transitive
        if not any(dominates(i, j) for i in keep):
            keep.append(j)
    return sorted(keep)


def _units(catalog: Catalog, offer: Offer) -> float:
    """Devices an instance counts as (cpu offers: the instance is one device)."""
    return 1.0 if catalog.families[offer.accelerator].per_vcpu else float(offer.accelerator_count)


class _Sparse:
    """Triplets of a sparse matrix, appended block by block."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray[Any, Any]] = []
        self.cols: list[np.ndarray[Any, Any]] = []
        self.vals: list[np.ndarray[Any, Any]] = []

    def put(self, rows: Any, cols: Any, vals: Any) -> None:  # noqa: ANN401 - arrays or scalars
        """Entries at ``(rows, cols)``, broadcast together."""
        r, c = np.broadcast_arrays(np.asarray(rows).ravel(), np.asarray(cols).ravel())
        self.rows.append(r)
        self.cols.append(c)
        self.vals.append(np.broadcast_to(np.asarray(vals, dtype=float).ravel(), r.shape))

    def csr(self, shape: tuple[int, int]) -> Any:  # noqa: ANN401 - scipy.sparse has no stubs
        """The matrix."""
        data = (np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols)))
        return coo_matrix(data, shape=shape).tocsr()


def _lagged(row: np.ndarray[Any, Any], lag: int) -> np.ndarray[Any, Any]:
    """``row`` shifted ``lag`` places later, zeros in front (``row[b - lag]``, 0 before 0)."""
    if lag >= len(row):
        return np.zeros_like(row)
    return np.concatenate([np.zeros(lag), row[: len(row) - lag]])

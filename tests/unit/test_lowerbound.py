"""The offline lower bound: hand-computed cases, the closed form, monotonicity, placement."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest

from fleet.autoscaler.config import AutoscalerConfig, PoolConfig
from fleet.catalog import Catalog, default_catalog
from fleet.placement import NoPlacementError, place
from fleet.sim import lowerbound
from fleet.sim.lowerbound import greedy_bound, lower_bound, priced_offers
from fleet.sim.trace import TraceEvent
from fleet.spec import parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
OFFERS = {o.instance_type: o for o in CATALOG.offers}
KINDS = ("inference", "batch", "embedding", "fine_tune", "training")


def sub_catalog(*instance_types: str) -> Catalog:
    """The default catalog's families with only the named offers."""
    offers = tuple(OFFERS[name] for name in instance_types)
    by_family = {f: tuple(o for o in offers if o.accelerator == f) for f in CATALOG.families}
    return Catalog(CATALOG.version, CATALOG.families, offers, by_family)


def spec(kind="inference", params_b=8.0, dtype="bf16", tokens_in=500, tokens_out=100, **extra):
    """A valid spec of ``kind``; generation-free kinds drop ``tokens_out``."""
    data = {
        "kind": kind,
        "model": {"name": "m", "params_b": params_b, "dtype": dtype},
        "tokens_in": tokens_in,
        "tokens_out": 0 if kind in ("embedding", "training") else tokens_out,
    }
    return parse_spec(data | extra)


def synthetic(n, seed=0, shapes=40, horizon_s=3600.0, sizes=(0.5, 1.0, 8.0, 13.0, 70.0), pick=0.3):
    """``n`` events over ``horizon_s`` from ``shapes`` classes; ``pick``: share with cloud/market needs."""
    rng = random.Random(seed)
    pool = []
    for _ in range(shapes):
        kind = rng.choice(KINDS)
        extra = {}
        if rng.random() < pick:
            extra["requirements"] = rng.choice(
                [{"clouds": [c]} for c in ("aws", "gcp", "azure")] + [{"markets": ["on_demand"]}]
            )
        pool.append(
            spec(
                kind,
                params_b=rng.choice(sizes),
                dtype=rng.choice(["bf16", "fp16", "int8"]),
                tokens_in=rng.choice([100, 1000, 20_000]) * (1000 if kind == "training" else 1),
                tokens_out=rng.choice([0, 50, 800]),
                **extra,
            )
        )
    times = sorted(rng.uniform(0, horizon_s) for _ in range(n))
    return [TraceEvent(t, rng.choice(pool)) for t in times]


def test_single_task_single_offer_matches_hand_computation():
    """One 16B task on a 4 x L4 offer costs price x 2/4 devices x busy_s / 3600."""
    catalog = sub_catalog("g6.12xlarge")
    task = spec(params_b=16.0, tokens_in=2000, tokens_out=300)
    offer = OFFERS["g6.12xlarge"]
    busy = estimate(task, CATALOG.families["nvidia-l4"], 2, offer.vcpus).busy_s
    expected = offer.on_demand_usd_per_hour * 2 / 4 * busy / 3600
    result = lower_bound([TraceEvent(0.0, task)], catalog)
    assert result.status == "optimal"
    assert (result.buckets, result.classes, result.offers, result.infeasible_tasks) == (1, 1, 1, 0)
    assert result.cost_usd == pytest.approx(expected, rel=1e-9)


def test_cpu_offer_charges_the_whole_instance():
    """On a cpu offer a task pays the instance price for its busy time."""
    catalog = sub_catalog("c6id.4xlarge")
    task = spec(params_b=0.5, tokens_in=300, tokens_out=20)
    offer = OFFERS["c6id.4xlarge"]
    busy = estimate(task, CATALOG.families["cpu"], 1, offer.vcpus).busy_s
    expected = offer.spot_usd_per_hour * busy / 3600  # spot is the cheaper market
    assert lower_bound([TraceEvent(0.0, task)], catalog).cost_usd == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lp_equals_greedy_closed_form(seed):
    """Without capacity limits the LP optimum is each task's cheapest device-time."""
    trace = synthetic(600, seed=seed)
    result = lower_bound(trace, CATALOG, bucket_s=300.0)
    assert result.status == "optimal"
    assert result.buckets == 12
    assert result.cost_usd == pytest.approx(greedy_bound(trace, CATALOG), rel=1e-6)


def test_bucket_size_does_not_change_the_bound():
    """Demand may be served in any later bucket, and prices are constant: buckets do not matter."""
    trace = synthetic(300, seed=3)
    fine = lower_bound(trace, CATALOG, bucket_s=60.0)
    coarse = lower_bound(trace, CATALOG, bucket_s=3600.0)
    assert (fine.buckets, coarse.buckets) == (60, 1)
    assert fine.cost_usd == pytest.approx(coarse.cost_usd, rel=1e-6)


def test_adding_an_offer_can_only_lower_the_bound():
    """Each offer added to the catalog leaves the bound equal or lower."""
    trace = synthetic(200, seed=4, shapes=10, sizes=(0.5, 1.0, 8.0), pick=0.0)
    names = ["p4de.24xlarge", "g5.12xlarge", "g6.xlarge", "a2-ultragpu-1g", "c6i.xlarge"]
    costs = []
    for k in range(1, len(names) + 1):
        result = lower_bound(trace, sub_catalog(*names[:k]), bucket_s=600.0)
        assert (result.status, result.infeasible_tasks) == ("optimal", 0)
        costs.append(result.cost_usd)
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(costs))
    assert costs[-1] < costs[0]


def test_task_that_fits_nothing_is_counted_and_excluded():
    """A task no offer holds is counted as infeasible and adds nothing to the cost."""
    trace = synthetic(100, seed=5, shapes=5)
    huge = spec("training", params_b=90_000.0, tokens_in=10**6)
    wrong_kind = spec("training", tokens_in=10**6, requirements={"accelerators": ["nvidia-t4"]})
    extra = [TraceEvent(10.0, huge), TraceEvent(20.0, wrong_kind), TraceEvent(30.0, huge)]
    base = lower_bound(trace, CATALOG)
    mixed = lower_bound(sorted(trace + extra, key=lambda e: e.t), CATALOG)
    assert mixed.infeasible_tasks == base.infeasible_tasks + 3
    assert mixed.classes == base.classes
    assert mixed.cost_usd == pytest.approx(base.cost_usd, rel=1e-9)
    assert greedy_bound(extra, CATALOG) == 0.0


def test_bound_not_above_placement_cost():
    """Placing every task at its cheapest offer costs the bound (no deadlines here) or more."""
    trace = synthetic(400, seed=6)
    placed, unplaceable = 0.0, 0
    for e in trace:
        try:
            placed += place(e.spec, CATALOG).estimated_cost_usd
        except NoPlacementError:
            unplaceable += 1
    bound = lower_bound(trace, CATALOG)
    assert bound.infeasible_tasks == unplaceable
    assert bound.cost_usd <= placed * (1 + 1e-9)
    assert bound.cost_usd == pytest.approx(placed, rel=1e-6)


def test_config_restricts_offers_to_its_pools():
    """With a config the bound buys only its pools' offer-markets, so it is no lower."""
    config = AutoscalerConfig(
        pools=(
            PoolConfig(name="l4", provider="aws", accelerator="nvidia-l4"),
            PoolConfig(name="l4-again", provider="aws", accelerator="nvidia-l4"),
            PoolConfig(name="h100", provider="gcp", accelerator="nvidia-h100", markets=("spot",)),
        )
    )
    assert len(priced_offers(CATALOG, config)) == 8 + 2  # l4 once (on-demand), h100 spot
    trace = synthetic(200, seed=7, shapes=8)
    pooled = lower_bound(trace, CATALOG, config)
    everything = lower_bound(trace, CATALOG)
    assert pooled.offers == 10
    assert pooled.cost_usd >= everything.cost_usd * (1 - 1e-9)
    assert pooled.cost_usd == pytest.approx(greedy_bound(trace, CATALOG, config), rel=1e-6)


def test_merged_classes_stay_below_exact_bound():
    """Capping classes rounds tokens down: fewer classes, and a bound no higher than exact."""
    trace = [
        TraceEvent(float(i), spec(tokens_in=100 + 37 * i, tokens_out=10 + i)) for i in range(300)
    ]
    capped = lower_bound(trace, CATALOG, max_classes=20)
    assert capped.status == "optimal"
    assert capped.classes <= 20
    assert 0 < capped.cost_usd <= greedy_bound(trace, CATALOG) * (1 + 1e-9)


def test_empty_trace_costs_nothing():
    """An empty trace is trivially optimal at zero cost."""
    assert lower_bound([], CATALOG) == lower_bound([], CATALOG)
    result = lower_bound([], CATALOG)
    assert (result.cost_usd, result.status, result.classes) == (0.0, "optimal", 0)


def test_solver_failure_gives_nan_and_reason(monkeypatch):
    """A solver that does not reach an optimum yields NaN and its status and message."""

    def failing(*args, **kwargs):
        return SimpleNamespace(status=2, message="The problem is infeasible.", fun=None)

    monkeypatch.setattr(lowerbound, "linprog", failing)
    result = lower_bound(synthetic(10, shapes=2), CATALOG)
    assert math.isnan(result.cost_usd)
    assert result.status == "infeasible: The problem is infeasible."


@pytest.mark.parametrize("kwargs", [{"bucket_s": 0.0}, {"max_classes": 0}])
def test_bad_arguments_are_rejected(kwargs):
    """A non-positive bucket or class cap is a ValueError."""
    with pytest.raises(ValueError, match="bucket_s"):
        lower_bound([], CATALOG, **kwargs)


def test_runtime_on_a_2000_task_trace():
    """A 2,000-task, 50-class trace over two hours solves (no timing assertion)."""
    result = lower_bound(synthetic(2000, seed=8, shapes=50, horizon_s=7200.0), CATALOG)
    assert result.status == "optimal"
    assert result.buckets == 24
    assert result.cost_usd > 0

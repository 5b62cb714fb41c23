"""The tight bound (whole instances per bucket, boot charged): hand-solved traces and invariants."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleet.autoscaler.config import load_config, parse_config
from fleet.sim import ilp
from fleet.sim.generators import generate
from fleet.sim.ilp import buyable_offers, tight_bound
from fleet.sim.lowerbound import class_costs, class_key, lower_bound, priced_offers
from fleet.sim.trace import TraceEvent
from tests.unit.test_lowerbound import CATALOG, OFFERS, spec, sub_catalog, synthetic

ROOT = Path(__file__).resolve().parents[2]
BUCKET = 300.0
L4 = "aws/us-east-1/g6.xlarge"  # 1 x L4, on-demand only
L4_BUCKET_USD = OFFERS["g6.xlarge"].on_demand_usd_per_hour * BUCKET / 3600


def device_s(task, catalog):
    """Device-seconds ``task`` occupies on the catalog's only offer (the bound's ``a``)."""
    (cost,) = class_costs(task, class_key(task, 1.0), catalog, priced_offers(catalog))
    return cost.device_s


def chat(**slo):
    """A short 8B chat request, with ``slo`` goals."""
    return spec(params_b=8.0, tokens_in=500, tokens_out=100, slo=slo)


def embedding_of(seconds, catalog):
    """An embedding task occupying about ``seconds`` of device time on the catalog's offer."""
    per_token = device_s(spec("embedding", params_b=0.5, tokens_in=10**6), catalog) / 10**6
    return spec("embedding", params_b=0.5, tokens_in=round(seconds / per_token))


def test_one_task_one_offer_costs_one_bucket():
    """One chat on one L4: one instance for one bucket, boot from the catalog."""
    catalog = sub_catalog("g6.xlarge")
    result = tight_bound([TraceEvent(0.0, chat())], catalog)
    assert result.status == "optimal"
    assert result.cost_usd == pytest.approx(L4_BUCKET_USD)
    assert result.incumbent_usd == result.cost_usd
    assert result.dual_bound_usd == pytest.approx(L4_BUCKET_USD)
    assert (result.classes, result.offers, result.infeasible_tasks) == (1, 1, 0)
    # trailing: 120 s cold start plus the run, in buckets rounded up
    assert (result.buckets, result.trailing_buckets) == (2, 1)
    (buy,) = result.buys  # served in its bucket or, as cheaply, the trailing one
    assert (buy.offer, buy.market, buy.models, sum(buy.counts), buy.peak) == (
        L4,
        "on_demand",
        (),
        1,
        1,
    )
    assert buy.cost_usd == pytest.approx(L4_BUCKET_USD)


@pytest.mark.parametrize(
    ("spare_s", "buckets"),
    [
        (10.0, 1),  # boot + work fit the first bucket
        (-10.0, 2),  # boot leaves too little of it: a second bucket
    ],
)
def test_boot_is_charged_in_the_launch_bucket(spare_s, buckets):
    """A launch loses its boot time from the bucket it is paid for."""
    catalog = sub_catalog("g6.xlarge")
    task = embedding_of(100.0, catalog)
    work = device_s(task, catalog)
    assert 50 < work < 150
    result = tight_bound([TraceEvent(0.0, task)], catalog, boot_s=BUCKET - work - spare_s)
    assert result.status == "optimal"
    assert result.cost_usd == pytest.approx(buckets * L4_BUCKET_USD)
    assert lower_bound([TraceEvent(0.0, task)], catalog).cost_usd < L4_BUCKET_USD / 2


@pytest.mark.parametrize(
    ("work_s", "deadline_s", "counts"),
    [
        (150.0, 30.0, (1, 1)),  # 400 s boot: the first bucket all boot, 200 s of the second;
        # a deadline no cold start meets moves to that second bucket
        (250.0, 30.0, (2, 2)),  # 200 s is not enough: two instances there
        (150.0, None, (1, 1)),  # without a deadline, any two consecutive buckets
        (250.0, None, (1, 1, 1)),  # or three, the third finishing the work
    ],
)
def test_boot_longer_than_a_bucket(work_s, deadline_s, counts):
    """A boot beyond the bucket: launches come a bucket early and lose part of the next."""
    catalog = sub_catalog("g6.xlarge")
    task = embedding_of(work_s, catalog)
    if deadline_s is not None:
        task = spec(
            "embedding", params_b=0.5, tokens_in=task.tokens_in, slo={"deadline_s": deadline_s}
        )
    result = tight_bound([TraceEvent(0.0, task)], catalog, boot_s=400.0)
    assert result.status == "optimal"
    held = result.buys[0].counts
    if deadline_s is not None:
        assert held[: len(counts)] == counts
    else:
        first = next(i for i, n in enumerate(held) if n)
        assert held[first : first + len(counts)] == counts
    assert result.cost_usd == pytest.approx(sum(counts) * L4_BUCKET_USD)


def test_whole_instances_change_the_choice():
    """The LP buys a sliver of an 8-chip TPU; whole instances make one L4 the cheaper buy."""
    catalog = sub_catalog("tpu-v5litepod-8", "g2-standard-12")
    offers = priced_offers(catalog)
    device_usd = {
        (offers[c.offer][0].instance_type, offers[c.offer][1].value): c.device_s * c.unit_usd
        for c in class_costs(chat(), class_key(chat(), 1.0), catalog, offers)
    }
    # the premise: per device-second the TPU is cheaper, so the LP takes it
    assert device_usd["tpu-v5litepod-8", "spot"] < device_usd["g2-standard-12", "spot"]
    trace = [TraceEvent(0.0, chat())]
    assert lower_bound(trace, catalog).cost_usd == pytest.approx(
        device_usd["tpu-v5litepod-8", "spot"]
    )
    result = tight_bound(trace, catalog)
    assert [(b.offer, b.market, sum(b.counts)) for b in result.buys] == [
        ("gcp/us-central1/g2-standard-12", "spot", 1)
    ]
    assert result.cost_usd == pytest.approx(0.39931 * BUCKET / 3600)
    assert result.offers == 2  # the on-demand markets are dominated by the spot ones


@pytest.mark.parametrize(
    ("first", "second", "buckets"),
    [
        # no deadline: the first waits for the second, one bucket serves both
        (TraceEvent(0.0, chat()), TraceEvent(700.0, chat()), 1),
        # a deadline in the arrival bucket forces a bucket of its own
        (TraceEvent(0.0, chat(deadline_s=60.0)), TraceEvent(700.0, chat()), 2),
        # a deadline that ends in the next bucket can share it with the next arrival
        (TraceEvent(0.0, chat(deadline_s=350.0)), TraceEvent(400.0, chat()), 1),
        (TraceEvent(0.0, chat(deadline_s=250.0)), TraceEvent(400.0, chat()), 2),
    ],
)
def test_deadlines_force_capacity_into_their_buckets(first, second, buckets):
    """A task may be served from its arrival's bucket to its deadline's, one without any time."""
    catalog = sub_catalog("g6.xlarge")
    result = tight_bound([first, second], catalog)
    assert result.status == "optimal"
    assert result.cost_usd == pytest.approx(buckets * L4_BUCKET_USD)
    assert sum(result.buys[0].counts) == buckets
    if first.spec.slo.deadline_s is not None:
        last = int(first.spec.slo.deadline_s // BUCKET)
        assert sum(result.buys[0].counts[: last + 1]) >= 1


def test_default_deadline_applies_to_tasks_without_one():
    """``default_deadline_s`` keeps online work from waiting for later arrivals."""
    catalog = sub_catalog("g6.xlarge")
    trace = [TraceEvent(0.0, chat()), TraceEvent(700.0, chat())]
    assert tight_bound(trace, catalog).cost_usd == pytest.approx(L4_BUCKET_USD)
    hurried = tight_bound(trace, catalog, default_deadline_s=60.0)
    assert hurried.cost_usd == pytest.approx(2 * L4_BUCKET_USD)
    assert hurried.buys[0].counts[0] == 1
    # a task's own deadline wins over the default
    own = [TraceEvent(0.0, chat(deadline_s=3600.0)), TraceEvent(700.0, chat(deadline_s=3600.0))]
    assert tight_bound(own, catalog, default_deadline_s=60.0).cost_usd == pytest.approx(
        L4_BUCKET_USD
    )


def test_busy_buckets_buy_several_instances():
    """Work above one instance's bucket, due in its bucket, buys two instances there."""
    catalog = sub_catalog("g6.xlarge")
    task = embedding_of(100.0, catalog)
    work = device_s(task, catalog)
    n = math.floor((BUCKET - 60.0) / work) + 1  # one more than a booted instance holds
    hurried = spec("embedding", params_b=0.5, tokens_in=task.tokens_in, slo={"deadline_s": 10.0})
    result = tight_bound([TraceEvent(float(i), hurried) for i in range(n)], catalog, boot_s=60.0)
    assert result.buys[0].counts[0] == 2
    assert result.cost_usd == pytest.approx(2 * L4_BUCKET_USD)


MODEL_CONFIG = """
model_load_gbps = 0.4
[[models]]
name = "big-llm"
task = "generation"
params_b = 8
max_context = 8192
engines = ["vllm", "reference"]
source = { path = "/models/big-llm" }

[[pools]]
name = "plain"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]

[[pools]]
name = "held"
provider = "local"
accelerator = "nvidia-l40s"
price_as = "aws/us-east-1/g6e.xlarge"
markets = ["on_demand"]
models = ["big-llm"]
engine = "vllm"
"""


def test_model_work_buys_a_pool_that_holds_the_model():
    """Work for a registry model goes to the pool holding it, whose boot includes the load."""
    config = parse_config(MODEL_CONFIG, env={})
    held = next(b for b in buyable_offers(CATALOG, config) if b.models)
    load = config.pool("held").load_s(config.registry)
    assert load == pytest.approx(40.0)  # 8B bf16 = 16 GB at 0.4 GB/s
    assert held.boot_s == CATALOG.families["nvidia-l40s"].cold_start_s + load
    model_chat = spec(tokens_in=500, tokens_out=100).model_copy(
        update={"model": spec().model.model_copy(update={"name": "big-llm"})}
    )
    plain = tight_bound([TraceEvent(0.0, chat())], CATALOG, config)
    model = tight_bound([TraceEvent(0.0, model_chat)], CATALOG, config)
    assert [b.offer for b in plain.buys] == [L4]
    assert [(b.offer, b.models) for b in model.buys] == [("aws/us-east-1/g6e.xlarge", ("big-llm",))]
    assert model.cost_usd == pytest.approx(1.861 * BUCKET / 3600)
    # the LP does not know which pool holds a model
    assert lower_bound([TraceEvent(0.0, model_chat)], CATALOG, config).cost_usd < model.cost_usd


def random_trace(rng, n, horizon_s):
    """``n`` tasks of a few shapes, a third with deadlines."""
    shapes = [
        spec(params_b=rng.choice([1.0, 8.0, 13.0]), tokens_in=rng.choice([100, 2000]),
             tokens_out=rng.choice([20, 400]))
        for _ in range(4)
    ] + [spec("embedding", params_b=0.5, tokens_in=rng.choice([10**4, 10**6]))]  # fmt: skip
    events = []
    for t in sorted(rng.uniform(0, horizon_s) for _ in range(n)):
        task = rng.choice(shapes)
        if rng.random() < 0.35:
            task = task.model_copy(update={"slo": task.slo.model_copy(
                update={"deadline_s": rng.choice([30.0, 200.0, 900.0])})})  # fmt: skip
        events.append(TraceEvent(t, task))
    return events


@pytest.mark.parametrize("seed", range(6))
def test_never_below_the_lp(seed):
    """On random traces and catalogs the ILP (and its dual bound) stays at or above the LP."""
    rng = random.Random(seed)
    names = [
        "g6.xlarge",
        "g6.12xlarge",
        "g5.xlarge",
        "c6i.xlarge",
        "a2-highgpu-1g",
        "g2-standard-12",
    ]
    catalog = sub_catalog(*rng.sample(names, 3))
    trace = random_trace(rng, 80, horizon_s=rng.choice([600.0, 3600.0]))
    bucket_s = rng.choice([60.0, 300.0, 900.0])
    boot_s = rng.choice([None, 0.0, 500.0])
    lp = lower_bound(trace, catalog, bucket_s=bucket_s)
    tight = tight_bound(trace, catalog, bucket_s=bucket_s, boot_s=boot_s, mip_rel_gap=1e-6)
    assert (lp.status, tight.status) == ("optimal", "optimal")
    assert tight.infeasible_tasks == lp.infeasible_tasks
    assert tight.cost_usd >= lp.cost_usd * (1 - 1e-9)
    assert tight.dual_bound_usd >= lp.cost_usd * (1 - 1e-6)
    assert tight.cost_usd == pytest.approx(sum(b.cost_usd for b in tight.buys))


def test_finer_buckets_are_no_dearer_without_boot():
    """Without boot and deadlines, halving the bucket can only help (a 600 s plan is a 300 s one)."""
    catalog = sub_catalog("g6.xlarge", "g5.xlarge")
    trace = [e for e in random_trace(random.Random(9), 60, 3600.0) if e.spec.slo.deadline_s is None]
    coarse = tight_bound(trace, catalog, bucket_s=600.0, boot_s=0.0, trailing_buckets=2)
    fine = tight_bound(trace, catalog, bucket_s=300.0, boot_s=0.0, trailing_buckets=4)
    assert fine.cost_usd <= coarse.cost_usd * (1 + 1e-6)


def test_tasks_that_fit_nothing_are_counted():
    """A task no buyable holds is counted and left out, as in the LP."""
    catalog = sub_catalog("g6.xlarge")
    huge = spec("training", params_b=90_000.0, tokens_in=10**6)
    result = tight_bound([TraceEvent(0.0, chat()), TraceEvent(1.0, huge)], catalog)
    assert result.infeasible_tasks == 1
    assert result.cost_usd == pytest.approx(L4_BUCKET_USD)
    only_huge = tight_bound([TraceEvent(0.0, huge)], catalog)
    assert (only_huge.cost_usd, only_huge.status, only_huge.buckets) == (0.0, "optimal", 0)


def test_empty_trace_costs_nothing():
    """An empty trace is optimal at zero cost without calling the solver."""
    result = tight_bound([], CATALOG)
    assert (result.cost_usd, result.status, result.classes, result.buys) == (0.0, "optimal", 0, ())


def fake_result(status, message, x=None, fun=None, dual=None):
    return SimpleNamespace(
        status=status, message=message, x=x, fun=fun, mip_dual_bound=dual, mip_gap=None
    )


def test_solver_failure_gives_nan_and_reason(monkeypatch):
    """No solution: NaN cost and incumbent, the status and message, the dual bound if any."""
    monkeypatch.setattr(
        ilp, "milp", lambda *_, **__: fake_result(1, "Time limit reached.", dual=0.01)
    )
    result = tight_bound([TraceEvent(0.0, chat())], sub_catalog("g6.xlarge"))
    assert math.isnan(result.cost_usd)
    assert math.isnan(result.incumbent_usd)
    assert result.dual_bound_usd == 0.01
    assert result.status == "time_limit: Time limit reached."
    monkeypatch.setattr(ilp, "milp", lambda *_, **__: fake_result(2, "The problem is infeasible."))
    result = tight_bound([TraceEvent(0.0, chat())], sub_catalog("g6.xlarge"))
    assert result.status == "infeasible: The problem is infeasible."
    assert math.isnan(result.cost_usd)
    assert math.isnan(result.dual_bound_usd)


def test_time_limit_with_an_incumbent_keeps_it(monkeypatch):
    """Stopped at the time limit with a solution: cost NaN, the incumbent and its buys kept."""
    real = ilp.milp

    def stopped(*args, **kwargs):
        res = real(*args, **kwargs)
        res.status, res.message = 1, "Time limit reached."
        return res

    monkeypatch.setattr(ilp, "milp", stopped)
    result = tight_bound([TraceEvent(0.0, chat())], sub_catalog("g6.xlarge"))
    assert math.isnan(result.cost_usd)
    assert result.status.startswith("time_limit")
    assert result.incumbent_usd == pytest.approx(L4_BUCKET_USD)
    assert sum(result.buys[0].counts) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket_s": 0.0},
        {"max_classes": 0},
        {"time_limit_s": 0.0},
        {"trailing_buckets": -1},
        {"boot_s": -1.0},
        {"mip_rel_gap": -0.1},
        {"default_deadline_s": 0.0},
    ],
)
def test_bad_arguments_are_rejected(kwargs):
    """Non-positive bucket, time limit or class cap, negative counts or times: ValueError."""
    with pytest.raises(ValueError, match="must"):
        tight_bound([], CATALOG, **kwargs)


def test_runtime_on_a_2000_task_generated_trace():
    """The multi-agent benchmark trace on the benchmark's cloud pools solves in seconds."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    config = base.model_copy(
        update={"pools": tuple(p for p in base.pools if p.provider != "local")}
    )
    trace = generate("multi-agent", n=2000, seed=1, duration_s=3600.0)
    result = tight_bound(trace, CATALOG, config)
    assert result.status == "optimal"
    assert result.buckets == 12 + result.trailing_buckets
    assert result.infeasible_tasks == 0
    assert result.cost_usd >= lower_bound(trace, CATALOG, config).cost_usd
    assert result.solve_s < 30.0  # a few seconds on two cores; generous against noise


def test_whole_catalog_stays_within_the_time_limit():
    """Every priced offer (no config): solved, or stopped at the time limit with the reason."""
    result = tight_bound(synthetic(300, seed=2, shapes=10), CATALOG, time_limit_s=3.0)
    assert result.solve_s < 10.0
    assert result.status == "optimal" or result.status.startswith("time_limit")

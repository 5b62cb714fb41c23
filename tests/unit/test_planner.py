# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""The planner reads like a specification: scenario tables, invariants, and a loop that never flaps."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.autoscaler.config import (
    AutoscalerConfig,
    FleetConfig,
    PoolConfig,
    parse_config,
    pool_offers,
)
from fleet.autoscaler.demand import parse_demands
from fleet.autoscaler.memory import carry_samples, smooth_load
from fleet.autoscaler.model import (
    ErrorKind,
    Instance,
    InstanceState,
    OfferRef,
    PoolHistory,
    ProviderError,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.autoscaler.planner import DEFAULT_SERVICE_S, busy_pools, plan, pool_devices
from fleet.catalog import default_catalog
from fleet.queues import parse_queue
from fleet.spec import TaskKind

CATALOG = default_catalog()
NOW = 10_000.0
L4 = "inference.nvidia-l4"
L4_OD = "aws/us-east-1/g6.xlarge/on_demand"
L4X4_OD = "aws/us-east-1/g6.12xlarge/on_demand"
G2_SPOT = "gcp/us-central1/g2-standard-12/spot"
G2_OD = "gcp/us-central1/g2-standard-12/on_demand"

LOCAL_L4 = {
    "name": "local-l4",
    "provider": "local",
    "accelerator": "nvidia-l4",
    "price_as": "aws/us-east-1/g6.xlarge",
    "markets": ("on_demand",),
    "max_instances": 3,
    "budget_usd_per_hour": 5.0,
    "drain_target_s": 30,
    "idle_before_scale_in_s": 300,
    "scale_out_cooldown_s": 30,
    "scale_in_cooldown_s": 120,
}
GCP_L4 = {
    "name": "gcp-l4",
    "provider": "gcp",
    "accelerator": "nvidia-l4",
    "region": "us-central1",
    "instance_types": ("g2-standard-12",),
    "max_instances": 4,
    "drain_target_s": 30,
    "capacity_backoff_s": 900,
}
AWS_L4 = {
    "name": "aws-l4",
    "provider": "aws",
    "accelerator": "nvidia-l4",
    "region": "us-east-1",
    "instance_types": ("g6.xlarge", "g6.12xlarge"),
    "markets": ("on_demand",),
    "max_instances": 4,
    "drain_target_s": 30,
}
LOCAL_H200 = {
    "name": "local-h200",
    "provider": "local",
    "accelerator": "nvidia-h200",
    "price_as": "aws/us-east-1/p5en.48xlarge",
    "markets": ("on_demand",),
    "devices": 4,
}
LOCAL_CPU = {
    "name": "local-cpu",
    "provider": "local",
    "accelerator": "cpu",
    "price_as": "aws/us-east-1/c6i.xlarge",
    "markets": ("on_demand",),
    "max_instances": 2,
}


def ref(key: str) -> OfferRef:
    """An OfferRef from ``cloud/region/instance_type/market``."""
    return OfferRef(*key.split("/"))


def config(*pools: dict, **fleet) -> AutoscalerConfig:
    """A config of the given pool dicts (validated by pydantic) and fleet settings."""
    return AutoscalerConfig(fleet=FleetConfig(**fleet), pools=tuple(PoolConfig(**p) for p in pools))


def inst(iid, pool="local-l4", state="running", at=0.0, price=0.8048, offer=L4_OD) -> Instance:
    """An instance as a provider would report it."""
    return Instance(iid, pool, ref(offer), InstanceState(state), at, f"tok-{iid}", price)


def snap(queues=None, instances=(), errors=(), history=None, workers=()) -> Snapshot:
    """A snapshot with ``{queue: ready}`` (or QueueObservation values)."""
    obs = {
        name: q if isinstance(q, QueueObservation) else QueueObservation(name, ready=q)
        for name, q in (queues or {}).items()
    }
    return Snapshot(NOW, obs, tuple(instances), tuple(workers), tuple(errors), history or {})


def err(kind, key=G2_SPOT, at=NOW - 100, pool="gcp-l4") -> ProviderError:
    """A provider error for ``key``."""
    return ProviderError(pool, ref(key), ErrorKind(kind), "no capacity", at)


def hist(busy=None, out=None, in_=None) -> dict[str, PoolHistory]:
    """History of local-l4 at offsets from NOW (None: never)."""
    at = {k: None if v is None else NOW - v for k, v in {"b": busy, "o": out, "i": in_}.items()}
    return {"local-l4": PoolHistory(at["b"], at["o"], at["i"])}


def with_(pool: dict, **changes) -> dict:
    """A pool dict with some fields changed."""
    return pool | changes


BIG = {L4: 340}
RUNNING_3 = (inst("a", at=1.0), inst("b", at=2.0), inst("c", at=3.0))

# ------------------------------------------------------------------------------ scenarios

SCENARIOS = [
    # id, pools, fleet settings, snapshot, expected launch offer keys, expected terminated ids
    ("empty fleet + backlog: up to max", [LOCAL_L4], {}, snap(BIG), [L4_OD] * 3, []),
    ("small backlog: just enough", [LOCAL_L4], {}, snap({L4: 5}), [L4_OD] * 2, []),
    ("spot capacity error: on-demand", [GCP_L4], {}, snap({L4: 6}, errors=[err("capacity")]), [G2_OD] * 2, []),
    ("backoff over: spot again", [GCP_L4], {}, snap({L4: 6}, errors=[err("capacity", at=NOW - 900)]), [G2_SPOT] * 2, []),
    ("quota error backs off too", [GCP_L4], {}, snap({L4: 6}, errors=[err("quota")]), [G2_OD] * 2, []),
    ("throttling does not back off", [GCP_L4], {}, snap({L4: 6}, errors=[err("throttled")]), [G2_SPOT] * 2, []),
    ("another pool's error is ignored", [GCP_L4], {}, snap({L4: 6}, errors=[err("capacity", pool="x")]), [G2_SPOT] * 2, []),
    ("pool budget caps launches", [with_(LOCAL_L4, budget_usd_per_hour=2.0)], {}, snap(BIG), [L4_OD] * 2, []),
    ("fleet budget caps launches", [LOCAL_L4], {"budget_usd_per_hour": 1.0}, snap(BIG), [L4_OD], []),
    ("terminating spend counts", [with_(LOCAL_L4, budget_usd_per_hour=2.0)], {}, snap(BIG, [inst("a"), inst("t", state="terminating")]), [], []),
    ("max_instances caps", [with_(LOCAL_L4, max_instances=2)], {}, snap(BIG), [L4_OD] * 2, []),
    ("max_launches_per_loop caps", [LOCAL_L4], {"max_launches_per_loop": 2}, snap(BIG), [L4_OD] * 2, []),
    ("min_instances launched without work", [with_(LOCAL_L4, min_instances=1)], {}, snap(), [L4_OD], []),
    ("min_instances kept when idle", [with_(LOCAL_L4, min_instances=1)], {}, snap({}, RUNNING_3, history=hist(busy=1000)), [], ["c", "b"]),
    ("cooldown blocks a second scale-out", [LOCAL_L4], {}, snap(BIG, [inst("a", "local-l4", "pending", NOW - 10)], history=hist(out=10)), [], []),
    ("cooldown over: scale out again", [LOCAL_L4], {}, snap(BIG, [inst("a", "local-l4", "pending", NOW - 30)], history=hist(out=30)), [L4_OD] * 2, []),
    ("idle too short: keep", [LOCAL_L4], {}, snap({}, RUNNING_3, history=hist(busy=299)), [], []),
    ("idle long enough: scale to zero", [LOCAL_L4], {}, snap({}, RUNNING_3, history=hist(busy=300)), [], ["c", "b", "a"]),
    ("scale-in cooldown blocks", [LOCAL_L4], {}, snap({}, RUNNING_3, history=hist(busy=1000, in_=60)), [], []),
    ("under load, excess sheds half", [LOCAL_L4], {}, snap({L4: 1}, RUNNING_3, history=hist(busy=1000)), [], ["c"]),
    ("under load, excess of 4 sheds 2", [LOCAL_L4], {}, snap({L4: 1}, (*RUNNING_3, inst("d", at=4.0), inst("e", at=5.0)), history=hist(busy=1000)), [], ["e", "d"]),
    ("under load, recent scale-out holds", [LOCAL_L4], {}, snap({L4: 1}, RUNNING_3, history=hist(busy=1000, out=299)), [], []),
    ("under load, scale-in cooldown holds", [LOCAL_L4], {}, snap({L4: 1}, RUNNING_3, history=hist(busy=1000, in_=60)), [], []),
    ("running work holds its devices", [LOCAL_L4], {}, snap({L4: QueueObservation(L4, ready=1, unacked=3, sample_share=1.0)}, RUNNING_3, history=hist(busy=1000)), [], []),
    ("batched streams hold a share", [LOCAL_L4], {}, snap({L4: QueueObservation(L4, unacked=30, sample_share=0.02)}, RUNNING_3, history=hist(busy=1000)), [], ["c"]),
    ("within the hysteresis: hold", [LOCAL_L4], {}, snap({L4: QueueObservation(L4, unacked=2, running_devices=2.0)}, RUNNING_3, history=hist(busy=1000)), [], []),
    ("no history: idle since first launch", [LOCAL_L4], {}, snap({}, [inst("a", at=NOW - 100)]), [], []),
    ("no history, old instance: scale in", [LOCAL_L4], {}, snap({}, [inst("a", at=NOW - 400)]), [], ["a"]),
    ("draining is not terminated again", [LOCAL_L4], {}, snap({}, [inst("d", state="draining")], history=hist(busy=1000)), [], []),
    ("orphan is terminated", [LOCAL_L4], {}, snap({}, [inst("o", pool="gone")]), [], ["o"]),
    ("terminating orphan is left alone", [LOCAL_L4], {}, snap({}, [inst("o", pool="gone", state="terminating")]), [], []),
    ("unconfirmed launch cleaned, no launch with it", [LOCAL_L4], {}, snap(BIG, [inst("p", state="pending", at=NOW - 601)]), [], ["p"]),
    ("confirmed pending launch kept", [LOCAL_L4], {}, snap({L4: 1}, [inst("p", state="pending", at=NOW - 601)], workers=[WorkerObservation("w@p", "nvidia-l4", "p")]), [], []),
    ("pending within grace kept", [LOCAL_L4], {}, snap({L4: 1}, [inst("p", state="pending", at=NOW - 599)]), [], []),
    ("cheapest pool full: spill", [with_(GCP_L4, max_instances=1), LOCAL_L4], {}, snap(BIG), [G2_SPOT] + [L4_OD] * 3, []),
    ("x4 tier buys a 4-device offer", [AWS_L4], {}, snap({f"{L4}.x4": 3}), [L4X4_OD], []),
    ("x4 tier skips the 1-device pool", [LOCAL_L4, AWS_L4], {}, snap({f"{L4}.x4": 3}), [L4X4_OD], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("pools", "fleet", "snapshot", "launches", "terminated"),
    [pytest.param(*row[1:], id=row[0]) for row in SCENARIOS],
)
def test_scenarios(pools, fleet, snapshot, launches, terminated):
    """Each scenario launches exactly these offers and terminates exactly these instances."""
    p = plan(snapshot, config(*pools, **fleet), CATALOG, NOW)
    assert [launch.offer.key for launch in p.launches] == launches
    assert [t.instance_id for t in p.terminations] == terminated


# ------------------------------------------------------------------------------ reasons and output


def test_launch_reason_tokens_and_devices():
    """Launches say why in numbers, carry deterministic tokens, the price and the device count."""
    p = plan(snap(BIG), config(LOCAL_L4), CATALOG, NOW)
    (d,) = p.decisions
    assert [x.token for x in d.launches] == [f"local-l4-{int(NOW * 1000)}-{i}" for i in range(3)]
    reason = (
        "backlog 340 tasks x 10 s on inference.nvidia-l4: 0 -> 3 instances to drain within 30 s"
        " (113 devices with headroom for running work)"
    )
    assert {x.reason for x in d.launches} == {reason}
    assert {(x.usd_per_hour, x.devices) for x in d.launches} == {(0.8048, 1)}
    assert (d.current, d.desired) == (0, 3)
    assert d.usd_per_hour_before == 0
    assert d.usd_per_hour_after == pytest.approx(3 * 0.8048)


@pytest.mark.parametrize(
    ("pool", "fleet", "words"),
    [
        (with_(LOCAL_L4, budget_usd_per_hour=2.0), {}, "pool budget $2.00/h reached"),
        (LOCAL_L4, {"budget_usd_per_hour": 1.0}, "fleet budget $1.00/h reached"),
        (
            LOCAL_L4,
            {"max_launches_per_loop": 2},
            "max_launches_per_loop 2 reached: launched 2 of 3",
        ),
    ],
)
def test_a_limited_scale_out_says_what_stopped_it(pool, fleet, words):
    """When a budget or the launch cap stops launches, the pool's reasons say so."""
    (d,) = plan(snap(BIG), config(pool, **fleet), CATALOG, NOW).decisions
    assert any(words in r for r in d.reasons), d.reasons


@pytest.mark.parametrize(
    ("history", "words"),
    [
        (hist(busy=340), "idle 340 s >= 300 s: 3 -> 0 instances"),
        (hist(busy=12), "idle 12 s < 300 s: keeping 3 instances"),
        (hist(busy=1000, in_=60), "scale-in cooldown: 60 s < 120 s"),
    ],
)
def test_scale_in_reasons(history, words):
    """Scale-in decisions and refusals name the idle time and the threshold."""
    (d,) = plan(snap({}, RUNNING_3, history=history), config(LOCAL_L4), CATALOG, NOW).decisions
    assert words in d.reasons
    assert {t.reason for t in d.terminations} <= {"idle 340 s >= 300 s"}


def test_cleanup_reasons_and_orphan_decision():
    """Orphans get their own decision (current and desired 0); unconfirmed launches name the grace."""
    instances = [inst("o", pool="gone"), inst("p", state="pending", at=NOW - 700)]
    p = plan(snap({}, instances), config(LOCAL_L4), CATALOG, NOW)
    assert [d.pool for d in p.decisions] == ["gone", "local-l4"]
    gone, local = p.decisions
    assert (gone.current, gone.desired, gone.usd_per_hour_after) == (0, 0, 0)
    assert gone.terminations[0].reason == "orphan: pool gone is not in the config"
    assert local.terminations[0].reason == "launch never confirmed within 600 s"


def test_one_decision_per_pool_sorted_and_steady():
    """Every configured pool gets a decision, sorted by name, even with nothing to do."""
    p = plan(snap({}, [inst("g", pool="gcp-l4", offer=G2_SPOT, price=0.4)]), config(with_(LOCAL_L4, max_instances=5), with_(GCP_L4, min_instances=1)), CATALOG, NOW)  # fmt: skip
    assert [d.pool for d in p.decisions] == ["gcp-l4", "local-l4"]
    assert p.decisions[0].reasons == ("steady: 1 instances for 1 desired",)
    assert p.usd_per_hour_before == p.usd_per_hour_after == 0.4


@pytest.mark.parametrize(
    ("pools", "queue", "reason"),
    [
        ([LOCAL_L4], "inference.amd-mi300x", "no pool for accelerator amd-mi300x"),
        ([LOCAL_H200], "inference.nvidia-h200.x8", "needs 8 nvidia-h200 devices per instance; the largest pool (local-h200) offers 4"),
        ([LOCAL_CPU], "embedding.cpu.x2", "needs 2 cpu devices per instance; the largest pool (local-cpu) offers 1"),
        ([LOCAL_L4], "training.aws-inferentia2", "aws-inferentia2 does not run training work"),
        ([LOCAL_L4], "inference.nvidia-b300", "unknown accelerator 'nvidia-b300': no pool can serve it"),
    ],
)  # fmt: skip
def test_unsatisfiable_demand_is_reported(pools, queue, reason):
    """Work no pool can serve is reported with the reason, and launches nothing."""
    p = plan(snap({queue: 7, "not-a-fleet-queue": 3}), config(*pools), CATALOG, NOW)
    assert [(u.queue, u.ready, u.reason) for u in p.unsatisfiable] == [(queue, 7, reason)]
    assert p.launches == ()


@pytest.mark.parametrize(
    ("queues", "busy"),
    [
        ({L4: 1}, {"aws-l4", "local-l4"}),
        ({f"{L4}.x4": 1}, {"aws-l4"}),  # local-l4 has one device: an x4 queue is not its work
        ({f"{L4}.x8": 1, "inference.nvidia-h100": 9}, set()),
        ({L4: 0, "unparsed": 5}, set()),
    ],
)
def test_busy_pools(queues, busy):
    """Busy pools are those with work on a queue they can serve, tiers included."""
    assert busy_pools(snap(queues), config(LOCAL_L4, AWS_L4), CATALOG) == busy


def test_sample_service_time_beats_the_default():
    """A queue's sampled service time sizes the pool instead of the per-kind default."""
    slow = QueueObservation(L4, ready=4, sample_service_s=20.0)  # 80 s -> 3 at 30 s
    (d,) = plan(snap({L4: slow}), config(with_(LOCAL_L4, max_instances=9)), CATALOG, NOW).decisions
    assert d.desired == 3
    assert "4 tasks x 20 s on inference.nvidia-l4" in d.launches[0].reason


@pytest.mark.parametrize(("namespace", "served"), [("staging.", True), ("", False)])
def test_namespace(namespace, served):
    """Queues are parsed with the fleet's namespace; others are ignored, not unsatisfiable."""
    p = plan(snap({f"staging.{L4}": 5}), config(LOCAL_L4, namespace=namespace), CATALOG, NOW)
    assert bool(p.launches) is served
    assert p.unsatisfiable == ()


def test_parse_config_and_determinism():
    """A TOML config plans the same way twice; the plan is a pure function of its input."""
    toml = """
    [fleet]
    budget_usd_per_hour = 50
    [[pools]]
    name = "l4"
    provider = "gcp"
    accelerator = "nvidia-l4"
    region = "us-central1"
    max_instances = 5
    drain_target_s = 60
    """
    cfg = parse_config(toml, env={})
    s = snap({L4: 40, "embedding.nvidia-l4": 50}, errors=[err("capacity", pool="l4")])
    first, second = plan(s, cfg, CATALOG, NOW), plan(s, cfg, CATALOG, NOW)
    assert first == second
    # The backoff is per offer: the other spot L4 offer is still preferred to on-demand.
    assert {x.offer.key for x in first.launches} == {"gcp/us-central1/g2-standard-16/spot"}
    assert len(first.launches) == 5  # (400 + 100) s / 60 s -> 9, clamped to 5


@pytest.mark.parametrize(
    ("pool", "offer", "devices"),
    [
        (LOCAL_L4, "aws/us-east-1/g6.xlarge", 1),
        (AWS_L4, "aws/us-east-1/g6.12xlarge", 4),
        (LOCAL_H200, "aws/us-east-1/p5en.48xlarge", 4),
        (with_(LOCAL_CPU, devices=4), "aws/us-east-1/c6i.xlarge", 1),
    ],
)
def test_pool_devices(pool, offer, devices):
    """Devices per instance: the pool's override, else the offer's count; cpu is one device."""
    (o,) = [o for o in CATALOG.offers if o.key == offer]
    assert pool_devices(PoolConfig(**pool), o) == devices


def test_default_service_times():
    """Every task kind has a fallback service time."""
    assert DEFAULT_SERVICE_S == {
        TaskKind.INFERENCE: 10,
        TaskKind.EMBEDDING: 2,
        TaskKind.BATCH: 60,
        TaskKind.FINE_TUNE: 1800,
        TaskKind.TRAINING: 3600,
    }


# ------------------------------------------------------------------------------ invariants

AWS_L4_BIG = with_(AWS_L4, instance_types=("g6.xlarge", "g6.12xlarge", "g6.48xlarge"))
AWS_H200 = {
    "name": "aws-h200",
    "provider": "aws",
    "accelerator": "nvidia-h200",
    "region": "us-east-1",
    "markets": ("spot", "on_demand"),
}
MENU = (LOCAL_L4, GCP_L4, AWS_L4_BIG, LOCAL_H200, AWS_H200, LOCAL_CPU)
QUEUE_MENU = (
    "inference.nvidia-l4",
    "embedding.nvidia-l4",
    "inference.nvidia-l4.x4",
    "batch.nvidia-l4.x8",
    "inference.nvidia-h200",
    "training.nvidia-h200.x4",
    "inference.nvidia-h200.x8",
    "embedding.cpu",
    "inference.amd-mi300x",
    "not.a.fleet.queue",
)
OFFER_KEYS = {
    p["name"]: [f"{o.offer.key}/{o.market.value}" for o in pool_offers(PoolConfig(**p), CATALOG)]
    for p in MENU
}
TIME = st.floats(0, 3000, allow_nan=False)


@st.composite
def pools(draw):
    """A few pools from the menu with random sizes, budgets and timings."""
    picked = draw(
        st.lists(st.sampled_from(MENU), min_size=1, max_size=4, unique_by=lambda p: p["name"])
    )
    out = []
    for p in picked:
        lo, hi = sorted(draw(st.lists(st.integers(0, 6), min_size=2, max_size=2)))
        out.append(
            p
            | {
                "min_instances": lo,
                "max_instances": hi,
                "budget_usd_per_hour": draw(st.none() | st.floats(0.5, 150)),
                "drain_target_s": draw(st.sampled_from([10, 30, 120, 600])),
                "idle_before_scale_in_s": draw(st.sampled_from([0, 20, 300])),
                "scale_out_cooldown_s": draw(st.sampled_from([0, 30])),
                "scale_in_cooldown_s": draw(st.sampled_from([0, 120])),
                "capacity_backoff_s": draw(st.sampled_from([0, 900])),
            }
        )
    return out


@st.composite
def worlds(draw):
    """A random (config, snapshot, now): queues, instances, workers, errors and history."""
    pool_dicts = draw(pools())
    names = [p["name"] for p in pool_dicts]
    fleet = {
        "budget_usd_per_hour": draw(st.none() | st.floats(1, 200)),
        "max_launches_per_loop": draw(st.integers(1, 10)),
        "launch_grace_s": draw(st.sampled_from([60, 600])),
    }
    now = NOW + draw(TIME)
    queues = {
        q: QueueObservation(
            q,
            ready=draw(st.integers(0, 300)),
            unacked=draw(st.integers(0, 10)),
            sample_service_s=draw(st.none() | st.floats(0.5, 100)),
        )
        for q in draw(st.lists(st.sampled_from(QUEUE_MENU), max_size=6, unique=True))
    }
    instances = []
    for n in range(draw(st.integers(0, 8))):
        pool = draw(st.sampled_from([*names, "gone"]))
        offer = draw(st.sampled_from(OFFER_KEYS.get(pool, [L4_OD])))
        state = draw(st.sampled_from(list(InstanceState)))
        price = draw(st.floats(0.1, 70))
        instances.append(
            Instance(f"i{n}", pool, ref(offer), state, now - draw(TIME), f"t{n}", price)
        )
    confirmed = (
        draw(st.lists(st.sampled_from([i.id for i in instances]), unique=True)) if instances else []
    )
    workers = [WorkerObservation(f"w@{i}", "nvidia-l4", i) for i in confirmed]
    errors = [
        ProviderError(
            p,
            ref(draw(st.sampled_from(OFFER_KEYS[p]))),
            draw(st.sampled_from(list(ErrorKind))),
            "x",
            now - draw(TIME),
        )
        for p in draw(st.lists(st.sampled_from(names), max_size=4))
    ]
    history = {
        p: PoolHistory(*(draw(st.none() | TIME.map(lambda t: now - t)) for _ in range(3)))
        for p in draw(st.lists(st.sampled_from(names), unique=True))
    }
    snapshot = Snapshot(now, queues, tuple(instances), tuple(workers), tuple(errors), history)
    return config(*pool_dicts, **fleet), snapshot, now


def has_work(pool: PoolConfig, snapshot: Snapshot) -> bool:
    """Whether any queue this pool can serve has ready or unacked work (rule 1, restated)."""
    biggest = max(pool_devices(pool, o.offer) for o in pool_offers(pool, CATALOG))
    for q in snapshot.queues.values():
        r = parse_queue(q.name)
        if q.ready + q.unacked and r and r.accelerator == pool.accelerator and r.devices <= biggest:
            return True
    return False


EPS = 1e-6


def within(before: float, after: float, budget: float | None, launched: bool) -> bool:
    """A budget holds: spend within it stays within it; spend over it launches nothing."""
    if budget is None:
        return True
    return after <= budget + EPS if before <= budget else not launched


@given(worlds())
@pytest.mark.fault
def test_budgets_are_never_broken(world):
    """Neither a pool's budget nor the fleet's is exceeded by a plan; over budget, nothing launches."""
    cfg, snapshot, now = world
    p = plan(snapshot, cfg, CATALOG, now)
    fleet_budget = cfg.fleet.budget_usd_per_hour
    assert within(p.usd_per_hour_before, p.usd_per_hour_after, fleet_budget, bool(p.launches))
    budgets = {pool.name: pool.budget_usd_per_hour for pool in cfg.pools}
    for d in p.decisions:
        budget = budgets.get(d.pool)
        assert within(d.usd_per_hour_before, d.usd_per_hour_after, budget, bool(d.launches)), d


@given(worlds())
def test_launches_respect_max_instances_device_tiers_and_the_cap(world):
    """Launches stay under max_instances and the per-plan cap, and fit every tier they serve."""
    cfg, snapshot, now = world
    p = plan(snapshot, cfg, CATALOG, now)
    assert len(p.launches) <= cfg.fleet.max_launches_per_loop
    by_name = {pool.name: pool for pool in cfg.pools}
    for d in p.decisions:
        pool = by_name.get(d.pool)
        assert pool is not None or d.launches == ()
        if pool is not None and d.current <= pool.max_instances:
            assert d.current + len(d.launches) <= pool.max_instances
        for launch in d.launches:
            assert launch.offer.key in OFFER_KEYS[d.pool]
            for tier in re.findall(r"on [a-z_]+\.[a-z0-9-]+\.x(\d+)", launch.reason):
                assert launch.devices >= int(tier), launch


@given(worlds())
def test_no_churn(world):
    """Under load only clean-up and shedding above need (never below desired); never with launches, never twice."""
    cfg, snapshot, now = world
    p = plan(snapshot, cfg, CATALOG, now)
    by_name = {pool.name: pool for pool in cfg.pools}
    states = {i.id: i.state for i in snapshot.instances}
    assert [d.pool for d in p.decisions] == sorted(
        {*by_name, *(i.pool for i in snapshot.instances)}
    )
    for t in p.terminations:
        assert states[t.instance_id] in {InstanceState.PENDING, InstanceState.RUNNING}
    for d in p.decisions:
        assert not (d.launches and d.terminations), d
        pool = by_name.get(d.pool)
        if pool is None:
            assert all(t.reason.startswith("orphan:") for t in d.terminations)
        elif has_work(pool, snapshot):
            kinds = ("launch never confirmed", "capacity above need under load")
            assert all(t.reason.startswith(kinds) for t in d.terminations)
            shed = [t for t in d.terminations if t.reason.startswith(kinds[1])]
            assert not shed or d.current - len(d.terminations) >= d.desired, d
    assert plan(snapshot, cfg, CATALOG, now) == p
    assert busy_pools(snapshot, cfg, CATALOG) == {
        x.name for x in cfg.pools if has_work(x, snapshot)
    }


# ------------------------------------------------------------------------------ no flapping


class FakeFleet:
    """Applies plans by hand: launches appear pending, confirm a step later; terminations vanish."""

    def __init__(self, cfg: AutoscalerConfig) -> None:
        """Empty fleet at time 0."""
        self.cfg, self.now, self.instances = cfg, 0.0, {}
        self.history = PoolHistory()

    def step(self, backlog: int) -> tuple[int, int, int]:
        """One loop pass; returns (instances after, launches, terminations)."""
        running = {i: replace(x, state=InstanceState.RUNNING) for i, x in self.instances.items()}
        self.instances = running
        workers = [WorkerObservation(f"w@{i}", "nvidia-l4", i) for i in running]
        queues = {L4: QueueObservation(L4, ready=backlog)}
        s = Snapshot(
            self.now,
            queues,
            tuple(running.values()),
            tuple(workers),
            (),
            {"local-l4": self.history},
        )
        p = plan(s, self.cfg, CATALOG, self.now)
        for x in p.launches:
            self.instances[x.token] = Instance(
                x.token, x.pool, x.offer, InstanceState.PENDING, self.now, x.token, x.usd_per_hour
            )
        for t in p.terminations:
            del self.instances[t.instance_id]
        h = self.history
        self.history = PoolHistory(
            self.now if busy_pools(s, self.cfg, CATALOG) else h.last_busy_at,
            self.now if p.launches else h.last_scale_out_at,
            self.now if p.terminations else h.last_scale_in_at,
        )
        self.now += 1.0
        return len(self.instances), len(p.launches), len(p.terminations)


def test_no_flapping_under_a_steady_backlog_then_scale_in_only_after_idle():
    """A steady backlog ramps up monotonically and settles; idle pools shrink only after the idle time."""
    pool = with_(LOCAL_L4, min_instances=1, max_instances=6, scale_out_cooldown_s=2, scale_in_cooldown_s=5, idle_before_scale_in_s=20)  # fmt: skip
    fleet = FakeFleet(config(pool, max_launches_per_loop=1))
    counts = [fleet.step(backlog=12)[0] for _ in range(50)]  # 120 s of work / 30 s -> 4
    assert counts == sorted(counts)
    assert counts[-40:] == [4] * 40
    last_busy = fleet.now - 1
    after = []
    while fleet.now < last_busy + 40:
        n, launched, _ = fleet.step(backlog=0)
        after.append((fleet.now - 1 - last_busy, n))
        assert launched == 0
    assert all(n == 4 for idle, n in after if idle < 20)
    assert all(n == 1 for idle, n in after if idle >= 20)
    assert math.isclose(min(idle for idle, n in after if n == 1), 20)


# ------------------------------------------------------------------- capacity from in-flight work


def test_in_flight_streams_count_by_their_device_share():
    """40 running streams of a batch of 40 are one device of load, not 40 (Little's law)."""
    q = QueueObservation(L4, unacked=40, sample_service_s=0.5, sample_share=1 / 40)
    (d,) = parse_demands({L4: q}, "")
    assert d.in_flight_devices == pytest.approx(1.0)
    # headroom: max(1 / 0.8, 1 + 2 sqrt(1 x 1/40)) = 1.316; no backlog
    assert d.devices_wanted(300.0) == pytest.approx(1 + 2 * math.sqrt(1 / 40))


def test_backlog_adds_its_device_time_over_the_drain_target():
    """Waiting tasks add ready x tier x service_s / drain_target_s devices to the running load."""
    q = QueueObservation(f"{L4}.x2", ready=30, unacked=0, sample_service_s=10.0, sample_share=0.1)
    (d,) = parse_demands({f"{L4}.x2": q}, "")
    assert d.devices_wanted(60.0) == pytest.approx(30 * 2 * 10.0 / 60.0)


def test_observed_running_devices_win_over_the_share():
    """The simulator's exact device count replaces unacked x tier x share."""
    q = QueueObservation(L4, unacked=10, sample_share=0.5, running_devices=2.0)
    (d,) = parse_demands({L4: q}, "")
    assert d.in_flight_devices == 2.0
    assert d.devices_wanted(300.0) == pytest.approx(max(2 / 0.8, 2 + 2 * math.sqrt(2 * 0.5)))


def test_steady_batched_load_buys_what_it_uses():
    """200 streams at 1/50 of a device each: 4 devices of load, 6 instances with headroom."""
    q = QueueObservation(L4, unacked=200, sample_service_s=0.2, sample_share=1 / 50)
    p = plan(snap({L4: q}), config(with_(LOCAL_L4, max_instances=50)), CATALOG, NOW)
    (d,) = p.decisions
    assert d.desired == math.ceil(max(4 / 0.8, 4 + 2 * math.sqrt(4 / 50)))


def test_carry_samples_keeps_the_last_head_sample_for_running_work():
    """A queue drained to empty keeps its last sample while tasks run, then forgets it."""
    memory: dict[str, tuple[float, float]] = {}
    carry_samples(
        {L4: QueueObservation(L4, ready=3, sample_service_s=2.0, sample_share=0.1)}, memory
    )
    running = carry_samples({L4: QueueObservation(L4, unacked=3)}, memory)
    assert (running[L4].sample_service_s, running[L4].sample_share) == (2.0, 0.1)
    carry_samples({L4: QueueObservation(L4)}, memory)
    assert memory == {}


def test_smooth_load_averages_the_running_devices_over_time():
    """A one-tick spike moves the average by a fraction; a sustained level is reached; idle is forgotten."""
    memory: dict[str, tuple[float, float]] = {}
    first = smooth_load({L4: QueueObservation(L4, unacked=1, running_devices=1.0)}, memory, 0.0)
    assert first[L4].running_devices == 1.0
    spike = smooth_load({L4: QueueObservation(L4, unacked=9, running_devices=9.0)}, memory, 5.0)
    assert spike[L4].running_devices == pytest.approx(1 + 8 * (1 - math.exp(-5 / 120)))
    for t in range(10, 2000, 5):
        level = smooth_load({L4: QueueObservation(L4, unacked=4, running_devices=4.0)}, memory, t)
    assert level[L4].running_devices == pytest.approx(4.0, rel=1e-3)
    for t in range(2000, 4000, 5):
        smooth_load({L4: QueueObservation(L4)}, memory, t)
    assert memory == {}


def test_smooth_load_reads_unacked_times_share_when_devices_are_unknown():
    """The live observer has no device count: unacked x tier x share is what gets averaged."""
    memory: dict[str, tuple[float, float]] = {}
    q = QueueObservation(f"{L4}.x2", unacked=10, sample_share=0.1)
    assert smooth_load({q.name: q}, memory, 0.0)[q.name].running_devices == pytest.approx(2.0)

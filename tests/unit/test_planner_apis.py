"""The planner with API pools: concurrency within rate limits, and when self-hosted capacity is bought."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.autoscaler.actuator import Actuator
from fleet.autoscaler.apiactuator import ConcurrencyChange, apply_concurrency, concurrency_changes
from fleet.autoscaler.apiplan import TYPICAL_TOKENS_IN, TYPICAL_TOKENS_OUT
from fleet.autoscaler.config import ConfigError, parse_config
from fleet.autoscaler.model import (
    ApiPoolDecision,
    Plan,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.autoscaler.planner import plan
from fleet.catalog import default_catalog
from fleet.catalog.apis import find_api_offer

CATALOG = default_catalog()
NOW = 10_000.0
GROQ_Q = "inference.api-groq"
GROQ = find_api_offer(CATALOG, "groq", "llama-3.1-8b")
assert GROQ is not None
LATENCY = GROQ.latency_s(TYPICAL_TOKENS_IN, TYPICAL_TOKENS_OUT)

LOCAL_L4 = """
[[pools]]
name = "local-l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
max_instances = 3
drain_target_s = 30
"""


def config(
    overflow: bool = True, rpm: int = 60, max_concurrency: int = 16, min_concurrency: int = 0
):
    """local-l4 plus a Groq API pool: rpm calls/min, a 60 s drain target."""
    text = (
        LOCAL_L4
        + f"""
[[api_pools]]
provider = "groq"
models = ["llama-3.1-8b"]
requests_per_min = {rpm}
tokens_per_min = 100000000
drain_target_s = 60
min_concurrency = {min_concurrency}
max_concurrency = {max_concurrency}
"""
        + ('overflow_pool = "local-l4"\n' if overflow else "")
    )
    return parse_config(text, env={})


def snapshot(api_ready: int = 0, l4_ready: int = 0, workers=()) -> Snapshot:
    """Queues with the given backlogs, no instances."""
    queues = {
        GROQ_Q: QueueObservation(GROQ_Q, ready=api_ready),
        "inference.nvidia-l4": QueueObservation("inference.nvidia-l4", ready=l4_ready),
    }
    return Snapshot(taken_at=NOW, queues=queues, instances=(), workers=tuple(workers))


def decision(p: Plan, pool: str):
    """The PoolDecision of ``pool``."""
    return next(d for d in p.decisions if d.pool == pool)


# ------------------------------------------------------------------ instances or not


def test_work_the_api_absorbs_launches_no_instance():
    """30 calls at 60/min drain within 60 s: one concurrent call, no L4 launched."""
    p = plan(snapshot(api_ready=30), config(), CATALOG, NOW)
    [api] = p.api_pools
    assert (api.tasks, api.absorbed, api.overflow) == (30, 30, 0)
    assert api.desired_concurrency == 1
    assert "no instance needed" in api.reasons[-1]
    assert decision(p, "local-l4").launches == ()
    assert p.unsatisfiable == ()


def test_backlog_beyond_the_rate_limit_buys_self_hosted_capacity():
    """200 calls at 60/min: 60 drain in time, 140 overflow to the L4 pool, which launches."""
    p = plan(snapshot(api_ready=200), config(), CATALOG, NOW)
    [api] = p.api_pools
    assert (api.absorbed, api.overflow, api.overflow_pool) == (60, 140, "local-l4")
    l4 = decision(p, "local-l4")
    assert len(l4.launches) == 3  # 140 x 10 s / 30 s drain target, clamped to max_instances
    assert "inference.api-groq (overflow)" in l4.launches[0].reason


def test_overflow_without_an_overflow_pool_is_reported_not_bought():
    """No overflow_pool: the overflow is in the reasons and nothing launches."""
    p = plan(snapshot(api_ready=200), config(overflow=False), CATALOG, NOW)
    [api] = p.api_pools
    assert api.overflow == 140
    assert "no overflow_pool" in api.reasons[-1]
    assert decision(p, "local-l4").launches == ()


def test_api_queue_without_an_api_pool_is_unsatisfiable():
    """Work on inference.api-cerebras with no [[api_pools]] entry is reported, not mistaken for a chip."""
    snap = snapshot()
    snap.queues["inference.api-cerebras"] = QueueObservation("inference.api-cerebras", ready=4)
    p = plan(snap, config(), CATALOG, NOW)
    [u] = p.unsatisfiable
    assert (u.queue, u.ready) == ("inference.api-cerebras", 4)
    assert "no [[api_pools]] entry for provider 'cerebras'" in u.reason


def test_chip_demand_is_planned_as_before_beside_api_pools():
    """An L4 backlog still sizes the L4 pool; an idle API pool wants min_concurrency."""
    p = plan(snapshot(l4_ready=6), config(min_concurrency=2), CATALOG, NOW)
    assert len(decision(p, "local-l4").launches) == 2  # 6 x 10 s / 30 s
    [api] = p.api_pools
    assert (api.tasks, api.desired_concurrency) == (0, 2)


# --------------------------------------------------------------------- concurrency


def test_concurrency_follows_littles_law_and_is_capped():
    """3,000 calls at 6,000/min: 50 calls/s x latency streams, capped at max_concurrency."""
    p = plan(snapshot(api_ready=3000), config(rpm=6000, max_concurrency=200), CATALOG, NOW)
    [api] = p.api_pools
    assert api.desired_concurrency == math.ceil(50 * LATENCY)
    capped = plan(snapshot(api_ready=3000), config(rpm=6000, max_concurrency=8), CATALOG, NOW)
    assert capped.api_pools[0].desired_concurrency == 8
    assert "capped at max_concurrency 8" in capped.api_pools[0].reasons


@given(
    ready=st.integers(0, 100_000),
    rpm=st.integers(1, 100_000),
    lo=st.integers(0, 10),
    hi=st.integers(10, 500),
)
def test_api_decisions_stay_within_bounds_and_the_rate_limit(ready, rpm, lo, hi):
    """Desired concurrency is in [min, max] (>= 1 with work); absorbed + overflow = tasks; absorbed fits the limit."""
    p = plan(
        snapshot(api_ready=ready),
        config(rpm=rpm, min_concurrency=lo, max_concurrency=hi),
        CATALOG,
        NOW,
    )
    [api] = p.api_pools
    assert lo <= api.desired_concurrency <= hi
    assert api.desired_concurrency >= (1 if ready else 0)
    assert api.absorbed + api.overflow == ready
    assert api.absorbed <= rpm / 60 * 60 + 1e-9  # drain target 60 s
    assert api.desired_concurrency <= max(lo, 1, math.ceil(rpm / 60 * LATENCY))
    if api.overflow == 0:
        assert decision(p, "local-l4").launches == ()


def test_bad_overflow_pool_is_refused():
    """overflow_pool must name a configured pool."""
    with pytest.raises(ConfigError, match="overflow_pool: no pool 'nope'"):
        parse_config(
            LOCAL_L4 + '[[api_pools]]\nprovider = "groq"\noverflow_pool = "nope"\n', env={}
        )


# ------------------------------------------------------------------------ actuation


def api_decision(desired: int, provider: str = "groq") -> ApiPoolDecision:
    """A decision wanting ``desired`` concurrent calls."""
    return ApiPoolDecision(
        provider, f"inference.api-{provider}", 0, 0, desired, 60.0, 0, 0, None, ()
    )


def worker(host: str, concurrency: int = 0, accelerator: str = "api-groq") -> WorkerObservation:
    """A live worker."""
    return WorkerObservation(host, accelerator, None, 0, (), concurrency)


class FakeControl:
    """Records Celery remote-control broadcasts (the shape of ``app.control``)."""

    def __init__(self) -> None:
        """No calls yet."""
        self.calls: list[tuple[str, dict, tuple[str, ...]]] = []

    def broadcast(self, command, arguments=None, destination=None, **_):
        """Record a broadcast."""
        self.calls.append((command, dict(arguments or {}), tuple(destination or ())))


def test_desired_concurrency_is_spread_over_the_pools_workers():
    """5 calls over two workers: 3 and 2, each set with one absolute fleet_api_concurrency."""
    changes = concurrency_changes(
        [api_decision(5)],
        [worker("b", concurrency=4), worker("a", concurrency=1), worker("gpu", 8, "nvidia-l4")],
    )
    assert changes == [ConcurrencyChange("groq", "a", 1, 3), ConcurrencyChange("groq", "b", 4, 2)]
    control = FakeControl()
    assert apply_concurrency(control, changes) == 2
    assert control.calls == [
        ("fleet_api_concurrency", {"n": 3}, ("a",)),
        ("fleet_api_concurrency", {"n": 2}, ("b",)),
    ]


def test_unknown_concurrency_is_set_absolutely_and_idle_workers_keep_one_slot():
    """A worker of unknown concurrency (0) gets its target; no worker gets fewer than 1."""
    changes = concurrency_changes([api_decision(0)], [worker("a"), worker("b", concurrency=1)])
    assert changes == [ConcurrencyChange("groq", "a", 0, 1)]
    control = FakeControl()
    apply_concurrency(control, changes)
    assert control.calls == [("fleet_api_concurrency", {"n": 1}, ("a",))]


def test_no_change_for_a_pool_without_workers_or_already_right():
    """Nothing to send when no worker serves the pool or each already runs its share."""
    assert concurrency_changes([api_decision(4, "cerebras")], [worker("a", 2)]) == []
    assert concurrency_changes([api_decision(4)], [worker("a", 2), worker("b", 2)]) == []


def test_actuator_applies_the_plans_api_decisions():
    """Actuator.act sends the concurrency changes through the app's remote control."""
    cfg = config()
    control = FakeControl()
    actuator = Actuator(cfg, {}, SimpleNamespace(control=control))
    snap = snapshot(api_ready=3000, workers=[worker("api-1", concurrency=2)])
    decided = plan(snap, config(rpm=6000, max_concurrency=10), CATALOG, NOW)
    report = actuator.act(decided, snap, NOW)
    assert report.api_changes == [ConcurrencyChange("groq", "api-1", 2, 10)]
    assert control.calls == [("fleet_api_concurrency", {"n": 10}, ("api-1",))]

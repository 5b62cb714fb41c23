"""The simulator with API pools: per-token cost, latency from tokens/s, rate limits held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.autoscaler.config import parse_config
from fleet.catalog import default_catalog
from fleet.catalog.apis import find_api_offer
from fleet.sim.apipools import WINDOW_S, SimApiPool
from fleet.sim.engine import Simulation, simulate
from fleet.sim.trace import TraceEvent
from fleet.spec import parse_spec

CATALOG = default_catalog()
GROQ = find_api_offer(CATALOG, "groq", "llama-3.1-8b")
assert GROQ is not None

LOCAL_L4 = """
[[pools]]
name = "l4"
provider = "fake"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
max_instances = 4
"""
GROQ_POOL = """
[[api_pools]]
provider = "groq"
requests_per_min = {rpm}
tokens_per_min = {tpm}
"""


def config(*, l4: bool = False, rpm: int = 30, tpm: int = 1_000_000):
    """A Groq API pool, with or without an L4 pool beside it."""
    return parse_config((LOCAL_L4 if l4 else "") + GROQ_POOL.format(rpm=rpm, tpm=tpm), env={})


def calls(
    n: int, *, every_s: float = 0.0, tokens_in: int = 500, tokens_out: int = 100, deadline=None
):
    """``n`` 8B chat calls, one every ``every_s`` seconds."""
    slo = {"deadline_s": deadline} if deadline else {}
    spec = parse_spec(
        {
            "kind": "inference",
            "model": {"name": "llama-3.1-8b-instruct", "params_b": 8},
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "slo": slo,
        }
    )
    return [TraceEvent(i * every_s, spec) for i in range(n)]


def max_in_window(starts: list[float]) -> int:
    """Most starts in any half-open 60 s window."""
    starts = sorted(starts)
    return max((sum(1 for t in starts if s <= t < s + WINDOW_S) for s in starts), default=0)


# --------------------------------------------------------------------------- the pool


@given(
    arrivals=st.lists(st.floats(0, 600, allow_nan=False), min_size=1, max_size=60),
    tokens=st.lists(st.integers(1, 5000), min_size=60, max_size=60),
    rpm=st.integers(1, 20),
    tpm=st.integers(5000, 40_000),
)
def test_the_rate_limiter_never_exceeds_either_limit(arrivals, tokens, rpm, tpm):
    """In every 60 s window: at most requests_per_min starts and tokens_per_min tokens; FIFO; no start before arrival."""
    pool = SimApiPool("groq", rpm, tpm)
    made = []
    for t, n in zip(sorted(arrivals), tokens, strict=False):
        call = pool.submit(GROQ, t, n, 0)
        assert call.start >= t
        made.append(call)
    starts = [c.start for c in made]
    assert starts == sorted(starts)
    for c in made:
        window = [d for d in made if c.start <= d.start < c.start + WINDOW_S]
        assert len(window) <= rpm
        assert sum(d.tokens for d in window) <= tpm


def test_a_call_over_the_token_limit_can_never_start():
    """One call bigger than tokens_per_min is refused, naming the limit."""
    with pytest.raises(ValueError, match="exceed groq's 1000 tokens/min"):
        SimApiPool("groq", 10, 1000).submit(GROQ, 0.0, 900, 200)


def test_waiting_counts_calls_not_started_yet():
    """Three calls at once with 1 request/min: two wait."""
    pool = SimApiPool("groq", 1, 10**6)
    for _ in range(3):
        pool.submit(GROQ, 0.0, 10, 10)
    assert pool.waiting(0.0) == 2
    assert pool.waiting(60.0) == 1
    assert pool.waiting(120.0) == 0


# ----------------------------------------------------------------------- the simulation


def test_api_only_fleet_costs_the_sum_of_per_token_costs():
    """20 calls, no instance pool: every call goes to Groq; cost is 20 x its token price, no instance."""
    result = simulate(calls(20, every_s=1.0), config(), CATALOG, "fleet")
    assert result.completed == 20
    assert result.api_calls == 20
    assert result.instances_launched == 0
    assert result.api_cost_usd == pytest.approx(20 * GROQ.cost_usd(500, 100))
    assert result.total_cost_usd == pytest.approx(result.api_cost_usd)
    assert result.to_dict()["accelerators"] == ["api-groq"]


def test_latency_is_the_offers_and_the_rate_limit_queues_the_rest():
    """60 calls at once at 30/min: each takes the offer's latency once started; starts respect the limit."""
    sim = Simulation(calls(60), config(rpm=30), CATALOG, "fleet")
    result = sim.run()
    assert result.completed == 60
    assert {round(t.service_s, 9) for t in sim.tasks} == {round(GROQ.latency_s(500, 100), 9)}
    starts = [t.start for t in sim.tasks if t.start is not None]
    assert max_in_window(starts) <= 30
    assert max(starts) >= WINDOW_S  # the second half had to wait for the window
    assert max(t.end for t in sim.tasks) == pytest.approx(max(starts) + GROQ.latency_s(500, 100))


def test_rate_limited_backlog_moves_deadline_work_to_chips():
    """A tight deadline and a 2/min limit: the API takes what it can, the rest waits for L4s."""
    sim = Simulation(calls(30, deadline=30), config(l4=True, rpm=2), CATALOG, "fleet")
    result = sim.run()
    assert result.completed == 30
    assert 0 < result.api_calls < 30
    assert result.instances_launched > 0
    starts = [t.start for t in sim.tasks if t.queue == "inference.api-groq" and t.start is not None]
    assert max_in_window(starts) <= 2


def test_api_pools_can_be_switched_off():
    """api_pools=False: the same trace runs on the L4 pool only."""
    result = simulate(calls(10, every_s=1.0), config(l4=True), CATALOG, "fleet", api_pools=False)
    assert result.api_calls == 0
    assert result.api_cost_usd == 0
    assert result.instances_launched > 0
    assert result.completed == 10


def test_homogeneous_baseline_ignores_api_pools():
    """The H100 baseline never calls an API."""
    result = simulate(calls(5, every_s=1.0), config(l4=True), CATALOG, "homogeneous")
    assert result.api_calls == 0
    assert result.completed == 5

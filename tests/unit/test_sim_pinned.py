"""The simulator's results on fixed traces, pinned: a refactor must not move any of them.

Each case runs one policy over one generated trace (fixed seed) on the cloud pools of
``infra/fleet.toml`` (the local pools left out, as ``bench/sim_bench.py`` does) and compares
what it reports with ``EXPECTED``: cost to 1e-9 relative, counts exactly, latencies and SLO
attainment to 1e-9, and two digests, one of every task's queue and one of every task's start
and end (to the microsecond), so that the same totals reached by another event order fail.

A change to the model on purpose (throughput, planner, cost shape) moves these numbers; then
print the new table and paste it over ``EXPECTED``::

    .venv/bin/python -m tests.unit.test_sim_pinned
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from pprint import pformat
from typing import Any

import pytest

from fleet.autoscaler.apipools import ApiPoolConfig
from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.catalog import Catalog, default_catalog
from fleet.sim.engine import Simulation
from fleet.sim.generators import generate

ROOT = Path(__file__).resolve().parents[2]
SEED = 1
DURATION_S = 3600.0
API_PROVIDERS = ("cerebras", "groq", "sambanova", "fireworks")


@dataclass(frozen=True)
class Case:
    """One run: a generated trace, a policy and the options that matter."""

    trace: str
    n: int
    policy: str
    spot_per_hour: float = 0.0
    api_pools: bool = False

    @property
    def name(self) -> str:
        """The id pytest shows and ``EXPECTED`` is keyed by."""
        extra = (f"-spot{self.spot_per_hour:g}" if self.spot_per_hour else "") + (
            "-apis" if self.api_pools else ""
        )
        return f"{self.trace}-{self.n}-{self.policy}{extra}"


CASES = (
    Case("multi-agent", 2000, "fleet"),
    Case("multi-agent", 2000, "homogeneous"),
    Case("multi-agent", 2000, "cheapest"),
    Case("interactive-chat", 1000, "fleet"),
    Case("interactive-chat", 1000, "homogeneous"),
    Case("interactive-chat", 1000, "cheapest"),
    Case("multi-agent", 500, "fleet", spot_per_hour=3.0),
    Case("multi-agent", 500, "fleet", api_pools=True),
)


@cache
def _setup() -> tuple[AutoscalerConfig, Catalog]:
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    config = base.model_copy(
        update={"pools": tuple(p for p in base.pools if p.provider != "local")}
    )
    return config, default_catalog()


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t:.6f}"


def measure(case: Case) -> dict[str, Any]:
    """Run ``case`` and return what is pinned."""
    config, catalog = _setup()
    if case.api_pools:
        config = config.model_copy(
            update={"api_pools": tuple(ApiPoolConfig(provider=p) for p in API_PROVIDERS)}
        )
    trace = generate(case.trace, n=case.n, seed=SEED, duration_s=DURATION_S)
    sim = Simulation(
        trace,
        config,
        catalog,
        case.policy,
        seed=SEED,
        spot_interruptions_per_hour=case.spot_per_hour,
    )
    r = sim.run()
    return {
        "total_cost_usd": r.total_cost_usd,
        "api_cost_usd": r.api_cost_usd,
        "completed": r.completed,
        "rejected": r.rejected,
        "api_calls": r.api_calls,
        "instances_launched": r.instances_launched,
        "p50_latency_s": r.p50_latency_s,
        "p95_latency_s": r.p95_latency_s,
        "slo_attainment": r.slo_attainment,
        "end_s": r.end_s,
        "utilisation": r.utilisation,
        "placements": _digest([f"{i}:{q}" for i, q in sorted(r.placements.items())]),
        "times": _digest([f"{t.idx}:{_us(t.start)}:{_us(t.end)}" for t in sim.tasks]),
    }


# Printed by `.venv/bin/python -m tests.unit.test_sim_pinned`.
EXPECTED: dict[str, dict[str, Any]] = {
    "multi-agent-2000-fleet": {
        "total_cost_usd": 65.71265994444445,
        "api_cost_usd": 0,
        "completed": 2000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 15,
        "p50_latency_s": 5.061192040903052,
        "p95_latency_s": 26.140423940620817,
        "slo_attainment": 0.986,
        "end_s": 3865.0,
        "utilisation": {
            "a100-azure": 0.03822634487905879,
            "embed-l4-gcp": 0.0007260875310877837,
            "h100x8-gcp": 0.00871630802537448,
            "h200x8-aws": 0.0027893298244381867,
            "l4-gcp": 0.08623185239596744,
            "l40s-aws": 0.034802684963271185,
        },
        "placements": "01e429684b9eeb29",
        "times": "bcac1cefaf6f651c",
    },
    "multi-agent-2000-homogeneous": {
        "total_cost_usd": 73.84533333333333,
        "api_cost_usd": 0,
        "completed": 2000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 2,
        "p50_latency_s": 2.6162271040948326,
        "p95_latency_s": 29.32812367682134,
        "slo_attainment": 0.9795,
        "end_s": 3870.0,
        "utilisation": {"homogeneous": 0.011612804993912644},
        "placements": "6cee5503b9691eb5",
        "times": "e23138700c2c1cba",
    },
    "multi-agent-2000-cheapest": {
        "total_cost_usd": 66.06085668333336,
        "api_cost_usd": 0,
        "completed": 2000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 12,
        "p50_latency_s": 4.791806530999565,
        "p95_latency_s": 27.249442093298864,
        "slo_attainment": 0.9745,
        "end_s": 3865.0,
        "utilisation": {
            "a100-azure": 0.034255828360238764,
            "embed-l4-gcp": 0.0007260875310877837,
            "h100x8-gcp": 0.008858909853494997,
            "h200x8-aws": 0.0027893298244381867,
            "tpu-v5e-gcp": 0.0021473974516262517,
        },
        "placements": "a7554ff6aca35002",
        "times": "60550fb8aa001969",
    },
    "interactive-chat-1000-fleet": {
        "total_cost_usd": 18.859967695833333,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 4,
        "p50_latency_s": 5.204135452778928,
        "p95_latency_s": 30.166826189356957,
        "slo_attainment": 0.984,
        "end_s": 3900.0,
        "utilisation": {
            "a100-azure": 0.04329371558618585,
            "h100x8-gcp": 0.0032652073501418426,
            "l4-gcp": 0.04584724851753487,
            "l40s-aws": 0.008891233742316502,
        },
        "placements": "87fc1b3225ac3ebe",
        "times": "53fc299f6ff7e101",
    },
    "interactive-chat-1000-homogeneous": {
        "total_cost_usd": 15.214328,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 4,
        "p50_latency_s": 15.48512176882889,
        "p95_latency_s": 104.06480483024392,
        "slo_attainment": 0.727,
        "end_s": 3930.0,
        "utilisation": {"homogeneous": 0.327970687673019},
        "placements": "30cce5ecec66c2f2",
        "times": "b9878accafa16d9d",
    },
    "interactive-chat-1000-cheapest": {
        "total_cost_usd": 19.22887293194444,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 3,
        "p50_latency_s": 5.24455226369588,
        "p95_latency_s": 33.546022817881855,
        "slo_attainment": 0.976,
        "end_s": 3900.0,
        "utilisation": {
            "a100-azure": 0.03490963572957414,
            "h100x8-gcp": 0.00328792933775646,
            "tpu-v5e-gcp": 0.0023319402352266613,
        },
        "placements": "bdbdd003eba8c7e3",
        "times": "95618730b8fa0315",
    },
    "multi-agent-500-fleet-spot3": {
        "total_cost_usd": 81.99413167429515,
        "api_cost_usd": 0,
        "completed": 500,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 13,
        "p50_latency_s": 10.796589266347382,
        "p95_latency_s": 95.14304212522751,
        "slo_attainment": 0.974,
        "end_s": 5767.749099287874,
        "utilisation": {
            "a100-azure": 0.012223071958367067,
            "embed-l4-gcp": 0.00018900693873718464,
            "h200x8-aws": 0.0022684493185829917,
            "l4-gcp": 0.17912289827079034,
            "l40s-aws": 0.003815985984246889,
        },
        "placements": "c96447592d0f8995",
        "times": "8f9460c078cbf545",
    },
    "multi-agent-500-fleet-apis": {
        "total_cost_usd": 0.9762318000000002,
        "api_cost_usd": 0.22752555,
        "completed": 500,
        "rejected": 0,
        "api_calls": 239,
        "instances_launched": 8,
        "p50_latency_s": 1.7078651685393424,
        "p95_latency_s": 24.19905385968906,
        "slo_attainment": 1.0,
        "end_s": 3870.0,
        "utilisation": {"embed-l4-gcp": 0.00018300698397450104, "l4-gcp": 0.02252161189433784},
        "placements": "23c1a65a679ddac8",
        "times": "2ba544dde1292a2b",
    },
}


def _close(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_results_are_pinned(case: Case) -> None:
    """Each policy on each fixed trace reports exactly the pinned results."""
    got, want = measure(case), EXPECTED[case.name]
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert _close(got[key], value), (key, got[key], value)
        elif isinstance(value, dict):
            assert got[key].keys() == value.keys(), key
            assert all(_close(got[key][k], v) for k, v in value.items()), (key, got[key])
        else:
            assert got[key] == value, (key, got[key], value)


if __name__ == "__main__":
    print(pformat({c.name: measure(c) for c in CASES}, sort_dicts=False, width=100))

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
        "total_cost_usd": 65.2711782916667,
        "api_cost_usd": 0,
        "completed": 2000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 13,
        "p50_latency_s": 0.8264804189366259,
        "p95_latency_s": 11.101151290615666,
        "slo_attainment": 0.9895,
        "end_s": 3855.0,
        "utilisation": {
            "embed-l4-gcp": 0.0007260875310877837,
            "h100x8-gcp": 0.016371935799340407,
            "h200x8-aws": 0.002675199488967824,
            "l4-gcp": 0.030221011363013656,
            "l40s-aws": 0.016972426165111992,
        },
        "placements": "31111113983a9a12",
        "times": "81ff312b8475435e",
    },
    "multi-agent-2000-homogeneous": {
        "total_cost_usd": 265.56800000000004,
        "api_cost_usd": 0,
        "completed": 1995,
        "rejected": 5,
        "api_calls": 0,
        "instances_launched": 37,
        "p50_latency_s": 0.8433621693641271,
        "p95_latency_s": 57.55526567047209,
        "slo_attainment": 0.943,
        "end_s": 3840.0,
        "utilisation": {"homogeneous": 0.005168422556739148},
        "placements": "4ec8050af25b48a6",
        "times": "6bc691ebba8754e4",
    },
    "multi-agent-2000-cheapest": {
        "total_cost_usd": 65.96421988333336,
        "api_cost_usd": 0,
        "completed": 2000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 12,
        "p50_latency_s": 1.3040366059699977,
        "p95_latency_s": 12.23427611185741,
        "slo_attainment": 0.9775,
        "end_s": 3855.0,
        "utilisation": {
            "a100-azure": 0.017233207120073063,
            "embed-l4-gcp": 0.0007260875310877837,
            "h100x8-gcp": 0.014494851758199478,
            "h200x8-aws": 0.002675199488967824,
            "tpu-v5e-gcp": 0.005700178240423693,
        },
        "placements": "5560485eafb05baf",
        "times": "c105cbcbf10384c6",
    },
    "interactive-chat-1000-fleet": {
        "total_cost_usd": 17.480937333333333,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 3,
        "p50_latency_s": 1.3889360793891683,
        "p95_latency_s": 12.485895898740104,
        "slo_attainment": 0.986,
        "end_s": 3815.0,
        "utilisation": {
            "h100x8-gcp": 0.008309635136781294,
            "l4-gcp": 0.026582150509423235,
            "l40s-aws": 0.017873178407911666,
        },
        "placements": "33497d6c42e62dcc",
        "times": "79acf23a7aed1d9d",
    },
    "interactive-chat-1000-homogeneous": {
        "total_cost_usd": 115.58400000000002,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 12,
        "p50_latency_s": 1.358092139332257,
        "p95_latency_s": 40.05692814765683,
        "slo_attainment": 0.948,
        "end_s": 3690.0,
        "utilisation": {"homogeneous": 0.005114325622784349},
        "placements": "30cce5ecec66c2f2",
        "times": "22a7bea09ab570b9",
    },
    "interactive-chat-1000-cheapest": {
        "total_cost_usd": 18.378326418055554,
        "api_cost_usd": 0,
        "completed": 1000,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 3,
        "p50_latency_s": 2.333801041623758,
        "p95_latency_s": 11.808558126668725,
        "slo_attainment": 0.978,
        "end_s": 3875.0,
        "utilisation": {
            "a100-azure": 0.01596517021806855,
            "h100x8-gcp": 0.006454304945177041,
            "tpu-v5e-gcp": 0.005367837424203192,
        },
        "placements": "620294e7604faf14",
        "times": "587046d0d54d8c5c",
    },
    "multi-agent-500-fleet-spot3": {
        "total_cost_usd": 81.91469350164533,
        "api_cost_usd": 0,
        "completed": 500,
        "rejected": 0,
        "api_calls": 0,
        "instances_launched": 11,
        "p50_latency_s": 3.584519629337251,
        "p95_latency_s": 86.31181690685605,
        "slo_attainment": 0.974,
        "end_s": 5310.504246675951,
        "utilisation": {
            "embed-l4-gcp": 0.00018900693873718464,
            "h200x8-aws": 0.0027904298230926453,
            "l4-gcp": 0.001012896390166797,
            "l40s-aws": 0.008050765974931257,
        },
        "placements": "d28adef038a289de",
        "times": "d3679fdb4baa48a6",
    },
    "multi-agent-500-fleet-apis": {
        "total_cost_usd": 0.961217132777778,
        "api_cost_usd": 0.21306548,
        "completed": 500,
        "rejected": 0,
        "api_calls": 102,
        "instances_launched": 8,
        "p50_latency_s": 6.56241794569064,
        "p95_latency_s": 23.559386411393064,
        "slo_attainment": 1.0,
        "end_s": 3865.0,
        "utilisation": {"embed-l4-gcp": 0.00018300698397450104, "l4-gcp": 0.05463958366373564},
        "placements": "e73ed127a2b71c73",
        "times": "d03c91ef5219c9a9",
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

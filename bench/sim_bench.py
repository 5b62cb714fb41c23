"""Trace benchmarks: each shipped trace through each policy, against the offline lower bound.

The capacity is the cloud pools of ``infra/fleet.toml`` (its local emulated pools stand in
for the same offers and are left out so nothing is counted twice). Seeds are fixed, so the
table is reproducible: ``make bench`` or ``python -m bench.sim_bench``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from fleet.autoscaler.config import load_config
from fleet.catalog import default_catalog
from fleet.sim.engine import POLICIES, simulate
from fleet.sim.generators import generate

ROOT = Path(__file__).resolve().parents[1]
TRACES: tuple[tuple[str, int], ...] = (
    ("multi-agent", 2000),
    ("interactive-chat", 2000),
    ("batch-embedding", 1000),
    ("training-mix", 600),
)
SEED = 1
DURATION_S = 3600.0


def run() -> dict[str, Any]:
    """Every trace x policy, plus the lower bound; ratios of fleet to the others."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    config = base.model_copy(
        update={"pools": tuple(p for p in base.pools if p.provider != "local")}
    )
    catalog = default_catalog()
    rows: list[dict[str, Any]] = []
    try:
        from fleet.sim.lowerbound import lower_bound  # noqa: PLC0415 - optional until it lands
    except ImportError:
        lower_bound = None  # type: ignore[assignment]
    for name, n in TRACES:
        trace = generate(name, n=n, seed=SEED, duration_s=DURATION_S)
        results = {}
        for policy in POLICIES:
            t0 = time.perf_counter()
            results[policy] = simulate(trace, config, catalog, policy, seed=SEED).to_dict()
            results[policy]["sim_s"] = time.perf_counter() - t0
        bound = (
            lower_bound(trace, catalog, config).cost_usd
            if lower_bound is not None
            else float("nan")
        )
        fleet, homog = results["fleet"], results["homogeneous"]
        rows.append({
            "trace": name,
            "tasks": n,
            "policies": results,
            "lower_bound_usd": bound,
            "fleet_vs_homogeneous": homog["cost_per_1k_tasks_usd"] / fleet["cost_per_1k_tasks_usd"],
            "fleet_vs_lower_bound": fleet["total_cost_usd"] / bound if not math.isnan(bound) and bound > 0 else math.nan,
        })  # fmt: skip
    return {"seed": SEED, "duration_s": DURATION_S, "rows": rows}


def print_table(out: dict[str, Any]) -> None:
    """The trace table."""
    print(
        f"{'trace':18} {'policy':12} {'cost $':>10} {'$/1k tasks':>11} {'p50 s':>8} {'p95 s':>8} {'SLO':>7} {'done':>6}"
    )
    for row in out["rows"]:
        for policy, r in row["policies"].items():
            print(
                f"{row['trace']:18} {policy:12} {r['total_cost_usd']:>10.2f} {r['cost_per_1k_tasks_usd']:>11.2f}"
                f" {r['p50_latency_s']:>8.1f} {r['p95_latency_s']:>8.1f} {r['slo_attainment']:>7.1%} {r['completed']:>6}"
            )
        print(
            f"{row['trace']:18} {'lower bound':12} {row['lower_bound_usd']:>10.2f}"
            f"   homogeneous/fleet {row['fleet_vs_homogeneous']:.1f}x cheaper, fleet/lower bound {row['fleet_vs_lower_bound']:.2f}x"
        )


if __name__ == "__main__":
    print_table(run())

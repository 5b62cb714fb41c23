"""Trace benchmarks: each shipped trace through each policy, against the offline lower bound.

The capacity is the cloud pools of ``infra/fleet.toml`` (its local emulated pools stand in
for the same offers and are left out so nothing is counted twice). Seeds are fixed, so the
table is reproducible: ``make bench`` or ``python -m bench.sim_bench``.

``api_pools`` then replays the multi-agent trace with the ``fleet`` policy twice: on those
pools alone, and with the four catalog API providers (Cerebras, Groq, SambaNova,
Fireworks at their catalog rate limits) added as ``[[api_pools]]``, each against the
homogeneous H100 baseline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from fleet.autoscaler.apipools import ApiPoolConfig
from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.catalog import Catalog, default_catalog
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
API_TRACE = ("multi-agent", 2000)
API_PROVIDERS = ("cerebras", "groq", "sambanova", "fireworks")
SUMMARY_KEYS = ("total_cost_usd", "cost_per_1k_tasks_usd", "slo_attainment", "p50_latency_s",
                "p95_latency_s", "completed", "rejected", "api_cost_usd", "api_calls",
                "instances_launched", "accelerators")  # fmt: skip


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
    return {
        "seed": SEED,
        "duration_s": DURATION_S,
        "rows": rows,
        "api_pools": api_pool_run(config, catalog, rows),
    }


def api_pool_run(
    config: AutoscalerConfig, catalog: Catalog, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The multi-agent trace, fleet policy, without and with API pools, vs homogeneous."""
    name, n = API_TRACE
    trace = generate(name, n=n, seed=SEED, duration_s=DURATION_S)
    with_apis = config.model_copy(
        update={"api_pools": tuple(ApiPoolConfig(provider=p) for p in API_PROVIDERS)}
    )
    homog = next(r["policies"]["homogeneous"] for r in rows if r["trace"] == name)
    out: dict[str, Any] = {"trace": name, "tasks": n, "providers": list(API_PROVIDERS)}
    for label, cfg in (("without", config), ("with", with_apis)):
        result = simulate(trace, cfg, catalog, "fleet", seed=SEED).to_dict()
        out[label] = {k: result[k] for k in SUMMARY_KEYS}
        out[label]["homogeneous_vs_this"] = (
            homog["cost_per_1k_tasks_usd"] / result["cost_per_1k_tasks_usd"]
        )
    out["homogeneous"] = {k: homog[k] for k in SUMMARY_KEYS if k in homog}
    return out


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
    api = out.get("api_pools")
    if api:
        print(
            f"\n{api['trace']} trace, fleet policy, without and with API pools ({', '.join(api['providers'])}):"
        )
        for label in ("without", "with"):
            r = api[label]
            print(
                f"  {label:8} API pools: cost ${r['total_cost_usd']:.2f} (API ${r['api_cost_usd']:.2f}, {r['api_calls']} calls),"
                f" SLO {r['slo_attainment']:.1%}, p95 {r['p95_latency_s']:.1f} s,"
                f" {r['homogeneous_vs_this']:.1f}x cheaper than homogeneous"
            )


if __name__ == "__main__":
    print_table(run())

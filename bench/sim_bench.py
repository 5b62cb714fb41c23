"""Trace benchmarks: fleet against honest baselines and the offline bounds, trace by trace.

The capacity is the cloud pools of ``infra/fleet.toml`` (its local emulated pools stand in
for the same offers and are left out so nothing is counted twice). Seeds are fixed, so the
table is reproducible: ``make bench`` or ``python -m bench.sim_bench``.

For each trace:

* ``fleet``, ``cheapest`` and ``homogeneous`` (the KEDA-like baseline of ``fleet.sim.keda``:
  one instance type, the cheapest pool offer that holds every task, scaled on queue length)
  on the whole config;
* **single types**: for each accelerator type among the pools, the ``fleet`` policy on a
  config holding only that type's pools (what the Melange paper compares against: the best
  one chip type under the same planner). Tasks none of those pools can run are rejected and
  count as SLO misses. The **best single type** is the cheapest (total cost) whose SLO
  attainment is at least fleet's minus 1 point (``best_single``); every type is reported
  with its attainment, valid or not;
* the bounds: the LP (``fleet.sim.lowerbound``: fractional device-time, no boot, below
  every policy) and the tight ILP reference (``fleet.sim.ilp``: whole instances per
  ``BUCKET_S`` bucket, boot charged; ``BOUND_TIME_S`` solver limit, NaN unless solved
  within its 1% gap).

Ratios are of total cost, fleet over the other (below 1: fleet is cheaper): fleet / best
single type, fleet / KEDA-like, fleet / tight bound, fleet / LP. Read them beside the SLO
columns: a cheaper run that misses more deadlines is not a better one.

``api_pools`` then replays the multi-agent trace with the ``fleet`` policy twice: on those
pools alone, and with the four catalog API providers (Cerebras, Groq, SambaNova,
Fireworks at their catalog rate limits) added as ``[[api_pools]]``, each against the
KEDA-like homogeneous baseline.

The independent runs go to a ``ProcessPoolExecutor`` of ``WORKERS`` processes, longest
(the ILP bounds) first.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fleet.autoscaler.apipools import ApiPoolConfig
from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.catalog import Catalog, default_catalog
from fleet.sim.engine import POLICIES, Simulation
from fleet.sim.generators import generate
from fleet.sim.trace import TraceEvent

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
SLO_TOLERANCE = 0.01  # a single type is valid when its SLO attainment is >= fleet's - 1 point
BUCKET_S = 300.0  # the tight bound's bucket, as `fleet simulate`'s default
BOUND_TIME_S = 60.0  # the tight bound's solver limit per trace, as `fleet simulate`'s default
WORKERS = 2
SUMMARY_KEYS = ("total_cost_usd", "cost_per_1k_tasks_usd", "slo_attainment", "p50_latency_s",
                "p95_latency_s", "completed", "rejected", "api_cost_usd", "api_calls",
                "instances_launched", "accelerators")  # fmt: skip

# A job: (kind, trace name, tasks, argument). Kinds: "policy" (argument: the policy),
# "single" (the accelerator), "lp", "tight", "api" ("without" or "with").
Job = tuple[str, str, int, str]


def best_single(
    singles: Mapping[str, Mapping[str, Any]], fleet_slo: float, tolerance: float = SLO_TOLERANCE
) -> str | None:
    """The best single type: the cheapest whose SLO attainment is >= ``fleet_slo - tolerance``.

    Args:
        singles: per accelerator type, its run's ``total_cost_usd`` and ``slo_attainment``.
        fleet_slo: the ``fleet`` policy's SLO attainment on the whole config (0 to 1).
        tolerance: how far below fleet's attainment a valid type may be (0.01: one point).

    Returns:
        The type's name (ties: the first by name), or None when no type is valid. Runs
        with a NaN cost or attainment are never valid.

    """
    valid = [
        (float(r["total_cost_usd"]), name)
        for name, r in singles.items()
        if r["slo_attainment"] >= fleet_slo - tolerance and not math.isnan(r["total_cost_usd"])
    ]
    return min(valid)[1] if valid else None


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when either is NaN or ``den`` is not positive."""
    if math.isnan(num) or math.isnan(den) or den <= 0:
        return math.nan
    return num / den


def cloud_config() -> AutoscalerConfig:
    """The cloud pools of ``infra/fleet.toml`` (local pools left out)."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    return base.model_copy(update={"pools": tuple(p for p in base.pools if p.provider != "local")})


def only_type(config: AutoscalerConfig, accelerator: str) -> AutoscalerConfig:
    """``config`` with only the pools of ``accelerator``."""
    pools = tuple(p for p in config.pools if p.accelerator == accelerator)
    return config.model_copy(update={"pools": pools})


def accelerator_types(config: AutoscalerConfig) -> list[str]:
    """The accelerator types among ``config``'s pools, in pool order."""
    return list(dict.fromkeys(p.accelerator for p in config.pools))


@functools.cache
def _trace(name: str, n: int) -> list[TraceEvent]:
    return generate(name, n=n, seed=SEED, duration_s=DURATION_S)


@functools.cache
def _setup() -> tuple[AutoscalerConfig, Catalog]:
    return cloud_config(), default_catalog()


def _simulate(trace: list[TraceEvent], config: AutoscalerConfig, policy: str) -> dict[str, Any]:
    catalog = _setup()[1]
    t0 = time.perf_counter()
    sim = Simulation(trace, config, catalog, policy, seed=SEED)
    out = sim.run().to_dict()
    out["sim_s"] = time.perf_counter() - t0
    if sim.homog is not None:  # the KEDA-like baseline: what it bought, and its target
        offer = sim.homog.priced.offer
        out["offer"] = f"{offer.cloud}/{offer.region}/{offer.instance_type}"
        out["market"] = sim.homog.priced.market.value
        out["usd_per_hour"] = sim.homog.priced.usd_per_hour
        out["tasks_per_instance"] = sim.keda[0]
    return out


def run_job(job: Job) -> tuple[Job, dict[str, Any]]:
    """Run one job (in a worker process); its result as JSON-ready data."""
    kind, name, n, arg = job
    config, catalog = _setup()
    trace = _trace(name, n)
    t0 = time.perf_counter()
    if kind == "policy":
        return job, _simulate(trace, config, arg)
    if kind == "single":
        return job, _simulate(trace, only_type(config, arg), "fleet")
    if kind == "api":
        if arg == "with":
            apis = tuple(ApiPoolConfig(provider=p) for p in API_PROVIDERS)
            config = config.model_copy(update={"api_pools": apis})
        return job, _simulate(trace, config, "fleet")
    if kind == "lp":
        from fleet.sim.lowerbound import lower_bound  # noqa: PLC0415 - solver imports are heavy

        lp = lower_bound(trace, catalog, config, bucket_s=BUCKET_S)
        return job, {
            "cost_usd": lp.cost_usd,
            "status": lp.status,
            "solve_s": time.perf_counter() - t0,
        }
    if kind == "tight":
        from fleet.sim.ilp import tight_bound  # noqa: PLC0415 - solver imports are heavy

        tb = tight_bound(trace, catalog, config, bucket_s=BUCKET_S, time_limit_s=BOUND_TIME_S)
        return job, {
            "cost_usd": tb.cost_usd,
            "status": tb.status,
            "incumbent_usd": tb.incumbent_usd,
            "dual_bound_usd": tb.dual_bound_usd,
            "gap": tb.gap,
            "bucket_s": tb.bucket_s,
            "solve_s": tb.solve_s,
        }
    raise ValueError(f"unknown job kind {kind!r}")


def jobs(config: AutoscalerConfig) -> list[Job]:
    """Every independent run, the solver jobs (the longest) first."""
    out: list[Job] = [("tight", name, n, "") for name, n in TRACES]
    out += [("lp", name, n, "") for name, n in TRACES]
    for name, n in TRACES:
        out += [("policy", name, n, policy) for policy in POLICIES]
        out += [("single", name, n, acc) for acc in accelerator_types(config)]
    out += [("api", *API_TRACE, label) for label in ("without", "with")]
    return out


def run(workers: int = WORKERS) -> dict[str, Any]:
    """Every trace: policies, single types, bounds and ratios; then the API-pool comparison."""
    t0 = time.perf_counter()
    config = cloud_config()
    with ProcessPoolExecutor(workers) as pool:
        done = dict(pool.map(run_job, jobs(config)))
    rows = [row(name, n, done, accelerator_types(config)) for name, n in TRACES]
    return {
        "seed": SEED,
        "duration_s": DURATION_S,
        "bucket_s": BUCKET_S,
        "bound_time_s": BOUND_TIME_S,
        "slo_tolerance": SLO_TOLERANCE,
        "rows": rows,
        "api_pools": api_pool_summary(done, rows),
        "workers": workers,
        "elapsed_s": time.perf_counter() - t0,
    }


def row(name: str, n: int, done: Mapping[Job, dict[str, Any]], types: list[str]) -> dict[str, Any]:
    """One trace's results, best single type and ratios."""
    policies = {p: done["policy", name, n, p] for p in POLICIES}
    singles = {acc: done["single", name, n, acc] for acc in types}
    fleet = policies["fleet"]
    best = best_single(singles, fleet["slo_attainment"])
    best_cost = singles[best]["total_cost_usd"] if best is not None else math.nan
    tight, lp = done["tight", name, n, ""], done["lp", name, n, ""]
    cost = fleet["total_cost_usd"]
    return {
        "trace": name,
        "tasks": n,
        "policies": policies,
        "single_types": singles,
        "best_single": best,
        "tight_bound": tight,
        "lp_bound": lp,
        "lower_bound_usd": lp["cost_usd"],
        "fleet_over_best_single": ratio(cost, best_cost),
        "fleet_over_keda": ratio(cost, policies["homogeneous"]["total_cost_usd"]),
        "fleet_over_tight_bound": ratio(cost, tight["cost_usd"]),
        "fleet_over_lp_bound": ratio(cost, lp["cost_usd"]),
    }


def api_pool_summary(
    done: Mapping[Job, dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The multi-agent trace, fleet policy, without and with API pools, vs KEDA-like homogeneous."""
    name, n = API_TRACE
    homog = next(r["policies"]["homogeneous"] for r in rows if r["trace"] == name)
    out: dict[str, Any] = {"trace": name, "tasks": n, "providers": list(API_PROVIDERS)}
    for label in ("without", "with"):
        result = done["api", name, n, label]
        out[label] = {k: result[k] for k in SUMMARY_KEYS}
        out[label]["homogeneous_vs_this"] = ratio(homog["total_cost_usd"], result["total_cost_usd"])
    out["homogeneous"] = {k: homog[k] for k in SUMMARY_KEYS if k in homog}
    return out


def _line(trace: str, label: str, r: Mapping[str, Any]) -> str:
    return (
        f"{trace:17} {label:26} {r['total_cost_usd']:>9.2f} {r['cost_per_1k_tasks_usd']:>9.2f}"
        f" {r['p50_latency_s']:>7.1f} {r['p95_latency_s']:>8.1f} {r['slo_attainment']:>7.1%}"
        f" {r['completed']:>5}/{r['tasks']:<5}"
    )


def print_table(out: dict[str, Any]) -> None:
    """Every run per trace, then one summary row per trace, then the API-pool comparison."""
    print(
        f"{'trace':17} {'run':26} {'cost $':>9} {'$/1k':>9} {'p50 s':>7} {'p95 s':>8}"
        f" {'SLO':>7} {'done':>11}"
    )
    for r in out["rows"]:
        for policy, res in r["policies"].items():
            label = "homogeneous (KEDA-like)" if policy == "homogeneous" else policy
            print(_line(r["trace"], label, res))
        for acc, res in r["single_types"].items():
            mark = " *" if acc == r["best_single"] else ""
            print(_line(r["trace"], f"only {acc}{mark}", res))
        for label, b in (("tight bound (ILP)", r["tight_bound"]), ("LP bound", r["lp_bound"])):
            print(f"{r['trace']:17} {label:26} {b['cost_usd']:>9.2f}   {b['status']}")
    print("* the best single type: the cheapest with SLO >= fleet's - 1 point\n")
    print(
        f"{'trace':17} {'fleet $ (SLO)':>16} {'best single $ (SLO)':>32} {'KEDA-like $ (SLO)':>19}"
        f" {'tight $':>8} {'LP $':>7} {'f/best':>7} {'f/KEDA':>7} {'f/tight':>7}"
    )
    for r in out["rows"]:
        fleet, keda = r["policies"]["fleet"], r["policies"]["homogeneous"]
        best = r["single_types"].get(r["best_single"] or "", None)
        best_text = (
            f"{r['best_single']} {best['total_cost_usd']:.2f} ({best['slo_attainment']:.1%})"
            if best is not None
            else "none valid"
        )
        print(
            f"{r['trace']:17} {fleet['total_cost_usd']:>8.2f} ({fleet['slo_attainment']:.1%})"
            f" {best_text:>32} {keda['total_cost_usd']:>8.2f} ({keda['slo_attainment']:.1%})"
            f" {r['tight_bound']['cost_usd']:>8.2f} {r['lp_bound']['cost_usd']:>7.2f}"
            f" {r['fleet_over_best_single']:>7.2f} {r['fleet_over_keda']:>7.3f}"
            f" {r['fleet_over_tight_bound']:>7.2f}"
        )
    for r in out["rows"]:
        keda = r["policies"]["homogeneous"]
        print(
            f"KEDA-like on {r['trace']}: {keda.get('offer')} {keda.get('market')}"
            f" ${keda.get('usd_per_hour', math.nan):.2f}/h,"
            f" {keda.get('tasks_per_instance')} tasks per instance"
        )
    if "elapsed_s" in out:
        print(f"({out['elapsed_s']:.0f} s on {out['workers']} worker processes)")
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
                f" KEDA-like homogeneous / this {r['homogeneous_vs_this']:.1f}x"
            )


if __name__ == "__main__":
    print_table(run())

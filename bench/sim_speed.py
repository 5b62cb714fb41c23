"""Simulator speed: tasks simulated per second, ``fleet`` policy, at 2,000, 20,000 and 100,000 tasks.

The trace is ``multi-agent`` (``fleet.sim.generators``, seed 1, one hour, so a larger trace is
a denser one); the capacity the cloud pools of ``infra/fleet.toml`` (local pools left out, as
in ``bench.sim_bench``). Only ``simulate`` is timed (the trace is generated first), in wall time
and in CPU time, the steadier figure on a shared machine.

``place_share`` is the part of the CPU time spent in ``fleet.placement.place`` (timed by
wrapping it, which adds about a microsecond per task); ``tick_share`` the part spent building
the planner's snapshot and in ``fleet.autoscaler.planner`` (``plan``, ``busy_pools``): a cost
per simulated ``loop_interval_s`` rather than per task, which is why the smallest trace costs
more per task.
``growth`` is CPU ms per task at the largest size over that at the smallest: at most 1.0 when
the simulator is linear in its tasks.

``python -m bench.sim_speed`` (``--sizes 2000,20000`` for a quicker run).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from fleet import placement
from fleet.autoscaler import planner
from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.catalog import Catalog, default_catalog
from fleet.sim import engine, snapshot
from fleet.sim.generators import generate

ROOT = Path(__file__).resolve().parents[1]
TRACE = "multi-agent"
SIZES = (2_000, 20_000, 100_000)
SEED = 1
DURATION_S = 3600.0
POLICY = "fleet"


def cloud_config() -> AutoscalerConfig:
    """The cloud pools of infra/fleet.toml (its local pools stand in for the same offers)."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    return base.model_copy(update={"pools": tuple(p for p in base.pools if p.provider != "local")})


def _cpu_timer(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """``fn``, adding the CPU seconds each call takes to ``spent[0]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - a transparent wrapper
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - t0

    return timed


def measure(n: int, config: AutoscalerConfig, catalog: Catalog) -> dict[str, Any]:
    """Simulate ``n`` tasks of the trace once; timings and what the run reported."""
    trace = generate(TRACE, n=n, seed=SEED, duration_s=DURATION_S)
    in_place, in_ticks = [0.0], [0.0]
    timed = {
        "place": _cpu_timer(placement.place, in_place),
        "plan": _cpu_timer(planner.plan, in_ticks),
        "busy_pools": _cpu_timer(planner.busy_pools, in_ticks),
        "build_snapshot": _cpu_timer(snapshot.build_snapshot, in_ticks),
    }
    with contextlib.ExitStack() as patches:
        for name, fn in timed.items():
            patches.enter_context(mock.patch(f"fleet.sim.engine.{name}", fn))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = engine.simulate(trace, config, catalog, POLICY, seed=SEED)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "tasks": n,
        "sim_s": wall,
        "cpu_s": cpu,
        "tasks_per_s": n / wall,
        "ms_per_task": 1000 * wall / n,
        "cpu_ms_per_task": 1000 * cpu / n,
        "place_share": in_place[0] / cpu,
        "tick_share": in_ticks[0] / cpu,
        "completed": result.completed,
        "total_cost_usd": result.total_cost_usd,
    }


def run(sizes: Sequence[int] = SIZES) -> dict[str, Any]:
    """Each size once, smallest first."""
    config, catalog = cloud_config(), default_catalog()
    rows = [measure(n, config, catalog) for n in sorted(sizes)]
    return {
        "trace": TRACE,
        "seed": SEED,
        "duration_s": DURATION_S,
        "policy": POLICY,
        "rows": rows,
        "growth": rows[-1]["cpu_ms_per_task"] / rows[0]["cpu_ms_per_task"],
    }


def print_table(out: dict[str, Any]) -> None:
    """The speed table."""
    print(
        f"simulator speed: {out['trace']} trace (seed {out['seed']}, {out['duration_s']:g} s),"
        f" {out['policy']} policy"
    )
    print(
        f"{'tasks':>8} {'sim s':>8} {'tasks/s':>9} {'ms/task':>8} {'cpu ms/task':>12}"
        f" {'in place()':>11} {'in ticks':>9}"
    )
    for r in out["rows"]:
        print(
            f"{r['tasks']:>8,} {r['sim_s']:>8.2f} {r['tasks_per_s']:>9,.0f} {r['ms_per_task']:>8.3f}"
            f" {r['cpu_ms_per_task']:>12.3f} {r['place_share']:>11.0%} {r['tick_share']:>9.0%}"
        )
    print(f"cpu ms per task, largest over smallest: {out['growth']:.2f} (at most 1.0: linear)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.sim_speed [--sizes 2000,20000,100000]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    args = parser.parse_args(argv)
    print_table(run([int(s) for s in args.sizes.split(",")]))


if __name__ == "__main__":
    main()

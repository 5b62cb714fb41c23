"""``make bench``: system benchmarks, each a ratio against a baseline measured in the same run.

* submit: ``Fleet.submit`` vs a plain Celery ``apply_async`` of the same message; and
  ``submit_many`` of 1,000 and 10,000 tasks vs a loop of ``apply_async``
  (``bench.submit_bench``). Targets: at most 1.05x; at least 20x faster.
* worker: trivial tasks drained by a ``fleet worker`` vs two plain Celery workers, the bench's
  (Celery's defaults) and one configured like fleet (``bench.worker_bench``). Targets:
  >= 0.9x the first and >= 1.2x the second; idle resident memory within 1.2x.
* reaction, plan: scale-up reaction on the local provider; planning time at scale.
* engines: real engines through a ``fleet worker`` vs the same engine called directly, and
  start-to-ready per engine (``bench.engines_bench``). Target: >= 0.90x.
* traces: the trace x policy table through the simulator against the KEDA-like baseline,
  the best single chip type and the bounds (``bench.sim_bench``).
* sim_speed: simulator tasks per second at 2,000, 20,000 and 100,000 tasks
  (``bench.sim_speed``). Target: 100,000 in under 15 s.
* melange: the Mélange reproduction, fleet's GPU mix vs the best single type per workload,
  TPOT goal and rate (``bench.melange``; about 10-15 minutes on 2 cores).

Runs on a private Redis started for the purpose (``FLEET_BENCH_BROKER_URL`` overrides).
``--only submit,worker`` runs some parts (``PARTS``); results are printed and written to
``bench/results/latest.json`` (a partial run updates only its parts there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from bench import (
    engines_bench,
    melange,
    plan_bench,
    reaction,
    sim_bench,
    sim_speed,
    submit_bench,
    worker_bench,
)
from fleet.embedded import embedded_redis

RESULTS = Path(__file__).parent / "results" / "latest.json"
PARTS = ("submit", "worker", "reaction", "engines", "plan", "traces", "sim_speed", "melange")


@contextmanager
def broker() -> Iterator[str]:
    """The benchmark broker: FLEET_BENCH_BROKER_URL or a private Redis."""
    url = os.environ.get("FLEET_BENCH_BROKER_URL")
    if url:
        yield url
        return
    with embedded_redis() as started:
        yield started


def run_parts(parts: tuple[str, ...]) -> dict[str, Any]:
    """Run the named parts; each on a flushed broker database."""
    out: dict[str, Any] = {}
    with broker() as url:
        client = redis.Redis.from_url(url)
        for part, fn in (
            ("submit", submit_bench.run),
            ("worker", worker_bench.run),
            ("reaction", reaction.run),
            ("engines", engines_bench.run),
        ):
            if part in parts:
                client.flushdb()
                out[part] = fn(url)
    if "plan" in parts:
        out["plan"] = plan_bench.run()
    if "traces" in parts:
        out["traces"] = sim_bench.run()
    if "sim_speed" in parts:
        out["sim_speed"] = sim_speed.run()
    if "melange" in parts:
        out["melange"] = melange.run()
    return out


def print_tables(out: dict[str, Any]) -> None:
    """The table of every part that ran."""
    print(f"{'benchmark':48} {'fleet':>11} {'baseline':>11} {'ratio':>7}  target")
    if "submit" in out:
        submit_bench.print_table(out["submit"])
    if "worker" in out:
        worker_bench.print_table(out["worker"])
    if "reaction" in out:
        r = out["reaction"]
        print(
            f"{'scale-up reaction (backlog -> running)':48} {r['median_s']:>9.1f} s"
            f" {'KEDA 30 s':>11} {'':>7}  < 10 s {'ok' if r['met'] else 'MISSED'}"
        )
    if "plan" in out:
        p = out["plan"]
        for pools, ms in zip(p["pools"], p["ms"], strict=True):
            print(
                f"{f'plan, {pools:,} pools x 500 queues':48} {ms:>8.1f} ms {'':>11} {'':>7}"
                "  < 100 ms at 1,000"
            )
    if "traces" in out:
        print()
        sim_bench.print_table(out["traces"])
    if "engines" in out:
        print()
        engines_bench.print_table(out["engines"])
    if "sim_speed" in out:
        print()
        sim_speed.print_table(out["sim_speed"])
    if "melange" in out:
        print()
        melange.print_table(out["melange"])


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for (all by default), print the tables, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    out: dict[str, Any] = {
        "command": "make bench"
        if set(parts) == set(PARTS)
        else f"python -m bench.run --only {','.join(parts)}",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **run_parts(parts),
    }
    print_tables(out)
    ran = {p: {"command": out["command"], "when": out["when"]} for p in parts}
    if set(parts) != set(PARTS):  # a partial run keeps the other parts' last figures
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        ran = {**previous.get("parts", {}), **ran}
        out = {**{k: v for k, v in previous.items() if k in PARTS}, **out}
    out["parts"] = ran
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    shown = RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS
    print(f"written to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: system benchmarks, each a ratio against a baseline measured in the same run.

* submit: ``Fleet.submit`` (validate, place, publish) vs a plain Celery ``apply_async`` of
  the same message to the same queue. Target: at most 1.05x.
* bulk: ``Fleet.submit_many`` of 10,000 tasks vs a loop of ``apply_async``. Target: >= 10x faster.
* worker: trivial tasks drained by a ``fleet worker`` vs a plain Celery worker, same pool
  and concurrency. Target: at least as fast; idle resident memory within 1.2x.
* engines: real engines through a ``fleet worker`` vs the same engine called directly, and
  start-to-ready per engine (``bench.engines_bench``). Target: >= 0.90x.

Runs on a private Redis started for the purpose (``FLEET_BENCH_BROKER_URL`` overrides).
Results are printed and written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench import engines_bench, plan_bench, reaction, sim_bench
from fleet.app import TASK_NAME, TIME_LIMITS, create_app
from fleet.client import Fleet
from fleet.embedded import embedded_redis
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from fleet.spec import TaskKind, parse_spec

RESULTS = Path(__file__).parent / "results" / "latest.json"
ROUNDS = 7
PER_ROUND = 1500
BULK = 10_000
WORKER_TASKS = 2000

SPEC = parse_spec(
    {
        "kind": "inference",
        "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
        "input": {"prompt": "hello", "seed": 1},
        "tokens_in": 200,
        "tokens_out": 20,
        "slo": {"deadline_s": 60},
    }
)
NOOP = parse_spec(
    {
        "kind": "batch",
        "model": {"name": "noop", "params_b": 0.001, "dtype": "fp32"},
        "input": {"op": "noop"},
        "requirements": {"accelerators": ["cpu"]},
    }
)


@contextmanager
def broker() -> Iterator[str]:
    """The benchmark broker: FLEET_BENCH_BROKER_URL or a private Redis."""
    url = os.environ.get("FLEET_BENCH_BROKER_URL")
    if url:
        yield url
        return
    with embedded_redis() as started:
        yield started


def per_op(fn: Callable[[], None], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def baseline_task(fleet: Fleet) -> Any:  # noqa: ANN401 - a Celery task object
    """``fleet.run`` registered on a plain app of the same config, so ``apply_async`` is plain Celery."""
    baseline_app = create_app(fleet.settings)

    @baseline_app.task(name=TASK_NAME)
    def run(spec: dict[str, Any], placement: dict[str, Any] | None = None) -> None:
        """Stand-in registration; never executed here."""

    return run


def bench_submit(fleet: Fleet, client: redis.Redis) -> dict[str, Any]:
    """Fleet.submit vs apply_async of the same message, interleaved rounds, medians."""
    placement = fleet.route(SPEC)
    run = baseline_task(fleet)

    body = SPEC.model_dump(mode="json")
    kwargs = Fleet._kwargs(placement)  # noqa: SLF001 - the exact kwargs submit sends
    limit = TIME_LIMITS[TaskKind.INFERENCE]
    options = {
        "queue": placement.queue,
        "routing_key": placement.queue,
        "priority": 9 - SPEC.priority,
        "time_limit": limit,
        "soft_time_limit": limit - 60,
    }

    def plain() -> None:
        run.apply_async(args=(body,), kwargs=kwargs, **options)

    def ours() -> None:
        fleet.submit(SPEC)

    for fn in (plain, ours):  # warm up connections and caches
        per_op(fn, 200)
    plain_t: list[float] = []
    ours_t: list[float] = []
    for _ in range(ROUNDS):
        plain_t.append(per_op(plain, PER_ROUND))
        ours_t.append(per_op(ours, PER_ROUND))
        client.flushdb()
    p, o = statistics.median(plain_t), statistics.median(ours_t)
    return {
        "apply_async_us": p * 1e6,
        "fleet_submit_us": o * 1e6,
        "ratio": o / p,
        "target": "<= 1.05",
        "met": o / p <= 1.05,
        "rounds": ROUNDS,
        "per_round": PER_ROUND,
    }


def bench_bulk(fleet: Fleet, client: redis.Redis) -> dict[str, Any]:
    """submit_many(10,000) vs a loop of 10,000 apply_async."""
    specs = [SPEC] * BULK
    placement = fleet.route(SPEC)
    body = SPEC.model_dump(mode="json")
    kwargs = Fleet._kwargs(placement)  # noqa: SLF001 - the exact kwargs submit sends
    run = baseline_task(fleet)
    t0 = time.perf_counter()
    for _ in range(BULK):
        run.apply_async(
            args=(body,), kwargs=kwargs, queue=placement.queue, routing_key=placement.queue
        )
    loop_s = time.perf_counter() - t0
    client.flushdb()
    t0 = time.perf_counter()
    handles = fleet.submit_many(specs)
    bulk_s = time.perf_counter() - t0
    queues = {h.placement.queue for h in handles}
    landed = sum(int(client.llen(k)) for q in queues for k in client.scan_iter(match=f"{q}*"))
    client.flushdb()
    return {
        "loop_s": loop_s,
        "submit_many_s": bulk_s,
        "speedup": loop_s / bulk_s,
        "target": ">= 10",
        "met": loop_s / bulk_s >= 10,
        "tasks": BULK,
        "messages_landed": landed,
    }


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (kB, from /proc)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def drain_time(
    app: Celery, node: str, queue: str, client: redis.Redis, publish: Callable[[], None]
) -> float:
    """Publish while the worker is not consuming ``queue``, then time it draining the backlog.

    Uses Celery's own remote control (``cancel_consumer`` / ``add_consumer``) so that
    publishing speed does not enter the measurement.
    """
    app.control.cancel_consumer(queue, destination=[node], reply=True)
    publish()
    t0 = time.perf_counter()
    app.control.add_consumer(queue, destination=[node], reply=True)
    while (
        client.llen(queue)
        or client.hlen("unacked")
        or any(client.llen(f"{queue}:{p}") for p in range(1, 10))
    ):
        time.sleep(0.005)
    return time.perf_counter() - t0


def bench_worker(url: str, fleet: Fleet, client: redis.Redis, log_dir: Path) -> dict[str, Any]:
    """Trivial tasks through a fleet worker vs a plain Celery worker (prefork, concurrency 2)."""
    env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
    results: dict[str, Any] = {"tasks": WORKER_TASKS, "pool": "prefork", "concurrency": 2}
    # fleet worker
    worker = spawn_worker(env, "cpu", log_dir, concurrency=2, loglevel="WARNING")
    try:
        wait_ready(fleet.app, [worker])
        time.sleep(2)
        results["fleet_idle_rss_mb"] = tree_rss_kb(worker.proc.pid) / 1024
        queue = fleet.route(NOOP).queue
        results["fleet_s"] = drain_time(
            fleet.app, worker.node, queue, client, lambda: fleet.submit_many([NOOP] * WORKER_TASKS)
        )
    finally:
        stop_workers([worker])
    client.flushdb()
    # plain celery worker
    os.environ["FLEET_BROKER_URL"] = url  # bench.plain_app reads it at import
    from bench.plain_app import app as plain_app  # noqa: PLC0415 - needs FLEET_BROKER_URL set first

    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.plain_app",
        "worker",
        "-Q",
        "bench.plain",
        "-c",
        "2",
        "-P",
        "prefork",
        "-n",
        "plain@bench",
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
    ]
    log = (log_dir / "plain.log").open("wb")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not plain_app.control.ping(destination=["plain@bench"], timeout=0.5):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((log_dir / "plain.log").read_text()[-2000:])
        time.sleep(2)
        results["plain_idle_rss_mb"] = tree_rss_kb(proc.pid) / 1024
        body = NOOP.model_dump(mode="json")

        def publish() -> None:
            with plain_app.producer_or_acquire() as producer, producer.batch(1000):
                for _ in range(WORKER_TASKS):
                    plain_app.send_task(
                        "plain.noop", args=(body,), queue="bench.plain", producer=producer
                    )

        results["plain_s"] = drain_time(plain_app, "plain@bench", "bench.plain", client, publish)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    results["fleet_tasks_per_s"] = WORKER_TASKS / results["fleet_s"]
    results["plain_tasks_per_s"] = WORKER_TASKS / results["plain_s"]
    results["throughput_ratio"] = results["fleet_tasks_per_s"] / results["plain_tasks_per_s"]
    results["rss_ratio"] = results["fleet_idle_rss_mb"] / results["plain_idle_rss_mb"]
    results["throughput_met"] = results["throughput_ratio"] >= 1.0
    results["rss_met"] = results["rss_ratio"] <= 1.2
    results["met"] = results["throughput_met"] and results["rss_met"]
    results["target"] = "throughput >= 1.0x, idle RSS <= 1.2x"
    return results


def main() -> int:
    """Run everything, print a table, write the JSON."""
    out: dict[str, Any] = {
        "command": "make bench",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with broker() as url, tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        client = redis.Redis.from_url(url)
        client.flushdb()
        with Fleet(settings) as fleet:
            out["submit"] = bench_submit(fleet, client)
            out["bulk"] = bench_bulk(fleet, client)
            out["worker"] = bench_worker(url, fleet, client, Path(tmp))
        client.flushdb()
        out["reaction"] = reaction.run(url)
        client.flushdb()
        out["engines"] = engines_bench.run(url)
    out["plan"] = plan_bench.run()
    out["traces"] = sim_bench.run()
    s, b, w = out["submit"], out["bulk"], out["worker"]
    print(f"{'benchmark':34} {'fleet':>14} {'baseline':>14} {'ratio':>8}  target")
    print(
        f"{'submit, per task':34} {s['fleet_submit_us']:>11.0f} us {s['apply_async_us']:>11.0f} us {s['ratio']:>7.3f}x  <= 1.05x {'ok' if s['met'] else 'MISSED'}"
    )
    print(
        f"{'bulk submit, 10,000 tasks':34} {b['submit_many_s']:>12.2f} s {b['loop_s']:>12.2f} s {b['speedup']:>7.1f}x  >= 10x faster {'ok' if b['met'] else 'MISSED'}"
    )
    print(
        f"{'worker, trivial tasks/s':34} {w['fleet_tasks_per_s']:>14.0f} {w['plain_tasks_per_s']:>14.0f} {w['throughput_ratio']:>7.2f}x  >= 1.0x {'ok' if w['throughput_met'] else 'MISSED'}"
    )
    print(
        f"{'worker, idle RSS':34} {w['fleet_idle_rss_mb']:>11.1f} MB {w['plain_idle_rss_mb']:>11.1f} MB {w['rss_ratio']:>7.2f}x  <= 1.2x {'ok' if w['rss_met'] else 'MISSED'}"
    )
    r, p = out["reaction"], out["plan"]
    print(
        f"{'scale-up reaction (backlog -> running)':34} {r['median_s']:>12.1f} s {'KEDA polls 30 s':>14} {'':>8}  < 10 s {'ok' if r['met'] else 'MISSED'}"
    )
    for pools, ms in zip(p["pools"], p["ms"], strict=True):
        print(
            f"{f'plan, {pools:,} pools x 500 queues':34} {ms:>11.1f} ms {'':>14} {'':>8}  < 100 ms at 1,000"
        )
    print()
    sim_bench.print_table(out["traces"])
    print()
    engines_bench.print_table(out["engines"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"written to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

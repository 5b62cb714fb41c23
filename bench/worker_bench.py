"""Worker throughput: a fleet worker against two plain Celery workers, in interleaved rounds.

Three workers, each prefork at concurrency 2, drain trivial tasks (fleet's ``batch`` ``noop``):

* ``fleet``: ``fleet worker --accelerator cpu --devices 2 --concurrency 2`` (the at-most-once
  guard, the spec check, the device lease, the reference engine), fed by ``submit_many``
  one task per message (``fleet``) and, as a second side on the same worker, ``PACK``
  tasks per message (``fleet_pack``: ``submit_many(pack=PACK)``, each task still its own
  task id, guard and records);
* ``plain``: the bench's plain Celery worker (``bench.plain_app``): Celery's defaults,
  so early acks, prefetch 4 per process, no STARTED record, one queue;
* ``like``: a plain Celery worker configured like fleet (``bench.like_app``): late
  acks, reject on worker loss, prefetch 1, STARTED records, fleet's transport options and
  result backend, as many queues as the fleet worker consumes, and the same message options
  (priority, time limits) and kwargs as fleet's messages.

A round publishes a backlog of ``tasks`` tasks to each worker's queue while that worker
does not consume it (Celery's ``cancel_consumer``), then times the drain from
``add_consumer`` until the queue and the unacked set are empty and every task's result is
stored as a SUCCESS. The order of the sides rotates each round and the medians count: the
machine may be loaded by other work, and a median of interleaved rounds is what stays
comparable. Targets: fleet >= 1.2x ``like`` and
>= 0.9x ``plain``, judged on ``fleet_pack`` (the ratios of one task per message are
reported beside them); idle resident memory (main process and pool) <= 1.2x ``plain``.

``python -m bench.worker_bench`` runs this part alone on a private Redis.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from fleet.catalog import default_catalog
from fleet.client import Fleet
from fleet.embedded import embedded_redis
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.queues import queues_for_worker
from fleet.settings import Settings
from fleet.spec import parse_spec

ROUNDS = 5
TASKS = 2000
CONCURRENCY = 2
SIDES = ("fleet", "fleet_pack", "plain", "like")
FLEET_SIDES = ("fleet", "fleet_pack")
PACK = 16
TARGETS = {"like": 1.2, "plain": 0.9}
RSS_TARGET = 1.2
NOOP = parse_spec(
    {
        "kind": "batch",
        "model": {"name": "noop", "params_b": 0.001, "dtype": "fp32"},
        "input": {"op": "noop"},
        "requirements": {"accelerators": ["cpu"]},
    }
)


@dataclass
class Side:
    """One worker under test: how to reach it, and how to give it work."""

    name: str
    app: Celery
    node: str
    queue: str
    pid: int
    publish: Callable[[int], list[str]]  # publishes n tasks, returns their ids


def summarize(rounds: list[dict[str, float]], tasks: int) -> dict[str, Any]:
    """Medians, ratios and targets from per-round drain times in seconds (pure).

    ``rounds`` holds one ``{side: seconds}`` per round; a ratio is a fleet side's tasks/s
    over a plain side's, so above 1 means fleet is faster. Targets are judged on
    ``fleet_pack``.
    """
    med = {s: statistics.median(r[s] for r in rounds) for s in SIDES}
    rate = {s: tasks / med[s] for s in SIDES}
    ratios = {f: {p: rate[f] / rate[p] for p in TARGETS} for f in FLEET_SIDES}
    return {
        "tasks_per_s": rate,
        "median_s": med,
        "rounds_s": {s: [r[s] for r in rounds] for s in SIDES},
        "ratios": ratios,
        "pack": PACK,
        "targets": {f"vs_{p}": f">= {t} (fleet_pack)" for p, t in TARGETS.items()},
        "met": {f"vs_{p}": ratios["fleet_pack"][p] >= t for p, t in TARGETS.items()},
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


def _backlog(client: redis.Redis, queue: str) -> int:
    keys = [queue, *(f"{queue}:{p}" for p in range(1, 10))]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        pipe.hlen("unacked")
        return sum(int(n) for n in pipe.execute())


def _stored(client: redis.Redis, ids: list[str]) -> int:
    """How many of ``ids`` have a SUCCESS record in the result backend."""
    done = 0
    for i in range(0, len(ids), 1000):
        for raw in client.mget([f"celery-task-meta-{t}" for t in ids[i : i + 1000]]):
            done += raw is not None and json.loads(raw).get("status") == "SUCCESS"
    return done


def drain(side: Side, client: redis.Redis, tasks: int) -> float:
    """Seconds ``side`` takes to drain a backlog of ``tasks`` published while it did not consume.

    Raises:
        RuntimeError: not every task's result was a SUCCESS afterwards.

    """
    side.app.control.cancel_consumer(side.queue, destination=[side.node], reply=True)
    ids = side.publish(tasks)
    t0 = time.perf_counter()
    side.app.control.add_consumer(side.queue, destination=[side.node], reply=True)
    while _backlog(client, side.queue):  # a cheap poll: the benchmark must not load the machine
        time.sleep(0.01)
    deadline = time.monotonic() + 30  # then every result (early acks: the last may still run)
    while (stored := _stored(client, ids)) < tasks and time.monotonic() < deadline:
        time.sleep(0.002)
    seconds = time.perf_counter() - t0
    if stored != tasks:
        states = [client.get(f"celery-task-meta-{t}") for t in ids]
        odd = [
            (t, s) for t, s in zip(ids, states, strict=True) if s is None or b'"SUCCESS"' not in s
        ]
        raise RuntimeError(f"{side.name}: {stored} of {tasks} results stored; not: {odd[:3]}")
    return seconds


def _plain_worker(app_path: str, queues: list[str], node: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    cmd = [
        sys.executable, "-m", "celery", "-A", app_path, "worker", "-Q", ",".join(queues),
        "-c", str(CONCURRENCY), "-P", "prefork", "-n", node, "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def _wait_plain(app: Celery, node: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[node], timeout=0.5):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])


@contextmanager
def workers(url: str, fleet: Fleet, log_dir: Path) -> Iterator[dict[str, Side]]:
    """Start the three workers (one after another, each answering ping), stop them after."""
    fleet_queues = queues_for_worker(default_catalog().family("cpu"), CONCURRENCY)
    env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
    env["BENCH_LIKE_QUEUES"] = str(len(fleet_queues))
    os.environ.update(env)  # bench.plain_app and bench.like_app read them at import
    from bench.like_app import app as like_app  # noqa: PLC0415 - needs the environment first
    from bench.like_app import queue_names  # noqa: PLC0415
    from bench.plain_app import app as plain_app  # noqa: PLC0415

    like_queues = queue_names(len(fleet_queues))
    placement = fleet.route(NOOP)
    message = fleet.message_options(NOOP, placement)
    like_options = {**message["options"], "queue": like_queues[0], "routing_key": like_queues[0]}
    body = NOOP.model_dump(mode="json")

    def publish_fleet(pack: int) -> Callable[[int], list[str]]:
        def publish(n: int) -> list[str]:
            return [h.id for h in fleet.submit_many([NOOP] * n, pack=pack)]

        return publish

    def publish_with(app: Celery, **options: Any) -> Callable[[int], list[str]]:  # noqa: ANN401 - Celery's options
        def publish(n: int) -> list[str]:
            with app.producer_or_acquire() as producer, producer.batch(1000):
                return [
                    app.send_task("plain.noop", args=(body,), producer=producer, **options).id
                    for _ in range(n)
                ]

        return publish

    with ExitStack() as stack:
        worker = spawn_worker(
            env, "cpu", log_dir, devices=CONCURRENCY, concurrency=CONCURRENCY, loglevel="WARNING"
        )
        stack.callback(stop_workers, [worker])
        wait_ready(fleet.app, [worker])
        sides = {
            name: Side(name, fleet.app, worker.node, placement.queue, worker.proc.pid, publish_fleet(pack))
            for name, pack in (("fleet", 1), ("fleet_pack", PACK))
        }  # fmt: skip
        for name, app, path, queues, publish in (
            ("plain", plain_app, "bench.plain_app", ["bench.plain"],
             publish_with(plain_app, queue="bench.plain")),
            ("like", like_app, "bench.like_app", like_queues,
             publish_with(like_app, kwargs=message["kwargs"], **like_options)),
        ):  # fmt: skip
            node, log = f"{name}@bench", log_dir / f"{name}.log"
            proc = _plain_worker(path, queues, node, env, log)
            stack.callback(_stop, proc)
            _wait_plain(app, node, proc, log)
            sides[name] = Side(name, app, node, queues[0], proc.pid, publish)
        yield sides


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(url: str, rounds: int = ROUNDS, tasks: int = TASKS) -> dict[str, Any]:
    """The worker benchmark on the Redis at ``url`` (see the module docstring)."""
    settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
    client = redis.Redis.from_url(url)
    with (
        tempfile.TemporaryDirectory(prefix="fleet-worker-bench-") as tmp,
        Fleet(settings) as fleet,
        workers(url, fleet, Path(tmp)) as sides,
    ):
        time.sleep(2)  # idle memory after start-up settles
        rss = {s: tree_rss_kb(sides[s].pid) / 1024 for s in ("fleet", "plain", "like")}
        for side in sides.values():  # warm up: first tasks import and connect
            drain(side, client, 200)
        times: list[dict[str, float]] = []
        for r in range(rounds):
            k = r % len(SIDES)
            times.append({s: drain(sides[s], client, tasks) for s in SIDES[k:] + SIDES[:k]})
    out = summarize(times, tasks)
    out |= {
        "tasks": tasks,
        "rounds": rounds,
        "pool": "prefork",
        "concurrency": CONCURRENCY,
        "idle_rss_mb": rss,
        "rss_ratio": rss["fleet"] / rss["plain"],
        "rss_met": rss["fleet"] / rss["plain"] <= RSS_TARGET,
    }
    return out


def print_table(w: dict[str, Any]) -> None:
    """The worker rows of ``make bench``'s table."""
    rate, ok = w["tasks_per_s"], {True: "ok", False: "MISSED"}
    for side, label in (("fleet", "1 task/message"), ("fleet_pack", f"{w['pack']} tasks/message")):
        for plain, name, target in (("plain", "defaults", 0.9), ("like", "like fleet", 1.2)):
            ratio = w["ratios"][side][plain]
            judged = f"  >= {target}x {ok[w['met'][f'vs_{plain}']]}" if side == "fleet_pack" else ""
            print(
                f"{f'worker, {label} vs Celery ({name})':48} {rate[side]:>8.0f} /s"
                f" {rate[plain]:>8.0f} /s {ratio:>6.2f}x{judged}"
            )
    rss = w["idle_rss_mb"]
    print(
        f"{'worker, idle RSS vs Celery (defaults)':48} {rss['fleet']:>8.1f} MB"
        f" {rss['plain']:>8.1f} MB {w['rss_ratio']:>6.2f}x  <= 1.2x {ok[w['rss_met']]}"
    )


def main() -> int:
    """Run this part alone on a private Redis; print the rows and the JSON."""
    rounds = int(os.environ.get("BENCH_ROUNDS") or ROUNDS)
    with embedded_redis() as url:
        out = run(url, rounds)
    print_table(out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Submission overhead: fleet's client against plain Celery publishing the same messages.

* submit: ``Fleet.submit`` (validate, place, publish) vs a plain Celery ``apply_async`` of
  the same message (body, options, queue), ``PER_ROUND`` calls a round. Target <= 1.05x.
* submit_many at ``BULK_SIZES`` tasks: ``Fleet.submit_many`` of one spec repeated (one
  task per message) vs a loop of ``apply_async`` of the same message. Target >= 20x faster.

Rounds alternate the two sides (which goes first alternates too); each side's median round
counts, because the machine may be loaded by other work. Queues are emptied between rounds
and every round's messages are counted on the broker. ``python -m bench.submit_bench``
runs this part alone on a private Redis.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from fleet.app import TASK_NAME, create_app
from fleet.client import Fleet
from fleet.embedded import embedded_redis
from fleet.settings import Settings
from fleet.spec import parse_spec

ROUNDS = 7
PER_ROUND = 1500
BULK_SIZES = (1000, 10_000)
BULK_ROUNDS = {1000: 7, 10_000: 3}
SUBMIT_TARGET = 1.05
BULK_TARGET = 20.0

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


def baseline_task(fleet: Fleet) -> Any:  # noqa: ANN401 - a Celery task object
    """``fleet.run`` registered on a plain app of the same config, so ``apply_async`` is plain Celery."""
    baseline_app = create_app(fleet.settings)

    @baseline_app.task(name=TASK_NAME)
    def run(spec: dict[str, Any], placement: dict[str, Any] | None = None) -> None:
        """Stand-in registration; never executed here."""

    return run


def apply_async_of(fleet: Fleet) -> Callable[[], None]:
    """One ``apply_async`` of exactly the message ``fleet.submit(SPEC)`` publishes."""
    run = baseline_task(fleet)
    message = fleet.message_options(SPEC, fleet.route(SPEC))
    options, kwargs = message["options"], message["kwargs"]
    body = SPEC.model_dump(mode="json")

    def plain() -> None:
        run.apply_async(args=(body,), kwargs=kwargs, **options)

    return plain


def timed(fn: Callable[[], None], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _landed(client: redis.Redis) -> int:
    """Messages on every queue (each priority band's list), which are then removed.

    Every queue, not only the first placement's: placement follows queue depths, so a
    long round may move to another accelerator's queue.
    """
    keys = [k for k in client.scan_iter(count=1000) if not k.startswith(b"_kombu")]
    lists = [k for k in keys if client.type(k) == b"list"]
    count = sum(int(client.llen(k)) for k in lists)
    if lists:
        client.delete(*lists)
    return count


def bench_submit(fleet: Fleet, client: redis.Redis) -> dict[str, Any]:
    """Fleet.submit vs apply_async of the same message, interleaved rounds, medians."""
    plain = apply_async_of(fleet)

    def ours() -> None:
        fleet.submit(SPEC)

    for fn in (plain, ours):  # warm up connections and caches
        timed(fn, 200)
    _landed(client)
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(ROUNDS):
        for name, fn in (("plain", plain), ("ours", ours))[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(fn, PER_ROUND))
            if (landed := _landed(client)) != PER_ROUND:
                raise RuntimeError(f"{name}: {landed} of {PER_ROUND} messages landed")
    p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
    return {
        "apply_async_us": p * 1e6,
        "fleet_submit_us": o * 1e6,
        "ratio": o / p,
        "target": f"<= {SUBMIT_TARGET}",
        "met": o / p <= SUBMIT_TARGET,
        "rounds": ROUNDS,
        "per_round": PER_ROUND,
        "rounds_us": {k: [t * 1e6 for t in v] for k, v in times.items()},
    }


def bench_bulk(fleet: Fleet, client: redis.Redis, size: int) -> dict[str, Any]:
    """submit_many(size) vs a loop of ``size`` apply_async, interleaved rounds, medians."""
    plain = apply_async_of(fleet)
    specs = [SPEC] * size

    def loop() -> None:
        for _ in range(size):
            plain()

    def many() -> None:
        fleet.submit_many(specs)

    fleet.submit_many(specs[:100])  # warm up
    _landed(client)
    rounds = BULK_ROUNDS.get(size, 3)
    times: dict[str, list[float]] = {"loop": [], "submit_many": []}
    for r in range(rounds):
        for name, fn in (("loop", loop), ("submit_many", many))[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(fn, 1))
            if (landed := _landed(client)) != size:
                raise RuntimeError(f"{name}: {landed} of {size} messages landed")
    loop_s, bulk_s = statistics.median(times["loop"]), statistics.median(times["submit_many"])
    return {
        "tasks": size,
        "loop_s": loop_s,
        "submit_many_s": bulk_s,
        "loop_us_per_task": loop_s / size * 1e6,
        "submit_many_us_per_task": bulk_s / size * 1e6,
        "speedup": loop_s / bulk_s,
        "target": f">= {BULK_TARGET:g}",
        "met": loop_s / bulk_s >= BULK_TARGET,
        "rounds": rounds,
        "rounds_s": times,
    }


def run(url: str) -> dict[str, Any]:
    """Both submission benchmarks on the Redis at ``url``."""
    settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
    client = redis.Redis.from_url(url)
    with Fleet(settings) as fleet:
        out: dict[str, Any] = {"submit": bench_submit(fleet, client)}
        out["bulk"] = [bench_bulk(fleet, client, n) for n in BULK_SIZES]
    return out


def print_table(out: dict[str, Any]) -> None:
    """The submission rows of ``make bench``'s table."""
    ok = {True: "ok", False: "MISSED"}
    s = out["submit"]
    print(
        f"{'submit, per task':48} {s['fleet_submit_us']:>8.0f} us {s['apply_async_us']:>8.0f} us"
        f" {s['ratio']:>6.3f}x  <= {SUBMIT_TARGET}x {ok[s['met']]}"
    )
    for b in out["bulk"]:
        label = f"submit_many, {b['tasks']:,} tasks"
        print(
            f"{label:48} {b['submit_many_s']:>9.3f} s"
            f" {b['loop_s']:>9.3f} s {b['speedup']:>6.1f}x  >= {BULK_TARGET:g}x faster"
            f" {ok[b['met']]}"
        )


def main() -> int:
    """Run this part alone on a private Redis; print the rows and the JSON."""
    with embedded_redis() as url:
        out = run(url)
    print_table(out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

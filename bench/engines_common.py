"""What the engine benchmarks share: inputs, task specs, rounds, and the pure comparisons.

See ``bench.engines_bench`` for what is measured and how.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from fleet.client import Fleet

MINILM, TINY = "all-minilm-l6-v2", "tiny-llama"
EMBED_BATCHES = (1, 8, 32)
EMBED_TARGET_BATCH = 32
TEXTS_PER_ROUND = {1: 24, 8: 64, 32: 128}  # per batch size: 24 tasks of 1, 8 of 8, 4 of 32
GEN_TASKS_PER_ROUND = 6
NEW_TOKENS = 32
ROUNDS = 7
WARMUP = 2
TARGET = 0.90
RESULT_TIMEOUT_S = 300.0
PROMPT = "The scheduler placed the embedding job on a spot instance because"
CPU = {"accelerators": ["cpu"]}
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
SENTENCES: tuple[str, ...] = (
    "The invoice was paid two days after the due date.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Please restart the database replica before the maintenance window closes.",
    "She trained for the marathon every morning before work.",
    "The new library opens on Saturday with a reading for children.",
    "A customer asked whether the blue jacket comes in a larger size.",
    "The model's validation loss stopped improving after the fifth epoch.",
    "Heavy rain is expected across the northern coast tonight.",
    "He forgot his umbrella on the train again.",
    "The quarterly report shows revenue up eight percent year over year.",
    "Can you send me the slides from yesterday's meeting?",
    "The bakery on the corner sells out of croissants by nine.",
    "Kubernetes evicted the pod when the node ran out of memory.",
    "The museum's new wing is dedicated to modern photography.",
    "My laptop battery drains quickly when the screen is at full brightness.",
    "The committee postponed the vote until next month.",
    "A gentle breeze carried the smell of pine through the valley.",
    "The API returns a 429 status code when the rate limit is exceeded.",
    "They adopted a small grey cat from the shelter last week.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Shares of the chip maker rose after strong earnings.",
    "The hikers reached the summit just before sunset.",
    "Remember to rotate the access keys every ninety days.",
    "The orchestra rehearsed the symphony for the last time before the tour.",
    "Traffic on the bridge was slow because of roadworks.",
    "The patient was advised to drink more water and rest.",
    "Our team migrated the service from virtual machines to containers.",
    "The children built a sandcastle that the tide washed away.",
    "Latency doubled after the cache was accidentally disabled.",
    "The author signed copies of her novel at the bookstore.",
    "A sudden frost damaged most of the apple blossoms.",
    "The contract renews automatically unless cancelled in writing.",
)


# --- pure pieces -------------------------------------------------------------------------


def batches(size: int, count: int) -> list[list[str]]:
    """``count`` batches of ``size`` texts, cycling through ``SENTENCES`` (deterministic)."""
    n = len(SENTENCES)
    return [[SENTENCES[(b * size + i) % n] for i in range(size)] for b in range(count)]


def compare(
    work: float, fleet_s: Sequence[float], direct_s: Sequence[float], target: float | None
) -> dict[str, Any]:
    """Rates of ``work`` units per round from each side's median round time, and their ratio.

    ``ratio`` is fleet's rate over direct's (above 1: fleet faster). ``target`` is stated
    as in ``bench.run`` (``">= 0.90"``) and ``met`` says whether the ratio reaches it;
    both are None without a target.

    Raises:
        ValueError: a side has no rounds or a round took no time.

    """
    if not fleet_s or not direct_s or min(*fleet_s, *direct_s) <= 0:
        raise ValueError("every side needs rounds of positive duration")
    fleet_rate = work / statistics.median(fleet_s)
    direct_rate = work / statistics.median(direct_s)
    ratio = fleet_rate / direct_rate
    return {
        "fleet_per_s": fleet_rate,
        "direct_per_s": direct_rate,
        "ratio": ratio,
        "target": None if target is None else f">= {target:.2f}",
        "met": None if target is None else ratio >= target,
        "work_per_round": work,
        "fleet_rounds_s": list(fleet_s),
        "direct_rounds_s": list(direct_s),
    }


def per_task_ms(
    tasks: int,
    fleet_s: Sequence[float],
    direct_s: Sequence[float],
    run_s: Sequence[float],
    engine_s: Sequence[float],
) -> dict[str, float]:
    """Median milliseconds per task: through fleet, in the worker's task, in its engine, direct.

    ``run_s`` and ``engine_s`` are each task's ``run_s`` (fleet's task wrapper included) and
    ``engine_run_s`` (the engine alone) from the worker's results. Fleet minus run is the
    queue, acknowledgement and result path; run minus engine the task wrapper; engine minus
    direct the cost of running inside the worker process.
    """
    return {
        "fleet_ms_per_task": 1000 * statistics.median(fleet_s) / tasks,
        "worker_run_ms_per_task": 1000 * statistics.median(run_s),
        "worker_engine_ms_per_task": 1000 * statistics.median(engine_s),
        "direct_ms_per_task": 1000 * statistics.median(direct_s) / tasks,
    }


def server_port(argv: Sequence[str]) -> int | None:
    """The ``--port`` of a vLLM server's command line, or None when ``argv`` is not one."""
    if VLLM_MODULE not in argv or "--port" not in argv:
        return None
    at = list(argv).index("--port") + 1
    return int(argv[at]) if at < len(argv) and argv[at].isdigit() else None


def embedding_spec(texts: list[str]) -> dict[str, Any]:
    """The embedding task a user sends for ``texts``."""
    return {
        "kind": "embedding",
        "model": {"name": MINILM, "params_b": 0.0227, "dtype": "fp32"},
        "input": {"texts": texts},
        "tokens_in": 16 * len(texts),
        "requirements": CPU,
    }


def generation_spec() -> dict[str, Any]:
    """The greedy tiny-llama task of every generation round (``NEW_TOKENS`` new tokens)."""
    return {
        "kind": "inference",
        "model": {"name": TINY, "params_b": 0.00316, "dtype": "fp32"},
        "input": {"prompt": PROMPT, "temperature": 0},
        "tokens_in": 16,
        "tokens_out": NEW_TOKENS,
        "requirements": CPU,
    }


# --- rounds ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """The workers' environment, a fleet client, the broker's Redis and the log folder."""

    env: dict[str, str]
    fleet: Fleet
    client: redis.Redis
    logs: Path


@dataclass
class FleetSide:
    """The fleet side of a comparison: ``round`` submits ``specs`` and gets every result."""

    fleet: Fleet
    specs: list[dict[str, Any]]
    run_s: list[float] = field(default_factory=list)  # each task's run_s in the worker
    engine_s: list[float] = field(default_factory=list)  # each task's engine_run_s

    def round(self) -> float:
        """Seconds for one round (``through_fleet``); records the worker's own times."""
        took, results = through_fleet(self.fleet, self.specs)
        self.run_s += [float(r["run_s"]) for r in results]
        self.engine_s += [float(r["engine_run_s"]) for r in results]
        return took


def alternate(
    fleet_round: Callable[[], float], direct_round: Callable[[], float], rounds: int = ROUNDS
) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of each side, one side at a time, alternating which goes first."""
    fleet_s: list[float] = []
    direct_s: list[float] = []
    for r in range(rounds):
        first, second = (fleet_round, direct_round) if r % 2 == 0 else (direct_round, fleet_round)
        a, b = first(), second()
        fleet_s.append(a if first is fleet_round else b)
        direct_s.append(b if first is fleet_round else a)
    return fleet_s, direct_s


def timed(fn: Callable[[], object], times: int) -> float:
    """Seconds for ``times`` calls of ``fn`` one after another."""
    t0 = time.perf_counter()
    for _ in range(times):
        fn()
    return time.perf_counter() - t0


def through_fleet(fleet: Fleet, specs: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """Seconds to ``submit_many`` ``specs`` and ``get`` every result, and the results."""
    t0 = time.perf_counter()
    handles = fleet.submit_many(specs)
    results = [h.get(timeout=RESULT_TIMEOUT_S) for h in handles]
    return time.perf_counter() - t0, results

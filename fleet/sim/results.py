"""What a simulation run reports: cost, latency, SLO attainment and utilisation, from its final state.

Cost is each instance's hourly price from launch to its end (or the end of the run), plus
``stop_s`` for an instance ended by a scale-in decision, plus every API call at list price.
Latency is end minus arrival of each completed task; a task meets its SLO when it finishes
within its deadline (if it has one) and, when it has ``slo.tpot_ms``, decoded within that
time per output token on the chip it ran on (``meets_slo``); ``slo_attainment`` is over
all tasks, rejected ones included.
Utilisation per pool is device time busy over device time available after ready.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.catalog import Family
from fleet.sim.apipools import SimApiPool
from fleet.sim.state import SimInstance, SimTask
from fleet.spec import TaskSpec
from fleet.throughput import Estimate, estimate


@dataclass(frozen=True)
class SimResult:
    """What a run costs and how well it served."""

    policy: str
    total_cost_usd: float
    tasks: int
    completed: int
    rejected: int
    cost_per_1k_tasks_usd: float
    p50_latency_s: float
    p95_latency_s: float
    slo_attainment: float
    utilisation: dict[str, float]
    placements: dict[int, str]
    instances_launched: int
    end_s: float
    api_cost_usd: float = 0.0
    api_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fleet simulate --json``); placements left out for size."""
        out = {k: v for k, v in self.__dict__.items() if k != "placements"}
        out["accelerators"] = sorted(
            {q.split("@")[0].split(".")[1] for q in self.placements.values() if "." in q}
        )
        return out


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def decode_tpot_s(
    est: Estimate, spec: TaskSpec, family: Family, devices: int, vcpus: int | None
) -> float | None:
    """Seconds per output token of ``spec`` on ``devices`` of ``family``, from its estimate ``est``.

    The estimate's ``tpot_s``; when it is 0 (an ``Estimate`` that does not say), the wall
    time less its ``ttft_s`` (or less the prefill: the estimate of the same prompt with no
    output) over the output tokens. None when there is no output.
    """
    if spec.tokens_out <= 0:
        return None
    if est.tpot_s:
        return est.tpot_s
    ttft = est.ttft_s
    if not ttft:
        prompt_only = spec.model_copy(update={"tokens_out": 0})
        ttft = estimate(prompt_only, family, devices, vcpus).service_s
    return max(0.0, est.service_s - ttft) / spec.tokens_out


def achieved_tpot_s(task: SimTask) -> float | None:
    """The time per output token ``task`` decoded at (None: no output tokens).

    ``task.tpot_s`` when the engine set it at start; otherwise (an API call) its whole
    service time over its output tokens, prefill included: an upper bound.
    """
    if task.tpot_s is not None:
        return task.tpot_s
    if task.spec.tokens_out > 0:
        return task.service_s / task.spec.tokens_out
    return None


def meets_slo(task: SimTask) -> bool:
    """Completed, within its deadline (if any) and its time per output token (if any)."""
    if task.end is None:
        return False
    slo = task.spec.slo
    if slo.deadline_s is not None and task.end - task.arrival > slo.deadline_s:
        return False
    if slo.tpot_ms is not None:
        tpot = achieved_tpot_s(task)
        # A relative slack of 1e-9 so that decoding exactly at the goal meets it.
        if tpot is not None and tpot * 1000.0 > slo.tpot_ms * (1.0 + 1e-9):
            return False
    return True


def summarise(
    policy: str,
    tasks: Sequence[SimTask],
    instances: Iterable[SimInstance],
    api: Iterable[SimApiPool],
    end: float,
    stop_s: float,
) -> SimResult:
    """The result of a run of ``policy`` that stopped at ``end``."""
    cost = 0.0
    launched = 0
    util: dict[str, tuple[float, float]] = {}
    for inst in instances:
        launched += 1
        stop = inst.ended_at if inst.ended_at is not None else end
        billed_until = stop + stop_s if inst.draining and inst.ended_at is not None else stop
        cost += inst.price * (billed_until - inst.launched_at) / 3600.0
        avail = max(0.0, stop - inst.ready_at) * inst.capacity()
        busy, total = util.get(inst.pool, (0.0, 0.0))
        util[inst.pool] = (busy + inst.busy_device_s, total + avail)
    done = [t for t in tasks if t.end is not None]
    latencies = [t.end - t.arrival for t in done if t.end is not None]
    met = sum(1 for t in done if meets_slo(t))
    n = len(tasks)
    pools = list(api)
    api_cost = sum(pool.cost_usd for pool in pools)
    cost += api_cost
    return SimResult(
        policy=policy,
        total_cost_usd=cost,
        tasks=n,
        completed=len(done),
        rejected=sum(1 for t in tasks if t.rejected),
        cost_per_1k_tasks_usd=cost / len(done) * 1000 if done else math.nan,
        p50_latency_s=percentile(latencies, 0.5),
        p95_latency_s=percentile(latencies, 0.95),
        slo_attainment=met / n if n else math.nan,
        utilisation={p: (b / a if a else 0.0) for p, (b, a) in sorted(util.items())},
        placements={t.idx: t.queue for t in tasks if t.queue},
        instances_launched=launched,
        end_s=end,
        api_cost_usd=api_cost,
        api_calls=sum(len(pool.calls) for pool in pools),
    )

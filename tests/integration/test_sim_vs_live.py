"""The simulator and the live system agree on a short trace with the same config.

The live run uses a real Redis, the real autoscaler loop and the local provider's real
worker processes; the simulation replays the same trace through the same placement and
planner, given the boot and stop times the live run measured. Placements must match task for task; costs
(instance-seconds x the pools' prices) must agree within ``COST_TOLERANCE``, which covers
what the simulator does not model: process start-up jitter, Celery's own latencies, and
the CPU handlers' wall time against the throughput model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.autoscaler.loop import build_autoscaler
from fleet.catalog import default_catalog
from fleet.client import Fleet
from fleet.settings import Settings
from fleet.sim.engine import simulate
from fleet.sim.trace import TraceEvent
from fleet.spec import parse_spec
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
COST_TOLERANCE = 0.35
LOCAL_BOOT_S = 2.0  # used only if no boot was observed

SMALL_L4 = {"kind": "inference", "model": {"name": "tiny-chat", "params_b": 0.5, "dtype": "bf16"},
            "tokens_in": 20, "tokens_out": 4, "requirements": {"accelerators": ["nvidia-l4"]}}  # fmt: skip
# Not a registry model: it stays on the plain queue of the reference local-cpu pool.
SMALL_CPU = {"kind": "embedding", "model": {"name": "hash-embed", "params_b": 0.0227, "dtype": "fp32"},
             "input": {"texts": ["a b c"]}, "tokens_in": 3, "requirements": {"accelerators": ["cpu"]}}  # fmt: skip


def trace() -> list[TraceEvent]:
    """Six small L4 calls and two CPU embeddings over three seconds."""
    events = [
        TraceEvent(0.5 * i, parse_spec({**SMALL_L4, "input": {"prompt": "x", "seed": i}}))
        for i in range(6)
    ]
    events += [TraceEvent(1.0, parse_spec(SMALL_CPU)), TraceEvent(2.0, parse_spec(SMALL_CPU))]
    return sorted(events, key=lambda e: e.t)


def local_config(url: str, tmp: Path) -> AutoscalerConfig:
    """infra/fleet.toml's local pools with short timers."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    pools = tuple(
        p.model_copy(
            update={
                "idle_before_scale_in_s": 4.0,
                "scale_in_cooldown_s": 0.0,
                "scale_out_cooldown_s": 0.0,
            }
        )
        for p in base.pools
        if p.provider == "local"
    )
    fleet = base.fleet.model_copy(
        update={"broker_url": url, "loop_interval_s": 0.5, "local_state_dir": str(tmp / "state")}
    )
    return base.model_copy(update={"fleet": fleet, "pools": pools})


@dataclass
class Lifetimes:
    """What the live loop saw of each instance, by instance id (wall-clock times)."""

    launched: dict[str, tuple[float, float]] = field(default_factory=dict)  # (at, $/h)
    seen: dict[str, float] = field(default_factory=dict)  # first loop with its worker registered
    decided: dict[str, float] = field(default_factory=dict)  # the plan that scaled it in
    ended: dict[str, float] = field(default_factory=dict)  # the loop that reported it terminated

    def note(self, report: Any, now: float) -> None:
        """Record one autoscaler step."""
        if report.snapshot is not None:
            for w in report.snapshot.workers:
                if w.instance_id is not None:
                    self.seen.setdefault(w.instance_id, now)
        if report.plan is not None:
            for term in report.plan.terminations:
                self.decided.setdefault(term.instance_id, now)
        if report.acted is not None:
            for inst in report.acted.launched:
                self.launched[inst.id] = (inst.launched_at, inst.usd_per_hour)
            for inst_id in report.acted.terminated:
                self.ended.setdefault(inst_id, time.time())

    def all_ended(self) -> bool:
        """Something was launched and every launch has ended."""
        return bool(self.launched) and set(self.ended) >= set(self.launched)

    def figures(self) -> tuple[float, float, float]:
        """(cost $, mean boot s, mean stop s)."""
        cost = sum(p * (self.ended[i] - t0) / 3600 for i, (t0, p) in self.launched.items())
        boots = [self.seen[i] - t0 for i, (t0, _) in self.launched.items() if i in self.seen]
        stops = [self.ended[i] - self.decided[i] for i in self.launched if i in self.decided]
        return (
            cost,
            sum(boots) / len(boots) if boots else LOCAL_BOOT_S,
            sum(stops) / len(stops) if stops else 0.0,
        )


def run_live(
    config: AutoscalerConfig, settings: Settings, events: list[TraceEvent]
) -> tuple[list[str], float, float, float]:
    """Submit on the trace's schedule while stepping the real autoscaler.

    Returns (queues, cost, boot s, stop s). The boot time is measured from each launch to the
    first loop that sees the instance's worker registered, and the stop time from the plan
    that scales an instance in to the loop that reports it terminated (drain handshake and
    worker shutdown), so the simulation can be given the same.
    """
    scaler = build_autoscaler(config, settings, locked=False)
    provider: Any = scaler.providers["local"]
    seen = Lifetimes()
    queues: list[str] = []
    handles = []
    start = time.time()
    try:
        with Fleet(settings) as fleet:
            pending = list(events)
            while time.time() < start + 120:
                now = time.time()
                while pending and pending[0].t <= now - start:
                    handle = fleet.submit(pending.pop(0).spec)
                    queues.append(handle.placement.queue)
                    handles.append(handle)
                seen.note(scaler.step(now=now), now)
                if not pending and all(h.state == "SUCCESS" for h in handles) and seen.all_ended():
                    break
                time.sleep(0.5)
    finally:
        provider.terminate_all(time.time())
    assert seen.all_ended(), "live run did not scale back in"
    return (queues, *seen.figures())


def test_simulator_matches_the_live_system(tmp_path: Path) -> None:
    """Same trace, same config: identical placements, costs within the stated tolerance."""
    events = trace()
    with redis_url() as url:
        config = local_config(url, tmp_path)
        settings = Settings.from_env(
            {
                "FLEET_BROKER_URL": url,
                "FLEET_RESULT_BACKEND": url,
                "FLEET_ARTIFACT_DIR": str(tmp_path),
            }
        )
        live_queues, live_cost, boot_s, stop_s = run_live(config, settings, events)
    sim = simulate(events, config, default_catalog(), "fleet", boot_s=boot_s, stop_s=stop_s)
    assert live_queues == [sim.placements[i] for i in range(len(events))]
    assert sim.completed == len(events)
    assert live_cost > 0
    assert abs(sim.total_cost_usd - live_cost) / live_cost <= COST_TOLERANCE, (
        sim.total_cost_usd,
        live_cost,
    )

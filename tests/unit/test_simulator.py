"""The simulator on tiny traces with answers computed by hand from the model's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.autoscaler.config import parse_config
from fleet.catalog import default_catalog
from fleet.cli import main
from fleet.sim.engine import simulate
from fleet.sim.trace import TraceError, TraceEvent, parse_trace, write_trace
from fleet.spec import parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
POOL = """
[fleet]
loop_interval_s = 5
[[pools]]
name = "l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
max_instances = 1
drain_target_s = 30
idle_before_scale_in_s = 60
scale_out_cooldown_s = 0
scale_in_cooldown_s = 0
"""
CONFIG = parse_config(POOL, env={})
L4_PRICE = 0.8048  # g6.xlarge on-demand, from the catalog
CHAT = {
    "kind": "inference",
    "model": {"name": "m", "params_b": 8, "dtype": "bf16"},
    "tokens_in": 100,
    "tokens_out": 50,
}


def one_task(at: float = 0.0, **extra: object) -> list[TraceEvent]:
    """A trace of one 8B chat task."""
    return [TraceEvent(at, parse_spec({**CHAT, **extra}))]


def test_one_task_one_offer_is_exact() -> None:
    """One task on one L4 pool: latency is boot + run, cost is price x (launch to scale-in)."""
    result = simulate(one_task(), CONFIG, CATALOG, "fleet")
    family = CATALOG.family("nvidia-l4")
    run = estimate(parse_spec(CHAT), family, 1).service_s
    boot = family.cold_start_s
    finish = boot + run
    # Ticks every 5 s from 0; the last tick that sees the task running is the last before
    # it finishes; scale-in comes at the first tick 60 s (idle time) after that.
    last_busy = math.floor(finish / 5) * 5
    end = math.ceil((last_busy + 60) / 5) * 5
    assert result.completed == 1
    assert result.p50_latency_s == pytest.approx(finish)
    assert result.total_cost_usd == pytest.approx(L4_PRICE * end / 3600)
    assert result.cost_per_1k_tasks_usd == pytest.approx(1000 * L4_PRICE * end / 3600)
    assert result.slo_attainment == 1.0
    assert result.placements == {0: "inference.nvidia-l4"}


def test_stop_time_is_billed_after_the_scale_in_decision() -> None:
    """``stop_s`` adds the drain-and-shutdown time to each scaled-in instance's bill, nothing else."""
    base = simulate(one_task(), CONFIG, CATALOG, "fleet")
    slow = simulate(one_task(), CONFIG, CATALOG, "fleet", stop_s=30.0)
    assert slow.total_cost_usd == pytest.approx(base.total_cost_usd + L4_PRICE * 30 / 3600)
    assert slow.p50_latency_s == base.p50_latency_s


def test_a_missed_deadline_counts_against_slo() -> None:
    """A deadline shorter than the cold start is missed, and the task still completes."""
    result = simulate(one_task(slo={"deadline_s": 10}), CONFIG, CATALOG, "fleet")
    assert result.completed == 1
    assert result.slo_attainment == 0.0


def test_homogeneous_is_keda_on_the_cheapest_pool_offer_that_holds_every_task() -> None:
    """KEDA-like: the L4 pool's g6.xlarge, boot + run latency, 30 s polls, 300 s cooldown."""
    result = simulate(one_task(), CONFIG, CATALOG, "homogeneous")
    family = CATALOG.family("nvidia-l4")
    finish = family.cold_start_s + estimate(parse_spec(CHAT), family, 1).service_s
    assert result.completed == 1
    assert result.p50_latency_s == pytest.approx(finish)
    assert result.instances_launched == 1
    # Polls every 30 s; the last poll that sees the task is the last before it ends; the
    # instance goes at the first poll more than 300 s after that one.
    last_active = math.floor(finish / 30) * 30
    end = (math.floor((last_active + 300) / 30) + 1) * 30
    assert result.total_cost_usd == pytest.approx(L4_PRICE * end / 3600)


def test_homogeneous_sizes_the_fleet_by_what_one_instance_runs_at_once() -> None:
    """Tasks per instance come from the throughput model (service_s / busy_s streams on one L4)."""
    trace = [TraceEvent(0.0, parse_spec(CHAT)) for _ in range(100)]
    family = CATALOG.family("nvidia-l4")
    est = estimate(parse_spec(CHAT), family, 1)
    per_instance = math.floor(est.service_s / est.busy_s)
    result = simulate(trace, CONFIG, CATALOG, "homogeneous")  # KEDA ignores max_instances
    assert result.completed == 100
    assert result.instances_launched == math.ceil(100 / per_instance)
    fixed = simulate(trace, CONFIG, CATALOG, "homogeneous", keda_target=10)
    assert fixed.instances_launched == 10


def test_homogeneous_rejects_what_no_pool_offer_can_hold() -> None:
    """A 405B bf16 task (972 GB) cannot run on the only pool's one L4 (24 GB) and is rejected."""
    trace = [
        TraceEvent(
            0.0, parse_spec({**CHAT, "model": {"name": "big", "params_b": 405, "dtype": "bf16"}})
        )
    ]
    result = simulate(trace, CONFIG, CATALOG, "homogeneous")
    assert result.rejected == 1
    assert result.completed == 0


def test_spot_interruptions_requeue_and_every_task_finishes() -> None:
    """With frequent spot interruptions tasks are requeued onto new capacity and all complete."""
    config = parse_config(
        POOL.replace(
            'price_as = "aws/us-east-1/g6.xlarge"', 'price_as = "gcp/us-central1/g2-standard-12"'
        )
        .replace('markets = ["on_demand"]', 'markets = ["spot"]')
        .replace("max_instances = 1", "max_instances = 3"),
        env={},
    )
    trace = [TraceEvent(float(i), parse_spec({**CHAT, "tokens_out": 2000})) for i in range(30)]
    result = simulate(trace, config, CATALOG, "fleet", spot_interruptions_per_hour=20.0, seed=3)
    assert result.completed == 30
    assert result.instances_launched > 1


def test_unknown_policy_is_refused() -> None:
    """Only fleet, homogeneous and cheapest exist."""
    with pytest.raises(ValueError, match="policy"):
        simulate(one_task(), CONFIG, CATALOG, "magic")


def test_trace_errors_name_the_line() -> None:
    """A bad line is reported with its number."""
    good = json.dumps({"t": 0, "spec": CHAT})
    with pytest.raises(TraceError, match="line 2"):
        parse_trace([good, '{"t": 1}'])
    with pytest.raises(TraceError, match="back in time"):
        parse_trace([json.dumps({"t": 5, "spec": CHAT}), good])


def test_cli_simulate_prints_the_required_fields(tmp_path: Path) -> None:
    """`fleet simulate --json` reports cost, tasks, cost per 1k, latencies, SLO attainment and utilisation."""
    trace = tmp_path / "t.jsonl"
    write_trace(one_task(), trace)
    config = tmp_path / "c.toml"
    config.write_text(POOL)
    out = CliRunner().invoke(
        main,
        ["simulate", "--trace", str(trace), "--config", str(config), "--policy", "fleet", "--json"],
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    for key in (
        "total_cost_usd",
        "tasks",
        "cost_per_1k_tasks_usd",
        "p50_latency_s",
        "p95_latency_s",
        "slo_attainment",
        "utilisation",
    ):
        assert key in data
    assert data["tasks"] == 1
    assert 0 < data["utilisation"]["l4"] <= 1

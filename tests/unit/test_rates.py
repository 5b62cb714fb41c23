"""Arrival rates (fleet.rates) and what they change in placement's cost ranking."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.catalog import load_catalog
from fleet.placement import Traffic, busy_by_accelerator, place
from fleet.rates import RateMeter, TrafficMeter
from fleet.spec import TaskSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
MELANGE = load_catalog(ROOT / "examples" / "melange" / "catalog")
ARENA = parse_spec(
    {"kind": "inference", "model": {"name": "llama-2-7b", "params_b": 6.74, "dtype": "fp16"},
     "tokens_in": 70, "tokens_out": 215, "slo": {"tpot_ms": 120}}
)  # fmt: skip


def test_rate_is_arrivals_over_the_window_once_it_has_passed():
    """600 arrivals over the last 300 s read as 2 per second; older ones fall out."""
    meter = RateMeter(window_s=300, min_span_s=30)
    for i in range(1200):
        meter.record("m", i * 0.5)  # 2/s for 600 s
    assert meter.rate("m", 599.5) == pytest.approx(599 / 300, rel=0.01)
    assert meter.rate("m", 900.0) == 0.0
    assert meter.rate("other", 10.0) is None


def test_a_young_key_reads_over_its_age_but_at_least_the_minimum_span():
    """Ten arrivals in the first second are not a burst of ten per second."""
    meter = RateMeter(window_s=300, min_span_s=30)
    meter.record("m", 0.0, count=10)
    assert meter.rate("m", 1.0) == pytest.approx(10 / 30)
    assert meter.rate("m", 60.0) == pytest.approx(10 / 60)


def test_bad_windows_are_refused():
    """A window or span of zero is an error, not a division by zero later."""
    with pytest.raises(ValueError, match="positive"):
        RateMeter(window_s=0)


def traffic(rate: float, *specs: TaskSpec) -> Traffic:
    """Traffic at ``rate`` whose typical device time is the mean of ``specs``' on each chip."""
    accs = sorted(MELANGE.families)
    sizes = [busy_by_accelerator(s, MELANGE) for s in specs]
    mean = tuple(sum(b.get(a, 0.0) for b in sizes) / len(sizes) for a in accs)
    made = Traffic.of(rate, mean, accs)
    assert made is not None
    return made


def test_without_a_rate_the_cheapest_share_wins():
    """Per task share alone, an A100 at batch 256 beats the small chips on Arena-sized requests."""
    assert place(ARENA, MELANGE).accelerator == "nvidia-a100-80gb"


def test_at_one_request_a_second_a_small_chip_wins():
    """At 1 req/s one A100 would idle 97% of the time; the task pays for that, so an L4 or A10G wins."""
    p = place(ARENA, MELANGE, traffic=traffic(1.0, ARENA))
    assert p.accelerator in {"nvidia-l4", "nvidia-a10g"}
    a100 = next(r.reason for r in p.rejected if r.accelerator == "nvidia-a100-80gb")
    assert "idle at 1 tasks/s" in a100


def test_at_sixteen_requests_a_second_the_a100_is_busy_enough():
    """At 16 req/s one A100 is well used and cheapest per task again."""
    assert place(ARENA, MELANGE, traffic=traffic(16.0, ARENA)).accelerator == "nvidia-a100-80gb"


def test_a_rare_long_request_does_not_size_the_traffic_by_itself():
    """A 1,500-token answer among Arena traffic at 1 req/s: sized on the traffic, a small chip wins."""
    long = ARENA.model_copy(update={"tokens_out": 1500})
    alone = place(long, MELANGE, traffic=traffic(1.0, long))
    sized = place(long, MELANGE, traffic=traffic(1.0, *[ARENA] * 19, long))
    assert sized.accelerator in {"nvidia-l4", "nvidia-a10g"}
    assert alone.accelerator == "nvidia-a100-80gb"  # as if every request were this long


def test_mean_size_follows_the_window():
    """Sizes leave the mean as their arrivals leave the window."""
    meter = RateMeter(window_s=100, min_span_s=10)
    meter.record("m", 0.0, size=(1000, 10))
    meter.record("m", 50.0, size=(100, 30))
    assert meter.mean_size("m", 60.0) == pytest.approx((550, 20))
    assert meter.mean_size("m", 120.0) == pytest.approx((100, 30))
    assert meter.mean_size("none", 1.0) is None


def test_traffic_maps_the_means_to_their_accelerators():
    """Means recorded in accelerator order come back by name; no rate or no sizes is no traffic."""
    assert Traffic.of(2.0, (1.5, 0.5), ["a", "b"]) == Traffic(2.0, {"a": 1.5, "b": 0.5})
    assert Traffic.of(None, (1.0,), ["a"]) is None
    assert Traffic.of(2.0, None, ["a"]) is None


def test_traffic_meter_keeps_rate_and_device_time_per_chip():
    """Ten Arena tasks at once read as 1/s (10 s minimum span) with their device time per chip."""
    meter = TrafficMeter()
    assert meter.traffic(ARENA, 0.0) is None
    meter.record(ARENA, MELANGE, 0.0, count=10)
    got = meter.traffic(ARENA, 1.0)
    assert got is not None
    assert got.rate_per_s == pytest.approx(1.0)
    assert dict(got.busy_s) == pytest.approx(
        {a: busy_by_accelerator(ARENA, MELANGE).get(a, 0.0) for a in MELANGE.families}
    )

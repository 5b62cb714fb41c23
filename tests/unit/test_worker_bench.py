"""The worker benchmark's arithmetic: medians of interleaved rounds, ratios, targets on packs."""

from __future__ import annotations

import pytest

from bench.worker_bench import PACK, summarize


def rounds(**sides: list[float]) -> list[dict[str, float]]:
    return [dict(zip(sides, t, strict=True)) for t in zip(*sides.values(), strict=True)]


def test_ratios_are_fleet_rate_over_each_plain_workers_rate_from_median_rounds():
    """A ratio above 1 means fleet drained faster; medians shrug off one slow round."""
    out = summarize(
        rounds(
            fleet=[4.0, 40.0, 4.0],
            fleet_pack=[1.0, 1.0, 9.0],
            plain=[2.0, 2.0, 2.0],
            like=[3.0, 3.0, 30.0],
        ),
        tasks=2000,
    )
    assert out["tasks_per_s"] == {
        "fleet": 500.0,
        "fleet_pack": 2000.0,
        "plain": 1000.0,
        "like": pytest.approx(666.67, rel=1e-3),
    }
    assert out["ratios"]["fleet"] == {"plain": 0.5, "like": 0.75}
    assert out["ratios"]["fleet_pack"] == {"plain": 2.0, "like": 3.0}
    assert out["met"] == {"vs_plain": True, "vs_like": True}
    assert out["pack"] == PACK


@pytest.mark.parametrize(
    ("pack_s", "met"),
    [
        (2.2, {"vs_plain": True, "vs_like": False}),
        (2.0 / 0.85, {"vs_plain": False, "vs_like": False}),
    ],
)
def test_targets_are_judged_on_the_packed_side(pack_s, met):
    """>= 0.9x the plain worker and >= 1.2x the like-configured one, for fleet_pack."""
    out = summarize(rounds(fleet=[1.0], fleet_pack=[pack_s], plain=[2.0], like=[2.5]), tasks=100)
    assert out["met"] == met

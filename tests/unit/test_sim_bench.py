"""The trace benchmark's pure rules (bench/sim_bench.py), on hand-made numbers."""

from __future__ import annotations

import math

import pytest

from bench.sim_bench import accelerator_types, best_single, cloud_config, only_type, ratio


def runs(**by_type: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Single-type results from ``type=(total cost, SLO attainment)``."""
    return {k: {"total_cost_usd": c, "slo_attainment": s} for k, (c, s) in by_type.items()}


@pytest.mark.parametrize(
    ("singles", "fleet_slo", "want"),
    [
        # The cheapest type misses too many deadlines; the next one is within a point.
        (runs(l4=(1.0, 0.50), h100=(10.0, 0.985), h200=(20.0, 1.0)), 0.99, "h100"),
        # Exactly one point below fleet still counts.
        (runs(l4=(1.0, 0.89), h100=(10.0, 0.95)), 0.90, "l4"),
        # Better attainment than fleet is fine; cost decides.
        (runs(a=(5.0, 1.0), b=(3.0, 0.999)), 0.98, "b"),
        # No type is within a point of fleet: none is a valid single type.
        (runs(l4=(1.0, 0.70), h100=(10.0, 0.93)), 0.99, None),
        # Ties in cost go to the first name.
        (runs(b=(2.0, 1.0), a=(2.0, 1.0)), 1.0, "a"),
        # A run without a cost is never valid.
        (runs(a=(math.nan, 1.0), b=(9.0, 1.0)), 1.0, "b"),
        ({}, 0.9, None),
    ],
)
def test_best_single_is_the_cheapest_within_one_point_of_fleet(
    singles: dict[str, dict[str, float]], fleet_slo: float, want: str | None
) -> None:
    """Valid: SLO attainment >= fleet's - 0.01; best: the cheapest valid one."""
    assert best_single(singles, fleet_slo) == want


@pytest.mark.parametrize(
    ("num", "den", "want"),
    [(2.0, 4.0, 0.5), (1.0, 0.0, math.nan), (math.nan, 1.0, math.nan), (1.0, math.nan, math.nan)],
)
def test_ratio_is_nan_without_a_positive_denominator(num: float, den: float, want: float) -> None:
    """Fleet over a baseline; NaN when the baseline is missing or zero."""
    got = ratio(num, den)
    assert got == want or (math.isnan(got) and math.isnan(want))


def test_single_type_configs_hold_only_that_types_pools() -> None:
    """Each accelerator of the cloud pools once; its config holds its pools and no other."""
    config = cloud_config()
    types = accelerator_types(config)
    assert len(types) == len(set(types))
    assert "nvidia-l4" in types
    assert all(p.provider != "local" for p in config.pools)
    for acc in types:
        pools = only_type(config, acc).pools
        assert pools
        assert {p.accelerator for p in pools} == {acc}

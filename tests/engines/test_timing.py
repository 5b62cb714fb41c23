"""Time per output token and the slo.tpot_ms verdict (workers.engines.timing), on hand numbers."""

from __future__ import annotations

import math

import pytest

from workers.engines.timing import TokenPace, slo_tpot_met, token_pace, tpot_ms


@pytest.mark.parametrize(
    ("first_s", "end_s", "tokens_out", "expected"),
    [
        pytest.param(1.0, 1.3, 4, 100.0, id="0.3 s over 3 tokens after the first"),
        pytest.param(10.0, 10.5, 2, 500.0, id="two tokens: the gap between them"),
        pytest.param(0.25, 0.75, 101, 5.0, id="0.5 s over 100 tokens"),
        pytest.param(2.0, 2.02, 1, 20.0, id="one token: first to end, over max(1, 0)"),
        pytest.param(3.0, 3.0, 1, 0.0, id="one token ending at its arrival"),
        pytest.param(5.0, 4.999, 3, 0.0, id="end before first: never negative"),
        pytest.param(0.0, 0.0, 0, None, id="nothing generated"),
    ],
)
def test_tpot_ms(first_s, end_s, tokens_out, expected):
    """(end - first) / max(1, tokens_out - 1), in milliseconds; None without tokens."""
    got = tpot_ms(first_s, end_s, tokens_out)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("first_s", "end_s", "tokens_out", "match"),
    [
        (0.0, 1.0, -1, "tokens_out"),
        (math.nan, 1.0, 2, "finite"),
        (0.0, math.inf, 2, "finite"),
    ],
)
def test_tpot_ms_refuses_impossible_numbers(first_s, end_s, tokens_out, match):
    """Negative token counts and non-finite instants are a caller's bug, not a measurement."""
    with pytest.raises(ValueError, match=match):
        tpot_ms(first_s, end_s, tokens_out)


@pytest.mark.parametrize(
    ("measured", "goal", "met"),
    [
        (40.0, None, None),  # no goal: no verdict
        (None, None, None),
        (39.9, 40.0, True),
        (40.0, 40.0, True),  # equal keeps the goal
        (40.1, 40.0, False),
        (5.0, 0.001, False),
        (5.0, 60_000, True),
        (None, 0.001, True),  # nothing generated: no token was late
    ],
)
def test_slo_tpot_met(measured, goal, met):
    """Met when measured <= goal; None exactly when no goal was set."""
    assert slo_tpot_met(measured, goal) is met


def test_token_pace_combines_both():
    """token_pace is tpot_ms and its verdict in one value."""
    assert token_pace(1.0, 1.3, 4, 150) == TokenPace(
        tpot_ms=pytest.approx(100.0), slo_tpot_met=True
    )
    assert token_pace(1.0, 1.3, 4, 50.0).slo_tpot_met is False
    assert token_pace(1.0, 1.3, 4, None).slo_tpot_met is None

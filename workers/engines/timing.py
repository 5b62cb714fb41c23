"""Time per output token (TPOT) and the ``slo.tpot_ms`` verdict: arithmetic shared by the engines.

Pure: the instants are arguments, in seconds on one clock (``time.perf_counter``); no engine
state, no I/O.

* TPOT is the decode time per output token after the first:
  ``(end - first) / max(1, tokens_out - 1)``, in milliseconds. ``first`` is the arrival of
  the first generated token and ``end`` the end of generation (each engine's docstring says
  which instants it measures). The prefill before the first token is not in it: ``ttft_s``
  reports that. One token: the time from it to ``end`` (0 when ``end`` is its arrival).
  No token: ``None``.
* ``slo_tpot_met`` is ``tpot_ms <= goal`` when the spec sets ``slo.tpot_ms`` and ``None``
  when it does not; a task that generated nothing had no late token, so it met the goal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MS_PER_S = 1000.0


@dataclass(frozen=True, slots=True)
class TokenPace:
    """A generation's measured TPOT (ms) and, when a goal was set, whether it met it."""

    tpot_ms: float | None
    slo_tpot_met: bool | None


def tpot_ms(first_s: float, end_s: float, tokens_out: int) -> float | None:
    """Decode milliseconds per output token after the first (None when none was generated).

    Args:
        first_s: when the first generated token arrived (seconds, any origin).
        end_s: when generation ended, on the same clock. An ``end_s`` before ``first_s``
            (two clocks' rounding) counts as no decode time: TPOT is never negative.
        tokens_out: the tokens generated, the first included.

    Raises:
        ValueError: ``tokens_out`` is negative, or an instant is not finite.

    """
    if tokens_out < 0:
        raise ValueError(f"tokens_out: expected >= 0, got {tokens_out}")
    if not (math.isfinite(first_s) and math.isfinite(end_s)):
        raise ValueError(f"instants must be finite, got first={first_s}, end={end_s}")
    if tokens_out == 0:
        return None
    return max(0.0, end_s - first_s) * MS_PER_S / max(1, tokens_out - 1)


def slo_tpot_met(measured_ms: float | None, goal_ms: float | None) -> bool | None:
    """Whether ``measured_ms`` keeps the goal ``goal_ms`` (None when no goal was set).

    ``measured_ms`` None (nothing generated) meets any goal; equal to the goal meets it.
    """
    if goal_ms is None:
        return None
    return measured_ms is None or measured_ms <= goal_ms


def token_pace(first_s: float, end_s: float, tokens_out: int, goal_ms: float | None) -> TokenPace:
    """``tpot_ms`` and ``slo_tpot_met`` of one generation (see the module docstring).

    Raises:
        ValueError: as ``tpot_ms``.

    """
    measured = tpot_ms(first_s, end_s, tokens_out)
    return TokenPace(tpot_ms=measured, slo_tpot_met=slo_tpot_met(measured, goal_ms))

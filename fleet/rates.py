"""Arrival rates: how many tasks of a kind arrived per second lately, pure.

``RateMeter`` counts arrivals per key (the simulator and the client use ``(model name,
kind)``) over a sliding window and reads the rate at a given time; the clock is the
caller's (``now`` is an argument), so it is deterministic. Placement ranks chips by what
a task costs at that rate (``fleet.placement``): at 1 request/s an A100 that could serve 30
is mostly idle, and the task pays for the idle part.

Each arrival may carry a size (the simulator and the client use ``(tokens_in,
tokens_out)``), whose mean over the window is the key's typical task: placement sizes the
instances the whole traffic needs on each chip from that task's device time.

The rate is the arrivals within the last ``window_s`` over the time they span: the window
once it has passed, else the time since the key's first arrival, but at least ``min_span_s``
(so the first few arrivals do not read as a burst).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from fleet.catalog import Catalog
from fleet.placement import Traffic, busy_by_accelerator
from fleet.spec import TaskSpec

Size = tuple[float, ...]
WINDOW_S = 300.0
MIN_SPAN_S = 10.0


class RateMeter:
    """Arrivals per second per key over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S, min_span_s: float = MIN_SPAN_S) -> None:
        """A meter over ``window_s`` seconds; spans shorter than ``min_span_s`` count as it."""
        if window_s <= 0 or min_span_s <= 0:
            raise ValueError("window_s and min_span_s must be positive")
        self.window_s = window_s
        self.min_span_s = min(min_span_s, window_s)
        self._times: dict[Hashable, deque[tuple[float, Size]]] = {}
        self._sizes: dict[Hashable, list[float]] = {}  # sums of the sizes in the window
        self._first: dict[Hashable, float] = {}

    def record(self, key: Hashable, now: float, count: int = 1, size: Size = ()) -> None:
        """``count`` arrivals of ``key`` at ``now``, each of ``size`` (times must not decrease).

        ``size`` is a tuple of numbers (the same length for every arrival of a key).
        """
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque()
            self._first[key] = now
            self._sizes[key] = [0.0] * len(size)
        times.extend([(now, size)] * count)
        sums = self._sizes[key]
        for i, x in enumerate(size):
            sums[i] += x * count
        self._trim(key, now)

    def rate(self, key: Hashable, now: float) -> float | None:
        """Arrivals per second of ``key`` at ``now``; None when it never arrived."""
        times = self._times.get(key)
        if times is None:
            return None
        self._trim(key, now)
        span = min(self.window_s, max(self.min_span_s, now - self._first[key]))
        return len(times) / span

    def mean_size(self, key: Hashable, now: float) -> Size | None:
        """The mean ``size`` of ``key``'s arrivals in the window; None when there are none."""
        times = self._times.get(key)
        if not times:
            return None
        self._trim(key, now)
        return tuple(x / len(times) for x in self._sizes[key]) if times else None

    def _trim(self, key: Hashable, now: float) -> None:
        times, sums = self._times[key], self._sizes[key]
        while times and times[0][0] <= now - self.window_s:
            for i, x in enumerate(times.popleft()[1]):
                sums[i] -= x


class TrafficMeter:
    """Arrivals per (model, kind) and what they take on each chip: placement's ``Traffic``.

    Each recorded task adds its device time on every family of the catalog it is placed on
    (``fleet.placement.busy_by_accelerator``; 0 where it does not fit), kept in that
    catalog's sorted family order, so the meter's mean is the traffic's mean device time
    per chip. The simulator and the client each keep one.
    """

    def __init__(self, meter: RateMeter | None = None) -> None:
        """A meter over ``meter`` (default: a ``RateMeter`` with its default window)."""
        self.meter = meter or RateMeter()
        self._order: dict[Hashable, tuple[str, ...]] = {}

    def record(self, spec: TaskSpec, catalog: Catalog, now: float, count: int = 1) -> None:
        """``count`` tasks like ``spec`` arrived at ``now``, to be placed on ``catalog``."""
        key = (spec.model.name, spec.kind)
        order = self._order.get(key)
        if order is None:
            order = self._order[key] = tuple(sorted(catalog.families))
        busy = busy_by_accelerator(spec, catalog)
        self.meter.record(key, now, count, tuple(busy.get(a, 0.0) for a in order))

    def traffic(self, spec: TaskSpec, now: float) -> Traffic | None:
        """The recent traffic of ``spec``'s model and kind (None: none recorded)."""
        key = (spec.model.name, spec.kind)
        order = self._order.get(key)
        if order is None:
            return None
        return Traffic.of(self.meter.rate(key, now), self.meter.mean_size(key, now), order)

"""Prometheus metrics for the fleet: queues, workers, instances, spend, tasks, decisions.

``FleetMetrics`` owns a private ``CollectorRegistry`` (never the process-global default), so
two instances in one process (tests, an exporter beside an autoscaler) never share state.
Every metric name starts with ``fleet_`` and carries its unit (``_seconds``, ``_usd``):

==========================================  =========  =====================================
name                                        type       labels
==========================================  =========  =====================================
``fleet_queue_depth``                       gauge      queue, state (``ready`` | ``unacked``)
``fleet_queue_oldest_age_seconds``          gauge      queue (only where an age is known)
``fleet_workers``                           gauge      pool, accelerator, emulated
``fleet_instances``                         gauge      pool, market, state
``fleet_spend_usd_per_hour``                gauge      pool (rate once the plan is carried out)
``fleet_spend_usd_total``                   counter    (none): money spent, integrated over time
``fleet_tasks_total``                       counter    accelerator, kind, outcome
``fleet_task_wait_seconds``                 histogram  accelerator, kind (submit to start)
``fleet_task_duration_seconds``             histogram  accelerator, kind (0.01 s to 24 h)
``fleet_task_cost_usd``                     histogram  accelerator, kind (1e-7 to 100 USD)
``fleet_autoscaler_decisions_total``        counter    pool, action (``launch`` | ``terminate``)
``fleet_provider_errors_total``             counter    provider, kind (``ErrorKind``)
==========================================  =========  =====================================

Contracts: the ``observe_*`` methods replace a gauge family's whole state, so label sets that
are no longer reported (a queue that vanished, a pool scaled to zero) are removed rather than
left frozen at their last value. Counters and histograms only ever grow. Every method is safe
to call from several threads while the registry is being scraped. The Grafana dashboard in
``infra/grafana`` reads exactly these names and labels.
"""

from __future__ import annotations

import math
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from fleet.autoscaler.model import Instance, Plan, ProviderError
from fleet.queues import parse_queue
from fleet.registry import WorkerInfo
from fleet.stats import QueueStats

__all__ = [
    "COST_BUCKETS_USD",
    "DURATION_BUCKETS_S",
    "UNPOOLED",
    "FleetMetrics",
    "Outcome",
]

Outcome = Literal["success", "failure"]
OUTCOMES: Final = ("success", "failure")
UNPOOLED: Final = "unpooled"  # the pool label of a worker no autoscaler pool claims
SECONDS_PER_HOUR: Final = 3600.0

# 10 ms to 24 h: emulated embeddings finish in milliseconds, fine-tunes run for hours.
DURATION_BUCKETS_S: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
)  # fmt: skip
# 1e-7 USD (a few embedding tokens) to 100 USD (a long multi-GPU training run).
COST_BUCKETS_USD: Final = (
    1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3,
    0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0,
)  # fmt: skip


def _usable(value: float | None) -> float | None:
    """``value`` when it is a finite, non-negative number, else None (never observed)."""
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value)


class _LabelledGauge:
    """A gauge whose full state is replaced at once; stale label sets are removed."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._known: set[tuple[str, ...]] = set()

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)
        for stale in self._known - values.keys():
            self.gauge.remove(*stale)
        self._known = set(values)


class FleetMetrics:
    """The fleet's metrics in a registry of their own; see the module docstring."""

    def __init__(self) -> None:
        """Create every metric in a fresh ``CollectorRegistry`` (``self.registry``)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self.queue_depth = Gauge(
            "fleet_queue_depth",
            "Messages per queue: ready (waiting) or unacked (delivered, not yet acknowledged).",
            ["queue", "state"],
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "fleet_queue_oldest_age_seconds",
            "Age of the oldest ready message per queue, where the broker tells.",
            ["queue"],
            registry=r,
        )
        self.workers = Gauge(
            "fleet_workers",
            "Live workers (registry heartbeats) by pool, accelerator and emulated flag.",
            ["pool", "accelerator", "emulated"],
            registry=r,
        )
        self.instances = Gauge(
            "fleet_instances",
            "Provider instances by pool, market (spot | on_demand) and lifecycle state.",
            ["pool", "market", "state"],
            registry=r,
        )
        self.spend_rate = Gauge(
            "fleet_spend_usd_per_hour",
            "Spend rate per pool once the latest plan is carried out, in USD per hour.",
            ["pool"],
            registry=r,
        )
        self.spend_total = Counter(
            "fleet_spend_usd",
            "Money spent on instances, integrated over time, in USD.",
            registry=r,
        )
        self.tasks = Counter(
            "fleet_tasks",
            "Finished tasks by accelerator, kind and outcome (success | failure).",
            ["accelerator", "kind", "outcome"],
            registry=r,
        )
        self.task_wait = Histogram(
            "fleet_task_wait_seconds",
            "Time from submission to the start of execution.",
            ["accelerator", "kind"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.task_duration = Histogram(
            "fleet_task_duration_seconds",
            "Execution time of a task on its worker.",
            ["accelerator", "kind"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.task_cost = Histogram(
            "fleet_task_cost_usd",
            "Estimated cost of a task at its placement's price, in USD.",
            ["accelerator", "kind"],
            buckets=COST_BUCKETS_USD,
            registry=r,
        )
        self.decisions = Counter(
            "fleet_autoscaler_decisions",
            "Instances the autoscaler decided to launch or terminate, by pool.",
            ["pool", "action"],
            registry=r,
        )
        self.provider_errors = Counter(
            "fleet_provider_errors",
            "Failed provider calls by provider and error kind.",
            ["provider", "kind"],
            registry=r,
        )
        self._depth = _LabelledGauge(self.queue_depth)
        self._age = _LabelledGauge(self.queue_oldest_age)
        self._workers = _LabelledGauge(self.workers)
        self._instances = _LabelledGauge(self.instances)
        self._spend_rate = _LabelledGauge(self.spend_rate)
        self._last_plan: tuple[float, float] | None = None  # (plan.at, usd_per_hour_after)

    # -- gauges: whole-state replacement --------------------------------------------------

    def observe_queues(
        self,
        stats: Mapping[str, QueueStats],
        oldest_age_s: Mapping[str, float | None] | None = None,
    ) -> None:
        """Set ``fleet_queue_depth`` (ready, unacked) for every queue in ``stats``.

        Queues absent from ``stats`` lose their series. ``oldest_age_s`` (optional) sets
        ``fleet_queue_oldest_age_seconds``; a queue without a usable age has no age series.
        """
        depth: dict[tuple[str, ...], float] = {}
        for name, s in stats.items():
            depth[(name, "ready")] = float(s.ready)
            depth[(name, "unacked")] = float(s.unacked)
        ages: dict[tuple[str, ...], float] = {}
        for name, age in (oldest_age_s or {}).items():
            usable = _usable(age)
            if usable is not None and name in stats:
                ages[(name,)] = usable
        with self._lock:
            self._depth.replace(depth)
            self._age.replace(ages)

    def observe_workers(
        self,
        workers: Iterable[WorkerInfo],
        pool_of: Callable[[WorkerInfo], str] = lambda _w: UNPOOLED,
    ) -> None:
        """Set ``fleet_workers`` to the count of ``workers`` per (pool, accelerator, emulated)."""
        counts = Tally(
            (pool_of(w) or UNPOOLED, w.accelerator, "true" if w.emulated else "false")
            for w in workers
        )
        with self._lock:
            self._workers.replace({k: float(n) for k, n in counts.items()})

    def observe_plan(self, plan: Plan, instances: Iterable[Instance]) -> None:
        """Record one autoscaler pass: its instances, spend rates and decisions.

        ``instances`` are those the plan was made from (``snapshot.instances``). Sets
        ``fleet_instances`` and ``fleet_spend_usd_per_hour`` (each pool's
        ``usd_per_hour_after``), counts each launch and termination in
        ``fleet_autoscaler_decisions_total``, and adds to ``fleet_spend_usd_total`` the money
        spent since the previous plan at the previous plan's rate (left Riemann sum; the first
        plan adds nothing, and a plan dated before the previous one adds nothing).
        """
        counts = Tally((i.pool, i.offer.market, i.state.value) for i in instances)
        rates: dict[tuple[str, ...], float] = {
            (d.pool,): max(0.0, d.usd_per_hour_after) for d in plan.decisions
        }
        with self._lock:
            self._instances.replace({k: float(n) for k, n in counts.items()})
            self._spend_rate.replace(rates)
            for d in plan.decisions:
                self.decisions.labels(d.pool, "launch").inc(len(d.launches))
                self.decisions.labels(d.pool, "terminate").inc(len(d.terminations))
            if self._last_plan is not None:
                last_at, last_rate = self._last_plan
                if plan.at > last_at:
                    self.spend_total.inc(last_rate * (plan.at - last_at) / SECONDS_PER_HOUR)
            if self._last_plan is None or plan.at >= self._last_plan[0]:
                self._last_plan = (plan.at, sum(rates.values()))

    # -- counters and histograms -----------------------------------------------------------

    def add_spend(self, usd: float) -> None:
        """Add ``usd`` (finite, >= 0; anything else is ignored) to ``fleet_spend_usd_total``.

        For spend ``observe_plan`` does not see (say, token-priced APIs); do not add instance
        spend here as well when ``observe_plan`` is fed, or it is counted twice.
        """
        amount = _usable(usd)
        if amount:
            self.spend_total.inc(amount)

    def record_provider_error(self, err: ProviderError, provider: str) -> None:
        """Count ``err`` in ``fleet_provider_errors_total{provider, kind}``."""
        self.provider_errors.labels(provider, err.kind.value).inc()

    def record_task(
        self,
        accelerator: str,
        kind: str,
        outcome: Outcome,
        wait_s: float | None = None,
        run_s: float | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """Count one finished task and observe its wait, run time and cost where known.

        A None, negative or non-finite wait, run time or cost is not observed (the count
        still is).

        Raises:
            ValueError: ``outcome`` is not ``success`` or ``failure``.

        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        self.tasks.labels(accelerator, kind, outcome).inc()
        for histogram, value in (
            (self.task_wait, wait_s),
            (self.task_duration, run_s),
            (self.task_cost, cost_usd),
        ):
            usable = _usable(value)
            if usable is not None:
                histogram.labels(accelerator, kind).observe(usable)

    def record_result(
        self,
        result: Mapping[str, Any],
        *,
        submitted_at: float | None = None,
        namespace: str = "",
    ) -> None:
        """Record a successful ``fleet.run`` result dict (see ``workers.tasks.run``).

        The kind comes from the result's ``queue`` (``parse_queue``; ``unknown`` when it is
        not a fleet queue); the wait is ``started_at - submitted_at`` when both are known
        (epoch seconds, ``time.time()``).
        """
        queue = result.get("queue")
        ref = parse_queue(queue, namespace) if isinstance(queue, str) else None
        started = result.get("started_at")
        wait = (
            float(started) - submitted_at
            if submitted_at is not None and isinstance(started, int | float)
            else None
        )
        run_s = result.get("run_s")
        cost = result.get("estimated_cost_usd")
        self.record_task(
            str(result.get("accelerator") or "unknown"),
            ref.kind.value if ref is not None else "unknown",
            "success",
            wait_s=wait,
            run_s=float(run_s) if isinstance(run_s, int | float) else None,
            cost_usd=float(cost) if isinstance(cost, int | float) else None,
        )

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; return (server, thread).

        Stop it with ``server.shutdown(); server.server_close(); thread.join()``. Port 0
        picks a free port: read it back from ``server.server_port``. Binds loopback unless
        told otherwise: the metrics name queues, pools and spend.
        """
        return start_http_server(port, addr, registry=self.registry)

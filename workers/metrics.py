"""Worker metrics: Prometheus series from every pool process, served by the worker's main process.

Celery's prefork children cannot be scraped one by one, so ``fleet worker --metrics-port P``
puts prometheus-client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a directory
private to the worker, set before any metric exists): each child writes its counters and
histograms to files there, and the main process serves them all, summed, on
``127.0.0.1:P``. Series (names shared with ``fleet.obs.metrics``):
``fleet_tasks_total{accelerator,kind,outcome}``, ``fleet_task_duration_seconds``,
``fleet_task_cost_usd``, ``fleet_task_wait_seconds`` and, refreshed by the main process, ``fleet_queue_depth{queue,state}``
for the queues this worker consumes.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.tls import TlsFiles

ENV = "PROMETHEUS_MULTIPROC_DIR"
DEPTH_INTERVAL_S = 2.0
_task_metrics: Any = None


def enable(port: int) -> str:
    """Switch this process (and the children it will fork) to multiprocess metrics; the directory."""
    directory = tempfile.mkdtemp(prefix="fleet-metrics-")
    os.environ[ENV] = directory
    os.environ["FLEET_METRICS_PORT"] = str(port)
    return directory


def enabled() -> bool:
    """True in a worker started with ``--metrics-port``."""
    return bool(os.environ.get(ENV)) and bool(os.environ.get("FLEET_METRICS_PORT"))


def _metrics() -> Any:  # noqa: ANN401 - prometheus-client metric objects
    global _task_metrics  # noqa: PLW0603 - one set of metric objects per process, on first use
    if _task_metrics is None:
        from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: PLC0415 - after the env var is set

        scratch = CollectorRegistry()  # values live in the multiprocess files, not here
        _task_metrics = (
            Counter("fleet_tasks", "Tasks run, by accelerator, kind and outcome.", ["accelerator", "kind", "outcome"], registry=scratch),
            Histogram("fleet_task_duration_seconds", "Task run time.", ["accelerator", "kind"], registry=scratch,
                      buckets=(0.01, 0.1, 0.5, 1, 5, 30, 120, 600, 3600, 6 * 3600, 24 * 3600)),
            Histogram("fleet_task_cost_usd", "Estimated cost per task.", ["accelerator", "kind"], registry=scratch,
                      buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100)),
            Histogram("fleet_task_wait_seconds", "Time from submit to start.", ["accelerator", "kind"], registry=scratch,
                      buckets=(0.01, 0.1, 0.5, 1, 5, 30, 120, 600, 3600)),
        )  # fmt: skip
    return _task_metrics


def record_task(
    accelerator: str,
    kind: str,
    outcome: str,
    run_s: float | None,
    cost_usd: float | None,
    wait_s: float | None = None,
) -> None:
    """Count one task (called in the pool process that ran it)."""
    if not enabled():
        return
    tasks, duration, cost, wait = _metrics()
    if wait_s is not None and wait_s >= 0:
        wait.labels(accelerator, kind).observe(wait_s)
    tasks.labels(accelerator, kind, outcome).inc()
    if run_s is not None and run_s >= 0:
        duration.labels(accelerator, kind).observe(run_s)
    if cost_usd is not None and cost_usd >= 0:
        cost.labels(accelerator, kind).observe(cost_usd)


def serve(
    port: int,
    queues: Sequence[str],
    broker_url: str,
    namespace: str,
    tls: TlsFiles | None = None,
) -> threading.Event:
    """In the worker's main process: serve every process's series, and keep queue depths fresh."""
    from prometheus_client import CollectorRegistry, Gauge, multiprocess, start_http_server  # noqa: PLC0415

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus-client leaves it untyped
    start_http_server(port, addr="127.0.0.1", registry=registry)
    depth = Gauge("fleet_queue_depth", "Messages per queue.", ["queue", "state"], registry=CollectorRegistry(),
                  multiprocess_mode="mostrecent")  # fmt: skip
    stop = threading.Event()
    if not broker_url.startswith(("redis://", "rediss://")):
        return stop

    def refresh() -> None:
        import redis  # noqa: PLC0415

        from fleet.stats import RedisStats  # noqa: PLC0415
        from fleet.tls import redis_client  # noqa: PLC0415

        source = RedisStats(redis_client(broker_url, tls), namespace)
        while not stop.is_set():
            try:
                for name, s in source.read(queues).items():
                    depth.labels(name, "ready").set(s.ready)
                    depth.labels(name, "unacked").set(s.unacked)
            except (OSError, redis.RedisError):
                pass  # the broker may be restarting; try again next tick
            stop.wait(DEPTH_INTERVAL_S)

    threading.Thread(target=refresh, name="fleet-metrics-depth", daemon=True).start()
    return stop

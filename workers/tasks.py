"""The one Celery task, ``fleet.run``: thin by design.

It decodes the spec, checks that this worker's hardware can hold it (a second line of
defence behind the queue scheme), leases the devices it needs, calls the handler and
returns the handler's output with where and how it ran. A bad spec or a task this
worker cannot hold fails with a clear error and is never executed; the worker goes on.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import structlog
from celery import Task, signals
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from fleet.app import TASK_NAME, app
from fleet.compat import devices_needed, memory_needed_gb
from fleet.obs.logs import get_logger
from fleet.settings import Settings
from fleet.spec import SpecError, parse_spec
from workers import identity
from workers import metrics as worker_metrics
from workers.devices import DeviceLeases
from workers.handlers import HandlerContext, HandlerError, run_handler

log = get_logger("fleet.task")


@signals.setup_logging.connect(weak=False)
def _keep_our_logging(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
    """With a receiver here Celery leaves logging alone: ours (structlog) stays in charge."""


@signals.task_prerun.connect(weak=False)
def _bind_task(task_id: str | None = None, **_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
    structlog.contextvars.bind_contextvars(task_id=task_id)


@signals.task_postrun.connect(weak=False)
def _unbind_task(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
    structlog.contextvars.clear_contextvars()


@signals.task_failure.connect(weak=False)
def _log_failure(exception: BaseException | None = None, **_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
    """One structured event per failed task (the task id is still bound here)."""
    me = identity.current()
    log.error(
        "task.failed",
        accelerator=me.accelerator,
        error=type(exception).__name__,
        detail=str(exception)[:300],
    )
    worker_metrics.record_task(me.accelerator, "unknown", "failure", None, None)


class TaskRefusedError(Exception):
    """The worker will not run the message (invalid spec, or more than it can hold)."""


_leases: DeviceLeases | None = None


@cache
def _settings() -> Settings:
    return Settings.from_env()


def _device_leases(devices: int) -> DeviceLeases:
    global _leases  # noqa: PLW0603 - one lease table per pool process, built on first use
    if _leases is None:
        default = Path(tempfile.gettempdir()) / f"fleet-devices-{os.getppid()}"
        directory = Path(os.environ.get("FLEET_DEVICE_LOCK_DIR") or default)
        _leases = DeviceLeases(directory, devices)
    return _leases


# resultrepr_maxsize: Celery reprs every return value for its log line, even when that
# line is not logged; a short cap keeps that cheap (it was a third of a trivial task's
# time) and keeps task outputs, which may be sensitive, out of worker logs.
@app.task(name=TASK_NAME, bind=True, resultrepr_maxsize=128)
def run(
    self: Task[Any, Any], spec: dict[str, Any], placement: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one TaskSpec on this worker's accelerator; see the module docstring."""
    me = identity.current()
    try:
        task = parse_spec(spec)
    except SpecError as exc:
        log.warning("task.refused", reason="invalid spec", detail=str(exc)[:500])
        raise TaskRefusedError(f"invalid spec: {exc}") from None
    need = memory_needed_gb(task)
    devices = devices_needed(need, me.memory_gb, me.devices)
    if devices is None:
        log.warning(
            "task.refused", reason="does not fit this worker", need_gb=need, worker=me.label
        )
        raise TaskRefusedError(
            f"needs {need:,.1f} GB; this worker ({me.label}) holds {me.devices} x {me.memory_gb:g} GB"
        )
    settings = _settings()
    started = time.time()
    log.info(
        "task.started",
        queue=(self.request.delivery_info or {}).get("routing_key"),
        accelerator=me.accelerator,
        kind=task.kind.value,
        devices=devices,
        estimated_cost_usd=(placement or {}).get("estimated_cost_usd"),
    )
    t0 = time.perf_counter()
    with _device_leases(me.devices).lease(devices) as leased:
        ctx = HandlerContext(
            task_id=str(self.request.id),
            accelerator=me.accelerator,
            emulated=me.emulated,
            artifact_dir=settings.artifact_dir,
            devices=leased,
        )
        try:
            output = run_handler(task, ctx)
        except HandlerError as exc:
            raise TaskRefusedError(f"bad input: {exc}") from None
    run_s = time.perf_counter() - t0
    delivery = self.request.delivery_info or {}
    submitted = (placement or {}).get("submitted_at")
    wait_s = started - submitted if isinstance(submitted, (int, float)) else None
    worker_metrics.record_task(
        me.accelerator,
        task.kind.value,
        "success",
        run_s,
        (placement or {}).get("estimated_cost_usd"),
        wait_s,
    )
    log.info(
        "task.finished",
        queue=delivery.get("routing_key"),
        accelerator=me.accelerator,
        emulated=me.emulated,
        kind=task.kind.value,
        run_s=round(run_s, 6),
        estimated_cost_usd=(placement or {}).get("estimated_cost_usd"),
    )
    return {
        "task_id": self.request.id,
        "output": output,
        "accelerator": me.accelerator,
        "emulated": me.emulated,
        "worker": self.request.hostname,
        "queue": delivery.get("routing_key"),
        "devices": list(leased),
        "started_at": started,
        "run_s": run_s,
        "wait_s": wait_s,
        "estimated_cost_usd": (placement or {}).get("estimated_cost_usd"),
    }


@inspect_command()
def fleet_identity(state: Any, **_: Any) -> dict[str, Any]:  # noqa: ANN401, ARG001 - Celery's control API
    """Remote-control command: this worker's accelerator, devices and emulated flag."""
    me = identity.current()
    return {
        "accelerator": me.accelerator,
        "devices": me.devices,
        "emulated": me.emulated,
        "product": me.product,
        "queues": list(me.queues),
        "concurrency": me.concurrency,
        "instance_id": os.environ.get("FLEET_INSTANCE_ID"),
        "active": len(worker_state.active_requests),
    }

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
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import structlog
from celery import Task, signals
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from fleet.app import TASK_NAME, app
from fleet.catalog import default_catalog
from fleet.catalog.apis import find_api_offer
from fleet.compat import devices_needed, memory_needed_gb
from fleet.models.registry import ModelEntry
from fleet.obs.logs import get_logger
from fleet.settings import Settings
from fleet.spec import SpecError, TaskSpec, check_size, parse_spec
from workers import apicontrol, engine_host, identity, once, serving
from workers import metrics as worker_metrics
from workers.devices import DeviceLeases
from workers.engines.base import Engine, EngineError, EngineOutput, EngineRequest
from workers.handlers import HandlerContext, HandlerError, run_handler
from workers.intake import GUARDED_STRATEGY

log = get_logger("fleet.task")
ENGINE_POLL_S = 0.5


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


class SensitiveTaskError(Exception):
    """A sensitive task failed; the message names the error type only, never input text."""


WITHHELD = "details withheld: sensitive task"
# Exceptions that steer Celery (retry, time limits) pass through the sensitive wrapper as is.
_CELERY_CONTROL = (Retry, Ignore, Reject, SoftTimeLimitExceeded)


def _refusal_detail(spec: object, exc: SpecError) -> str:
    """The refusal's message: the SpecError, or for a sensitive spec only the fields' names.

    An error inside ``input`` can name the input's own keys, so a spec marked sensitive
    (even an otherwise invalid one) gets only top-level field names back.
    """
    if not (isinstance(spec, dict) and spec.get("sensitive") is True):
        return str(exc)
    fields = sorted({field.split(".", 1)[0] for field, _ in exc.errors if field})
    return f"{', '.join(fields) or 'spec'} invalid ({WITHHELD})"


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


# resultrepr_maxsize=0: Celery reprs every return value for its "succeeded" log line, even
# when that line is not logged, and its saferepr walks the whole result whatever the cap;
# 0 stops it at the first token (the line then ends in "..."), and keeps task outputs,
# which may be sensitive, out of worker logs.
# Strategy: a body of the wrong shape is rejected instead of stopping the worker (intake).
# A dotted path, as Celery expects: a function object would be bound as a method.
# track_started=False: the guard writes STARTED itself, in its claim step where it can
# (workers.records); clients still see STARTED.
@app.task(
    name=TASK_NAME,
    bind=True,
    resultrepr_maxsize=0,
    Strategy=GUARDED_STRATEGY,
    track_started=False,
)
def run(
    self: Task[Any, Any], spec: dict[str, Any], placement: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one TaskSpec on this worker's accelerator; see the module docstring.

    At most once to completion per task id, poison tasks dead-lettered, STARTED and
    SUCCESS written with the guard's own steps: ``workers.once``.
    """
    return once.guarded(
        self,
        spec,
        placement,
        lambda: execute(self, spec, placement),
        refused=(TaskRefusedError,),
        status=True,
    )


def execute(
    self: Task[Any, Any],
    spec: dict[str, Any],
    placement: dict[str, Any] | None = None,
    task_id: str | None = None,
) -> dict[str, Any]:
    """The body of ``fleet.run``, shared with workflow steps and packed tasks.

    ``self`` is the running Celery task (its request gives the queue, and the task id
    unless ``task_id`` names another: one spec of a packed message, ``workers.pack``).

    Raises:
        TaskRefusedError: invalid spec, more than this worker holds, or bad input.

    """
    me = identity.current()
    try:
        task = parse_spec(spec)
        check_size(task, _settings().max_task_bytes)  # the cap at submit, held here too
    except SpecError as exc:
        detail = _refusal_detail(spec, exc)
        log.warning("task.refused", reason="invalid spec", detail=detail[:500])
        raise TaskRefusedError(f"invalid spec: {detail}") from None
    devices = _api_check(task, me.api_provider) if me.api_provider else _fit_check(task, me)
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
    # An API worker holds no device: its threads share the endpoint (rate-limited there).
    leases = nullcontext((0,)) if me.api_provider else _device_leases(me.devices).lease(devices)
    with leases as leased:
        ctx = HandlerContext(
            task_id=task_id or str(self.request.id),
            accelerator=me.accelerator,
            emulated=me.emulated,
            artifact_dir=settings.artifact_dir,
            devices=leased,
        )
        try:
            if me.engine == "reference" or me.api_provider:
                output = run_handler(task, ctx)
                made = _made_by_reference(task, output)
            else:
                output, made = _run_engine(task, me, ctx, settings)
        except HandlerError as exc:
            raise TaskRefusedError(f"bad input: {WITHHELD if task.sensitive else exc}") from None
        except Exception as exc:
            if not task.sensitive or isinstance(exc, _CELERY_CONTROL):
                raise
            # The original's message and traceback would reach logs and the result store.
            raise SensitiveTaskError(f"{type(exc).__name__} ({WITHHELD})") from None
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
        "task_id": task_id or self.request.id,
        "output": output,
        "accelerator": me.accelerator,
        # An API worker is real, but the endpoint it calls may be fleet's emulated one.
        "emulated": me.emulated or output.get("emulated") is True,
        "worker": self.request.hostname,
        "queue": delivery.get("routing_key"),
        "devices": list(leased),
        "started_at": started,
        "run_s": run_s,
        "wait_s": wait_s,
        "estimated_cost_usd": (placement or {}).get("estimated_cost_usd"),
        # Known after the run only where the work is priced per token (API pools).
        "actual_cost_usd": output.get("actual_cost_usd"),
        "tokens": {"in": output.get("tokens_in"), "out": output.get("tokens_out")},
        **made,
    }


def _made_by_reference(task: TaskSpec, output: dict[str, Any]) -> dict[str, Any]:
    """How a reference (or API) result was made: no real model ran here."""
    api = output.get("engine") == "api" or str(output.get("engine", "")).startswith("api")
    return {
        "engine": {"name": "api" if api else "reference", "version": output.get("engine")},
        "reference": not api,
        "model": {"name": task.model.name, "revision": None, "pretrained": None},
        "ttft_s": output.get("ttft_s"),
        "tokens_per_s": None,
        "device": "cpu" if not api else None,
    }


def _run_engine(
    task: TaskSpec, me: identity.WorkerIdentity, ctx: HandlerContext, settings: Settings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``task`` on this process's real engine; returns the output and how it was made.

    Raises:
        TaskRefusedError: the worker does not hold the task's model (nor loads it on demand).
        HandlerError: bad input.
        EngineError: the engine failed (retried by the guard).

    """
    state = engine_host.process_serving(me, settings)
    entry = state.model_for(task.model.name, task.kind)
    on_demand = task.kind in state.engine.loads_on_demand
    if entry is None or (entry.name not in me.models and not on_demand):
        held = ", ".join(me.models) or "none"
        log.warning("task.refused", reason="model not held", model=task.model.name, held=held)
        raise TaskRefusedError(
            f"model {task.model.name!r} is not held by this worker (holds {held})"
        )
    _check_adapter(task, settings)
    state.hold(entry)  # a no-op for held models; training loads on demand
    request = state.request_for(entry, task, ctx.task_id, ctx.devices, settings.artifact_dir)
    made = _run_through_restarts(state.engine, request, _engine_wait_s(me, request.model))
    output: dict[str, Any] = {
        "kind": task.kind.value,
        "model": entry.name,
        "emulated": me.emulated,
        **made.output,
        "tokens_in": made.tokens_in,
        "tokens_out": made.tokens_out,
    }
    return output, {
        "engine": {"name": state.engine.name, "version": state.engine.version()},
        "reference": False,
        "model": {
            "name": entry.name,
            "revision": entry.revision,
            "pretrained": entry.pretrained,
            **({} if entry.pretrained else {"note": "RANDOM WEIGHTS: not a pretrained model"}),
        },
        "ttft_s": made.ttft_s,
        "tokens_per_s": made.tokens_per_s,
        "tpot_ms": made.tpot_ms,
        **({} if made.slo_tpot_met is None else {"slo_tpot_met": made.slo_tpot_met}),
        "device": state.device,
        "engine_run_s": made.run_s,
    }


def _engine_wait_s(me: identity.WorkerIdentity, entry: ModelEntry) -> float:
    """How long a task waits for a restarting engine server: the family's cold start + load."""
    return default_catalog().family(me.accelerator).cold_start_s + entry.load_s()


def _run_through_restarts(engine: Engine, request: EngineRequest, wait_s: float) -> EngineOutput:
    """``engine.run``, waiting out a server restart instead of failing the attempt.

    An ``EngineError`` while the engine says it does not serve the model (a vLLM server that
    died and is being restarted by its supervisor) waits until it serves again, at most
    ``wait_s``, then runs again; an ``EngineError`` from a serving engine is raised as is.

    Raises:
        EngineError: the engine failed while serving, or did not come back within ``wait_s``.

    """
    deadline = time.monotonic() + wait_s
    name = request.model.name
    while True:
        try:
            return engine.run(request)
        except EngineError as exc:
            if engine.ready(name) or time.monotonic() >= deadline:
                raise
            log.warning("engine.waiting", reason="engine not serving", detail=str(exc)[:200])
            while not engine.ready(name):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(ENGINE_POLL_S)


def _check_adapter(task: TaskSpec, settings: Settings) -> None:
    """``input.adapter`` may only name an adapter a fleet fine-tune wrote (under the artifact dir).

    Raises:
        TaskRefusedError: the path lies outside ``FLEET_ARTIFACT_DIR``.

    """
    data = task.input if isinstance(task.input, dict) else {}
    adapter = data.get("adapter")
    if not isinstance(adapter, str):
        return
    root = settings.artifact_dir.resolve()
    if not Path(adapter).resolve().is_relative_to(root):
        raise TaskRefusedError(
            f"bad input: input.adapter: not an adapter under the artifact directory {root}"
        )


def _engine_ready(me: identity.WorkerIdentity) -> bool:
    """Whether this process's engine serves its models (reference: always)."""
    if me.engine == "reference":
        return True
    state = serving.current()
    return state is not None and all(state.engine.ready(m) for m in me.models)


def _fit_check(task: TaskSpec, me: identity.WorkerIdentity) -> int:
    """Devices ``task`` needs on this worker; refuses a task it cannot hold.

    On a per-vCPU family (cpu) the devices are task slots sharing one host's RAM: a task
    fits when the RAM holds it and takes one slot.
    """
    need = memory_needed_gb(task)
    per_vcpu = default_catalog().family(me.accelerator).per_vcpu
    devices = devices_needed(need, me.memory_gb, 1 if per_vcpu else me.devices)
    if devices is None:
        log.warning(
            "task.refused", reason="does not fit this worker", need_gb=need, worker=me.label
        )
        held = f"{me.memory_gb:g} GB of RAM" if per_vcpu else f"{me.devices} x {me.memory_gb:g} GB"
        raise TaskRefusedError(f"needs {need:,.1f} GB; this worker ({me.label}) holds {held}")
    return devices


def _api_check(task: TaskSpec, provider: str) -> int:
    """An API worker holds no model: it refuses a model its provider does not serve."""
    if find_api_offer(default_catalog(), provider, task.model.name) is None:
        log.warning("task.refused", reason="model not served", provider=provider)
        raise TaskRefusedError(
            f"model {task.model.name!r} is not served by API provider {provider}"
        )
    return 1


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
        # An API worker's in-flight limit (``workers.apicontrol``); else the pool size.
        "concurrency": apicontrol.current_limit(me),
        "engine": me.engine,
        "models": list(me.models),
        "ready": _engine_ready(me),
        "instance_id": os.environ.get("FLEET_INSTANCE_ID"),
        "active": len(worker_state.active_requests),
    }

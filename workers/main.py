"""``fleet worker``: detect (or emulate) the chip, derive its queues, run a real Celery worker.

The worker consumes exactly the queues its accelerator can serve
(``fleet.queues.queues_for_worker``), with one pool process per device unless told
otherwise. ``--accelerator auto`` probes the machine (``workers.detect``); a named
accelerator that is not the detected one makes a process that emulates that chip, and
it is labelled emulated everywhere.

Engines (``--engine``, ``--model``; ``workers.serving``): a worker holding models consumes
only those models' queues (``...@<model>``) and loads them before it consumes: an in-process
engine (transformers) loads in each pool process right after the prefork fork (the parent
never imports torch or touches a device; Celery sends a pool process no task before its
initializer returns), a server engine (vLLM) is started and supervised by the parent, which
waits for it to serve before consuming. The heartbeat says engine, models and readiness.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from celery import signals

from fleet.catalog import Catalog, Family, default_catalog
from fleet.models.registry import ModelConfigError, ModelRegistry, registry_from_file
from fleet.obs.logs import configure_logging, get_logger
from fleet.queues import queues_for_worker
from fleet.registry import Heartbeat, WorkerInfo
from fleet.settings import Settings, masked
from fleet.tls import redis_client
from workers import apicontrol, lease, preemption, shutdown
from workers import identity as ident
from workers.detect import Detected, detect
from workers.engines import engine_class
from workers.serving import ServingError, engine_runtime, serving_plan

log = get_logger("fleet.worker")


@dataclass(frozen=True, slots=True)
class Serve:
    """What a worker is told to serve: an engine, the models to hold, the config of the registry."""

    engine: str = "reference"
    models: tuple[str, ...] = ()
    config_path: str | None = None


def plan_serving(
    me: ident.WorkerIdentity, family: Family, serve: Serve, registry: ModelRegistry, namespace: str
) -> ident.WorkerIdentity:
    """``me`` with its engine, held models and model queues (pure but for the engine check).

    Raises:
        ServingError: unknown model, an engine the model does not allow, an engine that does
            not run here (missing package, no device), more than one model for vLLM.

    """
    engine = engine_class(serve.engine)
    runtime = engine_runtime(family, engine, emulated=me.emulated)
    why = engine.unavailable(runtime)
    if why is not None:
        raise ServingError(f"engine {engine.name} is unavailable on {runtime}: {why}")
    if engine.name == "vllm" and len(serve.models) != 1:
        raise ServingError("engine vllm serves one model per worker: give exactly one --model")
    plan = serving_plan(registry, engine, serve.models, family)
    held = tuple(registry.get(m).name for m in serve.models)
    return ident.with_engine(me, family, engine.name, plan, held, runtime.value, namespace)


def resolve_identity(
    catalog: Catalog,
    accelerator: str,
    devices: int | None,
    concurrency: int | None,
    namespace: str,
    detected: Detected | None = None,
) -> ident.WorkerIdentity:
    """Decide what this worker is (pure, given what detection found).

    ``accelerator`` is ``auto`` or a canonical name. A name that matches the detected
    chip uses the real device count; any other name is an emulation.

    A per-vCPU family (``cpu``) has no device to share: its ``devices`` are task slots,
    one per task it runs at once (``devices``, else ``concurrency``, else one per vCPU),
    leased like GPUs so that each pool process gets its own slot. Queue tiers stay at one
    and the memory check uses the host's RAM once (``workers.tasks``), whatever the count.

    Raises:
        KeyError: unknown accelerator name.

    """
    if accelerator == "auto" or (detected is not None and detected.accelerator == accelerator):
        if detected is None:
            raise ValueError("auto detection needs a detection result")
        family = catalog.family(detected.accelerator)
        if family.per_vcpu:
            n = devices or concurrency or detected.vcpus or 1
        else:
            n = devices or detected.devices
        return ident.WorkerIdentity(
            accelerator=detected.accelerator,
            devices=n,
            memory_gb=detected.memory_gb,
            emulated=False,
            product=detected.product,
            queues=queues_for_worker(family, n, namespace),
            concurrency=concurrency or n,
        )
    per_vcpu = catalog.family(accelerator).per_vcpu
    n = devices or ((concurrency or 1) if per_vcpu else 1)
    return ident.emulated_identity(catalog, accelerator, n, concurrency, namespace)


def start(
    accelerator: str = "auto",
    devices: int | None = None,
    concurrency: int | None = None,
    pool: str = "prefork",
    hostname: str | None = None,
    loglevel: str = "INFO",
    metrics_port: int | None = None,
    api: str | None = None,
    serve: Serve | None = None,
) -> None:
    """Run the worker in this process until it is stopped (SIGTERM: warm shutdown).

    With ``api`` (a provider), an API worker: a light CPU process whose accelerator is
    ``api-<provider>``, consuming only ``inference.api-<provider>`` on a threads pool
    (default 16 threads), forwarding each task to the provider's endpoint.

    With ``serve`` (an engine and models), see the module docstring.

    Raises:
        KeyError: an unknown accelerator, or a provider without API offers.
        ServingError: the engine or a model cannot be served here (the message says why).

    """
    settings = Settings.from_env()
    catalog = default_catalog()
    serve = serve or Serve()
    registry: ModelRegistry | None = None
    if api is not None:
        me = ident.api_identity(catalog, api, concurrency, settings.namespace)
        pool = "solo" if pool == "solo" else "threads"  # I/O-bound: threads, not processes
    else:
        detected = detect()
        me = resolve_identity(
            catalog, accelerator, devices, concurrency, settings.namespace, detected
        )
        try:
            registry = registry_from_file(serve.config_path or settings.config_path)
        except ModelConfigError as exc:
            raise ServingError(str(exc)) from None
        me = plan_serving(me, catalog.family(me.accelerator), serve, registry, settings.namespace)
    os.environ[ident.ENV_VAR] = me.to_json()
    if serve.config_path:  # pool processes read the same registry
        os.environ["FLEET_CONFIG"] = serve.config_path
    node = hostname or f"{me.accelerator}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    configure_logging(loglevel)
    log.info(
        "worker.starting",
        node=node,
        broker=masked(settings.broker_url),
        accelerator=me.accelerator,
        devices=me.devices,
        emulated=me.emulated,
        engine=me.engine,
        models=list(me.models),
        runtime=me.runtime,
        note="EMULATED: a CPU process standing in for this accelerator"
        if me.emulated
        else ("API forwarder" if api else "real hardware"),
        queues=list(me.queues),
    )
    from workers import engine_host  # noqa: PLC0415 - after the identity is in the environment

    stop = shutdown.install()  # SIGTERM: stop consuming, a bounded grace, then requeue
    host = engine_host.prepare(me, registry, settings, pool)  # vLLM: started, ready
    beat = _register_heartbeat(settings, me, node, host.ready)
    if me.engine == "reference" and not me.emulated and api is None:
        log.warning(
            "worker.reference_engine",
            note="real hardware running the CPU reference handlers: results are not a model's;"
            " start it with --engine and --model to run real models",
        )
    preemption.install(stop, node, settings.namespace)  # spot notices drain the same way
    if metrics_port:
        from workers import metrics  # noqa: PLC0415

        metrics.enable(metrics_port)  # before any metric exists, and before the pool forks

        @signals.worker_ready.connect(weak=False)
        def _serve_metrics(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
            metrics.serve(
                metrics_port, me.queues, settings.broker_url, settings.namespace, settings.tls
            )
            log.info("worker.metrics", url=f"http://127.0.0.1:{metrics_port}/metrics")

    from fleet.app import app  # noqa: PLC0415 - after the identity is in the environment

    host.install(app)  # in-process engines: load in each pool process, after the fork
    lease.install(app, settings)  # Redis: extend the leases of the messages this worker holds
    if api is not None:  # the autoscaler sets its in-flight limit (fleet_api_concurrency)
        apicontrol.install(app, None if beat is None else _report_limit(beat))
    _check_consumer_timeout(settings, me.queues, app.conf.broker_use_ssl)
    try:
        _run_celery(app, me, pool, node, loglevel)
    finally:
        host.stop()


def _run_celery(app: Any, me: ident.WorkerIdentity, pool: str, node: str, loglevel: str) -> None:  # noqa: ANN401 - the Celery app
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(me.queues),
            "--concurrency",
            str(me.concurrency),
            "--pool",
            pool,
            "--hostname",
            node,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _check_consumer_timeout(settings: Settings, queues: tuple[str, ...], ssl: object) -> None:
    """RabbitMQ: warn when the broker's consumer timeout is shorter than our longest task."""
    if settings.is_redis:
        return
    ssl_options = ssl if isinstance(ssl, dict) else None
    from fleet.app import REDELIVERY_WINDOW_S, TIME_LIMITS  # noqa: PLC0415
    from fleet.brokercheck import warn_if_consumer_timeout_short  # noqa: PLC0415

    warn_if_consumer_timeout_short(
        settings, queues, TIME_LIMITS, REDELIVERY_WINDOW_S * 1000, ssl=ssl_options
    )


def _report_limit(beat: Heartbeat) -> Callable[[int], None]:
    """A callback putting an API worker's new in-flight limit in its registry entry."""

    def report(limit: int) -> None:
        beat.update(replace(beat.info, concurrency=limit))

    return report


def _register_heartbeat(
    settings: Settings, me: ident.WorkerIdentity, node: str, ready: Callable[[], bool]
) -> Heartbeat | None:
    if not settings.is_redis:
        return None
    info = WorkerInfo(
        hostname=node,
        accelerator=me.accelerator,
        devices=me.devices,
        emulated=me.emulated,
        queues=me.queues,
        pid=os.getpid(),
        product=me.product,
        concurrency=me.concurrency,
        instance_id=os.environ.get("FLEET_INSTANCE_ID"),
        engine=me.engine,
        models=me.models,
        ready=ready(),
    )
    beat = Heartbeat(
        redis_client(settings.broker_url, settings.tls),
        info,
        settings.namespace,
        refresh=lambda i: replace(i, ready=ready()),
    )

    @signals.worker_ready.connect(weak=False)
    def _on_ready(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _on_shutdown(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.stop()

    return beat

"""``fleet worker``: detect (or emulate) the chip, derive its queues, run a real Celery worker.

The worker consumes exactly the queues its accelerator can serve
(``fleet.queues.queues_for_worker``), with one pool process per device unless told
otherwise. ``--accelerator auto`` probes the machine (``workers.detect``); a named
accelerator that is not the detected one makes a process that emulates that chip, and
it is labelled emulated everywhere.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import redis
from celery import signals

from fleet.catalog import Catalog, default_catalog
from fleet.obs.logs import configure_logging, get_logger
from fleet.queues import queues_for_worker
from fleet.registry import Heartbeat, WorkerInfo
from fleet.settings import Settings, masked
from workers import identity as ident
from workers.detect import Detected, detect

log = get_logger("fleet.worker")


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

    Raises:
        KeyError: unknown accelerator name.

    """
    if accelerator == "auto" or (detected is not None and detected.accelerator == accelerator):
        if detected is None:
            raise ValueError("auto detection needs a detection result")
        family = catalog.family(detected.accelerator)
        n = 1 if family.per_vcpu else (devices or detected.devices)
        return ident.WorkerIdentity(
            accelerator=detected.accelerator,
            devices=n,
            memory_gb=detected.memory_gb,
            emulated=False,
            product=detected.product,
            queues=queues_for_worker(family, n, namespace),
            concurrency=concurrency or (detected.vcpus or 1 if family.per_vcpu else n),
        )
    return ident.emulated_identity(catalog, accelerator, devices or 1, concurrency, namespace)


def start(
    accelerator: str = "auto",
    devices: int | None = None,
    concurrency: int | None = None,
    pool: str = "prefork",
    hostname: str | None = None,
    loglevel: str = "INFO",
    metrics_port: int | None = None,
) -> None:
    """Run the worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    settings = Settings.from_env()
    catalog = default_catalog()
    detected = detect()
    me = resolve_identity(catalog, accelerator, devices, concurrency, settings.namespace, detected)
    os.environ[ident.ENV_VAR] = me.to_json()
    node = hostname or f"{me.accelerator}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    configure_logging(loglevel)
    log.info(
        "worker.starting",
        node=node,
        broker=masked(settings.broker_url),
        accelerator=me.accelerator,
        devices=me.devices,
        emulated=me.emulated,
        note="EMULATED: a CPU process standing in for this accelerator"
        if me.emulated
        else "real hardware",
        queues=list(me.queues),
    )
    _register_heartbeat(settings, me, node)
    if metrics_port:
        from workers import metrics  # noqa: PLC0415

        metrics.enable(metrics_port)  # before any metric exists, and before the pool forks

        @signals.worker_ready.connect(weak=False)
        def _serve_metrics(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
            metrics.serve(metrics_port, me.queues, settings.broker_url, settings.namespace)
            log.info("worker.metrics", url=f"http://127.0.0.1:{metrics_port}/metrics")

    from fleet.app import app  # noqa: PLC0415 - after the identity is in the environment

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


def _register_heartbeat(settings: Settings, me: ident.WorkerIdentity, node: str) -> None:
    if not settings.is_redis:
        return
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
    )
    beat = Heartbeat(redis.Redis.from_url(settings.broker_url), info, settings.namespace)

    @signals.worker_ready.connect(weak=False)
    def _on_ready(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _on_shutdown(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.stop()

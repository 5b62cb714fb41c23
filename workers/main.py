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
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from celery import signals

from fleet.catalog import Catalog, default_catalog
from fleet.obs.logs import configure_logging, get_logger
from fleet.queues import queues_for_worker
from fleet.registry import Heartbeat, WorkerInfo
from fleet.settings import Settings, masked
from fleet.tls import redis_client
from workers import apicontrol, lease, preemption, shutdown
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
    api: str | None = None,
) -> None:
    """Run the worker in this process until it is stopped (SIGTERM: warm shutdown).

    With ``api`` (a provider), an API worker: a light CPU process whose accelerator is
    ``api-<provider>``, consuming only ``inference.api-<provider>`` on a threads pool
    (default 16 threads), forwarding each task to the provider's endpoint.

    Raises:
        KeyError: an unknown accelerator, or a provider without API offers.

    """
    settings = Settings.from_env()
    catalog = default_catalog()
    if api is not None:
        me = ident.api_identity(catalog, api, concurrency, settings.namespace)
        pool = "solo" if pool == "solo" else "threads"  # I/O-bound: threads, not processes
    else:
        detected = detect()
        me = resolve_identity(
            catalog, accelerator, devices, concurrency, settings.namespace, detected
        )
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
        else ("API forwarder" if api else "real hardware"),
        queues=list(me.queues),
    )
    beat = _register_heartbeat(settings, me, node)
    stop = shutdown.install()  # SIGTERM: stop consuming, a bounded grace, then requeue
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

    lease.install(app, settings)  # Redis: extend the leases of the messages this worker holds
    if api is not None:  # the autoscaler sets its in-flight limit (fleet_api_concurrency)
        apicontrol.install(app, None if beat is None else _report_limit(beat))
    _check_consumer_timeout(settings, me.queues, app.conf.broker_use_ssl)
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
    settings: Settings, me: ident.WorkerIdentity, node: str
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
    )
    beat = Heartbeat(redis_client(settings.broker_url, settings.tls), info, settings.namespace)

    @signals.worker_ready.connect(weak=False)
    def _on_ready(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _on_shutdown(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        beat.stop()

    return beat

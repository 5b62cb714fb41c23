"""The Celery app: configuration only, no task logic.

Choices and why:

* JSON only (``accept_content=["json"]``): a pickle message is refused, not executed.
* Late acks, ``task_reject_on_worker_lost``: a task whose worker dies goes back to its
  queue instead of being lost.
* Prefetch 1: a GPU worker holds only the task it runs, so a long fine-tune never sits
  behind another in one worker's buffer while other workers idle.
* Time limits per kind (``TIME_LIMITS``). On Redis a short visibility timeout
  (``FLEET_VISIBILITY_TIMEOUT_S``, default 300 s) plus a lease each live worker extends
  every third of it for the messages it holds (``workers.lease``): a task running far
  longer than the timeout is not run twice (the Celery trap, celery#5935), and a dead
  worker's task comes back after about one timeout (the unacked sweep runs every tenth
  of it, 1-30 s) instead of a day later. On
  RabbitMQ the longest limit is set per queue with ``x-consumer-timeout`` (3.12+; older
  servers apply their server-wide ``consumer_timeout``).
* Priorities 0-9 on both brokers; Redis groups them in four bands (kombu's priority
  sub-queues), RabbitMQ keeps all ten.
* Task events are off by default: Flower switches them on at run time
  (``enable_events``) while it watches; always-on events halve trivial-task throughput.

``app`` is the module-level app the worker and ``celery -A fleet.app`` use;
``create_app(settings)`` builds another, e.g. for a client talking to another broker.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery import Celery

from fleet.catalog import default_catalog
from fleet.models.registry import (
    ModelConfigError,
    ModelRegistry,
    builtin_registry,
    registry_from_file,
)
from fleet.queues import DEFAULT_EXCHANGE, REDIS_PRIORITY_STEPS, all_queue_names, kombu_queue
from fleet.routing import TASK_NAME, route_task
from fleet.settings import Settings
from fleet.signing import SigningFiles, enable_signing
from fleet.spec import TaskKind
from fleet.tls import celery_tls_conf

__all__ = ["PACK_TASK_NAME", "TASK_NAME", "TIME_LIMITS", "app", "create_app"]

# Several small specs in one message, each its own fleet task (``Fleet.submit_many(pack=N)``,
# run by ``workers.pack``).
PACK_TASK_NAME = "fleet.run_pack"

# Hard time limit per kind, seconds. The soft limit is a minute earlier.
TIME_LIMITS: dict[TaskKind, int] = {
    TaskKind.INFERENCE: 15 * 60,
    TaskKind.EMBEDDING: 15 * 60,
    TaskKind.BATCH: 6 * 3600,
    TaskKind.FINE_TUNE: 12 * 3600,
    TaskKind.TRAINING: 24 * 3600,
}
LEASE_MARGIN_S = 3600
REDELIVERY_WINDOW_S = max(TIME_LIMITS.values()) + LEASE_MARGIN_S  # RabbitMQ consumer timeout


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between sweeps for expired unacked Redis messages: a tenth of the timeout, 1-30."""
    return max(1, min(30, visibility_timeout_s // 10))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options: the Redis visibility timeout, its sweep, and priority sub-queues."""
    if not settings.is_redis:
        return {"confirm_publish": True}
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
        "unacked_restore_throttle": 1,  # every sweep scans: the interval alone sets the pace
        "priority_steps": list(REDIS_PRIORITY_STEPS),
        "sep": ":",
        "queue_order_strategy": "priority",
        # A broker that stops answering (restart, partition) fails a call in bounded time
        # instead of hanging it; the worker then reconnects (broker_connection_retry).
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": REDIS_HEALTH_CHECK_S,
    }


# Bounded waits on Redis (seconds): longer than kombu's 1 s BRPOP, short enough that a
# dead server is noticed within a loop or two.
REDIS_SOCKET_TIMEOUT_S = 30
REDIS_CONNECT_TIMEOUT_S = 5
REDIS_HEALTH_CHECK_S = 25
# A worker storing a result while the result store restarts retries this many times
# (with Celery's back-off, ~2 min in all) instead of failing the finished task.
RESULT_STORE_RETRIES = 20


def resilience_conf() -> dict[str, Any]:
    """Celery settings for broker and result-store outages (both brokers).

    Workers keep retrying the broker connection after start-up and on loss (Celery's
    defaults, stated here so they are not changed by accident); the Redis result store
    gets the same bounded socket timeouts as the broker; storing a result retries
    across a restart of the store. RabbitMQ keeps its 120 s AMQP heartbeat.
    """
    return {
        "broker_connection_retry": True,
        "broker_connection_max_retries": 100,
        "broker_heartbeat": 120,
        "redis_socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "redis_socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "redis_retry_on_timeout": True,
        "result_backend_always_retry": True,
        "result_backend_max_retries": RESULT_STORE_RETRIES,
    }


def app_models(settings: Settings) -> ModelRegistry:
    """The registry whose model queues the app declares (``FLEET_CONFIG``'s, else built-ins).

    A broken config does not stop the app from being built: the built-ins are used, and the
    commands that read the config (``fleet worker``, ``fleet config check``) report the error.
    """
    try:
        return registry_from_file(settings.config_path)
    except ModelConfigError:
        return builtin_registry()


def create_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    app = Celery(
        "fleet", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False
    )
    models = app_models(settings)
    names = all_queue_names(default_catalog(), settings.namespace, models)
    queues = [kombu_queue(n) for n in names]
    if not settings.is_redis:
        for q in queues:
            q.queue_arguments = {
                **(q.queue_arguments or {}),
                "x-consumer-timeout": REDELIVERY_WINDOW_S * 1000,
            }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_track_started=True,  # clients see STARTED, the actuator sees what is running
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=queues,
        task_default_queue=f"{settings.namespace}fleet.unrouted",
        task_default_exchange=DEFAULT_EXCHANGE.name,
        task_default_routing_key=f"{settings.namespace}fleet.unrouted",
        task_queue_max_priority=9,
        task_default_priority=0,
        task_routes=(partial(route_task, namespace=settings.namespace, models=models),),
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options=broker_transport_options(settings)
        if settings.is_redis
        else {},
        broker_connection_retry_on_startup=True,
        **resilience_conf(),
        **celery_tls_conf(settings.broker_url, settings.result_backend, settings.tls),
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        include=["workers.tasks", "workers.pack", "workers.steps", "workers.apicontrol"],
    )
    app.conf.fleet_namespace = settings.namespace
    signing = SigningFiles.from_env()  # FLEET_SIGNING_*: sign and accept only signed messages
    if signing is not None:
        enable_signing(app, signing)
    return app


app = create_app()

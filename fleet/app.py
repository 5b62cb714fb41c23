"""The Celery app: configuration only, no task logic.

Choices and why:

* JSON only (``accept_content=["json"]``): a pickle message is refused, not executed.
* Late acks, ``task_reject_on_worker_lost``: a task whose worker dies goes back to its
  queue instead of being lost.
* Prefetch 1: a GPU worker holds only the task it runs, so a long fine-tune never sits
  behind another in one worker's buffer while other workers idle.
* Time limits per kind (``TIME_LIMITS``), and a Redis visibility timeout longer than the
  longest of them (the Celery trap where a long job runs twice, celery#5935); on
  RabbitMQ the same bound is set per queue with ``x-consumer-timeout`` (3.12+; older
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
from fleet.queues import DEFAULT_EXCHANGE, REDIS_PRIORITY_STEPS, all_queue_names, kombu_queue
from fleet.routing import TASK_NAME, route_task
from fleet.settings import Settings
from fleet.spec import TaskKind

__all__ = ["TASK_NAME", "TIME_LIMITS", "app", "create_app"]

# Hard time limit per kind, seconds. The soft limit is a minute earlier.
TIME_LIMITS: dict[TaskKind, int] = {
    TaskKind.INFERENCE: 15 * 60,
    TaskKind.EMBEDDING: 15 * 60,
    TaskKind.BATCH: 6 * 3600,
    TaskKind.FINE_TUNE: 12 * 3600,
    TaskKind.TRAINING: 24 * 3600,
}
LEASE_MARGIN_S = 3600
REDELIVERY_WINDOW_S = max(TIME_LIMITS.values()) + LEASE_MARGIN_S


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options: the Redis visibility timeout and priority sub-queues."""
    if not settings.is_redis:
        return {"confirm_publish": True}
    return {
        "visibility_timeout": REDELIVERY_WINDOW_S,
        "priority_steps": list(REDIS_PRIORITY_STEPS),
        "sep": ":",
        "queue_order_strategy": "priority",
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    app = Celery(
        "fleet", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False
    )
    queues = [kombu_queue(n) for n in all_queue_names(default_catalog(), settings.namespace)]
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
        task_routes=(partial(route_task, namespace=settings.namespace),),
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options=broker_transport_options(settings)
        if settings.is_redis
        else {},
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        include=["workers.tasks"],
    )
    app.conf.fleet_namespace = settings.namespace
    return app


app = create_app()

"""The Python client: ``Fleet.from_env().submit(spec)``.

Submission validates the spec, places it (pure, against the catalog and the cached
queue loads, so no extra broker round trip), and publishes one Celery message for the
``fleet.run`` task on the chosen queue. ``submit_many`` publishes a whole batch through
one producer and, on Redis, one pipeline.

Task ids: a spec with an ``idempotency_key`` gets a task id derived from it (UUID5), so a
resubmission is recognisable and its result is stored under the same id.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

from celery import Celery
from celery.backends.rpc import RPCBackend
from celery.result import AsyncResult

from fleet.app import TASK_NAME, TIME_LIMITS, app_models, create_app
from fleet.autoscaler.config import (
    AutoscalerConfig,
    catalog_for_model,
    catalog_for_pools,
    load_config,
)
from fleet.catalog import Catalog, default_catalog
from fleet.modelfit import served_entry
from fleet.models.registry import ModelRegistry
from fleet.obs.logs import get_logger
from fleet.placement import Placement, Policy, api_summary, place
from fleet.queues import all_queue_names
from fleet.settings import Settings
from fleet.spec import TaskKind, TaskSpec, check_size, parse_spec
from fleet.stats import AmqpStats, RedisStats, StatsCache, StatsSource
from fleet.submiterrors import PUBLISH_ERRORS, as_submit_error
from fleet.tls import redis_client

log = get_logger("fleet.client")
_stdlib_log = logging.getLogger("fleet.client")
IDEMPOTENCY_NAMESPACE = uuid.UUID("5f1e7c3a-2b7d-4c55-9d0e-6f1ee7f00001")
BATCH_SIZE = 1000


def task_id_for(spec: TaskSpec) -> str:
    """The task id: derived from ``idempotency_key`` when there is one, else random."""
    if spec.idempotency_key is not None:
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, spec.idempotency_key))
    return str(uuid.uuid4())


def broker_priority(priority: int, *, is_redis: bool) -> int:
    """Map fleet priority (9 most urgent) to the broker's (Redis: 0 most urgent)."""
    return 9 - priority if is_redis else priority


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """A submitted task: its id, where it went, and a way to wait for its result."""

    id: str
    placement: Placement
    _result: AsyncResult[Any]

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for and return the task's result; raises the task's error if it failed."""
        value: dict[str, Any] = self._result.get(timeout=timeout, propagate=True)
        return value

    @property
    def state(self) -> str:
        """Celery's state for the task (PENDING, STARTED, SUCCESS, FAILURE, ...)."""
        return str(self._result.state)


class Fleet:
    """Submit typed tasks to a fleet.

    One instance per process is enough; it is safe to share between threads. Call
    ``close()`` (or use it as a context manager) to stop its statistics thread.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        app: Celery | None = None,
        catalog: Catalog | None = None,
        stats: StatsSource | None = None,
        stats_interval_s: float = 1.0,
        pools: AutoscalerConfig | None = None,
        models: ModelRegistry | None = None,
    ) -> None:
        """Build from ``settings`` (default: environment); ``stats`` overrides the broker's.

        With ``pools`` (an autoscaler config), placement only chooses offers its pools can
        buy, so no task lands on a queue nothing will ever serve. ``models`` is the model
        registry (default: the pools' config's, else ``FLEET_CONFIG``'s, else the built-ins):
        work for a registered model goes to that model's queues.
        """
        self.settings = settings or Settings.from_env()
        self.app = app or create_app(self.settings)
        self.catalog = catalog or default_catalog()
        self._base_catalog = self.catalog
        self._pools = pools
        self._model_catalogs: dict[tuple[str | None, TaskKind], Catalog] = {}
        if pools is not None:
            self.catalog = catalog_for_pools(self.catalog, pools)
        if models is None:
            models = pools.registry if pools is not None else app_models(self.settings)
        self.models = models
        self._queues = all_queue_names(self.catalog, self.settings.namespace, models)
        self._stats = StatsCache(stats or self._default_stats(), self._queues, stats_interval_s)

    @classmethod
    def from_env(cls) -> Fleet:
        """A client configured from the ``FLEET_*`` variables (``FLEET_CONFIG``: pools to place on).

        Raises:
            ConfigError: ``FLEET_CONFIG`` names an invalid file.

        """
        path = os.environ.get("FLEET_CONFIG")
        return cls(pools=load_config(path) if path else None)

    def _default_stats(self) -> StatsSource:
        if self.settings.is_redis:
            return RedisStats(
                redis_client(self.settings.broker_url, self.settings.tls), self.settings.namespace
            )
        return AmqpStats(self.settings.broker_url, self.settings.tls)

    def refresh_stats(self) -> None:
        """Read queue statistics now instead of waiting for the next background tick."""
        self._stats.refresh()

    def route(
        self, spec: TaskSpec | dict[str, Any], policy: Policy = Policy.COST, pin: str | None = None
    ) -> Placement:
        """The placement ``submit`` would use now, without submitting."""
        spec = spec if isinstance(spec, TaskSpec) else parse_spec(spec)
        return place(
            spec,
            self._catalog_for(spec),
            self._stats.loads(),
            policy,
            pin,
            self.settings.namespace,
            models=self.models,
        )

    def _catalog_for(self, spec: TaskSpec) -> Catalog:
        """The catalog to place ``spec`` on: with pools, only where a pool serves its model."""
        if self._pools is None:
            return self.catalog
        entry = served_entry(spec, self.models)
        key = (None if entry is None else entry.name, spec.kind)
        found = self._model_catalogs.get(key)
        if found is None:
            found = catalog_for_model(self._base_catalog, self._pools, key[0], spec.kind)
            self._model_catalogs[key] = found
        return found

    def _options(self, spec: TaskSpec, placement: Placement) -> dict[str, Any]:
        limit = TIME_LIMITS[spec.kind]
        return {
            # A short summary instead of Celery's repr of the whole spec: task inputs can
            # be large or sensitive and do not belong in events, Flower or logs; it also
            # spares Celery's saferepr, the costliest step of building a message.
            "argsrepr": f"(<TaskSpec {spec.kind.value} {spec.model.name} {spec.model.params_b:g}B {spec.model.dtype.value}>,)",
            "kwargsrepr": f"{{'placement': '{placement.queue}'}}",
            "queue": placement.queue,
            "routing_key": placement.queue,
            "priority": broker_priority(spec.priority, is_redis=self.settings.is_redis),
            "time_limit": limit,
            "soft_time_limit": limit - 60,
        }

    @staticmethod
    def _kwargs(placement: Placement) -> dict[str, Any]:
        return {
            "placement": {
                "submitted_at": time.time(),  # queue age in status and metrics, task wait time
                "accelerator": placement.accelerator,
                "devices": placement.devices,
                "queue": placement.queue,
                "estimated_cost_usd": placement.estimated_cost_usd,
                "usd_per_hour": placement.offer.usd_per_hour,
                "offer_devices": placement.offer.accelerator_count,
                # token-priced API pool: provider, model and $/M tokens (None on a chip)
                "api": api_summary(placement.api),
            }
        }

    def submit(
        self,
        spec: TaskSpec | dict[str, Any],
        *,
        policy: Policy = Policy.COST,
        pin: str | None = None,
    ) -> TaskHandle:
        """Validate, place and enqueue one task.

        Raises:
            SpecError: the spec is invalid (nothing is sent); ``SpecTooLargeError`` when
                its serialized size is over ``settings.max_task_bytes``.
            NoPlacementError: no accelerator can run it (nothing is sent).
            SubmitError: the broker refused the task (a publisher-confirm nack on
                RabbitMQ) or cannot be reached; nothing was enqueued. A subclass of
                ``kombu.exceptions.OperationalError``; the message has no password.

        """
        spec = spec if isinstance(spec, TaskSpec) else parse_spec(spec)
        check_size(spec, self.settings.max_task_bytes)
        placement = self.route(spec, policy, pin)
        try:
            with self.app.producer_or_acquire() as producer:
                prepared = [(spec, placement, task_id_for(spec))]
                handle = self._publish(producer, prepared, batch=False)[0]
        except PUBLISH_ERRORS as exc:
            raise as_submit_error(exc, self.settings.broker_url, [placement.queue], 1) from exc
        if _stdlib_log.isEnabledFor(logging.INFO):  # costs nothing unless logging is configured
            log.info(
                "task.submitted",
                task_id=handle.id,
                kind=spec.kind.value,
                model=spec.model.name,
                params_b=spec.model.params_b,
                dtype=spec.model.dtype.value,
                queue=placement.queue,
                offer=f"{placement.offer.cloud}/{placement.offer.instance_type}/{placement.offer.market.value}",
                estimated_cost_usd=placement.estimated_cost_usd,
                reasons=list(placement.reasons),
            )
        return handle

    def submit_many(
        self,
        specs: Iterable[TaskSpec | dict[str, Any]],
        *,
        policy: Policy = Policy.COST,
    ) -> list[TaskHandle]:
        """Validate and place every spec first, then publish them all on one connection.

        All-or-nothing at validation: if any spec is invalid, over the size cap or
        unplaceable, nothing is sent and the error names the index. On Redis the publishes go through one
        pipeline per ``BATCH_SIZE`` messages.

        Raises:
            SpecError, NoPlacementError: with ``[index]`` prefixed to the message.
            SubmitError: the broker refused or cannot be reached (see ``submit``); some
                of the batch may have landed.

        """
        prepared: list[tuple[TaskSpec, Placement, str]] = []
        loads = self._stats.loads()  # one snapshot for the whole batch
        decided: dict[tuple[Any, ...], Placement] = {}
        for i, raw in enumerate(specs):
            try:
                spec = raw if isinstance(raw, TaskSpec) else parse_spec(raw)
                check_size(spec, self.settings.max_task_bytes)
                key = (spec.kind, spec.model, spec.tokens_in, spec.tokens_out, spec.requirements,
                       spec.training_method, spec.slo, spec.budget)  # fmt: skip
                placement = decided.get(key) or place(
                    spec, self._catalog_for(spec), loads, policy, None, self.settings.namespace,
                    models=self.models,
                )  # fmt: skip
                decided[key] = placement
            except ValueError as exc:
                # Keep the type (SpecError, NoPlacementError); name the index.
                exc.args = (f"[{i}] {exc}",)
                raise
            prepared.append((spec, placement, task_id_for(spec)))
        amqp = self.app.amqp
        try:
            with self.app.producer_or_acquire() as producer:
                for queue in {p.queue for _, p, _ in prepared}:  # declare each queue once
                    producer.maybe_declare(amqp.queues[queue])
                with producer.batch(BATCH_SIZE):
                    return self._publish(producer, prepared, batch=True)
        except PUBLISH_ERRORS as exc:
            queues = [p.queue for _, p, _ in prepared]
            raise as_submit_error(exc, self.settings.broker_url, queues, len(prepared)) from exc

    def _publish(
        self,
        producer: Any,  # noqa: ANN401 - kombu's Producer is untyped
        prepared: list[tuple[TaskSpec, Placement, str]],
        *,
        batch: bool,
    ) -> list[TaskHandle]:
        """Publish prepared tasks through ``producer``.

        Celery's own message builder and publisher (the two halves of ``send_task``)
        without its result subscription at send time: that is a round trip per task,
        and with an unreachable result store it fails with a RuntimeError instead of the
        broker's error; a handle subscribes when ``.get()`` waits. In a batch, queues
        are declared once beforehand and a failure raises for the whole batch (delivery
        uncertain) instead of retrying message by message.

        Raises:
            kombu.exceptions.OperationalError: the broker cannot be reached.

        """
        amqp = self.app.amqp
        handles: list[TaskHandle] = []
        extra: dict[str, Any] = {"declare": [], "retry": False} if batch else {}
        # The rpc:// backend (RabbitMQ) replies to a queue of this client's that must
        # exist before the worker answers; declaring it is cached, so it costs once.
        rpc = isinstance(self.app.backend, RPCBackend)
        for spec, placement, task_id in prepared:
            if rpc:
                self.app.backend.on_task_call(producer, task_id)
            options = self._options(spec, placement)
            message = amqp.create_task_message(
                task_id,
                TASK_NAME,
                (spec.model_dump(mode="json"),),
                self._kwargs(placement),
                time_limit=options.pop("time_limit"),
                soft_time_limit=options.pop("soft_time_limit"),
                argsrepr=options.pop("argsrepr"),
                kwargsrepr=options.pop("kwargsrepr"),
                reply_to=self.app.thread_oid,
            )
            amqp.send_task_message(producer, TASK_NAME, message, **extra, **options)
            handles.append(TaskHandle(task_id, placement, AsyncResult(task_id, app=self.app)))
        return handles

    def message_options(self, spec: TaskSpec, placement: Placement) -> dict[str, Any]:
        """What ``submit`` publishes with, for workflow canvases.

        ``options``: queue, priority, time limits, reprs; ``kwargs``: the placement the
        worker receives.
        """
        return {"options": self._options(spec, placement), "kwargs": self._kwargs(placement)}

    def submit_workflow(self, workflow: Any, *, policy: Policy = Policy.COST) -> Any:  # noqa: ANN401 - fleet.workflow types; imported lazily
        """Place every step of a ``fleet.workflow.Workflow`` on its own and run it on Celery canvas.

        See ``fleet.workflow_run.submit_workflow`` (returns a ``WorkflowRun``).
        """
        from fleet.workflow_run import submit_workflow  # noqa: PLC0415 - keeps the client import light

        return submit_workflow(self, workflow, policy=policy)

    def result(self, task_id: str) -> AsyncResult[Any]:
        """The Celery result handle for a task id."""
        return AsyncResult(task_id, app=self.app)

    def close(self) -> None:
        """Stop background statistics."""
        self._stats.close()

    def __enter__(self) -> Self:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on exit."""
        self.close()


def specs_from(values: Sequence[dict[str, Any]]) -> list[TaskSpec]:
    """Validate a list of decoded specs (helper for files of many specs)."""
    return [parse_spec(v) for v in values]

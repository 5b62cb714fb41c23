"""The Python client: ``Fleet.from_env().submit(spec)``.

Submission validates the spec, places it (pure, against the catalog and the cached
queue loads, so no extra broker round trip), and publishes one Celery message for the
``fleet.run`` task on the chosen queue. ``submit_many`` publishes a whole batch through
one producer and, on Redis, one pipeline of prebuilt messages (``fleet.bulk``,
``fleet.publish``); with ``pack`` it puts several small specs in one message.

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

from fleet import bulk
from fleet.app import app_models, create_app
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
from fleet.placement import Placement, Policy, Traffic, place
from fleet.publish import outbox_for
from fleet.queues import all_queue_names
from fleet.rates import TrafficMeter
from fleet.settings import Settings
from fleet.spec import SpecTooLargeError, TaskKind, TaskSpec, check_size, parse_spec
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


@dataclass(slots=True)  # not frozen: a frozen dataclass is slow to build, one per task
class TaskHandle:
    """A submitted task: its id, where it went, and a way to wait for its result."""

    id: str
    placement: Placement
    _app: Celery

    @property
    def result(self) -> AsyncResult[Any]:
        """Celery's result handle for the task (made on demand: a batch of handles stays cheap)."""
        return AsyncResult(self.id, app=self._app)

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for and return the task's result; raises the task's error if it failed."""
        value: dict[str, Any] = self.result.get(timeout=timeout, propagate=True)
        return value

    @property
    def state(self) -> str:
        """Celery's state for the task (PENDING, STARTED, SUCCESS, FAILURE, ...)."""
        return str(self.result.state)


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
        self._traffic = TrafficMeter()  # this process's submissions per (model, kind)
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
            traffic=self._traffic_of(spec),
        )

    def _traffic_of(self, spec: TaskSpec) -> Traffic | None:
        """The recent traffic this process submitted of ``spec``'s model and kind."""
        return self._traffic.traffic(spec, time.monotonic())

    def _count(self, spec: TaskSpec, n: int = 1) -> None:
        """Record ``n`` submissions of ``spec`` in the traffic meter."""
        self._traffic.record(spec, self._catalog_for(spec), time.monotonic(), n)

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
        return bulk.message_options(spec, placement, is_redis=self.settings.is_redis)

    @staticmethod
    def _kwargs(placement: Placement) -> dict[str, Any]:
        return bulk.placement_kwargs(placement, time.time())

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
        self._count(spec)
        placement = self.route(spec, policy, pin)
        task_id = task_id_for(spec)
        try:
            with self.app.producer_or_acquire() as producer:
                item = bulk.Item(spec, placement, task_id, "")
                self._publish(producer, [(item,)], batch=False)
        except PUBLISH_ERRORS as exc:
            raise as_submit_error(exc, self.settings.broker_url, [placement.queue], 1) from exc
        handle = TaskHandle(task_id, placement, self.app)
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
        pack: int = 1,
    ) -> list[TaskHandle]:
        """Validate and place every spec first, then publish them all on one connection.

        All-or-nothing at validation: if any spec is invalid, over the size cap or
        unplaceable, nothing is sent and the error names the index. On Redis the messages
        are built from one envelope per placement, each distinct spec object encoded once,
        and pushed in one pipeline (``fleet.publish``).

        ``pack``: put up to ``pack`` specs of one placement and priority in one
        ``fleet.run_pack`` message (``workers.pack``), for many short tasks: a message
        costs a worker the same whatever it carries. Each spec keeps its own task id,
        handle, STARTED and SUCCESS records, at-most-once guard and dead-lettering; a pack
        runs its specs one after another in one worker process, and counts as one message
        in queue depths. Ignored on the ``rpc://`` result backend, whose results are
        replies to each task's own message.

        Raises:
            SpecError, NoPlacementError: with ``[index]`` prefixed to the message.
            ValueError: ``pack`` is below 1.
            SubmitError: the broker refused or cannot be reached (see ``submit``); some
                of the batch may have landed.

        """
        if pack < 1:
            raise ValueError(f"pack must be at least 1, not {pack}")
        items = self._place_all(specs, policy)
        rpc = isinstance(self.app.backend, RPCBackend)
        planned = bulk.plan(items, 1 if rpc else pack)
        amqp = self.app.amqp
        try:
            with self.app.producer_or_acquire() as producer:
                for queue in {i.placement.queue for i in items}:  # declare each queue once
                    producer.maybe_declare(amqp.queues[queue])
                outbox = outbox_for(self.app, producer)
                if outbox is not None:
                    bulk.publish_fast(outbox, planned, is_redis=self.settings.is_redis)
                else:
                    with producer.batch(BATCH_SIZE):
                        self._publish(producer, planned, batch=True)
        except PUBLISH_ERRORS as exc:
            queues = [i.placement.queue for i in items]
            raise as_submit_error(exc, self.settings.broker_url, queues, len(items)) from exc
        return [TaskHandle(i.task_id, i.placement, self.app) for i in items]

    def _place_all(
        self, specs: Iterable[TaskSpec | dict[str, Any]], policy: Policy
    ) -> list[bulk.Item]:
        """Validate, size-check and place every spec (each distinct spec object once).

        Raises:
            SpecError, NoPlacementError: with ``[index]`` prefixed to the message.

        """
        items: list[bulk.Item] = []
        loads = self._stats.loads()  # one snapshot for the whole batch
        decided: dict[tuple[Any, ...], Placement] = {}
        seen: dict[int, tuple[TaskSpec, Placement, str]] = {}  # id(spec): placed once
        tally: dict[int, int] = {}  # id(spec): tasks, for the traffic meter
        limit = self.settings.max_task_bytes
        for i, raw in enumerate(specs):
            try:
                spec = raw if isinstance(raw, TaskSpec) else parse_spec(raw)
                known = seen.get(id(spec))
                if known is None or known[0] is not spec:
                    text = TaskSpec.__pydantic_serializer__.to_json(spec).decode()
                    if len(text) > limit:
                        raise SpecTooLargeError(len(text), limit)
                    key = (spec.kind, spec.model, spec.tokens_in, spec.tokens_out, spec.requirements,
                           spec.training_method, spec.slo, spec.budget)  # fmt: skip
                    placement = decided.get(key) or place(
                        spec, self._catalog_for(spec), loads, policy, None, self.settings.namespace,
                        models=self.models, traffic=self._traffic_of(spec),
                    )  # fmt: skip
                    decided[key] = placement
                    known = seen[id(spec)] = (spec, placement, text)
            except ValueError as exc:
                # Keep the type (SpecError, NoPlacementError); name the index.
                exc.args = (f"[{i}] {exc}",)
                raise
            items.append(bulk.Item(spec, known[1], task_id_for(spec), known[2]))
            tally[id(spec)] = tally.get(id(spec), 0) + 1
        for spec_id, n in tally.items():
            self._count(seen[spec_id][0], n)
        return items

    def _publish(
        self,
        producer: Any,  # noqa: ANN401 - kombu's Producer is untyped
        planned: list[bulk.Message],
        *,
        batch: bool,
    ) -> None:
        """Publish ``planned`` through Celery's message builder (``bulk.publish_celery``).

        Raises:
            kombu.exceptions.OperationalError: the broker cannot be reached.

        """
        rpc = isinstance(self.app.backend, RPCBackend)
        bulk.publish_celery(
            self.app, producer, planned, is_redis=self.settings.is_redis, batch=batch, rpc=rpc
        )

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

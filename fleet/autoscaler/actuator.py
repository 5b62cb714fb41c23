"""Act: carry out a plan through the providers, draining before anything is terminated.

Launches go to the pool's provider with the plan's idempotency token; a failure is kept
as data (``errors``) for the next snapshot, so the planner avoids that offer for the
pool's back-off and falls back to the next one. Terminations are two-phase and
re-checked every loop:

1. **drain**: the instance's workers stop consuming (Celery ``cancel_consumer`` on each
   of their queues); the instance is marked DRAINING;
2. **terminate**: once none of its workers has an active or reserved task (asked over
   Celery's remote control), the provider terminates it (for local workers a warm
   shutdown, which would still finish a running task). An instance without workers
   (never confirmed, or already gone) is terminated at once.

So scale-in never kills a task in flight and never loses one: with late acks, anything
a worker had not started goes back to its queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from celery import Celery

from fleet.autoscaler.apiactuator import ConcurrencyChange, apply_concurrency, concurrency_changes
from fleet.autoscaler.config import AutoscalerConfig
from fleet.autoscaler.model import (
    Instance,
    InstanceState,
    Launch,
    Plan,
    ProviderError,
    Snapshot,
    Termination,
)
from fleet.obs.logs import get_logger
from fleet.providers.base import LaunchRequest, Provider

log = get_logger("fleet.autoscaler")
INSPECT_TIMEOUT_S = 1.0
MAX_ERRORS = 500


@dataclass
class ActReport:
    """What one call of ``act`` did."""

    launched: list[Instance] = field(default_factory=list)
    failed: list[ProviderError] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    api_changes: list[ConcurrencyChange] = field(default_factory=list)


class Actuator:
    """Carries out plans; remembers draining instances and recent provider errors."""

    def __init__(
        self, config: AutoscalerConfig, providers: Mapping[str, Provider], app: Celery
    ) -> None:
        """``providers`` by provider name (``local``, ``fake``, ``aws``, ...)."""
        self.config = config
        self.providers = providers
        self.app = app
        self.draining: dict[str, InstanceState] = {}
        self.errors: deque[ProviderError] = deque(maxlen=MAX_ERRORS)
        self._pending_terminations: dict[str, Termination] = {}

    def recent_errors(self, now: float, horizon_s: float) -> list[ProviderError]:
        """Errors newer than ``horizon_s`` (what the next snapshot carries)."""
        return [e for e in self.errors if now - e.at <= horizon_s]

    def act(self, plan: Plan, snapshot: Snapshot, now: float) -> ActReport:
        """Launch, set API workers' concurrency, start drains, and finish drains that are done."""
        report = ActReport()
        for launch in plan.launches:
            self._launch(launch, now, report)
        report.api_changes = concurrency_changes(plan.api_pools, snapshot.workers)
        if report.api_changes:  # no broadcast on the (common) loop with nothing to change
            apply_concurrency(self.app.control, report.api_changes)
        for term in plan.terminations:
            self._pending_terminations[term.instance_id] = term
        self._progress(snapshot, now, report)
        return report

    def _launch(self, launch: Launch, now: float, report: ActReport) -> None:
        pool = self.config.pool(launch.pool)
        provider = self.providers.get(pool.provider)
        if provider is None:
            return
        request = LaunchRequest(
            pool=pool.name,
            accelerator=pool.accelerator,
            offer=launch.offer,
            token=launch.token,
            devices=launch.devices,
            usd_per_hour=launch.usd_per_hour,
            fleet_name=self.config.fleet_tag,
            # FLEET_OFFER: a worker that gets a spot notice records which offer was hit.
            env={
                "FLEET_NAMESPACE": self.config.fleet.namespace,
                "FLEET_OFFER": launch.offer.key,
                **pool.worker_env(self.config.registry),  # FLEET_ENGINE, FLEET_MODELS
            },
        )
        result = provider.launch(request, now)
        if result.error is not None:
            self.errors.append(result.error)
            report.failed.append(result.error)
            log.warning(
                "autoscaler.launch_failed",
                pool=pool.name,
                offer=launch.offer.key,
                error_kind=result.error.kind.value,
                message=result.error.message,
            )
        elif result.instance is not None:
            report.launched.append(result.instance)
            log.info(
                "autoscaler.launched",
                instance=result.instance.id,
                pool=pool.name,
                offer=launch.offer.key,
                usd_per_hour=launch.usd_per_hour,
                reason=launch.reason,
            )

    def _progress(self, snapshot: Snapshot, now: float, report: ActReport) -> None:
        by_id = {i.id: i for i in snapshot.instances}
        workers_of: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for w in snapshot.workers:
            if w.instance_id is not None:
                workers_of.setdefault(w.instance_id, []).append((w.hostname, w.queues))
        for instance_id, term in sorted(self._pending_terminations.items()):
            inst = by_id.get(instance_id)
            if inst is None:  # gone: the provider no longer lists it
                self._pending_terminations.pop(instance_id)
                self.draining.pop(instance_id, None)
                continue
            nodes = workers_of.get(instance_id, [])
            if self.draining.get(instance_id) is None:
                self.draining[instance_id] = InstanceState.DRAINING
                report.draining.append(instance_id)
                for node, queues in nodes:
                    for queue in queues:
                        self.app.control.cancel_consumer(
                            queue, destination=[node], reply=True, timeout=INSPECT_TIMEOUT_S
                        )
                log.info(
                    "autoscaler.draining", instance=instance_id, pool=term.pool, reason=term.reason
                )
            if nodes and self._busy([n for n, _ in nodes]):
                continue  # re-checked next loop
            self._terminate(inst, term, now, report)

    def _busy(self, nodes: list[str]) -> bool:
        inspect = self.app.control.inspect(destination=nodes, timeout=INSPECT_TIMEOUT_S)
        for answer in (inspect.active(), inspect.reserved()):
            if answer is None:
                return True  # no reply: assume busy, ask again next loop
            if any(tasks for tasks in answer.values()):
                return True
        return False

    def _terminate(self, inst: Instance, term: Termination, now: float, report: ActReport) -> None:
        provider = self.providers.get(inst.provider)
        if provider is None:
            log.warning("autoscaler.no_provider", instance=inst.id, provider=inst.provider)
            return
        error = provider.terminate(inst.id, now)
        if error is not None:
            self.errors.append(error)
            log.warning(
                "autoscaler.terminate_failed",
                instance=inst.id,
                error_kind=error.kind.value,
                message=error.message,
            )
            return
        self.draining[inst.id] = InstanceState.TERMINATING
        report.terminated.append(inst.id)
        log.info(
            "autoscaler.terminated",
            instance=inst.id,
            pool=inst.pool,
            usd_per_hour=inst.usd_per_hour,
            reason=term.reason,
        )

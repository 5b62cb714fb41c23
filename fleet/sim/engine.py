"""A discrete-event fleet simulation on a virtual clock, driving the real decision code.

Policies:

* ``fleet``: each task is placed by ``fleet.placement.place`` (cost policy, live queue loads
  from the simulation, the config's model registry) among the accelerators the config's
  pools can buy, and capacity is planned by ``fleet.autoscaler.planner.plan`` every
  ``loop_interval_s`` from a Snapshot the simulation builds, exactly as the live loop does.
  Work for a registry model goes to its ``...@<model>`` queue, among the pools that hold
  the model (``fleet.sim.models``).
* ``cheapest``: each task goes to the cheapest compatible offer, ignoring queues and
  deadlines (placement without loads or deadline); capacity by the same planner.
* ``homogeneous``: what a buyer runs today: every task on one H100 offer (AWS p5.48xlarge,
  on-demand), scaled the way KEDA scales a Deployment on a queue: every ``polling_s`` the
  desired replicas are ``ceil(queue length / target)``, scale-up at once, scale-down only
  after ``cooldown_s`` without need. Tasks that 8 x H100 cannot hold are rejected.

The model. An instance becomes usable ``cold_start_s`` (the family's, or ``boot_s``) plus the
time its pool's models take to load (``PoolConfig.load_s``) after its launch, and costs its hourly price from launch to termination, plus ``stop_s`` after a scale-in
decision (the drain handshake and shutdown; 0 by default). A task on ``d`` devices takes the
throughput model's ``service_s`` of wall time and occupies ``d x busy_s / service_s`` of the
instance's device capacity while it runs (a batching server overlaps generation streams;
compute-bound work occupies whole devices). Queues are FIFO. Spot instances are
interrupted at ``spot_interruptions_per_hour`` (a Poisson process); their running tasks go
back to the head of their queue.

API pools (the config's ``[[api_pools]]``; ``api_pools=False`` leaves them out): a task
placement sends to ``inference.api-<provider>`` is a call on that provider's
``fleet.sim.apipools.SimApiPool``: no boot, no idle cost, the tokens at list price, the
offer's latency, and queueing only behind the provider's rate limit. The autoscaler's
overflow demand from API pools is not simulated (their queues never reach the planner).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from fleet.autoscaler.config import AutoscalerConfig, catalog_for_pools
from fleet.autoscaler.model import (
    Instance,
    InstanceState,
    OfferRef,
    PoolHistory,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.autoscaler.planner import busy_pools, plan
from fleet.catalog import Catalog, Offer
from fleet.compat import devices_needed, memory_needed_gb
from fleet.placement import NoPlacementError, Placement, Policy, QueueLoad, place
from fleet.queues import all_queue_names, parse_queue, queue_name
from fleet.sim.apipools import SimApiPool
from fleet.sim.models import Holds, ModelCatalogs, pool_holds
from fleet.sim.trace import TraceEvent
from fleet.spec import TaskSpec
from fleet.throughput import estimate

POLICIES = ("fleet", "homogeneous", "cheapest")
HOMOGENEOUS_OFFER = ("aws", "us-east-1", "p5.48xlarge")
SAMPLE = 20


@dataclass
class SimTask:
    """A task in the simulation."""

    idx: int
    spec: TaskSpec
    arrival: float
    queue: str = ""
    devices: int = 1
    start: float | None = None
    end: float | None = None
    share: float = 0.0  # device capacity it occupies while running
    service_s: float = 0.0
    rejected: str | None = None


@dataclass
class SimInstance:
    """An instance: launched, usable from ``ready_at``, billed until ``ended_at``."""

    id: str
    pool: str
    offer: Offer
    market: str
    price: float
    devices: int
    launched_at: float
    ready_at: float
    ended_at: float | None = None
    draining: bool = False
    running: dict[int, SimTask] = field(default_factory=dict)
    used: float = 0.0
    busy_device_s: float = 0.0
    holds: Holds = field(default_factory=Holds)

    def capacity(self) -> float:
        """Device capacity (cpu: one instance)."""
        return float(self.devices)


@dataclass(frozen=True)
class SimResult:
    """What a run costs and how well it served."""

    policy: str
    total_cost_usd: float
    tasks: int
    completed: int
    rejected: int
    cost_per_1k_tasks_usd: float
    p50_latency_s: float
    p95_latency_s: float
    slo_attainment: float
    utilisation: dict[str, float]
    placements: dict[int, str]
    instances_launched: int
    end_s: float
    api_cost_usd: float = 0.0
    api_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fleet simulate --json``); placements left out for size."""
        out = {k: v for k, v in self.__dict__.items() if k != "placements"}
        out["accelerators"] = sorted(
            {q.split("@")[0].split(".")[1] for q in self.placements.values() if "." in q}
        )
        return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Simulation:
    """One run of one policy over one trace."""

    def __init__(
        self,
        trace: list[TraceEvent],
        config: AutoscalerConfig,
        catalog: Catalog,
        policy: str,
        *,
        spot_interruptions_per_hour: float = 0.0,
        seed: int = 0,
        keda_target: int = 5,
        keda_polling_s: float = 30.0,
        keda_cooldown_s: float = 300.0,
        keda_max: int = 100,
        boot_s: float | None = None,
        stop_s: float = 0.0,
        api_pools: bool = True,
    ) -> None:
        """Prepare a run; ``policy`` is one of ``POLICIES``; ``api_pools`` False ignores ``[[api_pools]]``."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        if not api_pools:
            config = config.model_copy(update={"api_pools": ()})
        self.policy = policy
        self.config = config
        self.catalog = catalog
        self.placement_catalog = catalog_for_pools(catalog, config)
        by_provider: dict[str, list[Any]] = {}
        for o in self.placement_catalog.apis:
            by_provider.setdefault(o.provider, []).append(o)
        self.api = {p: SimApiPool.for_offers(p, offers) for p, offers in by_provider.items()}
        self.tasks = [SimTask(i, e.spec, e.t) for i, e in enumerate(trace)]
        self.models = ModelCatalogs(catalog, config)
        self.holds = pool_holds(config)
        self.all_queues = all_queue_names(
            self.placement_catalog, models=self.models.entries([t.spec for t in self.tasks])
        )
        self.rng = random.Random(seed)
        self.spot_rate = spot_interruptions_per_hour
        self.keda = (keda_target, keda_polling_s, keda_cooldown_s, keda_max)
        self.boot_s = boot_s  # None: each family's cold start from the catalog
        # Billed time after a scale-in decision finds an instance idle: the drain handshake and
        # the shutdown itself (0: billing stops at the decision, as before).
        self.stop_s = stop_s
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.queues: dict[str, deque[SimTask]] = {}
        self.instances: dict[str, SimInstance] = {}
        self.history: dict[str, PoolHistory] = {}
        self.ids = itertools.count()
        self.now = 0.0
        self.keda_low_since: float | None = None
        self.homog_offer = next(
            o for o in catalog.offers if (o.cloud, o.region, o.instance_type) == HOMOGENEOUS_OFFER
        )

    # -- events -------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: Any = None) -> None:  # noqa: ANN401 - event payloads vary
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> SimResult:
        """Simulate until every task is done or rejected and the fleet has scaled in."""
        for task in self.tasks:
            self._push(task.arrival, "arrival", task)
        interval = (
            self.keda[1] if self.policy == "homogeneous" else self.config.fleet.loop_interval_s
        )
        self._push(0.0, "tick")
        last_arrival = self.tasks[-1].arrival if self.tasks else 0.0
        horizon = last_arrival + 6 * 3600.0
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > horizon:
                break
            self.now = t
            if kind == "arrival":
                self._arrive(payload)
            elif kind == "finish":
                self._finish(*payload)
            elif kind == "interrupt":
                self._interrupt(payload)
            elif kind == "api_done":
                payload.end = t
            elif kind == "tick":
                self._tick()
                if not self._settled(last_arrival):
                    self._push(t + interval, "tick")
            self._dispatch()
        return self._result()

    def _settled(self, last_arrival: float) -> bool:
        done = all(task.end is not None or task.rejected for task in self.tasks)
        live = any(i.ended_at is None for i in self.instances.values())
        return self.now >= last_arrival and done and not live

    # -- placement ----------------------------------------------------------------------
    def _arrive(self, task: SimTask) -> None:
        spec = task.spec
        if self.policy == "homogeneous":
            need = memory_needed_gb(spec)
            d = devices_needed(
                need, self.homog_offer.accelerator_memory_gb, self.homog_offer.accelerator_count
            )
            if d is None:
                task.rejected = f"8 x H100 cannot hold {need:,.0f} GB"
                return
            task.queue, task.devices = "homogeneous", d
        else:
            model = self.models.model_of(spec)
            where = self.models.for_model(model, spec.kind)
            registry = self.models.registry
            try:
                if self.policy == "cheapest":
                    spec = spec.model_copy(
                        update={"slo": spec.slo.model_copy(update={"deadline_s": None})}
                    )
                    placement = place(spec, where, None, Policy.COST, models=registry)
                else:
                    placement = place(spec, where, self._loads(), Policy.COST, models=registry)
            except NoPlacementError as exc:
                task.rejected = (self.models.unheld(model, spec.kind) or str(exc))[:200]
                return
            task.queue, task.devices = placement.queue, placement.devices
            if placement.api is not None:
                self._call_api(task, placement)
                return
        self.queues.setdefault(task.queue, deque()).append(task)

    def _call_api(self, task: SimTask, placement: Placement) -> None:
        offer = placement.api
        assert offer is not None  # noqa: S101 - the caller checked
        try:
            call = self.api[offer.provider].submit(
                offer, self.now, task.spec.tokens_in, task.spec.tokens_out
            )
        except ValueError as exc:
            task.rejected = str(exc)[:200]
            return
        task.start, task.service_s = call.start, call.end - call.start
        self._push(call.end, "api_done", task)

    def _loads(self) -> dict[str, QueueLoad]:
        consumers: dict[str, int] = {}
        for inst in self.instances.values():
            if inst.ended_at is None and not inst.draining and inst.ready_at <= self.now:
                for q in self.all_queues:
                    if self._serves(inst, q):
                        consumers[q] = consumers.get(q, 0) + 1
        # Every queue placement can choose, as the live stats cache reads them: an empty,
        # unserved queue is cold, not unknown.
        loads = {
            q: QueueLoad(len(self.queues.get(q, ())), consumers.get(q, 0)) for q in self.all_queues
        }
        for provider, pool in self.api.items():  # API workers are always up; the limit queues
            loads[queue_name("inference", f"api-{provider}")] = QueueLoad(pool.waiting(self.now), 1)
        return loads

    def _serves(self, inst: SimInstance, queue: str) -> bool:
        if self.policy == "homogeneous":
            return queue == "homogeneous"
        ref = parse_queue(queue)
        return (
            ref is not None
            and ref.accelerator == inst.offer.accelerator
            and ref.devices <= inst.devices
            and inst.holds.serves(ref.model, ref.kind)
        )

    # -- running tasks -------------------------------------------------------------------
    def _cost_shape(self, task: SimTask, inst: SimInstance) -> tuple[float, float]:
        family = self.catalog.families[inst.offer.accelerator]
        est = estimate(task.spec, family, task.devices, inst.offer.vcpus)
        service = max(est.service_s, 1e-6)
        share = (
            task.devices * min(1.0, est.busy_s / service)
            if not family.per_vcpu
            else min(1.0, est.busy_s / service)
        )
        return service, share

    def _dispatch(self) -> None:
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            if inst.ended_at is not None or inst.draining or inst.ready_at > self.now:
                continue
            for q, waiting in self.queues.items():
                if not waiting or not self._serves(inst, q):
                    continue
                while waiting:
                    task = waiting[0]
                    service, share = self._cost_shape(task, inst)
                    if inst.used + share > inst.capacity() + 1e-9:
                        break
                    waiting.popleft()
                    task.start, task.service_s, task.share = self.now, service, share
                    inst.used += share
                    inst.running[task.idx] = task
                    self._push(self.now + service, "finish", (inst.id, task.idx))

    def _finish(self, inst_id: str, idx: int) -> None:
        inst = self.instances[inst_id]
        task = inst.running.pop(idx, None)
        if task is None:  # interrupted before it finished
            return
        task.end = self.now
        inst.used -= task.share
        inst.busy_device_s += task.share * task.service_s
        self._maybe_end(inst)

    def _interrupt(self, inst_id: str) -> None:
        inst = self.instances[inst_id]
        if inst.ended_at is not None:
            return
        for task in sorted(inst.running.values(), key=lambda t: -t.idx):
            task.start = None
            self.queues.setdefault(task.queue, deque()).appendleft(task)
        inst.running.clear()
        inst.used = 0.0
        inst.ended_at = self.now

    def _maybe_end(self, inst: SimInstance) -> None:
        if inst.draining and not inst.running and inst.ended_at is None:
            inst.ended_at = self.now

    # -- capacity ------------------------------------------------------------------------
    def _launch(self, pool: str, offer: Offer, market: str, price: float, devices: int) -> None:
        family = self.catalog.families[offer.accelerator]
        holds = self.holds.get(pool, Holds())
        boot = family.cold_start_s if self.boot_s is None else self.boot_s
        inst = SimInstance(
            f"sim-{next(self.ids)}",
            pool,
            offer,
            market,
            price,
            devices,
            self.now,
            self.now + boot + holds.load_s,
            holds=holds,
        )
        self.instances[inst.id] = inst
        self._push(inst.ready_at, "ready")
        if market == "spot" and self.spot_rate > 0:
            self._push(
                self.now + self.rng.expovariate(self.spot_rate / 3600.0), "interrupt", inst.id
            )

    def _tick(self) -> None:
        if self.policy == "homogeneous":
            self._keda_tick()
        else:
            self._planner_tick()

    def _keda_tick(self) -> None:
        target, _, cooldown, maximum = self.keda
        live = [i for i in self.instances.values() if i.ended_at is None and not i.draining]
        backlog = len(self.queues.get("homogeneous", ())) + sum(len(i.running) for i in live)
        desired = min(maximum, math.ceil(backlog / target))
        price = self.homog_offer.on_demand_usd_per_hour or 0.0
        if desired > len(live):
            self.keda_low_since = None
            for _ in range(desired - len(live)):
                self._launch(
                    "homogeneous",
                    self.homog_offer,
                    "on_demand",
                    price,
                    self.homog_offer.accelerator_count,
                )
        elif desired < len(live):
            self.keda_low_since = (
                self.keda_low_since if self.keda_low_since is not None else self.now
            )
            if self.now - self.keda_low_since >= cooldown:
                for inst in sorted(live, key=lambda i: (len(i.running), -i.launched_at))[
                    : len(live) - desired
                ]:
                    inst.draining = True
                    self._maybe_end(inst)
        else:
            self.keda_low_since = None

    def _snapshot(self) -> Snapshot:
        queues: dict[str, QueueObservation] = {}
        running: dict[str, int] = {}
        for inst in self.instances.values():
            for task in inst.running.values():
                running[task.queue] = running.get(task.queue, 0) + 1
        for q in set(self.queues) | set(running):
            waiting = self.queues.get(q, deque())
            sample = None
            ref = parse_queue(q)
            if waiting and ref is not None:
                family = self.catalog.families[ref.accelerator]
                vcpus = (
                    max(
                        (o.vcpus or 0 for o in self.catalog.offers_by_family[ref.accelerator]),
                        default=0,
                    )
                    or None
                )
                head = list(itertools.islice(waiting, SAMPLE))
                sample = sum(
                    estimate(t.spec, family, ref.devices, vcpus).busy_s for t in head
                ) / len(head)
            queues[q] = QueueObservation(q, len(waiting), running.get(q, 0), 0, sample)
        instances = []
        workers = []
        for inst in self.instances.values():
            if inst.ended_at is not None:
                continue
            state = (
                InstanceState.DRAINING
                if inst.draining
                else (InstanceState.RUNNING if inst.ready_at <= self.now else InstanceState.PENDING)
            )
            offer_ref = OfferRef(
                inst.offer.cloud, inst.offer.region, inst.offer.instance_type, inst.market
            )
            instances.append(
                Instance(
                    inst.id,
                    inst.pool,
                    offer_ref,
                    state,
                    inst.launched_at,
                    inst.id,
                    inst.price,
                    inst.devices,
                )
            )
            workers.append(
                WorkerObservation(
                    f"w-{inst.id}", inst.offer.accelerator, inst.id, len(inst.running)
                )
            )
        return Snapshot(self.now, queues, tuple(instances), tuple(workers), (), dict(self.history))

    def _planner_tick(self) -> None:
        snap = self._snapshot()
        decided = plan(snap, self.config, self.catalog, self.now)
        busy = busy_pools(snap, self.config, self.catalog)
        for d in decided.decisions:
            old = self.history.get(d.pool, PoolHistory())
            self.history[d.pool] = replace(
                old,
                last_busy_at=self.now if d.pool in busy else old.last_busy_at,
                last_scale_out_at=self.now if d.launches else old.last_scale_out_at,
                last_scale_in_at=self.now if d.terminations else old.last_scale_in_at,
            )
        offers = {(o.cloud, o.region, o.instance_type): o for o in self.catalog.offers}
        for launch in decided.launches:
            offer = offers[(launch.offer.cloud, launch.offer.region, launch.offer.instance_type)]
            self._launch(
                launch.pool, offer, launch.offer.market, launch.usd_per_hour, launch.devices
            )
        for term in decided.terminations:
            inst = self.instances.get(term.instance_id)
            if inst is not None and inst.ended_at is None:
                inst.draining = True
                self._maybe_end(inst)

    # -- results -------------------------------------------------------------------------
    def _result(self) -> SimResult:
        end = self.now
        cost = 0.0
        util: dict[str, tuple[float, float]] = {}
        for inst in self.instances.values():
            stop = inst.ended_at if inst.ended_at is not None else end
            billed_until = (
                stop + self.stop_s if inst.draining and inst.ended_at is not None else stop
            )
            cost += inst.price * (billed_until - inst.launched_at) / 3600.0
            avail = max(0.0, stop - inst.ready_at) * inst.capacity()
            busy, total = util.get(inst.pool, (0.0, 0.0))
            util[inst.pool] = (busy + inst.busy_device_s, total + avail)
        done = [t for t in self.tasks if t.end is not None]
        latencies = [t.end - t.arrival for t in done if t.end is not None]
        met = sum(
            1
            for t in done
            if t.end is not None
            and (t.spec.slo.deadline_s is None or t.end - t.arrival <= t.spec.slo.deadline_s)
        )
        n = len(self.tasks)
        api_cost = sum(pool.cost_usd for pool in self.api.values())
        cost += api_cost
        return SimResult(
            policy=self.policy,
            total_cost_usd=cost,
            tasks=n,
            completed=len(done),
            rejected=sum(1 for t in self.tasks if t.rejected),
            cost_per_1k_tasks_usd=cost / len(done) * 1000 if done else math.nan,
            p50_latency_s=_percentile(latencies, 0.5),
            p95_latency_s=_percentile(latencies, 0.95),
            slo_attainment=met / n if n else math.nan,
            utilisation={p: (b / a if a else 0.0) for p, (b, a) in sorted(util.items())},
            placements={t.idx: t.queue for t in self.tasks if t.queue},
            instances_launched=len(self.instances),
            end_s=end,
            api_cost_usd=api_cost,
            api_calls=sum(len(pool.calls) for pool in self.api.values()),
        )


def simulate(
    trace: list[TraceEvent],
    config: AutoscalerConfig,
    catalog: Catalog,
    policy: str,
    **options: float,
) -> SimResult:
    """Run ``policy`` over ``trace`` (see ``Simulation`` for the options)."""
    return Simulation(trace, config, catalog, policy, **options).run()  # type: ignore[arg-type]

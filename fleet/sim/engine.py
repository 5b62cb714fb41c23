"""A discrete-event fleet simulation on a virtual clock, driving the real decision code.

Policies:

* ``fleet``: each task is placed by ``fleet.placement.place`` (cost policy, the recent
  arrival rate of its model and kind from a ``fleet.rates.TrafficMeter``, live queue loads
  from the simulation, the config's model registry) among the accelerators the config's
  pools can buy, and capacity is planned by ``fleet.autoscaler.planner.plan`` every
  ``loop_interval_s`` from a Snapshot the simulation builds (``fleet.sim.snapshot``), exactly
  as the live loop does. Work for a registry model goes to its ``...@<model>`` queue, among
  the pools that hold the model (``fleet.sim.models``).
* ``cheapest``: each task goes to the cheapest compatible offer, ignoring queues and
  deadlines (placement without loads or deadline); capacity by the same planner.
* ``homogeneous``: a KEDA-like baseline, what a buyer runs without fleet: every task on one
  instance type, the cheapest offer of the config's pools that can hold every task of the
  trace, scaled the way KEDA scales a Deployment on a queue: every ``polling_s`` (30 s) the
  desired replicas are ``ceil((waiting + running) / target)``, the target being what one
  instance runs at once for the trace's typical task; scale-up at once, scale-in to the
  largest count desired within the last ``cooldown_s`` (300 s). The rules are in
  ``fleet.sim.keda``. Tasks the instance cannot hold are rejected.

The model. An instance becomes usable ``cold_start_s`` (the family's, or ``boot_s``) plus the
time its pool's models take to load (``PoolConfig.load_s``) after its launch, and costs its
hourly price from launch to termination, plus ``stop_s`` after a scale-in decision (the drain
handshake and shutdown; 0 by default). A task on ``d`` devices takes the throughput model's
``service_s`` of wall time and occupies ``d x busy_s / service_s`` of the instance's device
capacity while it runs (a batching server overlaps generation streams; compute-bound work
occupies whole devices). Queues are FIFO. Spot instances are interrupted at
``spot_interruptions_per_hour`` (a Poisson process); their running tasks go back to the head
of their queue.

API pools (the config's ``[[api_pools]]``; ``api_pools=False`` leaves them out): a task
placement sends to ``inference.api-<provider>`` is a call on that provider's
``fleet.sim.apipools.SimApiPool``: no boot, no idle cost, the tokens at list price, the
offer's latency, and queueing only behind the provider's rate limit. The autoscaler's
overflow demand from API pools is not simulated (their queues never reach the planner).

Instance lifecycle (passive transitions come from the clock and the spot market, active ones
from the planner or the KEDA rule)::

    from      event                                   to        what changes
    --------  --------------------------------------  --------  ---------------------------
    -         launch (tick)                           PENDING   billed from now
    PENDING   clock reaches ready_at (passive)        USABLE    counted as a consumer
    USABLE    scale-in picks it (active)              DRAINING  takes no new work
    DRAINING  its last task finishes (passive)        ENDED     billing stops (+ stop_s)
    PENDING   scale-in picks it (active)              ENDED     never served
    any       spot interruption (passive)             ENDED     running tasks requeued first

Event order. Events at equal times run in the order they were scheduled. After every event,
dispatch runs as if it visited every usable instance in ascending id order and, for each, every
queue it serves in the order the queues first got work, starting head tasks while they fit.
It visits only instances that could start something: those that became usable or freed
capacity since their last visit, and those serving a queue whose head changed (an instance
earlier in the order that a later one's start unblocks waits for the next event, as it would
in the full scan). So an event costs time in what it touches, and a run is linear in its tasks.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
from collections import deque
from dataclasses import replace
from typing import Any

from fleet.autoscaler.config import AutoscalerConfig, catalog_for_pools
from fleet.autoscaler.memory import smooth_load
from fleet.autoscaler.model import PoolHistory
from fleet.autoscaler.planner import busy_pools, plan
from fleet.catalog import Catalog, Offer
from fleet.compat import family_rejection, memory_needed_gb, offer_fit
from fleet.placement import NoPlacementError, Placement, Policy, place
from fleet.queues import all_queue_names, api_queue_name, parse_queue
from fleet.rates import TrafficMeter
from fleet.sim.apipools import SimApiPool
from fleet.sim.keda import (
    KEDA_COOLDOWN_S,
    KEDA_MAX_REPLICAS,
    KEDA_POLLING_S,
    HomogeneousOffer,
    concurrency,
    desired_replicas,
    homogeneous_offer,
    scale_in_floor,
    target_per_instance,
    task_devices,
)
from fleet.sim.models import Holds, ModelCatalogs, pool_holds
from fleet.sim.results import SimResult, decode_tpot_s, summarise
from fleet.sim.snapshot import SAMPLE, build_snapshot
from fleet.sim.state import QueueBook, QueueLoads, SimInstance, SimTask, packing
from fleet.sim.trace import TraceEvent
from fleet.spec import SLO, TaskKind, TaskSpec
from fleet.throughput import estimate

__all__ = [
    "POLICIES",
    "SAMPLE",
    "SimInstance",
    "SimResult",
    "SimTask",
    "Simulation",
    "simulate",
]

POLICIES = ("fleet", "homogeneous", "cheapest")
HOMOGENEOUS_QUEUE = "homogeneous"


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
        keda_target: int | None = None,
        keda_polling_s: float = KEDA_POLLING_S,
        keda_cooldown_s: float = KEDA_COOLDOWN_S,
        keda_max: int = KEDA_MAX_REPLICAS,
        boot_s: float | None = None,
        stop_s: float = 0.0,
        api_pools: bool = True,
    ) -> None:
        """Prepare a run; ``policy`` is one of ``POLICIES``; ``api_pools`` False ignores ``[[api_pools]]``.

        ``keda_*`` shape the ``homogeneous`` policy (``fleet.sim.keda``): ``keda_target``
        tasks per instance (None: what one instance runs at once for the trace's typical
        task), the polling interval, the scale-in cooldown and the most instances.
        """
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
        self.api_queues = {api_queue_name(p): pool for p, pool in self.api.items()}
        self.tasks = [SimTask(i, e.spec, e.t) for i, e in enumerate(trace)]
        self.models = ModelCatalogs(catalog, config)
        self.holds = pool_holds(config)
        # The registry model of a task depends on its model name and kind only.
        self._model_of: dict[tuple[str, TaskKind], str | None] = {}
        one_per_model = {(t.spec.model.name, t.spec.kind): t.spec for t in self.tasks}
        self.all_queues = all_queue_names(
            self.placement_catalog, models=self.models.entries(list(one_per_model.values()))
        )
        self.book = QueueBook(self.all_queues, self._serves)
        self.queues = self.book.queues
        self.rng = random.Random(seed)
        self.spot_rate = spot_interruptions_per_hour
        self.keda = (keda_target or 1, keda_polling_s, keda_cooldown_s, keda_max)
        self.boot_s = boot_s  # None: each family's cold start from the catalog
        # Billed time after a scale-in decision finds an instance idle: the drain handshake and
        # the shutdown itself (0: billing stops at the decision, as before).
        self.stop_s = stop_s
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.instances: dict[str, SimInstance] = {}
        self.live: dict[str, SimInstance] = {}  # not ended, in launch order
        self.pending: list[tuple[float, int, SimInstance]] = []  # not yet usable, by ready_at
        self.dirty: set[str] = set()  # instances dispatch must visit next
        self.unsettled = len(self.tasks)  # neither finished nor rejected
        self.history: dict[str, PoolHistory] = {}
        self.ids = itertools.count()
        self.launches = itertools.count()  # ties in `pending` go by launch order
        self.now = 0.0
        self.keda_recent: deque[tuple[float, int]] = deque()  # (poll time, desired) in cooldown
        self.homog: HomogeneousOffer | None = None
        if policy == "homogeneous":
            self._keda_setup(keda_target)
        self.offers = {(o.cloud, o.region, o.instance_type): o for o in catalog.offers}
        self._no_deadline: dict[SLO, SLO] = {}
        self.loads: dict[str, tuple[float, float]] = {}  # smoothed running load per queue
        self.traffic = TrafficMeter()  # arrivals per (model, kind), for placement's pricing

    # -- events -------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: Any = None) -> None:  # noqa: ANN401 - event payloads vary
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> SimResult:
        """Simulate until every task is done or rejected and the fleet has scaled in.

        The trace and what was built from it live for the whole run, so they are moved out of
        the cyclic garbage collector's sight while it runs (``gc.freeze``, undone after):
        otherwise every full collection re-scans every task's spec, a cost that grows with the
        trace. Left alone when the process has frozen objects of its own.
        """
        if gc.get_freeze_count():
            return self._run()
        gc.freeze()
        try:
            return self._run()
        finally:
            gc.unfreeze()

    def _run(self) -> SimResult:
        # Arrivals come from the trace in time order, before any event scheduled for the same
        # time (as if all were scheduled first), merged with the heap of everything else.
        arrivals = sorted(self.tasks, key=lambda task: task.arrival)
        waiting = len(arrivals)
        interval = (
            self.keda[1] if self.policy == "homogeneous" else self.config.fleet.loop_interval_s
        )
        self._push(0.0, "tick")
        last_arrival = self.tasks[-1].arrival if self.tasks else 0.0
        horizon = last_arrival + 6 * 3600.0
        events = self.events
        arrived = 0
        payload: Any
        while arrived < waiting or events:
            if arrived < waiting and (not events or arrivals[arrived].arrival <= events[0][0]):
                payload = arrivals[arrived]
                t, kind = payload.arrival, "arrival"
                arrived += 1
            else:
                t, _, kind, payload = heapq.heappop(events)
            if t > horizon:
                break
            self.now = t
            self._activate()
            if kind == "arrival":
                self._arrive(payload)
            elif kind == "finish":
                self._finish(*payload)
            elif kind == "interrupt":
                self._interrupt(payload)
            elif kind == "api_done":
                payload.end = t
                self.unsettled -= 1
            elif kind == "tick":
                self._tick()
                if not (t >= last_arrival and self.unsettled == 0 and not self.live):
                    self._push(t + interval, "tick")
            self._dispatch()
        return summarise(
            self.policy,
            self.tasks,
            self.instances.values(),
            self.api.values(),
            self.now,
            self.stop_s,
        )

    # -- placement ----------------------------------------------------------------------
    def _arrive(self, task: SimTask) -> None:
        spec = task.spec
        if self.policy == "homogeneous":
            d = self.homog_devices[task.idx]
            if d is None:
                self._reject(task, self._homog_refusal(spec))
                return
            task.queue, task.devices = HOMOGENEOUS_QUEUE, d
        else:
            key = (spec.model.name, spec.kind)
            if key in self._model_of:
                model = self._model_of[key]
            else:
                model = self._model_of[key] = self.models.model_of(spec)
            where = self.models.for_model(model, spec.kind)
            registry = self.models.registry
            try:
                if self.policy == "cheapest":
                    if spec.slo.deadline_s is not None:
                        spec = spec.model_copy(update={"slo": self._without_deadline(spec.slo)})
                    placement = place(spec, where, None, Policy.COST, models=registry)
                else:
                    loads = QueueLoads(self.book, self.api_queues, self.now)
                    self.traffic.record(spec, where, self.now)
                    traffic = self.traffic.traffic(spec, self.now)
                    placement = place(
                        spec, where, loads, Policy.COST, models=registry, traffic=traffic
                    )
            except NoPlacementError as exc:
                self._reject(task, (self.models.unheld(model, spec.kind) or str(exc))[:200])
                return
            task.queue, task.devices = placement.queue, placement.devices
            if placement.api is not None:
                self._call_api(task, placement)
                return
        waiting = self.book.queue(task.queue)
        waiting.append(task)
        if len(waiting) == 1:  # a new head: whoever serves the queue may take it
            self._head_changed(task.queue)

    def _without_deadline(self, slo: SLO) -> SLO:
        """``slo`` without its deadline (one copy per distinct SLO, not per task)."""
        out = self._no_deadline.get(slo)
        if out is None:
            out = self._no_deadline[slo] = slo.model_copy(update={"deadline_s": None})
        return out

    def _reject(self, task: SimTask, why: str) -> None:
        task.rejected = why
        self.unsettled -= 1

    def _call_api(self, task: SimTask, placement: Placement) -> None:
        offer = placement.api
        assert offer is not None  # noqa: S101 - the caller checked
        try:
            call = self.api[offer.provider].submit(
                offer, self.now, task.spec.tokens_in, task.spec.tokens_out
            )
        except ValueError as exc:
            self._reject(task, str(exc)[:200])
            return
        task.start, task.service_s = call.start, call.end - call.start
        self._push(call.end, "api_done", task)

    def _serves(self, inst: SimInstance, queue: str) -> bool:
        """The policy's rule: whether ``inst`` consumes ``queue`` (asked once per shape and queue)."""
        if self.policy == "homogeneous":
            return queue == HOMOGENEOUS_QUEUE
        ref = parse_queue(queue)
        return (
            ref is not None
            and ref.accelerator == inst.offer.accelerator
            and ref.devices <= inst.devices
            and inst.holds.serves(ref.model, ref.kind)
        )

    # -- running tasks -------------------------------------------------------------------
    def _cost_shape(self, task: SimTask, inst: SimInstance) -> tuple[float, float]:
        """``(service_s, share)`` of ``task`` on ``inst``, cached on the task per offer shape."""
        key = (inst.offer.accelerator, inst.offer.vcpus)
        cached = task.cost
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        family = self.catalog.families[inst.offer.accelerator]
        est = estimate(task.spec, family, task.devices, inst.offer.vcpus)
        if task.spec.slo.tpot_ms is not None:  # for the SLO check (fleet.sim.results)
            task.tpot_s = decode_tpot_s(est, task.spec, family, task.devices, inst.offer.vcpus)
        service, share = packing(est, task.devices, per_vcpu=family.per_vcpu)
        task.cost = (key, service, share)
        return service, share

    def _head_changed(self, queue: str) -> None:
        for inst in self.book.serving(queue):
            self.dirty.add(inst.id)

    def _activate(self) -> None:
        """Instances whose ``ready_at`` has come become usable (unless drained or ended first)."""
        pending = self.pending
        while pending and pending[0][0] <= self.now:
            inst = heapq.heappop(pending)[2]
            if not inst.draining and inst.ended_at is None:
                self.book.activate(inst)
                self.dirty.add(inst.id)

    def _dispatch(self) -> None:
        """Start what fits, in the full scan's order, visiting only instances that may start work."""
        self._activate()
        if not self.dirty:
            return
        order = sorted(self.dirty)  # a sorted list is a heap
        visiting = set(order)
        self.dirty = set()
        while order:
            inst = self.instances[heapq.heappop(order)]
            if not inst.usable:
                continue
            for q in self._fill(inst):
                # The head of q changed: later instances see it in this pass, earlier ones next.
                for other in self.book.serving(q):
                    oid = other.id
                    if oid > inst.id:
                        if oid not in visiting:
                            visiting.add(oid)
                            heapq.heappush(order, oid)
                    elif other is not inst:
                        self.dirty.add(oid)

    def _fill(self, inst: SimInstance) -> list[str]:
        """Start head tasks on ``inst`` while they fit, queue by queue; the queues taken from."""
        taken = []
        capacity = inst.capacity() + 1e-9
        queues = self.book.queues
        for q in inst.served:
            waiting = queues[q]
            if not waiting:
                continue
            took = False
            while waiting:
                task = waiting[0]
                service, share = self._cost_shape(task, inst)
                if inst.used + share > capacity:
                    break
                waiting.popleft()
                task.start, task.service_s, task.share = self.now, service, share
                task.cost = None  # only a waiting task needs it
                inst.used += share
                inst.running[task.idx] = task
                self._push(self.now + service, "finish", (inst.id, task.idx))
                took = True
            if took:
                taken.append(q)
        return taken

    def _finish(self, inst_id: str, idx: int) -> None:
        inst = self.instances[inst_id]
        task = inst.running.pop(idx, None)
        if task is None:  # interrupted before it finished
            return
        task.end = self.now
        self.unsettled -= 1
        inst.used -= task.share
        inst.busy_device_s += task.share * task.service_s
        if inst.usable:
            self.dirty.add(inst.id)
        self._maybe_end(inst)

    def _interrupt(self, inst_id: str) -> None:
        inst = self.instances[inst_id]
        if inst.ended_at is not None:
            return
        self._end(inst)
        for task in sorted(inst.running.values(), key=lambda t: -t.idx):
            task.start = None
            self.book.queue(task.queue).appendleft(task)
            self._head_changed(task.queue)
        inst.running.clear()
        inst.used = 0.0

    def _drain(self, inst: SimInstance) -> None:
        """A scale-in decision: ``inst`` takes no new work and ends when its last task does."""
        inst.draining = True
        self.book.retire(inst)
        self._maybe_end(inst)

    def _maybe_end(self, inst: SimInstance) -> None:
        if inst.draining and not inst.running and inst.ended_at is None:
            self._end(inst)

    def _end(self, inst: SimInstance) -> None:
        inst.ended_at = self.now
        self.book.retire(inst)
        del self.live[inst.id]

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
        self.live[inst.id] = inst
        heapq.heappush(self.pending, (inst.ready_at, next(self.launches), inst))
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

    def _keda_setup(self, target: int | None) -> None:
        """The homogeneous policy's one offer, each task's devices on it, and the KEDA target."""
        self.homog = homogeneous_offer([t.spec for t in self.tasks], self.config, self.catalog)
        self.homog_devices: list[int | None] = [None] * len(self.tasks)
        if self.homog is None:
            return
        offer = self.homog.priced.offer
        family = self.catalog.families[offer.accelerator]
        held = []
        for task in self.tasks:
            self.homog_devices[task.idx] = task_devices(task.spec, offer, family)
            if self.homog_devices[task.idx] is not None:
                held.append(concurrency(task.spec, offer, family) or 1.0)
        if target is None:
            self.keda = (target_per_instance(held), *self.keda[1:])

    def _homog_refusal(self, spec: TaskSpec) -> str:
        if self.homog is None:
            return "the config's pools buy no instance"
        offer = self.homog.priced.offer
        why = family_rejection(spec, self.catalog.families[offer.accelerator])
        if why is None:
            why = offer_fit(spec, offer, memory_needed_gb(spec)).reason
        return f"{offer.instance_type}: {why}"[:200]

    def _keda_tick(self) -> None:
        target, _, cooldown, maximum = self.keda
        live = [i for i in self.live.values() if not i.draining]
        backlog = len(self.book.queues.get(HOMOGENEOUS_QUEUE, ())) + sum(
            len(i.running) for i in live
        )
        desired = desired_replicas(backlog, target, maximum)
        recent = self.keda_recent
        recent.append((self.now, desired))
        while recent and self.now - recent[0][0] > cooldown:
            recent.popleft()
        if desired > len(live) and self.homog is not None:
            priced = self.homog.priced
            for _ in range(desired - len(live)):
                self._launch(
                    "homogeneous",  # no pool's models or load time: one plain Deployment
                    priced.offer,
                    priced.market.value,
                    priced.usd_per_hour,
                    priced.offer.accelerator_count,
                )
            return
        floor = scale_in_floor(recent, self.now, cooldown)
        if floor < len(live):
            for inst in sorted(live, key=lambda i: (len(i.running), -i.launched_at))[
                : len(live) - floor
            ]:
                self._drain(inst)

    def _planner_tick(self) -> None:
        snap = build_snapshot(
            self.now, self.book.queues, self.live.values(), self.catalog, self.history
        )
        queues = smooth_load(snap.queues, self.loads, self.now, self.config.fleet.namespace)
        snap = replace(snap, queues=queues)  # as the live loop smooths it
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
        for launch in decided.launches:
            offer = self.offers[
                (launch.offer.cloud, launch.offer.region, launch.offer.instance_type)
            ]
            self._launch(
                launch.pool, offer, launch.offer.market, launch.usd_per_hour, launch.devices
            )
        for term in decided.terminations:
            inst = self.instances.get(term.instance_id)
            if inst is not None and inst.ended_at is None:
                self._drain(inst)


def simulate(
    trace: list[TraceEvent],
    config: AutoscalerConfig,
    catalog: Catalog,
    policy: str,
    **options: float,
) -> SimResult:
    """Run ``policy`` over ``trace`` (see ``Simulation`` for the options)."""
    return Simulation(trace, config, catalog, policy, **options).run()  # type: ignore[arg-type]

"""What the simulated fleet shows the planner: a ``Snapshot`` built from the simulation's state.

The same observation the live loop gathers (``fleet.autoscaler.observe``), from the
simulation instead of a broker and a provider:

* one ``QueueObservation`` per queue that has ever had work or has work running: depth,
  tasks running from it and the devices they occupy, and the mean device time
  (``busy_s`` on the queue's family and tier) and device share of up to ``SAMPLE`` tasks
  at its head when it is not empty (else the running tasks' mean share);
* one ``Instance`` and one ``WorkerObservation`` per instance not ended: PENDING before
  ``ready_at``, RUNNING after, DRAINING once a scale-in chose it.

Pure: it reads the state and changes nothing.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Mapping

from fleet.autoscaler.model import (
    Instance,
    InstanceState,
    OfferRef,
    PoolHistory,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.catalog import Catalog
from fleet.queues import parse_queue
from fleet.sim.state import SimInstance, SimTask
from fleet.throughput import estimate

SAMPLE = 20


def queue_observations(
    queues: Mapping[str, deque[SimTask]], live: Iterable[SimInstance], catalog: Catalog
) -> dict[str, QueueObservation]:
    """Depth, running count and devices, and the head sample of every queue with work."""
    out: dict[str, QueueObservation] = {}
    running: dict[str, int] = {}
    devices: dict[str, float] = {}
    shares: dict[str, float] = {}
    for inst in live:
        for task in inst.running.values():
            running[task.queue] = running.get(task.queue, 0) + 1
            devices[task.queue] = devices.get(task.queue, 0.0) + task.share
            shares[task.queue] = shares.get(task.queue, 0.0) + task.share / max(task.devices, 1)
    for q in set(queues) | set(running):
        waiting = queues.get(q, deque())
        sample = share = None
        ref = parse_queue(q)
        if waiting and ref is not None:
            family = catalog.families[ref.accelerator]
            vcpus = (
                max((o.vcpus or 0 for o in catalog.offers_by_family[ref.accelerator]), default=0)
                or None
            )
            head = [
                estimate(t.spec, family, ref.devices, vcpus)
                for t in itertools.islice(waiting, SAMPLE)
            ]
            sample = sum(e.busy_s for e in head) / len(head)
            share = sum(min(1.0, e.busy_s / max(e.service_s, 1e-9)) for e in head) / len(head)
        elif q in running:
            share = shares[q] / running[q]
        out[q] = QueueObservation(
            q, len(waiting), running.get(q, 0), 0, sample, share, devices.get(q, 0.0)
        )
    return out


def build_snapshot(
    now: float,
    queues: Mapping[str, deque[SimTask]],
    live: Iterable[SimInstance],
    catalog: Catalog,
    history: Mapping[str, PoolHistory],
) -> Snapshot:
    """The planner's view at ``now`` of ``queues`` and the instances ``live`` (not ended, in launch order)."""
    live = tuple(live)
    instances = []
    workers = []
    for inst in live:
        state = (
            InstanceState.DRAINING
            if inst.draining
            else (InstanceState.RUNNING if inst.ready_at <= now else InstanceState.PENDING)
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
            WorkerObservation(f"w-{inst.id}", inst.offer.accelerator, inst.id, len(inst.running))
        )
    return Snapshot(
        now,
        queue_observations(queues, live, catalog),
        tuple(instances),
        tuple(workers),
        (),
        dict(history),
    )

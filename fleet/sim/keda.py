"""The simulator's ``homogeneous`` baseline, a KEDA-like fleet of one instance type, pure.

What a buyer runs without fleet: one instance type for every task, a Deployment scaled by
KEDA on the length of one queue. The rules, each a pure function here:

* **The instance type** (``homogeneous_offer``): among the offers the config's pools may
  buy (``pool_offers``: each pool's offers in each of its markets, at the price the
  planner sees), the cheapest per hour whose one instance can hold every task of the
  trace: the family runs the task's kind and dtype (``fleet.compat.family_rejection``)
  and some tensor-parallel degree of its devices holds the task's memory
  (``fleet.compat.offer_fit``). Ties go to the lexically first offer and market. When no
  offer holds every task, the one that holds the most (then the cheapest) is taken and
  the simulator rejects the rest.
* **Tasks per instance** (``target_per_instance``): KEDA's queue-length scaler sizes a
  Deployment as ``ceil(queue length / target)``, where the target is what one replica
  serves at once. Here it is what one instance of the offer holds concurrently under the
  simulator's packing rule: a task on ``d`` devices occupies ``d x busy_s / service_s``
  of the instance's devices (``fleet.throughput.estimate``: a batching server overlaps
  about ``service_s / busy_s`` streams per device; compute-bound work fills whole
  devices), so an instance of ``D`` devices holds ``D / share`` of them. The target is
  that number for the trace's typical task, the one of average share over the tasks the
  offer holds (the harmonic mean of the ``D / share``), rounded down, at least 1: a real
  operator sets one number for the Deployment, and at this one a full instance of the
  trace's mix uses all its devices. (The median task would overload it when a minority
  of the tasks, 70B calls among 8B chats, take most of the devices.)
* **Scaling** (``desired_replicas``, ``scale_in_floor``): every ``polling_s`` (KEDA's
  default, 30 s) the desired count is ``ceil((waiting + running) / target)``, capped at
  ``maxReplicaCount`` (100); scale-out to it at once. Scale-in goes to the largest desired
  count polled within the last ``cooldown_s`` (300 s: KEDA's ``cooldownPeriod`` before
  the last replica goes, and the Kubernetes HPA's scale-down stabilization window before
  the others), so an instance is released only after 300 s in which it was in excess.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleet.autoscaler.config import AutoscalerConfig, PricedOffer, pool_offers
from fleet.catalog import Catalog, Family, Offer
from fleet.compat import family_rejection, memory_needed_gb, offer_fit
from fleet.sim.state import packing
from fleet.spec import TaskSpec
from fleet.throughput import estimate

KEDA_POLLING_S = 30.0  # KEDA's default pollingInterval
KEDA_COOLDOWN_S = 300.0  # KEDA's default cooldownPeriod; the HPA's scale-down window
KEDA_MAX_REPLICAS = 100  # KEDA's default maxReplicaCount


@dataclass(frozen=True, slots=True)
class HomogeneousOffer:
    """The one buyable of the baseline: ``priced`` (offer, market, hourly price) of ``pool``.

    ``holds`` and ``tasks`` count the trace's tasks it can hold and all of them.
    """

    pool: str
    priced: PricedOffer
    holds: int
    tasks: int


def task_devices(spec: TaskSpec, offer: Offer, family: Family) -> int | None:
    """Devices of ``offer`` that ``spec`` runs on, or None when one instance cannot run it."""
    if family_rejection(spec, family) is not None:
        return None
    return offer_fit(spec, offer, memory_needed_gb(spec)).devices


def _shape(spec: TaskSpec) -> tuple[object, ...]:
    """What decides whether an offer holds ``spec`` (tasks of one shape are tested once)."""
    return (spec.model, spec.kind, spec.training_method, spec.requirements)


def homogeneous_offer(
    specs: Sequence[TaskSpec], config: AutoscalerConfig, catalog: Catalog
) -> HomogeneousOffer | None:
    """The cheapest pool offer that holds every task (else the one holding most); None: no offer.

    See the module docstring for the rule.
    """
    shapes: dict[tuple[object, ...], tuple[TaskSpec, int]] = {}
    for spec in specs:
        key = _shape(spec)
        first, count = shapes.get(key, (spec, 0))
        shapes[key] = (first, count + 1)
    best: tuple[tuple[object, ...], HomogeneousOffer] | None = None
    for pool in config.pools:
        for priced in pool_offers(pool, catalog):
            family = catalog.families[priced.offer.accelerator]
            holds = sum(
                n
                for spec, n in shapes.values()
                if task_devices(spec, priced.offer, family) is not None
            )
            o = priced.offer
            rank = (-holds, priced.usd_per_hour, o.cloud, o.region, o.instance_type, priced.market)
            if best is None or rank < best[0]:
                best = (rank, HomogeneousOffer(pool.name, priced, holds, len(specs)))
    return best[1] if best is not None else None


def concurrency(spec: TaskSpec, offer: Offer, family: Family) -> float | None:
    """How many tasks like ``spec`` one instance of ``offer`` runs at once (None: it cannot).

    The simulator's packing rule: a task takes ``d x min(1, busy_s / service_s)`` of the
    instance's ``accelerator_count`` devices (cpu offers: ``min(1, busy_s / service_s)``
    of their one).
    """
    devices = task_devices(spec, offer, family)
    if devices is None:
        return None
    _, share = packing(
        estimate(spec, family, devices, offer.vcpus), devices, per_vcpu=family.per_vcpu
    )
    return offer.accelerator_count / max(share, 1e-12)


def target_per_instance(concurrencies: Iterable[float]) -> int:
    """KEDA's target for one instance: the harmonic mean of ``concurrencies``, rounded down, >= 1.

    ``concurrencies`` are ``D / share`` per task (``concurrency``); their harmonic mean is
    ``D`` over the average share, what one instance runs at once of the trace's mix. A
    tiny epsilon keeps float noise (``4 / (4 / 3)``) from rounding a whole number down.
    """
    values = [v for v in concurrencies if v > 0]
    if not values:
        return 1
    mean = len(values) / sum(1.0 / v for v in values)
    return max(1, math.floor(mean + 1e-9))


def desired_replicas(queue_length: int, target: int, maximum: int) -> int:
    """KEDA's queue-length rule: ``ceil(queue_length / target)``, at most ``maximum``."""
    return min(maximum, math.ceil(queue_length / target))


def scale_in_floor(recent: Sequence[tuple[float, int]], now: float, cooldown_s: float) -> int:
    """The fewest replicas allowed at ``now``: the largest desired count polled within ``cooldown_s``.

    ``recent`` holds ``(poll time, desired)`` pairs; a poll exactly ``cooldown_s`` ago still
    counts (KEDA scales to zero once its last active poll is more than the cooldown ago).
    """
    return max((d for t, d in recent if now - t <= cooldown_s), default=0)

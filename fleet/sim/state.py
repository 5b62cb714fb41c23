"""The simulation's state: tasks, instances, and the FIFO queues with who serves each one.

Kept incrementally so that an event costs time in what it touches, not in the size of the run:

* ``QueueBook`` holds the queues by name in the order each first got work, and for each queue
  the *usable* instances serving it (ready, not draining, not ended) and how many there are.
  The engine tells it when an instance becomes usable (``activate``) and when it stops being
  usable (``retire``); a queue name is parsed once per instance shape, never per event.
* ``QueueLoads`` is the read-only view placement receives: for every queue placement can
  choose, ``QueueLoad(depth, consumers)`` computed when placement asks for it, equal to the
  table the live stats cache would build (an empty, unserved queue is cold, not unknown);
  an API pool's queue reports its calls waiting for the rate limit and one consumer.

Which instance serves which queue is the policy's rule (``serves``), a pure function of the
instance's shape (its pool, accelerator and device count) and the queue name.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from fleet.catalog import Offer
from fleet.placement import QueueLoad
from fleet.sim.apipools import SimApiPool
from fleet.sim.models import Holds
from fleet.spec import TaskSpec
from fleet.throughput import Estimate

Shape = tuple[str, str, int]  # pool, accelerator, devices: what decides the queues served


@dataclass(slots=True)
class SimTask:
    """A task in the simulation.

    ``cost`` caches the last ``(offer key, service_s, share)`` computed for it while it
    waits, so a task at the head of a queue is not re-estimated on every dispatch.
    """

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
    cost: tuple[tuple[str, int | None], float, float] | None = None
    # Seconds per output token on the chip it starts on (set with ``cost`` when the spec has
    # ``slo.tpot_ms``; ``fleet.sim.results`` checks it against the goal).
    tpot_s: float | None = None


@dataclass(slots=True)
class SimInstance:
    """An instance: launched, usable from ``ready_at``, billed until ``ended_at``.

    ``usable`` is True while ``QueueBook`` counts it as a consumer (between ``activate``
    and ``retire``); ``served`` is its shape's list of queues (shared, kept by the book).
    """

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
    usable: bool = False
    served: list[str] = field(default_factory=list)

    @property
    def shape(self) -> Shape:
        """What decides the queues it serves."""
        return (self.pool, self.offer.accelerator, self.devices)

    def capacity(self) -> float:
        """Device capacity (cpu: one instance)."""
        return float(self.devices)


@dataclass(slots=True)
class _Served:
    """One instance shape and the queues it serves.

    ``names``: every queue it serves; ``order``: those that have had work, in the order they
    first got it (the order dispatch visits them); ``members``: its usable instances.
    """

    example: SimInstance
    names: list[str]
    order: list[str]
    members: dict[str, SimInstance] = field(default_factory=dict)


class QueueBook:
    """FIFO queues by name, and the usable instances serving each one.

    ``known`` are the queue names placement can choose (their loads are reported);
    ``serves(instance, queue)`` is the policy's rule. Callers append and pop through the
    deques in ``queues`` after ``queue(name)`` has created them.
    """

    def __init__(self, known: tuple[str, ...], serves: Callable[[SimInstance, str], bool]) -> None:
        """An empty book over ``known`` queue names."""
        self.known = known
        self.known_set = frozenset(known)
        self.serves = serves
        self.queues: dict[str, deque[SimTask]] = {}
        self.consumers: dict[str, int] = {}
        self.usable: dict[str, dict[str, SimInstance]] = {}
        self._shapes: dict[Shape, _Served] = {}

    def queue(self, name: str) -> deque[SimTask]:
        """The queue ``name``, created empty (after every existing one) when new."""
        waiting = self.queues.get(name)
        if waiting is None:
            waiting = self.queues[name] = deque()
            for served in self._shapes.values():
                if self.serves(served.example, name):
                    served.order.append(name)
                    if name not in self.known_set:
                        served.names.append(name)
                        for inst in served.members.values():
                            self._add(name, inst)
        return waiting

    def served(self, inst: SimInstance) -> _Served:
        """The shape record of ``inst``, built on first sight of its shape."""
        served = self._shapes.get(inst.shape)
        if served is None:
            names = [q for q in self.known if self.serves(inst, q)]
            names += [q for q in self.queues if q not in self.known_set and self.serves(inst, q)]
            order = [q for q in self.queues if self.serves(inst, q)]
            served = self._shapes[inst.shape] = _Served(inst, names, order)
        return served

    def _add(self, name: str, inst: SimInstance) -> None:
        self.usable.setdefault(name, {})[inst.id] = inst
        self.consumers[name] = self.consumers.get(name, 0) + 1

    def activate(self, inst: SimInstance) -> None:
        """``inst`` is ready and takes work: count it on every queue it serves."""
        served = self.served(inst)
        inst.served = served.order
        inst.usable = True
        served.members[inst.id] = inst
        for name in served.names:
            self._add(name, inst)

    def retire(self, inst: SimInstance) -> None:
        """``inst`` drains or ends: it no longer counts (a no-op when it was not usable)."""
        if not inst.usable:
            return
        inst.usable = False
        served = self.served(inst)
        del served.members[inst.id]
        for name in served.names:
            del self.usable[name][inst.id]
            self.consumers[name] -= 1

    def serving(self, name: str) -> Iterator[SimInstance]:
        """The usable instances serving queue ``name``."""
        return iter(self.usable.get(name, {}).values())


class QueueLoads(Mapping[str, QueueLoad]):
    """What placement sees at ``now``: depth and consumers of every known queue.

    An API pool's queue holds its calls not yet started at ``now``, with one consumer (API
    workers are always up). Other names are unknown (``KeyError``; ``get`` gives None).
    """

    def __init__(self, book: QueueBook, api: Mapping[str, SimApiPool], now: float) -> None:
        """A view of ``book`` and the API pools ``api`` (by queue name) at ``now``."""
        self._book = book
        self._api = api
        self._now = now

    def __getitem__(self, name: str) -> QueueLoad:
        """The load of queue ``name``."""
        pool = self._api.get(name)
        if pool is not None:
            return QueueLoad(pool.waiting(self._now), 1)
        book = self._book
        if name not in book.known_set:
            raise KeyError(name)
        waiting = book.queues.get(name)
        return QueueLoad(len(waiting) if waiting else 0, book.consumers.get(name, 0))

    def get(self, name: str, default: QueueLoad | None = None) -> QueueLoad | None:  # type: ignore[override]
        """The load of ``name``, or ``default`` when placement cannot choose that queue."""
        pool = self._api.get(name)
        if pool is not None:
            return QueueLoad(pool.waiting(self._now), 1)
        book = self._book
        if name not in book.known_set:
            return default
        waiting = book.queues.get(name)
        return QueueLoad(len(waiting) if waiting else 0, book.consumers.get(name, 0))

    def __iter__(self) -> Iterator[str]:
        """Every known queue name."""
        return iter(self._book.known_set | self._api.keys())

    def __len__(self) -> int:
        """How many queue names are known."""
        return len(self._book.known_set | self._api.keys())


def packing(est: Estimate, devices: int, *, per_vcpu: bool) -> tuple[float, float]:
    """``(service_s, share)`` of a task estimated ``est`` on ``devices`` devices.

    The simulator's packing rule: a running task takes ``devices x min(1, busy_s /
    service_s)`` of its instance's devices (a batching server overlaps streams;
    compute-bound work fills whole devices); on a per-vCPU offer, that fraction of its one.
    ``service_s`` is at least a microsecond.
    """
    service = max(est.service_s, 1e-6)
    fraction = min(1.0, est.busy_s / service)
    return service, fraction if per_vcpu else devices * fraction

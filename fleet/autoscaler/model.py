"""Data that flows through the autoscaler: snapshots in, plans out. All frozen, all JSON-able.

Instance lifecycle (passive transitions come from what providers and workers report,
active ones from the actuator):

====================  ===========================================  =================
from                  event                                        to
====================  ===========================================  =================
(none)                actuator launches (active)                   pending
pending               provider reports it running (passive)        running
pending               launch never confirmed past the grace (pas.)  orphan -> terminated
running               planner picks it for scale-in (active)       draining
draining              its workers report no active task (passive)  terminating
terminating           provider reports it gone (passive)           (none)
any                   provider reports it gone (passive)           (none)
====================  ===========================================  =================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class InstanceState(StrEnum):
    """Where an instance is in its life (see the module's transition table)."""

    PENDING = "pending"
    RUNNING = "running"
    DRAINING = "draining"
    TERMINATING = "terminating"


class ErrorKind(StrEnum):
    """Provider error taxonomy shared by every cloud."""

    CAPACITY = "capacity"  # no capacity now (InsufficientInstanceCapacity, ZONE_RESOURCE_POOL_EXHAUSTED, AllocationFailed, SkuNotAvailable)
    QUOTA = "quota"  # account limits (VcpuLimitExceeded, QUOTA_EXCEEDED)
    THROTTLED = "throttled"  # API rate limits (retried by the SDK; reported if they persist)
    UNSUPPORTED = "unsupported"  # the offer does not exist here (Unsupported, InvalidInstanceType)
    AUTH = "auth"  # credentials or permissions
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class OfferRef:
    """One priced way to buy an instance."""

    cloud: str
    region: str
    instance_type: str
    market: str  # "spot" | "on_demand"

    @property
    def key(self) -> str:
        """``cloud/region/instance_type/market``."""
        return f"{self.cloud}/{self.region}/{self.instance_type}/{self.market}"


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance a provider reports (carrying our fleet tag), and what we know of it."""

    id: str
    pool: str
    offer: OfferRef
    state: InstanceState
    launched_at: float
    token: str  # the launch's idempotency token
    usd_per_hour: float
    devices: int = 1
    workers: tuple[str, ...] = ()  # Celery node names running on it
    provider: str = ""  # the provider that listed it (filled in by observe)


@dataclass(frozen=True, slots=True)
class ProviderError:
    """A failed provider call, as data (never an exception through the planner)."""

    pool: str
    offer: OfferRef | None
    kind: ErrorKind
    message: str
    at: float


@dataclass(frozen=True, slots=True)
class Interruption:
    """A spot interruption notice a worker on ``instance_id`` saw at ``at`` (passive).

    ``offer`` is the interrupted offer (from the provider's listing of the instance, or
    what the worker recorded); ``pool`` is empty when the instance was no longer listed.
    The planner keeps that offer out, like one with a capacity error, for the back-off.
    """

    instance_id: str | None
    offer: OfferRef
    at: float
    pool: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class QueueObservation:
    """One queue: ready messages, delivered-but-unacked ones, consumers."""

    name: str
    ready: int = 0
    unacked: int = 0
    consumers: int = 0
    # Mean device time (s, the throughput model's busy_s: what one task occupies on a busy,
    # batching server) of the messages ``observe`` sampled from the head of the queue;
    # None when it could not peek.
    sample_service_s: float | None = None
    # Mean share of its devices one running task of this queue occupies (busy_s over wall
    # time, in (0, 1]: a stream of a batch of 40 holds 1/40); None: unknown (counted as 1).
    sample_share: float | None = None
    # Devices the queue's running tasks occupy now, when the observer knows it (the
    # simulator does); None: ``unacked x tier x sample_share``.
    running_devices: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerObservation:
    """One live worker: which instance it belongs to and how busy it is."""

    hostname: str
    accelerator: str
    instance_id: str | None
    active: int = 0
    queues: tuple[str, ...] = ()
    concurrency: int = (
        0  # API workers: the in-flight limit they report; 0: unknown or a chip worker
    )


@dataclass(frozen=True, slots=True)
class PoolHistory:
    """What the loop remembers of a pool between plans (times are ``now`` values)."""

    last_busy_at: float | None = None  # last time it had queued or running work
    last_scale_out_at: float | None = None
    last_scale_in_at: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the planner sees, gathered by ``observe`` in one pass."""

    taken_at: float
    queues: dict[str, QueueObservation]
    instances: tuple[Instance, ...]
    workers: tuple[WorkerObservation, ...] = ()
    errors: tuple[ProviderError, ...] = ()
    history: dict[str, PoolHistory] = field(default_factory=dict)
    interruptions: tuple[Interruption, ...] = ()  # recent spot notices (workers.preemption)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fleet plan --snapshot FILE`` reads it back)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Launch:
    """Start one instance of ``offer`` for ``pool``; ``token`` makes it idempotent."""

    pool: str
    offer: OfferRef
    token: str
    usd_per_hour: float
    devices: int
    reason: str


@dataclass(frozen=True, slots=True)
class Termination:
    """Drain, then stop, one instance."""

    pool: str
    instance_id: str
    usd_per_hour: float
    reason: str


@dataclass(frozen=True, slots=True)
class PoolDecision:
    """The plan for one pool, with its reasons and spend before and after."""

    pool: str
    current: int
    desired: int
    launches: tuple[Launch, ...]
    terminations: tuple[Termination, ...]
    reasons: tuple[str, ...]
    usd_per_hour_before: float
    usd_per_hour_after: float


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """Queued work no pool can serve, reported rather than ignored."""

    queue: str
    ready: int
    reason: str


@dataclass(frozen=True, slots=True)
class ApiPoolDecision:
    """The plan for one token-priced API pool: worker concurrency, not instances.

    ``absorbed`` tasks drain within the pool's drain target under its rate limit;
    ``overflow`` ones do not, and count as demand on ``overflow_pool`` when one is set.
    """

    provider: str
    queue: str
    tasks: int
    current_concurrency: int
    desired_concurrency: int
    calls_per_min_limit: float
    absorbed: int
    overflow: int
    overflow_pool: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan: per-pool decisions plus demand nobody can serve."""

    at: float
    decisions: tuple[PoolDecision, ...]
    unsatisfiable: tuple[Unsatisfiable, ...] = ()
    api_pools: tuple[ApiPoolDecision, ...] = ()

    @property
    def launches(self) -> tuple[Launch, ...]:
        """Every launch in the plan."""
        return tuple(launch for d in self.decisions for launch in d.launches)

    @property
    def terminations(self) -> tuple[Termination, ...]:
        """Every termination in the plan."""
        return tuple(t for d in self.decisions for t in d.terminations)

    @property
    def usd_per_hour_before(self) -> float:
        """Fleet spend rate before the plan."""
        return sum(d.usd_per_hour_before for d in self.decisions)

    @property
    def usd_per_hour_after(self) -> float:
        """Fleet spend rate once the plan is carried out."""
        return sum(d.usd_per_hour_after for d in self.decisions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fleet plan --json``)."""
        out = asdict(self)
        out["usd_per_hour_before"] = self.usd_per_hour_before
        out["usd_per_hour_after"] = self.usd_per_hour_after
        return out

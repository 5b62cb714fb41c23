"""Live-worker registry with expiry, in the broker's Redis.

Each worker writes ``<namespace>fleet:worker:<hostname>`` (JSON, TTL ``WORKER_TTL_S``) and
refreshes it every ``HEARTBEAT_S``; a worker that dies drops out when its key expires.
On RabbitMQ there is no shared Redis, and ``fleet status`` asks the workers over
Celery's remote control instead (``workers.control``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

WORKER_TTL_S = 15
HEARTBEAT_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker says of itself."""

    hostname: str
    accelerator: str
    devices: int
    emulated: bool
    queues: tuple[str, ...]
    pid: int
    product: str = ""
    concurrency: int = 1  # pool size; an API worker's in-flight limit (workers.apicontrol)
    instance_id: str | None = None  # the provider instance it runs on (FLEET_INSTANCE_ID)
    engine: str = "reference"  # transformers | vllm | reference (workers.engines)
    models: tuple[str, ...] = ()  # models it holds loaded
    ready: bool = True  # its engine serves its models (False while loading or restarting)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        """Decode a registry value."""
        data: dict[str, Any] = json.loads(raw)
        data["queues"] = tuple(data.get("queues", ()))
        data["models"] = tuple(data.get("models", ()))
        return cls(**data)

    def to_json(self) -> str:
        """Encode for the registry."""
        return json.dumps(asdict(self))


def _key(namespace: str, hostname: str) -> str:
    return f"{namespace}fleet:worker:{hostname}"


def register(client: redis.Redis, info: WorkerInfo, namespace: str = "") -> None:
    """Write or refresh ``info`` with the registry TTL."""
    client.set(_key(namespace, info.hostname), info.to_json(), ex=WORKER_TTL_S)


def unregister(client: redis.Redis, hostname: str, namespace: str = "") -> None:
    """Remove a worker at clean shutdown."""
    client.delete(_key(namespace, hostname))


def live_workers(client: redis.Redis, namespace: str = "") -> list[WorkerInfo]:
    """Workers whose registry key has not expired, sorted by hostname."""
    keys = list(client.scan_iter(match=f"{namespace}fleet:worker:*", count=500))
    if not keys:
        return []
    out = []
    for raw in client.mget(keys):
        if raw is not None:
            try:
                out.append(WorkerInfo.from_json(raw))
            except (ValueError, TypeError):
                continue  # a malformed entry is skipped, never fatal
    return sorted(out, key=lambda w: w.hostname)


class Heartbeat:
    """A daemon thread that keeps one worker's registry entry alive."""

    def __init__(
        self,
        client: redis.Redis,
        info: WorkerInfo,
        namespace: str = "",
        refresh: Callable[[WorkerInfo], WorkerInfo] | None = None,
    ) -> None:
        """Prepare; call ``start``. ``refresh`` (say, readiness) updates ``info`` before each beat."""
        self._client = client
        self._refresh = refresh
        self._info = info
        self._namespace = namespace
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by ``update`` and ``stop``: beat now
        self._thread = threading.Thread(target=self._run, name="fleet-heartbeat", daemon=True)

    @property
    def info(self) -> WorkerInfo:
        """What the worker says of itself now."""
        return self._info

    def start(self) -> None:
        """Register now and keep refreshing."""
        register(self._client, self._info, self._namespace)
        self._thread.start()

    def update(self, info: WorkerInfo) -> None:
        """Say ``info`` from now on; written on the heartbeat's thread at once (never blocks)."""
        self._info = info
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(HEARTBEAT_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._refresh is not None:
                self._info = self._refresh(self._info)
            try:
                register(self._client, self._info, self._namespace)
            except redis.RedisError:
                continue  # the broker may be restarting; try again next beat

    def stop(self) -> None:
        """Stop refreshing and remove the entry."""
        self._stop.set()
        self._wake.set()
        try:
            unregister(self._client, self._info.hostname, self._namespace)
        except redis.RedisError:
            return


# --- spot interruptions: written by a worker on a notice (workers.preemption), read by
# the autoscaler (fleet.autoscaler.observe), which then prefers other offers for a while.

INTERRUPTION_TTL_S = 6 * 3600  # longer than any pool's capacity back-off is likely to be


@dataclass(frozen=True, slots=True)
class InterruptionRecord:
    """A spot interruption notice one worker saw.

    ``offer`` is the offer key (``cloud/region/instance_type/market``) when the worker
    knows it (``FLEET_OFFER``, set by the autoscaler at launch); the autoscaler otherwise
    finds the offer from ``instance_id`` in its providers' listings. Times are epoch seconds.
    """

    hostname: str
    cloud: str
    action: str
    at: float
    deadline: float
    instance_id: str | None = None
    offer: str | None = None
    region: str | None = None
    instance_type: str | None = None

    @classmethod
    def from_json(cls, raw: str | bytes) -> InterruptionRecord:
        """Decode a stored record."""
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)

    def to_json(self) -> str:
        """Encode for the store."""
        return json.dumps(asdict(self))


def _interruption_key(namespace: str, name: str) -> str:
    return f"{namespace}fleet:interruption:{name}"


def record_interruption(
    client: redis.Redis, record: InterruptionRecord, namespace: str = ""
) -> None:
    """Store ``record`` (one per instance, or per worker without an instance id) with a TTL."""
    name = record.instance_id or record.hostname
    client.set(_interruption_key(namespace, name), record.to_json(), ex=INTERRUPTION_TTL_S)


def recent_interruptions(client: redis.Redis, namespace: str = "") -> list[InterruptionRecord]:
    """Interruptions recorded within ``INTERRUPTION_TTL_S``, oldest first; malformed ones skipped."""
    keys = list(client.scan_iter(match=_interruption_key(namespace, "*"), count=500))
    out = []
    for raw in client.mget(keys) if keys else []:
        if raw is not None:
            try:
                out.append(InterruptionRecord.from_json(raw))
            except (ValueError, TypeError):
                continue
    return sorted(out, key=lambda r: (r.at, r.hostname))

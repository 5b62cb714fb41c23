"""Who a worker is: its accelerator, devices, whether it is emulated, and its queues.

The worker's main process decides this once (``resolve``) and hands it to its pool
processes through the ``FLEET_WORKER_IDENTITY`` environment variable (JSON), so the
thin task can check every message against the hardware it actually runs on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from functools import cache

from fleet.catalog import Catalog, Family
from fleet.catalog.apis import PROVIDER_RE, provider_of
from fleet.queues import queue_name, queues_for_worker
from fleet.spec import TaskKind

ENV_VAR = "FLEET_WORKER_IDENTITY"


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """A worker's accelerator and what it serves.

    ``emulated`` is True when a local process stands in for the chip (``--accelerator
    NAME`` on a machine without it); every log line, status row and result says so.
    ``memory_gb`` is per device (for cpu, the host RAM).
    """

    accelerator: str
    devices: int
    memory_gb: float
    emulated: bool
    product: str
    queues: tuple[str, ...]
    concurrency: int
    engine: str = "reference"
    models: tuple[str, ...] = ()  # held: loaded before consuming (``fleet worker --model``)
    runtime: str = "cpu"  # what the engine runs on: cpu when emulated

    def to_json(self) -> str:
        """Encode for the environment."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> WorkerIdentity:
        """Decode from the environment."""
        data = json.loads(raw)
        data["queues"] = tuple(data["queues"])
        data["models"] = tuple(data.get("models", ()))
        return cls(**data)

    @property
    def api_provider(self) -> str | None:
        """The provider of an API worker (accelerator ``api-<provider>``), else None."""
        return provider_of(self.accelerator)

    @property
    def label(self) -> str:
        """``nvidia-l4 x1 (emulated)`` style label for logs and status."""
        tag = " (emulated)" if self.emulated else ""
        return f"{self.accelerator} x{self.devices}{tag}"


def with_engine(
    me: WorkerIdentity,
    family: Family,
    engine: str,
    plan: Mapping[str, Collection[TaskKind]],
    held: tuple[str, ...],
    runtime: str,
    namespace: str = "",
) -> WorkerIdentity:
    """``me`` serving ``engine``: model queues from ``plan`` (``workers.serving.serving_plan``).

    A reference worker with no plan keeps the plain queues of its family.
    """
    if engine == "reference" and not plan:
        return replace(me, engine=engine, runtime=runtime)
    queues = queues_for_worker(family, me.devices, namespace, models=plan)
    return replace(me, engine=engine, models=held, runtime=runtime, queues=queues)


def emulated_identity(
    catalog: Catalog,
    accelerator: str,
    devices: int = 1,
    concurrency: int | None = None,
    namespace: str = "",
) -> WorkerIdentity:
    """Identity of a local process emulating ``devices`` devices of ``accelerator``.

    Raises:
        KeyError: unknown accelerator (the message lists the valid names).

    """
    family = catalog.family(accelerator)
    memory = family.memory_gb or max(
        (o.accelerator_memory_gb for o in catalog.offers_by_family[accelerator]), default=0.0
    )
    return WorkerIdentity(
        accelerator=accelerator,
        devices=devices,
        memory_gb=memory,
        emulated=True,
        product=f"emulated {family.display}",
        queues=queues_for_worker(family, devices, namespace),
        concurrency=concurrency or devices,
    )


API_CONCURRENCY = 16  # threads: each task mostly waits on the network


def api_identity(
    catalog: Catalog, provider: str, concurrency: int | None = None, namespace: str = ""
) -> WorkerIdentity:
    """Identity of a light CPU worker forwarding ``inference.api-<provider>`` to the provider.

    Raises:
        KeyError: the catalog has no API offer from ``provider`` (the message lists those it has).

    """
    providers = sorted({o.provider for o in catalog.apis})
    if not PROVIDER_RE.match(provider) or provider not in providers:
        raise KeyError(f"no API offers from {provider!r} (known: {', '.join(providers) or 'none'})")
    accelerator = f"api-{provider}"
    return WorkerIdentity(
        accelerator=accelerator,
        devices=1,
        memory_gb=0.0,
        emulated=False,
        product=f"API forwarder to {provider}",
        queues=(queue_name(TaskKind.INFERENCE, accelerator, 1, namespace),),
        concurrency=concurrency or API_CONCURRENCY,
    )


def current(env: Mapping[str, str] | None = None) -> WorkerIdentity:
    """The identity of this worker process (from the environment)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_VAR)
    if raw is None:
        raise RuntimeError(f"{ENV_VAR} is not set: start workers with `fleet worker`")
    return _parse(raw)


@cache
def _parse(raw: str) -> WorkerIdentity:
    return WorkerIdentity.from_json(raw)

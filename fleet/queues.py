"""Queue names and declarations: the one place that knows them.

A task lands on ``<kind>.<accelerator>`` when one device holds it, and on
``<kind>.<accelerator>.x<N>`` when it needs ``N`` devices of one instance (tensor
parallel). A worker with ``D`` devices serves every tier up to ``D``, so a 405B model
placed on ``inference.nvidia-h200.x8`` is only ever pulled by an 8-GPU worker. An
optional namespace prefix (``FLEET_NAMESPACE``, say ``staging.``) lets several fleets
share one broker.

Work for a model in the registry (``fleet.models``) carries the model's name after ``@``:
``inference.nvidia-l4@tiny-llama``, ``inference.nvidia-h200.x8@llama-3.1-405b``. Only workers
that hold that model (``fleet worker --model NAME``) consume such a queue, so a task for model
M is never taken by a worker without M. Work for an unregistered model uses the plain queue,
served by reference workers.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kombu import Exchange, Queue

from fleet.catalog import Catalog, Family
from fleet.spec import TaskKind

if TYPE_CHECKING:
    from fleet.models.registry import ModelEntry

MAX_PRIORITY = 9
# Redis emulates priorities with one list per step; each step is one more key in every
# worker's BRPOP, so fleet uses four bands (kombu's default) for the ten levels.
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
DEFAULT_EXCHANGE = Exchange("fleet", type="direct", durable=True)
DEVICE_TIERS = (1, 2, 4, 6, 8, 12, 16, 32, 64)

MODEL_SEP = "@"
_QUEUE_RE = re.compile(
    r"^(?P<kind>inference|embedding|training|fine_tune|batch)\.(?P<acc>[a-z0-9-]+)(?:\.x(?P<n>\d+))?"
    r"(?:@(?P<model>[a-z0-9][a-z0-9._-]{0,63}))?$"
)


def queue_name(
    kind: TaskKind | str,
    accelerator: str,
    devices: int = 1,
    namespace: str = "",
    model: str | None = None,
) -> str:
    """The queue for ``kind`` work needing ``devices`` devices of ``accelerator``.

    ``model`` (a registry name) makes it that model's queue: ``...@<model>``.
    """
    kind_value = kind.value if isinstance(kind, TaskKind) else kind
    base = f"{namespace}{kind_value}.{accelerator}"
    base = base if devices <= 1 else f"{base}.x{devices}"
    return base if model is None else f"{base}{MODEL_SEP}{model}"


@dataclass(frozen=True, slots=True)
class QueueRef:
    """A parsed queue name."""

    kind: TaskKind
    accelerator: str
    devices: int
    model: str | None = None


def parse_queue(name: str, namespace: str = "") -> QueueRef | None:
    """Parse a queue name of this scheme, or None if it is not one."""
    if namespace and not name.startswith(namespace):
        return None
    m = _QUEUE_RE.match(name[len(namespace) :])
    if m is None:
        return None
    return QueueRef(TaskKind(m["kind"]), m["acc"], int(m["n"] or 1), m["model"])


def tiers_up_to(devices: int) -> tuple[int, ...]:
    """Device tiers a worker with ``devices`` devices serves."""
    tiers = [t for t in DEVICE_TIERS if t <= devices]
    if devices not in tiers:
        tiers.append(devices)
    return tuple(tiers)


def queues_for_worker(
    family: Family,
    devices: int,
    namespace: str = "",
    models: Mapping[str, Collection[TaskKind]] | None = None,
) -> tuple[str, ...]:
    """Every queue a worker with ``devices`` devices of ``family`` may consume, sorted.

    Without ``models`` (a reference worker): the plain queues of every kind the family runs.
    With ``models`` (model name -> the kinds this worker serves for it): only those models'
    queues, for the kinds the family runs too.
    """
    tiers = (1,) if family.per_vcpu else tiers_up_to(devices)
    if models is None:
        return tuple(
            sorted(
                queue_name(kind, family.name, n, namespace)
                for kind in TaskKind
                if kind.value in family.kinds
                for n in tiers
            )
        )
    return tuple(
        sorted(
            queue_name(kind, family.name, n, namespace, model)
            for model, kinds in models.items()
            for kind in kinds
            if kind.value in family.kinds
            for n in tiers
        )
    )


def all_queue_names(
    catalog: Catalog, namespace: str = "", models: Iterable[ModelEntry] = ()
) -> tuple[str, ...]:
    """Every queue the catalog's offers can need (kinds x families x device tiers of its offers).

    Includes one ``inference.api-<provider>`` queue per provider in ``catalog.apis``, and for
    each registry entry in ``models`` its ``...@<model>`` queue of every kind it serves.
    """
    entries = tuple(models)
    names: set[str] = set()
    for family in catalog.families.values():
        counts = {o.accelerator_count for o in catalog.offers_by_family.get(family.name, ())} or {1}
        tiers: set[int] = {1}
        if not family.per_vcpu:
            for count in counts:
                tiers.update(tiers_up_to(count))
        for kind in TaskKind:
            if kind.value not in family.kinds:
                continue
            names.update(queue_name(kind, family.name, n, namespace) for n in tiers)
            names.update(
                queue_name(kind, family.name, n, namespace, e.name)
                for e in entries
                if kind in e.kinds
                for n in tiers
            )
    names.update(api_queue_name(o.provider, namespace) for o in catalog.apis)
    return tuple(sorted(names))


def api_queue_name(provider: str, namespace: str = "") -> str:
    """The queue of an API pool: ``inference.api-<provider>`` (API pools serve inference only)."""
    return queue_name(TaskKind.INFERENCE, f"api-{provider}", 1, namespace)


def kombu_queue(name: str) -> Queue:
    """A durable kombu Queue bound to the fleet exchange, with priorities enabled.

    On RabbitMQ the queue is a classic queue with ``x-max-priority``; Redis emulates
    priorities with sub-queues (see ``fleet.app``).
    """
    return Queue(
        name,
        exchange=DEFAULT_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )

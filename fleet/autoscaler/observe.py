"""Observe: gather one Snapshot (I/O, thin; every decision is the planner's).

It reads queue depths (Redis: ready by priority band and unacked; RabbitMQ: ready and
consumers) of every queue the catalog's offers can need, the model queues of the registry's
entries (``...@<model>``) included, peeks at the head of each Redis queue to estimate the run time of what is
waiting with the catalog's throughput model, lists live workers (the Redis registry, or
Celery's remote control on RabbitMQ; an API worker's ``concurrency`` is the in-flight
limit it reports, ``workers.apicontrol``), asks every provider for the instances that carry
our tag, and reads the spot interruptions workers recorded (``fleet.registry``, in the
state store of ``fleet.execution.state_url``). What the loop remembers (draining
instances, recent provider errors, pool history) comes in as arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from fleet.autoscaler.model import (
    Instance,
    InstanceState,
    Interruption,
    OfferRef,
    PoolHistory,
    ProviderError,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.catalog import Catalog
from fleet.catalog.apis import provider_of
from fleet.execution import state_url
from fleet.providers.base import Provider
from fleet.queues import REDIS_PRIORITY_STEPS, all_queue_names, parse_queue
from fleet.registry import InterruptionRecord, live_workers, recent_interruptions
from fleet.settings import Settings
from fleet.spec import SpecError, parse_spec
from fleet.stats import AmqpStats, QueueStats, RedisStats, decode_task
from fleet.throughput import estimate
from fleet.tls import redis_client

if TYPE_CHECKING:
    from fleet.models.registry import ModelEntry

SAMPLE = 20
INSPECT_TIMEOUT_S = 1.0


def decode_spec(raw: bytes | str) -> dict[str, Any] | None:
    """The TaskSpec dict inside one kombu-on-Redis message, or None if it is not ours."""
    decoded = decode_task(raw)
    spec = decoded[0][0] if decoded is not None and decoded[0] else None
    return spec if isinstance(spec, dict) else None


def sample_service_s(
    client: redis.Redis, queue: str, catalog: Catalog, namespace: str, n: int = SAMPLE
) -> float | None:
    """Mean estimated device time of up to ``n`` messages at the head of a Redis queue."""
    sample = sample_head(client, queue, catalog, namespace, n)
    return None if sample is None else sample[0]


def sample_head(
    client: redis.Redis, queue: str, catalog: Catalog, namespace: str, n: int = SAMPLE
) -> tuple[float, float] | None:
    """``(mean device time, mean device share)`` of up to ``n`` messages at a Redis queue's head.

    Device time is the throughput model's ``busy_s``; the share is ``busy_s`` over the
    task's wall time (a stream of a batch of B holds about 1/B of its devices).
    """
    ref = parse_queue(queue, namespace)
    if ref is None or ref.accelerator not in catalog.families:
        return None
    family = catalog.families[ref.accelerator]
    vcpus = (
        max((o.vcpus or 0 for o in catalog.offers_by_family.get(ref.accelerator, ())), default=0)
        or None
    )
    times: list[float] = []
    shares: list[float] = []
    for step in REDIS_PRIORITY_STEPS:
        key = queue if step == 0 else f"{queue}:{step}"
        for raw in client.lrange(key, -n, -1):  # LPUSH/BRPOP: the oldest are at the right
            data = decode_spec(raw)
            if data is None:
                continue
            try:
                spec = parse_spec(data)
                # Device time, not wall time: a batching server overlaps generation
                # streams, and capacity is what the planner sizes.
                est = estimate(spec, family, ref.devices, vcpus)
            except (SpecError, ValueError):
                continue
            times.append(est.busy_s)
            shares.append(min(1.0, est.busy_s / max(est.service_s, 1e-9)))
        if len(times) >= n:
            break
    return (sum(times) / len(times), sum(shares) / len(shares)) if times else None


def _queue_stats(
    settings: Settings, names: Sequence[str], app: Celery
) -> tuple[dict[str, QueueStats], list[WorkerObservation]]:
    if settings.is_redis:
        client = redis_client(settings.broker_url, settings.tls)
        stats = RedisStats(client, settings.namespace).read(names)
        workers = [
            WorkerObservation(
                w.hostname,
                w.accelerator,
                w.instance_id,
                0,
                w.queues,
                _concurrency(w.accelerator, w.concurrency),
            )
            for w in live_workers(client, settings.namespace)
        ]
        return stats, workers
    stats = AmqpStats(settings.broker_url, settings.tls).read(names)
    inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
    replies: Any = inspect._request("fleet_identity") or {}  # noqa: SLF001 - Celery's way to call a custom inspect command
    workers = [
        WorkerObservation(
            host,
            r.get("accelerator", ""),
            r.get("instance_id"),
            int(r.get("active") or 0),
            tuple(r.get("queues", ())),
            _concurrency(r.get("accelerator", ""), r.get("concurrency")),
        )
        for host, r in sorted(replies.items())
    ]
    return stats, workers


def _concurrency(accelerator: str, reported: object) -> int:
    """An API worker's reported in-flight limit (``workers.apicontrol``); 0 (unknown) otherwise."""
    if provider_of(accelerator) is None or not isinstance(reported, int):
        return 0
    return max(0, reported)


def observe(
    *,
    settings: Settings,
    catalog: Catalog,
    app: Celery,
    providers: Mapping[str, Provider],
    now: float,
    draining: Mapping[str, InstanceState] | None = None,
    errors: Iterable[ProviderError] = (),
    history: Mapping[str, PoolHistory] | None = None,
    models: Iterable[ModelEntry] = (),
) -> Snapshot:
    """One snapshot of queues, workers and instances.

    ``models`` (the config's registry, ``AutoscalerConfig.registry``) adds the queues of
    those models; without it only the plain queues are read and model work goes unseen.
    A provider whose listing fails contributes no instances and its error is added to
    ``errors`` (the planner then sees it; nothing is terminated for want of a listing).
    """
    names = all_queue_names(catalog, settings.namespace, models)
    stats, workers = _queue_stats(settings, names, app)
    client = redis_client(settings.broker_url, settings.tls) if settings.is_redis else None
    queues: dict[str, QueueObservation] = {}
    for name, s in stats.items():
        sample = None
        if client is not None and s.ready:
            sample = sample_head(client, name, catalog, settings.namespace)
        busy, share = sample if sample is not None else (None, None)
        queues[name] = QueueObservation(name, s.ready, s.unacked, s.consumers, busy, share)
    instances: list[Instance] = []
    found_errors = list(errors)
    marks = draining or {}
    for name, provider in sorted(providers.items()):
        listed = provider.list_instances(now)
        if isinstance(listed, ProviderError):
            found_errors.append(listed)
            continue
        for inst in listed:
            state = marks.get(inst.id, inst.state)
            instances.append(replace(inst, state=state, provider=name))
    return Snapshot(
        taken_at=now,
        queues=queues,
        instances=tuple(sorted(instances, key=lambda i: i.id)),
        workers=tuple(workers),
        errors=tuple(found_errors),
        history=dict(history or {}),
        interruptions=map_interruptions(_interruption_records(settings), instances),
    )


def map_interruptions(
    records: Iterable[InterruptionRecord], instances: Iterable[Instance]
) -> tuple[Interruption, ...]:
    """The offer (and pool) each recorded spot interruption hit (pure).

    The provider's listing of the instance is trusted first; an instance no longer
    listed keeps the offer its worker recorded (``FLEET_OFFER``); a record with neither
    is dropped, since there is no offer to avoid.
    """
    by_id = {i.id: i for i in instances}
    out = []
    for r in records:
        inst = by_id.get(r.instance_id) if r.instance_id else None
        if inst is not None:
            out.append(Interruption(r.instance_id, inst.offer, r.at, inst.pool, r.hostname))
            continue
        parts = (r.offer or "").split("/")
        if len(parts) == len(("cloud", "region", "instance_type", "market")) and all(parts):
            out.append(Interruption(r.instance_id, OfferRef(*parts), r.at, "", r.hostname))
    return tuple(sorted(out, key=lambda i: (i.at, i.offer.key)))


def _interruption_records(settings: Settings) -> list[InterruptionRecord]:
    """Spot interruptions workers recorded in the state store (none without one)."""
    url = state_url(os.environ, settings.broker_url)
    if url is None:
        return []
    try:
        return recent_interruptions(redis_client(url, settings.tls), settings.namespace)
    except redis.RedisError:
        return []  # the store may be restarting; the next loop sees them

"""How ``Fleet`` turns placed specs into Celery messages: options, packs and both publish paths.

Every message is a ``fleet.run`` message (one spec; its task id is the message's) or, with
``pack`` above one, a ``fleet.run_pack`` message carrying up to ``pack`` specs of one
placement and priority, each under its own task id (``workers.pack``). ``plan`` groups a
batch into messages (pure). ``publish_fast`` writes them through a ``fleet.publish``
outbox (kombu's Redis transport: one envelope per placement, each distinct spec's JSON
encoded once and reused); ``publish_celery`` sends them through Celery's own message
builder and kombu's producer (RabbitMQ keeps its publisher confirm per message).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

from celery import Celery

from fleet.app import PACK_TASK_NAME, TASK_NAME, TIME_LIMITS
from fleet.placement import Placement, api_summary
from fleet.publish import Envelope, Prepared, RedisOutbox, body
from fleet.spec import TaskSpec

__all__ = [
    "Item",
    "Message",
    "broker_priority",
    "message_id",
    "message_options",
    "placement_kwargs",
    "plan",
    "publish_celery",
    "publish_fast",
]


def broker_priority(priority: int, *, is_redis: bool) -> int:
    """Map fleet priority (9 most urgent) to the broker's (Redis: 0 most urgent)."""
    return 9 - priority if is_redis else priority


class Item(NamedTuple):
    """One placed task: its spec, placement, task id and the spec's JSON (encoded once).

    A named tuple, not a dataclass: ``submit_many`` makes one per task.
    """

    spec: TaskSpec
    placement: Placement
    task_id: str
    spec_json: str


Message = tuple[Item, ...]  # one item: a fleet.run message (its id the task's); more: a pack


def plan(items: Sequence[Item], pack: int) -> list[Message]:
    """Group ``items`` into messages of at most ``pack`` specs (pure).

    A pack holds items of one placement and priority, in submission order; with ``pack``
    1 every item is its own message.
    """
    if pack <= 1:
        return [(item,) for item in items]
    open_packs: dict[tuple[int, int], list[Item]] = {}
    out: list[Message] = []
    for item in items:
        key = (id(item.placement), item.spec.priority)
        members = open_packs.setdefault(key, [])
        members.append(item)
        if len(members) >= pack:
            out.append(tuple(open_packs.pop(key)))
    out += [tuple(members) for members in open_packs.values()]
    return out


def message_id(message: Message) -> str:
    """The Celery message's id: the task's for one spec, a new one for a pack."""
    return message[0].task_id if len(message) == 1 else str(uuid.uuid4())


def argsrepr(spec: TaskSpec, count: int = 1) -> str:
    """The summary Celery shows for the args (never the spec's input: it may be sensitive)."""
    what = f"{spec.kind.value} {spec.model.name} {spec.model.params_b:g}B {spec.model.dtype.value}"
    return f"(<TaskSpec {what}>,)" if count == 1 else f"(<{count} TaskSpecs, first {what}>,)"


def message_options(spec: TaskSpec, placement: Placement, *, is_redis: bool) -> dict[str, Any]:
    """Queue, priority, time limits and reprs of ``spec``'s message on ``placement``."""
    limit = TIME_LIMITS[spec.kind]
    return {
        # A short summary instead of Celery's repr of the whole spec: task inputs can
        # be large or sensitive and do not belong in events, Flower or logs; it also
        # spares Celery's saferepr, the costliest step of building a message.
        "argsrepr": argsrepr(spec),
        "kwargsrepr": f"{{'placement': '{placement.queue}'}}",
        "queue": placement.queue,
        "routing_key": placement.queue,
        "priority": broker_priority(spec.priority, is_redis=is_redis),
        "time_limit": limit,
        "soft_time_limit": limit - 60,
    }


def placement_kwargs(placement: Placement, now: float) -> dict[str, Any]:
    """The placement the worker receives (``submitted_at``: ``now``, for queue age and wait)."""
    return {
        "placement": {
            "submitted_at": now,
            "accelerator": placement.accelerator,
            "devices": placement.devices,
            "queue": placement.queue,
            "estimated_cost_usd": placement.estimated_cost_usd,
            "usd_per_hour": placement.offer.usd_per_hour,
            "offer_devices": placement.offer.accelerator_count,
            # token-priced API pool: provider, model and $/M tokens (None on a chip)
            "api": api_summary(placement.api),
        }
    }


def publish_fast(outbox: RedisOutbox, planned: Sequence[Message], *, is_redis: bool) -> None:
    """Write ``planned`` through ``outbox`` and flush it (one pipeline).

    Per distinct placement: one envelope and one JSON of its kwargs; per distinct spec and
    placement: one body; per message: the template filled in with its ids.

    Raises:
        kombu.exceptions.OperationalError: the broker failed (some messages may have landed).

    """
    now = time.time()
    kwargs_json: dict[int, str] = {}
    envelopes: dict[tuple[int, int, bool], Envelope] = {}
    prepared: dict[tuple[int, int], Prepared] = {}
    for message in planned:
        first = message[0]
        spec, placement = first.spec, first.placement
        packed = len(message) > 1
        pair = (id(first.spec_json), id(placement))
        known = None if packed else prepared.get(pair)
        if known is None:
            key = (id(placement), spec.priority, packed)
            envelope = envelopes.get(key)
            if envelope is None:
                envelope = envelopes[key] = _envelope(spec, placement, packed, is_redis=is_redis)
            placed = kwargs_json.get(id(placement))
            if placed is None:
                placed = kwargs_json[id(placement)] = json.dumps(placement_kwargs(placement, now))
            if packed:
                specs = ", ".join(item.spec_json for item in message)
                ids = json.dumps([item.task_id for item in message])
                text = body(f"[[{specs}]]", f"{placed[:-1]}, {json.dumps('ids')}: {ids}}}")
            else:
                text = body(f"[{first.spec_json}]", placed)
            known = outbox.prepare(envelope, outbox.encode_body(text), argsrepr(spec, len(message)))
            if not packed:
                prepared[pair] = known
        outbox.push(known, message_id(message))
    outbox.flush()


def _envelope(spec: TaskSpec, placement: Placement, packed: bool, *, is_redis: bool) -> Envelope:  # noqa: FBT001 - internal
    options = message_options(spec, placement, is_redis=is_redis)
    return Envelope(
        PACK_TASK_NAME if packed else TASK_NAME,
        placement.queue,
        options["priority"],
        options["time_limit"],
        options["soft_time_limit"],
        options["kwargsrepr"],
        ignore_result=packed,
    )


def publish_celery(
    app: Celery,
    producer: Any,  # noqa: ANN401 - kombu's Producer is untyped
    planned: Sequence[Message],
    *,
    is_redis: bool,
    batch: bool,
    rpc: bool,
) -> None:
    """Send ``planned`` through Celery's message builder and kombu's producer.

    Celery's ``send_task`` without its result subscription at send time: that is a round
    trip per task, and with an unreachable result store it fails with a RuntimeError
    instead of the broker's error; a handle subscribes when ``.get()`` waits. In a
    ``batch``, queues are declared beforehand and a failure raises for the whole batch
    (delivery uncertain) instead of retrying message by message. ``rpc``: the rpc://
    backend replies to a queue of this client's that must exist before a worker answers
    (declaring it is cached, so it costs once).

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached or refused.

    """
    amqp = app.amqp
    extra: dict[str, Any] = {"declare": [], "retry": False} if batch else {}
    now = time.time()
    for message in planned:
        first, packed = message[0], len(message) > 1
        options = message_options(first.spec, first.placement, is_redis=is_redis)
        kwargs = placement_kwargs(first.placement, now)
        args: tuple[Any, ...] = (first.spec.model_dump(mode="json"),)
        if packed:
            args = ([item.spec.model_dump(mode="json") for item in message],)
            kwargs["ids"] = [item.task_id for item in message]
            options["argsrepr"] = argsrepr(first.spec, len(message))
        if rpc:
            for item in message:
                app.backend.on_task_call(producer, item.task_id)
        name = PACK_TASK_NAME if packed else TASK_NAME
        built = amqp.create_task_message(
            message_id(message),
            name,
            args,
            kwargs,
            time_limit=options.pop("time_limit"),
            soft_time_limit=options.pop("soft_time_limit"),
            argsrepr=options.pop("argsrepr"),
            kwargsrepr=options.pop("kwargsrepr"),
            reply_to=app.thread_oid,
            ignore_result=packed,
        )
        amqp.send_task_message(producer, name, built, **extra, **options)

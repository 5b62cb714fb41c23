"""Publishing many task messages on Redis: one envelope per placement, one encode per spec.

kombu keeps a message on Redis as one JSON document pushed onto the queue's list: Celery's
headers (task name, id, time limits, reprs), kombu's properties (correlation id, delivery
tag, priority, delivery info) and the body (``[args, kwargs, embed]`` as JSON, base64).
Publishing it through Celery and kombu costs, per message, two JSON encodings, a base64,
a uuid and a round of dictionary building, most of it identical for every message of one
placement. ``RedisOutbox`` builds that document once per ``Envelope`` (queue, priority,
time limits, task name), with Celery's own ``create_task_message`` and kombu's own channel
(``prepare_message``, its body encoding, its priority-band key), holding markers where the
task id, the delivery tag, the body and the argument summary go; per message it fills the
markers in, and ``flush`` pushes every list with multi-value LPUSHes in one non-transactional
pipeline (what kombu's own publish batch does, one command per message). The result is
the document kombu would have written, key for key: a stock Celery worker consumes it.

Callers encode each distinct spec's JSON once and reuse it in every body that carries it
(``body``). ``outbox_for`` says whether the fast path applies (kombu's Redis transport,
JSON, no compression, no signing, no publish signal receivers, kombu's batch publishing
safe); elsewhere callers publish through Celery as before (RabbitMQ keeps publisher
confirms per message).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, signals
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import OperationalError
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.json import dumps

__all__ = ["EMBED", "Envelope", "Prepared", "RedisOutbox", "body", "outbox_for"]

# The third part of a protocol-2 body: no callbacks, errbacks, chain or chord.
EMBED = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
LPUSH_CHUNK = 1000  # values per LPUSH command
_MARK = uuid.uuid4().hex  # per process: cannot occur in a spec, a queue name or a repr
_ID, _TAG, _BODY, _REPR = (f"{_MARK}{c}" for c in "itbr")
_COUNTS = {_ID: 3, _TAG: 1, _BODY: 1, _REPR: 1}  # id: headers id and root_id, correlation_id
_MARKS = re.compile(f"({_ID}|{_TAG}|{_BODY}|{_REPR})")  # splits a template, keeping them


def body(args_json: str, kwargs_json: str) -> str:
    """A protocol-2 body from the JSON of its args (a list) and kwargs (an object)."""
    return f"[{args_json}, {kwargs_json}, {EMBED}]"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every message of one template shares.

    ``priority`` is the broker's (Redis: 0 most urgent); ``kwargsrepr`` the summary Celery
    shows for the kwargs; ``ignore_result``: Celery stores no result under the message's
    own id (a pack: its tasks' results are stored under theirs).
    """

    name: str
    queue: str
    priority: int
    time_limit: int | None
    soft_time_limit: int | None
    kwargsrepr: str
    ignore_result: bool = False


def outbox_for(app: Celery, producer: Any) -> RedisOutbox | None:  # noqa: ANN401 - kombu's Producer is untyped
    """A ``RedisOutbox`` on ``producer``'s channel, or None where the fast path does not apply."""
    channel: Any = producer.channel
    conf = app.conf
    if not _redis_channel(channel) or not channel.supports_batch_publish:
        return None
    if channel.body_encoding != "base64":
        return None
    if conf.task_serializer != "json" or conf.task_compression or conf.task_protocol != 2:  # noqa: PLR2004 - Celery's message protocol 2
        return None
    if signals.before_task_publish.receivers or signals.after_task_publish.receivers:
        return None
    return RedisOutbox(app, channel)


class Prepared:
    """A message's document as parts, its body and args summary filled in (``prepare``).

    ``ids`` and ``tag`` are the positions of the task id and delivery tag in ``parts``;
    ``payloads`` is the Redis list's queue of finished documents.
    """

    __slots__ = ("ids", "parts", "payloads", "tag")

    def __init__(self, parts: list[str], ids: list[int], tag: int, payloads: list[str]) -> None:
        """Keep the parts and where the per-message values go."""
        self.parts, self.ids, self.tag, self.payloads = parts, ids, tag, payloads


@dataclass(frozen=True, slots=True)
class _Template:
    parts: tuple[str, ...]  # literals, with the markers as entries of their own
    payloads: list[str]

    def slots(self, mark: str) -> list[int]:
        return [i for i, part in enumerate(self.parts) if part == mark]


class RedisOutbox:
    """Messages for one publish: filled-in templates per Redis list, pushed by ``flush``."""

    def __init__(self, app: Celery, channel: Any) -> None:  # noqa: ANN401 - kombu's Redis channel
        """Publish through ``channel`` (kombu's Redis channel) for ``app``."""
        self._app, self._channel = app, channel
        self._templates: dict[Envelope, tuple[_Template, list[int], int, int, int]] = {}
        self._lists: dict[str, list[str]] = {}
        self._tag = uuid.uuid4().hex
        self._count = 0

    def prepare(self, envelope: Envelope, body_b64: str, argsrepr: str) -> Prepared:
        """The document of ``envelope`` with this body (``encode_body``) and args summary.

        Prepare once per distinct body, then ``push`` each message's task id.
        """
        found = self._templates.get(envelope)
        if found is None:
            text, key = self._template(envelope)
            template = _Template(tuple(_MARKS.split(text)), self._lists.setdefault(key, []))
            (tag,), (body_at,), (repr_at,) = (template.slots(m) for m in (_TAG, _BODY, _REPR))
            found = (template, template.slots(_ID), tag, body_at, repr_at)
            self._templates[envelope] = found
        template, ids, tag, body_at, repr_at = found
        parts = list(template.parts)
        parts[body_at], parts[repr_at] = body_b64, json.dumps(argsrepr)[1:-1]
        return Prepared(parts, ids, tag, template.payloads)

    def push(self, prepared: Prepared, task_id: str) -> None:
        """Queue one message of ``prepared`` with ``task_id`` (and a fresh delivery tag)."""
        parts = prepared.parts
        for i in prepared.ids:
            parts[i] = task_id
        self._count += 1
        parts[prepared.tag] = f"{self._tag}.{self._count}"
        prepared.payloads.append("".join(parts))

    def add(self, envelope: Envelope, task_id: str, body_b64: str, argsrepr: str) -> None:
        """Queue one message: ``prepare`` and ``push`` in one call."""
        self.push(self.prepare(envelope, body_b64, argsrepr), task_id)

    @staticmethod
    def encode_body(text: str) -> str:
        """The body as kombu's Redis channel carries it (base64 of its UTF-8)."""
        return base64.b64encode(text.encode()).decode("ascii")

    def flush(self) -> int:
        """Push every queued message (one pipeline); returns how many.

        Raises:
            kombu.exceptions.OperationalError: Redis failed; some messages may have landed.

        """
        pending = [(key, payloads[:]) for key, payloads in self._lists.items() if payloads]
        for payloads in self._lists.values():
            payloads.clear()  # the templates keep their lists
        count, self._count = self._count, 0
        if not pending:
            return 0
        try:
            with (
                self._channel.conn_or_acquire() as client,
                client.pipeline(transaction=False) as pipe,
            ):
                for key, payloads in pending:
                    for i in range(0, len(payloads), LPUSH_CHUNK):
                        pipe.lpush(key, *payloads[i : i + LPUSH_CHUNK])
                pipe.execute()
        except redis.RedisError as exc:
            raise OperationalError(f"{type(exc).__name__}: {exc}") from exc
        return count

    def _template(self, envelope: Envelope) -> tuple[str, str]:
        """The document with markers, as Celery's ``send_task_message`` and kombu would write it."""
        app, channel = self._app, self._channel
        message = app.amqp.create_task_message(
            _ID,
            envelope.name,
            (),
            {},
            time_limit=envelope.time_limit,
            soft_time_limit=envelope.soft_time_limit,
            argsrepr=_REPR,
            kwargsrepr=envelope.kwargsrepr,
            reply_to=app.thread_oid,
            ignore_result=envelope.ignore_result,
        )
        queue = app.amqp.queues[envelope.queue]
        properties = dict(message.properties)
        properties["delivery_mode"] = maybe_delivery_mode(
            queue.exchange.delivery_mode or app.conf.task_default_delivery_mode
        )
        raw = channel.prepare_message(
            _BODY, envelope.priority, "application/json", "utf-8", message.headers, properties
        )
        raw["properties"].update(body_encoding=channel.body_encoding, delivery_tag=_TAG)
        # Celery sends a direct queue's messages through the default exchange (anon).
        raw["properties"]["delivery_info"].update(exchange="", routing_key=envelope.queue)
        priority = channel._get_message_priority(raw, reverse=False)  # noqa: SLF001 - kombu's own rule
        key = channel._q_for_pri(envelope.queue, priority)  # noqa: SLF001 - kombu's own key
        text = dumps(raw)
        for mark, times in _COUNTS.items():
            if text.count(mark) != times:
                raise ValueError(f"unexpected message layout ({mark!r} x {text.count(mark)})")
        return text, key


def _redis_channel(channel: object) -> bool:
    return isinstance(channel, RedisChannel)

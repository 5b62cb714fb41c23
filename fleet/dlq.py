"""The dead-letter queue: where poison tasks go, and how to inspect and requeue them.

A task that fails the same way on every delivery (a handler that raises, a task that
kills its worker process, a spec the worker refuses) is not retried forever: after
``FLEET_MAX_ATTEMPTS`` attempts (see ``workers.once``) the worker publishes one JSON
entry (``DeadLetter``) to the kombu queue ``{namespace}fleet.dead-letter`` and the
task ends as a FAILURE (``DeadLetteredError``) naming the entry. Nothing consumes that
queue; ``fleet status`` counts it and ``fleet dlq list|show|requeue`` work on it.

Browsing never loses an entry:

* Redis: entries are read with LRANGE (read only) and removed with LREM of the exact
  message, after the requeued task was published.
* RabbitMQ: entries are fetched without ack on one channel; the one being requeued is
  acked after its task was published, and closing the channel returns every other
  entry to the queue at its place. While a browse runs, another browser sees fewer.

Requeueing resubmits the spec through ``fleet.client.Fleet`` (placed again, on today's
queues) and first forgets the task id's execution records (attempts, last error, the
dead mark), so the new delivery starts from attempt 1.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fleet.queues import DEFAULT_EXCHANGE, REDIS_PRIORITY_STEPS, kombu_queue
from fleet.settings import Settings, masked
from fleet.tls import redis_client

if TYPE_CHECKING:
    from celery import Celery

    from fleet.client import Fleet, TaskHandle
    from fleet.execution import ExecutionStore

__all__ = [
    "MAX_ERROR_CHARS",
    "DeadLetter",
    "DeadLetterQueue",
    "DeadLetteredError",
    "UnknownEntryError",
    "dead_letter_queue",
    "publish",
    "redact",
]

MAX_ERROR_CHARS = 500
REASONS = ("failed", "worker-lost", "refused")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)
_SECRET_PAIR = re.compile(
    r"((?:password|passwd|secret|token|api_key|apikey|authorization)\s*[=:]\s*)\S+", re.IGNORECASE
)

SENSITIVE_WITHHELD = "<withheld: sensitive task>"


def dead_letter_queue(namespace: str = "") -> str:
    """The dead-letter queue's name."""
    return f"{namespace}fleet.dead-letter"


class DeadLetteredError(Exception):
    """The task was dead-lettered; its message says why and how to inspect it."""


class UnknownEntryError(LookupError):
    """No dead-letter entry has that task id (or the prefix matches several)."""


def redact(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` with passwords in URLs and ``secret=...`` pairs masked, cut to ``limit`` chars."""
    text = _URL.sub(lambda m: masked(m.group(0)), text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}***", text)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry (the JSON body of one message on the dead-letter queue).

    ``reason``: ``failed`` (the handler raised on every attempt), ``worker-lost`` (the
    worker process died while running it, every attempt) or ``refused`` (invalid spec,
    does not fit, bad input: never retried). ``error`` is redacted and truncated.
    """

    task_id: str
    spec: dict[str, Any]
    placement: dict[str, Any] | None
    queue: str | None
    reason: str
    error: str
    attempts: int
    dead_lettered_at: float
    worker: str | None = None

    @classmethod
    def build(
        cls,
        task_id: str,
        spec: dict[str, Any],
        placement: dict[str, Any] | None,
        queue: str | None,
        reason: str,
        error: str,
        attempts: int,
        now: float,
        worker: str | None = None,
    ) -> DeadLetter:
        """An entry with ``error`` redacted (pure; ``now`` is the wall-clock time)."""
        if reason not in REASONS:
            raise ValueError(f"reason: expected one of {', '.join(REASONS)}, got {reason!r}")
        return cls(task_id, spec, placement, queue, reason, redact(error), attempts, now, worker)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the wire format: complete, so a requeue can run the task)."""
        return asdict(self)

    def shown(self) -> dict[str, Any]:
        """What ``fleet dlq show`` prints: ``to_dict()`` with a sensitive spec's input withheld.

        The entry keeps the input so a requeue can run the task; an operator's screen does not
        need it (spec ``sensitive: true``, see ``fleet.spec``).
        """
        data = self.to_dict()
        if self.spec.get("sensitive") is True:
            data["spec"] = {**self.spec, "input": SENSITIVE_WITHHELD}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeadLetter:
        """Parse an entry; unknown keys are ignored (newer writers may add some).

        Raises:
            ValueError: a required key is missing or has the wrong type.

        """
        try:
            return cls(
                task_id=str(data["task_id"]),
                spec=dict(data["spec"]),
                placement=data.get("placement"),
                queue=data.get("queue"),
                reason=str(data["reason"]),
                error=str(data.get("error", "")),
                attempts=int(data["attempts"]),
                dead_lettered_at=float(data["dead_lettered_at"]),
                worker=data.get("worker"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a dead-letter entry: {exc}") from None

    def message(self, dlq: str) -> str:
        """What the client waiting on the task sees (the FAILURE's message)."""
        return (
            f"dead-lettered to {dlq} after {self.attempts} attempt(s), reason {self.reason}: "
            f"{self.error} (inspect: fleet dlq show {self.task_id})"
        )


def publish(app: Celery, entry: DeadLetter, namespace: str = "") -> None:
    """Publish ``entry`` on the dead-letter queue (declared on the way; JSON; persistent).

    Raises:
        kombu.exceptions.OperationalError: the broker cannot be reached.

    """
    queue = kombu_queue(dead_letter_queue(namespace))
    with app.producer_or_acquire() as producer:
        producer.publish(
            entry.to_dict(),
            exchange=DEFAULT_EXCHANGE,
            routing_key=queue.name,
            declare=[queue],
            serializer="json",
            delivery_mode=2,
            retry=True,
        )


def _decode_redis(raw: bytes | str) -> dict[str, Any] | None:
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        value = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, dict) else None


class DeadLetterQueue:
    """Browse, remove and requeue dead-letter entries on the fleet's broker (I/O)."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        """Work on ``settings``' broker and namespace; ``app`` gives broker connections (TLS too)."""
        self.settings = settings
        self.app = app
        self.name = dead_letter_queue(settings.namespace)

    def entries(self) -> list[DeadLetter]:
        """Every entry, oldest first; messages that are not entries are skipped."""
        return [entry for entry, _ in self._browse()]

    def find(self, task_id: str) -> DeadLetter:
        """The entry for ``task_id`` (a unique prefix is enough).

        Raises:
            UnknownEntryError: no entry matches, or several do.

        """
        matches = [e for e in self.entries() if e.task_id.startswith(task_id)]
        exact = [e for e in matches if e.task_id == task_id]
        if exact:
            return exact[0]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UnknownEntryError(f"no dead-letter entry with task id {task_id!r}")
        raise UnknownEntryError(f"task id prefix {task_id!r} matches {len(matches)} entries")

    def requeue(
        self, task_id: str, fleet: Fleet, store: ExecutionStore | None
    ) -> tuple[DeadLetter, TaskHandle]:
        """Resubmit the entry's spec (placed again), then remove the entry.

        The task id's execution records are reset first, so the new delivery starts from
        attempt 1 (with an ``idempotency_key`` the new task keeps the same id). If the
        submit fails the entry stays.

        Raises:
            UnknownEntryError: no such entry.
            SpecError, NoPlacementError: the spec cannot be submitted (the entry stays).

        """
        entry = self.find(task_id)
        return entry, self._requeue(entry, fleet, store)

    def requeue_all(
        self, fleet: Fleet, store: ExecutionStore | None
    ) -> list[tuple[DeadLetter, TaskHandle | Exception]]:
        """Requeue every entry; each one's handle, or the error that kept it in the queue."""
        out: list[tuple[DeadLetter, TaskHandle | Exception]] = []
        for entry in self.entries():
            try:
                out.append((entry, self._requeue(entry, fleet, store)))
            except ValueError as exc:  # SpecError, NoPlacementError
                out.append((entry, exc))
        return out

    def _requeue(self, entry: DeadLetter, fleet: Fleet, store: ExecutionStore | None) -> TaskHandle:
        if store is not None:
            store.reset(entry.task_id)
        handle = fleet.submit(entry.spec)
        if store is not None and handle.id != entry.task_id:
            store.reset(handle.id)
        self._remove(entry.task_id)
        return handle

    # -- broker access ---------------------------------------------------------------

    def _browse(self) -> Iterator[tuple[DeadLetter, Any]]:
        if self.settings.is_redis:
            yield from self._browse_redis()
        else:
            with self._amqp_messages() as messages:
                yield from ((entry, None) for entry, _ in messages)

    def _redis_keys(self) -> list[str]:
        return [self.name] + [f"{self.name}:{p}" for p in REDIS_PRIORITY_STEPS[1:]]

    def _browse_redis(self) -> Iterator[tuple[DeadLetter, Any]]:
        client = redis_client(self.settings.broker_url, self.settings.tls)
        for key in self._redis_keys():
            # LPUSH/BRPOP: the oldest message is at the right end.
            for raw in reversed(client.lrange(key, 0, -1)):
                data = _decode_redis(raw)
                if data is None:
                    continue
                try:
                    yield DeadLetter.from_dict(data), (key, raw)
                except ValueError:
                    continue

    @contextmanager
    def _amqp_messages(self) -> Iterator[list[tuple[DeadLetter, Any]]]:
        """Every message fetched without ack; closing the channel requeues the unacked."""
        with self.app.connection_for_read() as conn, conn.channel() as channel:
            queue = kombu_queue(self.name)(channel)
            queue.declare()
            fetched: list[tuple[DeadLetter, Any]] = []
            while (message := queue.get(no_ack=False, accept=["json"])) is not None:
                try:
                    data = message.decode()
                    fetched.append((DeadLetter.from_dict(data), message))
                except (ValueError, TypeError):
                    continue  # not ours: left unacked, so it goes back too
            yield fetched

    def _remove(self, task_id: str) -> None:
        """Remove the entry (the first with ``task_id``); a missing one is not an error."""
        if self.settings.is_redis:
            client = redis_client(self.settings.broker_url, self.settings.tls)
            for entry, (key, raw) in self._browse_redis():
                if entry.task_id == task_id:
                    client.lrem(key, 1, raw)
                    return
            return
        with self._amqp_messages() as messages:
            for entry, message in messages:
                if entry.task_id == task_id:
                    message.ack()
                    return

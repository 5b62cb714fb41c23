"""Execution records per task id: the state store behind "run once, result once".

A task id (derived from the spec's ``idempotency_key`` when there is one, see
``fleet.client.task_id_for``) owns a few small records in a Redis "state store":

``claim``       who is running it now: SET NX with a TTL the runner refreshes while it
                runs, so a dead runner's claim lapses on its own after ``ttl_s``
``done``        the JSON result of the one completed execution
``deliveries``  how many times a message for it reached a worker (every delivery)
``attempts``    how many deliveries started the handler (a claim was won)
``error``       the last unexpected error (already redacted and truncated)
``dead``        the dead-letter entry, once it was dead-lettered

A delivery enters through ``try_claim``: one atomic step (one Lua script, one round trip
on Redis) that counts the delivery, looks for a result, takes the claim, looks for a
dead-letter entry and counts the attempt, and reports what it saw as a ``ClaimOutcome``
(``workers.once.decide`` turns that into a verdict). ``finish`` records the result and
releases the claim in one step too, so a trivial task costs two round trips, plus one
claim refresh per third of the claim TTL while it runs.

Both steps can also write Celery's own record of the task's state (a ``StatusRecord``:
STARTED with the claim, SUCCESS with the result) when the result backend is this same
Redis database, so that Celery need not write them itself (``workers.records``).

Every record expires after ``record_ttl_s`` (default 7 days) so the store does not
grow forever. ``RedisExecutionStore`` is the real one; ``MemoryExecutionStore`` is the
same contract in memory with an injected clock, for unit tests (it is part of the
product: use it to test code built on this module).

Where the store is: ``FLEET_STATE_URL``; else the broker when the broker is Redis;
else ``FLEET_LOCK_URL``; else nowhere, and the guard is off (``state_url``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis

from fleet.execution_scripts import FINISH, REFRESH, RELEASE, TRY_CLAIM
from fleet.settings import is_redis_url
from fleet.tls import TlsFiles, redis_client

__all__ = [
    "DEFAULT_RECORD_TTL_S",
    "ClaimOutcome",
    "ExecutionStore",
    "MemoryExecutionStore",
    "RedisExecutionStore",
    "StatusRecord",
    "state_url",
]

DEFAULT_RECORD_TTL_S = 7 * 24 * 3600
_FIELDS = ("claim", "done", "deliveries", "attempts", "error", "dead")


def state_url(env: Mapping[str, str], broker_url: str) -> str | None:
    """The state store's URL: FLEET_STATE_URL, a Redis broker, FLEET_LOCK_URL, or None."""
    if env.get("FLEET_STATE_URL"):
        return env["FLEET_STATE_URL"]
    if is_redis_url(broker_url):
        return broker_url
    return env.get("FLEET_LOCK_URL") or None


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What one ``try_claim`` saw and did; the rows of ``workers.once.decide``'s table.

    ``seen`` is where the step stopped:

    ``done``     a result is recorded (``result``); no claim taken, no attempt counted
    ``held``     another holder has the claim, ``claim_left_s`` seconds left (None: no TTL
                 could be read); no attempt counted
    ``dead``     the task was dead-lettered (``entry``); the claim was taken and released
                 again, no attempt counted
    ``claimed``  the caller holds the claim and ``attempt`` is its attempt number (counted);
                 ``last_error`` is the last recorded error when ``attempt`` is past the
                 limit the caller gave, else None

    Every outcome counted one delivery.
    """

    seen: Literal["done", "held", "dead", "claimed"]
    attempt: int = 0
    result: dict[str, Any] | None = None
    entry: dict[str, Any] | None = None
    claim_left_s: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """Celery's result record of a task, written by a store step beside its own records.

    ``key`` is where Celery's Redis result backend keeps the task's state
    (``celery-task-meta-<id>`` with the backend's prefixes), ``value`` the record encoded
    as that backend encodes it, ``ttl_s`` its expiry (``result_expires``; None: none).
    A step writes it and publishes it on the channel named ``key`` (where Celery's result
    consumers listen), exactly as the backend's own ``set`` does, unless the record held
    there already says SUCCESS: like Celery's ``_store_result``, a later write never
    replaces a success.
    """

    key: str
    value: str
    ttl_s: float | None = None


class ExecutionStore(Protocol):
    """The records of one fleet's executions (see the module docstring).

    Every method is atomic on its own; the claim taken by ``try_claim`` is the only
    mutual exclusion.
    """

    def try_claim(
        self,
        task_id: str,
        holder: str,
        ttl_s: float,
        max_attempts: int,
        started: StatusRecord | None = None,
    ) -> ClaimOutcome:
        """Admit one delivery of ``task_id`` for ``holder``, atomically; see ``ClaimOutcome``.

        In order: count the delivery; a recorded result ends the step (``done``); take the
        claim (SET NX, ``ttl_s``) or end with the holder's remaining TTL (``held``); a
        dead-letter entry releases the claim again and ends the step (``dead``); count the
        attempt, and past ``max_attempts`` read the last error (``claimed``), else write
        ``started`` (``StatusRecord``) when given.
        """

    def try_claim_many(
        self,
        claims: Sequence[tuple[str, StatusRecord | None]],
        holder: str,
        ttl_s: float,
        max_attempts: int,
    ) -> list[ClaimOutcome]:
        """``try_claim`` for each ``(task_id, started)`` in order, all in one atomic step."""

    def refresh(self, task_id: str, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s claim to ``ttl_s`` from now; False when it is not theirs any more."""

    def release(self, task_id: str, holder: str) -> None:
        """Drop the claim if ``holder`` still has it."""

    def claim_ttl_s(self, task_id: str) -> float | None:
        """Seconds left on the current claim, or None when there is none."""

    def done(self, task_id: str) -> dict[str, Any] | None:
        """The recorded result of the completed execution, or None."""

    def finish(
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> None:
        """Record ``result`` as the one result, release ``holder``'s claim, write ``status``."""

    def begin_finish(
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> Callable[[], None]:
        """``finish``, sent now; the returned function waits until it ran (call it once).

        The step is recorded as soon as the store runs it, whether or not anyone waits;
        the caller may do other work meanwhile (the next task of a pack).

        Raises:
            redis.RedisError: here or from the returned function: the step may not have run.

        """

    def counts(self, task_id: str) -> tuple[int, int]:
        """``(deliveries, attempts)`` so far."""

    def record_error(self, task_id: str, error: str) -> None:
        """Keep ``error`` (redacted by the caller) as the last error."""

    def last_error(self, task_id: str) -> str | None:
        """The last error recorded, or None."""

    def mark_dead(self, task_id: str, entry: dict[str, Any]) -> bool:
        """Record the dead-letter entry unless one exists; True when this call recorded it."""

    def dead(self, task_id: str) -> dict[str, Any] | None:
        """The dead-letter entry, or None."""

    def reset(self, task_id: str) -> None:
        """Forget everything about ``task_id`` (a requeue from the dead-letter queue)."""


class _Pipelined:
    """Commands sent on one connection now, their replies read later in order."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._conn: Any = None  # redis-py's Connection, checked out while replies are due
        self._due = 0
        self.closed = False

    def send(self, *command: str | int) -> None:
        """Send ``command`` (its reply is read by a later ``read``).

        Raises:
            redis.RedisError: the command could not be sent (nothing is due).

        """
        if self._conn is None:
            self._conn = self._pool.get_connection()
        try:
            self._conn.send_command(*command)
        except BaseException:
            self._close()
            raise
        self._due += 1

    def read(self) -> None:
        """Read the oldest reply due; the connection goes back to the pool when none is.

        Raises:
            redis.RedisError: the command failed (a server error), or the connection did
                (then every reply still due fails too).

        """
        if self._conn is None:
            raise redis.ConnectionError("the connection was lost before this reply was read")
        try:
            self._conn.read_response()
        except redis.ResponseError:
            self._settle()
            raise
        except BaseException:
            self._close()
            raise
        self._settle()

    def _settle(self) -> None:
        self._due -= 1
        if self._due == 0 and self._conn is not None:
            self._pool.release(self._conn)
            self._conn = None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
        self._conn, self._due, self.closed = None, 0, True


class RedisExecutionStore:
    """The state store on Redis; keys are ``{namespace}fleet:exec:{task_id}:{record}``."""

    def __init__(
        self, client: redis.Redis, namespace: str = "", record_ttl_s: float = DEFAULT_RECORD_TTL_S
    ) -> None:
        """Use ``client``; records expire ``record_ttl_s`` after their last write."""
        self._r = client
        self._local = threading.local()
        self._ns = namespace
        self._ttl_ms = int(record_ttl_s * 1000)
        self._try_claim = client.register_script(TRY_CLAIM)
        self._refresh = client.register_script(REFRESH)
        self._release = client.register_script(RELEASE)
        self._finish = client.register_script(FINISH)

    @classmethod
    def from_url(
        cls, url: str, namespace: str = "", tls: TlsFiles | None = None
    ) -> RedisExecutionStore:
        """A store on the Redis at ``url`` (short socket timeouts: a dead store fails fast)."""
        client = redis_client(url, tls, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, namespace)

    @property
    def client(self) -> redis.Redis:
        """The Redis client the store uses (to tell which database it is on)."""
        return self._r

    def _key(self, task_id: str, record: str) -> str:
        return f"{self._ns}fleet:exec:{task_id}:{record}"

    def try_claim(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        ttl_s: float,
        max_attempts: int,
        started: StatusRecord | None = None,
    ) -> ClaimOutcome:
        return self.try_claim_many([(task_id, started)], holder, ttl_s, max_attempts)[0]

    def try_claim_many(  # noqa: D102 - see ExecutionStore
        self,
        claims: Sequence[tuple[str, StatusRecord | None]],
        holder: str,
        ttl_s: float,
        max_attempts: int,
    ) -> list[ClaimOutcome]:
        keys: list[str] = []
        args: list[str | int] = [holder, _ms(ttl_s), self._ttl_ms, max_attempts]
        for task_id, started in claims:
            keys += [self._key(task_id, f) for f in _FIELDS]
            if started is None:
                keys.append(keys[-len(_FIELDS)])  # a placeholder: nothing is written there
                args += ["", 0]
            else:
                keys.append(started.key)
                args += [started.value, _status_ttl_ms(started)]
        return [_outcome(raw) for raw in self._try_claim(keys=keys, args=args)]

    def refresh(self, task_id: str, holder: str, ttl_s: float) -> bool:  # noqa: D102 - see ExecutionStore
        return bool(self._refresh(keys=[self._key(task_id, "claim")], args=[holder, _ms(ttl_s)]))

    def release(self, task_id: str, holder: str) -> None:  # noqa: D102
        self._release(keys=[self._key(task_id, "claim")], args=[holder])

    def claim_ttl_s(self, task_id: str) -> float | None:  # noqa: D102
        left = int(self._r.pttl(self._key(task_id, "claim")))
        return None if left < 0 else left / 1000

    def done(self, task_id: str) -> dict[str, Any] | None:  # noqa: D102
        return _loads(self._r.get(self._key(task_id, "done")))

    def finish(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> None:
        keys, args = self._finish_args(task_id, holder, result, status)
        self._finish(keys=keys, args=args)

    def begin_finish(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> Callable[[], None]:
        # Pipelined on one connection per thread: each step is sent at once, the replies
        # are read in the order sent (the waiters must be called in that order).
        keys, args = self._finish_args(task_id, holder, result, status)
        pipe = self._pipelined()
        pipe.send("EVALSHA", self._finish.sha, len(keys), *keys, *args)

        def wait() -> None:
            try:
                pipe.read()
            except redis.exceptions.NoScriptError:  # a new or restarted server: load and run
                self._finish(keys=keys, args=args)

        return wait

    def _pipelined(self) -> _Pipelined:
        found: _Pipelined | None = getattr(self._local, "pipelined", None)
        if found is None or found.closed:
            found = self._local.pipelined = _Pipelined(self._r.connection_pool)
        return found

    def _finish_args(
        self, task_id: str, holder: str, result: dict[str, Any], status: StatusRecord | None
    ) -> tuple[list[str], list[str | int]]:
        keys = [self._key(task_id, "claim"), self._key(task_id, "done")]
        args: list[str | int] = [holder, json.dumps(result), self._ttl_ms]
        if status is not None:
            keys.append(status.key)
            args += [status.value, _status_ttl_ms(status)]
        return keys, args

    def counts(self, task_id: str) -> tuple[int, int]:  # noqa: D102
        raw = self._r.mget([self._key(task_id, "deliveries"), self._key(task_id, "attempts")])
        deliveries, attempts = (int(v or 0) for v in raw)
        return deliveries, attempts

    def record_error(self, task_id: str, error: str) -> None:  # noqa: D102
        self._r.set(self._key(task_id, "error"), error, px=self._ttl_ms)

    def last_error(self, task_id: str) -> str | None:  # noqa: D102
        raw = self._r.get(self._key(task_id, "error"))
        return None if raw is None else _text(raw)

    def mark_dead(self, task_id: str, entry: dict[str, Any]) -> bool:  # noqa: D102
        key = self._key(task_id, "dead")
        return bool(self._r.set(key, json.dumps(entry), nx=True, px=self._ttl_ms))

    def dead(self, task_id: str) -> dict[str, Any] | None:  # noqa: D102
        return _loads(self._r.get(self._key(task_id, "dead")))

    def reset(self, task_id: str) -> None:  # noqa: D102
        self._r.delete(*(self._key(task_id, f) for f in _FIELDS))


class MemoryExecutionStore:
    """``ExecutionStore`` in memory, with an injected clock (a fake for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Empty store; ``clock`` decides when claims lapse."""
        self._clock = clock
        self._claims: dict[str, tuple[str, float]] = {}
        self._records: dict[tuple[str, str], Any] = {}
        self._statuses: dict[str, str] = {}

    def status(self, key: str) -> str | None:
        """The ``StatusRecord`` value written at ``key`` (what Celery would read), or None."""
        return self._statuses.get(key)

    def _put_status(self, record: StatusRecord | None) -> None:
        if record is None:
            return
        current = _loads(self._statuses.get(record.key))
        if current is None or current.get("status") != "SUCCESS":
            self._statuses[record.key] = record.value

    def _live_claim(self, task_id: str) -> tuple[str, float] | None:
        held = self._claims.get(task_id)
        if held is not None and held[1] <= self._clock():
            del self._claims[task_id]
            return None
        return held

    def try_claim(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        ttl_s: float,
        max_attempts: int,
        started: StatusRecord | None = None,
    ) -> ClaimOutcome:
        self._incr(task_id, "deliveries")
        if (result := self.done(task_id)) is not None:
            return ClaimOutcome("done", result=result)
        if (held := self._live_claim(task_id)) is not None:
            return ClaimOutcome("held", claim_left_s=held[1] - self._clock())
        if (entry := self.dead(task_id)) is not None:
            return ClaimOutcome("dead", entry=entry)  # taken and released at once: never held
        self._claims[task_id] = (holder, self._clock() + ttl_s)
        attempt = self._incr(task_id, "attempts")
        error = self.last_error(task_id) if attempt > max_attempts else None
        if attempt <= max_attempts:
            self._put_status(started)
        return ClaimOutcome("claimed", attempt=attempt, last_error=error)

    def try_claim_many(  # noqa: D102 - see ExecutionStore
        self,
        claims: Sequence[tuple[str, StatusRecord | None]],
        holder: str,
        ttl_s: float,
        max_attempts: int,
    ) -> list[ClaimOutcome]:
        return [self.try_claim(t, holder, ttl_s, max_attempts, s) for t, s in claims]

    def refresh(self, task_id: str, holder: str, ttl_s: float) -> bool:  # noqa: D102
        held = self._live_claim(task_id)
        if held is None or held[0] != holder:
            return False
        self._claims[task_id] = (holder, self._clock() + ttl_s)
        return True

    def release(self, task_id: str, holder: str) -> None:  # noqa: D102
        held = self._live_claim(task_id)
        if held is not None and held[0] == holder:
            del self._claims[task_id]

    def claim_ttl_s(self, task_id: str) -> float | None:  # noqa: D102
        held = self._live_claim(task_id)
        return None if held is None else held[1] - self._clock()

    def done(self, task_id: str) -> dict[str, Any] | None:  # noqa: D102
        value: dict[str, Any] | None = self._records.get((task_id, "done"))
        return None if value is None else json.loads(json.dumps(value))

    def finish(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> None:
        self._records[task_id, "done"] = json.loads(json.dumps(result))  # JSON, like Redis
        self.release(task_id, holder)
        self._put_status(status)

    def begin_finish(  # noqa: D102 - see ExecutionStore
        self,
        task_id: str,
        holder: str,
        result: dict[str, Any],
        status: StatusRecord | None = None,
    ) -> Callable[[], None]:
        self.finish(task_id, holder, result, status)
        return lambda: None

    def _incr(self, task_id: str, record: str) -> int:
        value = int(self._records.get((task_id, record), 0)) + 1
        self._records[task_id, record] = value
        return value

    def counts(self, task_id: str) -> tuple[int, int]:  # noqa: D102
        return (
            int(self._records.get((task_id, "deliveries"), 0)),
            int(self._records.get((task_id, "attempts"), 0)),
        )

    def record_error(self, task_id: str, error: str) -> None:  # noqa: D102
        self._records[task_id, "error"] = error

    def last_error(self, task_id: str) -> str | None:  # noqa: D102
        value: str | None = self._records.get((task_id, "error"))
        return value

    def mark_dead(self, task_id: str, entry: dict[str, Any]) -> bool:  # noqa: D102
        if (task_id, "dead") in self._records:
            return False
        self._records[task_id, "dead"] = json.loads(json.dumps(entry))
        return True

    def dead(self, task_id: str) -> dict[str, Any] | None:  # noqa: D102
        value: dict[str, Any] | None = self._records.get((task_id, "dead"))
        return value

    def reset(self, task_id: str) -> None:  # noqa: D102
        self._claims.pop(task_id, None)
        for f in _FIELDS:
            self._records.pop((task_id, f), None)


def _outcome(raw: Any) -> ClaimOutcome:  # noqa: ANN401 - redis-py returns untyped values
    """One task's reply of the admission script."""
    seen, attempt, payload, pttl = raw
    match _text(seen):
        case "done":
            return ClaimOutcome("done", result=_loads(payload))
        case "held":
            left = None if pttl is None or int(pttl) < 0 else int(pttl) / 1000
            return ClaimOutcome("held", claim_left_s=left)
        case "dead":
            return ClaimOutcome("dead", entry=_loads(payload))
        case _:
            error = None if payload is None else _text(payload)
            return ClaimOutcome("claimed", attempt=int(attempt), last_error=error)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _status_ttl_ms(record: StatusRecord) -> int:
    """The record's TTL for the scripts: milliseconds, 0 for none."""
    return 0 if not record.ttl_s else _ms(record.ttl_s)


def _text(raw: Any) -> str:  # noqa: ANN401 - redis-py returns untyped values
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _loads(raw: Any) -> dict[str, Any] | None:  # noqa: ANN401 - redis-py returns untyped values
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None

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

Every record expires after ``record_ttl_s`` (default 7 days) so the store does not
grow forever. ``RedisExecutionStore`` is the real one; ``MemoryExecutionStore`` is the
same contract in memory with an injected clock, for unit tests (it is part of the
product: use it to test code built on this module).

Where the store is: ``FLEET_STATE_URL``; else the broker when the broker is Redis;
else ``FLEET_LOCK_URL``; else nowhere, and the guard is off (``state_url``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis

from fleet.settings import is_redis_url
from fleet.tls import TlsFiles, redis_client

__all__ = [
    "DEFAULT_RECORD_TTL_S",
    "ExecutionStore",
    "MemoryExecutionStore",
    "RedisExecutionStore",
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


class ExecutionStore(Protocol):
    """The records of one fleet's executions (see the module docstring).

    Every method is atomic on its own; ``claim`` is the only mutual exclusion.
    """

    def claim(self, task_id: str, holder: str, ttl_s: float) -> bool:
        """Take the claim if nobody holds it (SET NX with a TTL); True when taken."""

    def refresh(self, task_id: str, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s claim to ``ttl_s`` from now; False when it is not theirs any more."""

    def release(self, task_id: str, holder: str) -> None:
        """Drop the claim if ``holder`` still has it."""

    def claim_ttl_s(self, task_id: str) -> float | None:
        """Seconds left on the current claim, or None when there is none."""

    def done(self, task_id: str) -> dict[str, Any] | None:
        """The recorded result of the completed execution, or None."""

    def finish(self, task_id: str, holder: str, result: dict[str, Any]) -> None:
        """Record ``result`` as the one result, then release ``holder``'s claim."""

    def count_delivery(self, task_id: str) -> int:
        """Count one more delivery; returns the new count."""

    def count_attempt(self, task_id: str) -> int:
        """Count one more started attempt; returns the new count."""

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


_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
_FINISH = """
redis.call('set', KEYS[2], ARGV[2], 'px', ARGV[3])
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
end
return 1
"""


class RedisExecutionStore:
    """The state store on Redis; keys are ``{namespace}fleet:exec:{task_id}:{record}``."""

    def __init__(
        self, client: redis.Redis, namespace: str = "", record_ttl_s: float = DEFAULT_RECORD_TTL_S
    ) -> None:
        """Use ``client``; records expire ``record_ttl_s`` after their last write."""
        self._r = client
        self._ns = namespace
        self._ttl_ms = int(record_ttl_s * 1000)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def from_url(
        cls, url: str, namespace: str = "", tls: TlsFiles | None = None
    ) -> RedisExecutionStore:
        """A store on the Redis at ``url`` (short socket timeouts: a dead store fails fast)."""
        client = redis_client(url, tls, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, namespace)

    def _key(self, task_id: str, record: str) -> str:
        return f"{self._ns}fleet:exec:{task_id}:{record}"

    def claim(self, task_id: str, holder: str, ttl_s: float) -> bool:  # noqa: D102 - see ExecutionStore
        return bool(self._r.set(self._key(task_id, "claim"), holder, nx=True, px=_ms(ttl_s)))

    def refresh(self, task_id: str, holder: str, ttl_s: float) -> bool:  # noqa: D102
        return bool(self._refresh(keys=[self._key(task_id, "claim")], args=[holder, _ms(ttl_s)]))

    def release(self, task_id: str, holder: str) -> None:  # noqa: D102
        self._release(keys=[self._key(task_id, "claim")], args=[holder])

    def claim_ttl_s(self, task_id: str) -> float | None:  # noqa: D102
        left = int(self._r.pttl(self._key(task_id, "claim")))
        return None if left < 0 else left / 1000

    def done(self, task_id: str) -> dict[str, Any] | None:  # noqa: D102
        return _loads(self._r.get(self._key(task_id, "done")))

    def finish(self, task_id: str, holder: str, result: dict[str, Any]) -> None:  # noqa: D102
        self._finish(
            keys=[self._key(task_id, "claim"), self._key(task_id, "done")],
            args=[holder, json.dumps(result), self._ttl_ms],
        )

    def _incr(self, task_id: str, record: str) -> int:
        pipe = self._r.pipeline()
        pipe.incr(self._key(task_id, record))
        pipe.pexpire(self._key(task_id, record), self._ttl_ms)
        return int(pipe.execute()[0])

    def count_delivery(self, task_id: str) -> int:  # noqa: D102
        return self._incr(task_id, "deliveries")

    def count_attempt(self, task_id: str) -> int:  # noqa: D102
        return self._incr(task_id, "attempts")

    def counts(self, task_id: str) -> tuple[int, int]:  # noqa: D102
        raw = self._r.mget([self._key(task_id, "deliveries"), self._key(task_id, "attempts")])
        deliveries, attempts = (int(v or 0) for v in raw)
        return deliveries, attempts

    def record_error(self, task_id: str, error: str) -> None:  # noqa: D102
        self._r.set(self._key(task_id, "error"), error, px=self._ttl_ms)

    def last_error(self, task_id: str) -> str | None:  # noqa: D102
        raw = self._r.get(self._key(task_id, "error"))
        return None if raw is None else bytes(raw).decode()  # type: ignore[arg-type]

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

    def _live_claim(self, task_id: str) -> tuple[str, float] | None:
        held = self._claims.get(task_id)
        if held is not None and held[1] <= self._clock():
            del self._claims[task_id]
            return None
        return held

    def claim(self, task_id: str, holder: str, ttl_s: float) -> bool:  # noqa: D102 - see ExecutionStore
        if self._live_claim(task_id) is not None:
            return False
        self._claims[task_id] = (holder, self._clock() + ttl_s)
        return True

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

    def finish(self, task_id: str, holder: str, result: dict[str, Any]) -> None:  # noqa: D102
        self._records[task_id, "done"] = json.loads(json.dumps(result))  # JSON, like Redis
        self.release(task_id, holder)

    def _incr(self, task_id: str, record: str) -> int:
        value = int(self._records.get((task_id, record), 0)) + 1
        self._records[task_id, record] = value
        return value

    def count_delivery(self, task_id: str) -> int:  # noqa: D102
        return self._incr(task_id, "deliveries")

    def count_attempt(self, task_id: str) -> int:  # noqa: D102
        return self._incr(task_id, "attempts")

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


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _loads(raw: Any) -> dict[str, Any] | None:  # noqa: ANN401 - redis-py returns untyped values
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None

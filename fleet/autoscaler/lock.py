"""One active autoscaler: a lease with expiry in Redis.

``acquire`` sets the key only if absent (``SET NX PX``) with this holder's random id;
``renew`` extends it only if we still hold it, and ``release`` deletes it only if we
hold it (both compare-and-act in one Lua script, so a holder that lost the lease can
never extend or delete the next holder's). A standby calls ``acquire`` every loop and
takes over once the active one stops renewing and its lease expires.

On a RabbitMQ broker the lease lives in a Redis given by ``FLEET_LOCK_URL``; without one
the autoscaler refuses to start rather than run unlocked.
"""

from __future__ import annotations

import uuid

import redis

LOCK_KEY = "fleet:autoscaler:lock"

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Lease:
    """A lease on the autoscaler lock for ``ttl_s`` seconds, renewable."""

    def __init__(
        self, client: redis.Redis, ttl_s: float, namespace: str = "", holder: str | None = None
    ) -> None:
        """Prepare; nothing is held until ``acquire`` succeeds."""
        self._client = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.key = f"{namespace}{LOCK_KEY}"
        self.holder = holder or uuid.uuid4().hex
        self.held = False

    def acquire(self) -> bool:
        """Take the lease if free, or renew it if we hold it; True when we hold it."""
        if self.held and self.renew():
            return True
        self.held = bool(self._client.set(self.key, self.holder, nx=True, px=self._ttl_ms))
        return self.held

    def renew(self) -> bool:
        """Extend our lease; False (and no longer held) if it expired or someone else has it."""
        self.held = bool(self._client.eval(_RENEW, 1, self.key, self.holder, self._ttl_ms))
        return self.held

    def release(self) -> None:
        """Give the lease up if we hold it."""
        self._client.eval(_RELEASE, 1, self.key, self.holder)
        self.held = False

    def holder_now(self) -> str | None:
        """Who holds the lease now (for status), or None."""
        raw = self._client.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

"""Shared rate limits for API workers: request and token buckets in Redis, one atomic script.

Every API worker forwarding to one provider with one key draws from the same two
buckets (requests per minute, tokens per minute), keyed by provider and a fingerprint
of the key (``key_fingerprint``: a hash prefix, never the key itself). One Lua script
checks both buckets and debits both, or neither, atomically; it returns how long to
wait when either is short.

The buckets refill continuously. A bucket whose capacity were the whole per-minute
limit, refilled at limit/60 per second, lets through up to twice the limit in some
60 s window (a full bucket at the start, then a minute of refill). A provider that
counts a sliding window would refuse that, so ``Limit`` splits the limit instead: a
burst (the capacity) plus a refill of ``(per_minute - burst) / (60 + margin_s)`` per
second. Then any 60 s window holds at most ``burst + 60 * refill <= per_minute``, the
invariant ``tests/unit/test_ratelimit.py`` checks with hypothesis. ``margin_s`` covers
the delay between a grant here and the provider seeing the request (and clock skew
between workers, whose clocks the grants use). A provider that enforces a bucket of
the whole limit (Cerebras documents one) is never tripped by these settings either;
``burst_fraction=1`` with ``margin_s=0`` would copy it exactly.

Token counts are estimates at acquisition (prompt estimate plus ``max_tokens``);
``settle`` corrects them with what the endpoint reports. The window invariant holds
for the tokens actually used as long as the estimate is not below them (a surplus is
credited back; a shortfall is debited after the fact).

``RedisBucket`` is the real store; ``MemoryBucket`` implements the same arithmetic in
process (for unit tests and single-process use); ``RateLimiter`` adds the waiting,
with an injected clock and sleep.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

WINDOW_S = 60.0
DEFAULT_BURST_FRACTION = 0.25
DEFAULT_MARGIN_S = 1.0
EPSILON = 1e-9
KEY_TTL_S = 600  # idle buckets are full again long before this; the keys then expire


class RateLimitError(Exception):
    """A request can never be granted (larger than the bucket), or waiting timed out."""


@dataclass(frozen=True, slots=True)
class Limit:
    """One per-minute limit as a bucket: ``burst`` capacity, ``refill_per_s`` refill.

    Invariant: at most ``per_minute`` units are granted in any 60 s window (see the
    module docstring).
    """

    per_minute: int
    burst: int
    margin_s: float = DEFAULT_MARGIN_S

    def __post_init__(self) -> None:
        """Reject limits that cannot hold the invariant."""
        if self.per_minute < 1 or not 1 <= self.burst <= self.per_minute or self.margin_s < 0:
            raise ValueError(
                f"need 1 <= burst ({self.burst}) <= per_minute ({self.per_minute}) and margin_s >= 0"
            )

    @classmethod
    def of(
        cls,
        per_minute: int,
        burst_fraction: float = DEFAULT_BURST_FRACTION,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> Limit:
        """A limit whose burst is ``burst_fraction`` of ``per_minute`` (at least 1)."""
        burst = min(per_minute, max(1, math.floor(per_minute * burst_fraction)))
        return cls(per_minute, burst, margin_s)

    @property
    def refill_per_s(self) -> float:
        """Units returned to the bucket per second."""
        return (self.per_minute - self.burst) / (WINDOW_S + self.margin_s)


@dataclass(frozen=True, slots=True)
class Limits:
    """The two limits of one provider account."""

    requests: Limit
    tokens: Limit

    @classmethod
    def per_minute(
        cls,
        requests: int,
        tokens: int,
        burst_fraction: float = DEFAULT_BURST_FRACTION,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> Limits:
        """Both limits with the same burst fraction and margin."""
        return cls(
            Limit.of(requests, burst_fraction, margin_s), Limit.of(tokens, burst_fraction, margin_s)
        )


def key_fingerprint(api_key: str | None) -> str:
    """A short, one-way name for an API key (``nokey`` without one); safe to log and store."""
    if not api_key:
        return "nokey"
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def bucket_key(provider: str, api_key: str | None, namespace: str = "") -> str:
    """The Redis key prefix of one provider account's buckets."""
    return f"{namespace}fleet:ratelimit:{provider}:{key_fingerprint(api_key)}"


# --- the arithmetic (pure); the Lua script below is the same, line for line ------------


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket's level at time ``ts``."""

    level: float
    ts: float


def level_at(state: BucketState | None, limit: Limit, now: float) -> BucketState:
    """The bucket refilled up to ``now`` (a missing bucket is full; time never runs back)."""
    if state is None:
        return BucketState(float(limit.burst), now)
    if now <= state.ts:
        return state
    return BucketState(min(limit.burst, state.level + (now - state.ts) * limit.refill_per_s), now)


def wait_for(state: BucketState, limit: Limit, amount: int) -> float:
    """Seconds until ``state`` holds ``amount`` (0 when it does now)."""
    short = amount - state.level
    if short <= EPSILON:  # float rounding must not leave a waiter a femtosecond short forever
        return 0.0
    if limit.refill_per_s <= 0:
        return math.inf
    return short / limit.refill_per_s


def check_fits(limits: Limits, requests: int, tokens: int) -> None:
    """Raise when an acquisition is larger than a bucket can ever hold."""
    if requests > limits.requests.burst or tokens > limits.tokens.burst:
        raise RateLimitError(
            f"{requests} request(s) / {tokens} tokens exceed the bucket sizes "
            f"({limits.requests.burst} requests, {limits.tokens.burst} tokens): "
            "raise the provider's limits or the burst fraction"
        )


class Bucket(Protocol):
    """A store of the two buckets of one provider account (shared or not)."""

    def try_acquire(self, requests: int, tokens: int, now: float) -> float:
        """Debit both buckets and return 0, or debit nothing and return the seconds to wait."""
        ...

    def adjust_tokens(self, delta: int, now: float) -> None:
        """Credit (``delta`` > 0) or debit (< 0) the token bucket, capped at its burst."""
        ...


@dataclass
class MemoryBucket:
    """The buckets in this process (thread-safe): the fake beside ``RedisBucket``."""

    limits: Limits
    requests_state: BucketState | None = None
    tokens_state: BucketState | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def try_acquire(self, requests: int, tokens: int, now: float) -> float:
        """See ``Bucket.try_acquire``."""
        with self._lock:
            req = level_at(self.requests_state, self.limits.requests, now)
            tok = level_at(self.tokens_state, self.limits.tokens, now)
            wait = max(
                wait_for(req, self.limits.requests, requests),
                wait_for(tok, self.limits.tokens, tokens),
            )
            if wait <= 0:
                req = BucketState(req.level - requests, req.ts)
                tok = BucketState(tok.level - tokens, tok.ts)
            self.requests_state, self.tokens_state = req, tok
            return wait

    def adjust_tokens(self, delta: int, now: float) -> None:
        """See ``Bucket.adjust_tokens``."""
        with self._lock:
            tok = level_at(self.tokens_state, self.limits.tokens, now)
            self.tokens_state = BucketState(
                min(self.limits.tokens.burst, tok.level + delta), tok.ts
            )


_REFILL = """
local function refill(key, burst, rate, now)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil then return burst, now end
  if now <= ts then return level, ts end
  return math.min(burst, level + (now - ts) * rate), now
end
local function store(key, level, ts, ttl)
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'ts', string.format('%.17g', ts))
  redis.call('EXPIRE', key, ttl)
end
"""
# KEYS: requests bucket, tokens bucket. ARGV: now, ttl, then burst, rate, amount for each.
_ACQUIRE = (
    _REFILL
    + """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rb, rr, ra = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tb, tr, ta = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rl, rts = refill(KEYS[1], rb, rr, now)
local tl, tts = refill(KEYS[2], tb, tr, now)
local wait = 0
if ra - rl > 1e-9 then wait = math.max(wait, (ra - rl) / rr) end
if ta - tl > 1e-9 then wait = math.max(wait, (ta - tl) / tr) end
if wait <= 0 then rl = rl - ra; tl = tl - ta end
store(KEYS[1], rl, rts, ttl)
store(KEYS[2], tl, tts, ttl)
return string.format('%.17g', wait)
"""
)
# KEYS: tokens bucket. ARGV: now, ttl, burst, rate, delta.
_ADJUST = (
    _REFILL
    + """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local tb, tr, delta = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tl, tts = refill(KEYS[1], tb, tr, now)
store(KEYS[1], math.min(tb, tl + delta), tts, ttl)
return 1
"""
)


class RedisBucket:
    """The buckets in Redis, shared by every worker using the same provider and key.

    Assumes each limit has a positive refill (``burst < per_minute``). Times are the
    callers' clocks (injected, so tests control them); workers on several hosts need
    synchronised clocks, their skew being absorbed by ``Limit.margin_s``.
    """

    def __init__(self, client: redis.Redis, prefix: str, limits: Limits) -> None:
        """Use keys ``<prefix>:requests`` and ``<prefix>:tokens`` (see ``bucket_key``)."""
        if limits.requests.refill_per_s <= 0 or limits.tokens.refill_per_s <= 0:
            raise ValueError("RedisBucket needs burst < per_minute for both limits")
        self.limits = limits
        self._keys = [f"{prefix}:requests", f"{prefix}:tokens"]
        self._acquire = client.register_script(_ACQUIRE)
        self._adjust = client.register_script(_ADJUST)

    def try_acquire(self, requests: int, tokens: int, now: float) -> float:
        """See ``Bucket.try_acquire``."""
        r, t = self.limits.requests, self.limits.tokens
        args = [now, KEY_TTL_S, r.burst, r.refill_per_s, requests, t.burst, t.refill_per_s, tokens]
        return float(self._acquire(keys=self._keys, args=[repr(float(a)) for a in args]))

    def adjust_tokens(self, delta: int, now: float) -> None:
        """See ``Bucket.adjust_tokens``."""
        t = self.limits.tokens
        args = [now, KEY_TTL_S, t.burst, t.refill_per_s, delta]
        self._adjust(keys=self._keys[1:], args=[repr(float(a)) for a in args])


@dataclass(frozen=True, slots=True)
class Grant:
    """What one acquisition took: settle it with the actual token count."""

    tokens: int
    waited_s: float


class RateLimiter:
    """Waits for a bucket: ``acquire`` before a request, ``settle`` after its response."""

    def __init__(
        self,
        bucket: Bucket,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Wait on ``bucket`` with ``clock`` (seconds) and ``sleep``."""
        self.bucket = bucket
        self.limits = limits
        self.clock = clock
        self.sleep = sleep

    def poll(self, tokens_estimate: int, requests: int = 1) -> float:
        """Try once: 0 when granted (debited), else the seconds to wait (nothing debited).

        Raises:
            RateLimitError: the acquisition is larger than a bucket can ever hold.

        """
        check_fits(self.limits, requests, tokens_estimate)
        return self.bucket.try_acquire(requests, tokens_estimate, self.clock())

    def attempt(self, tokens_estimate: int, started: float, timeout_s: float) -> Grant | float:
        """One step of a wait that began at ``started`` (this limiter's clock).

        Returns the ``Grant`` when granted, else the seconds to sleep before the next step
        (``acquire`` sleeps in a thread, an async caller awaits).

        Raises:
            RateLimitError: too large for the buckets, or no grant possible within ``timeout_s``.

        """
        wait = self.poll(tokens_estimate)
        now = self.clock()
        if wait <= 0:
            return Grant(tokens_estimate, now - started)
        if now + wait - started > timeout_s:
            raise RateLimitError(f"rate limit: no grant within {timeout_s:g} s")
        return wait

    def acquire(self, tokens_estimate: int, timeout_s: float = 300.0) -> Grant:
        """Block (sleeping) until one request and ``tokens_estimate`` tokens are granted.

        Raises:
            RateLimitError: too large for the buckets, or not granted within ``timeout_s``.

        """
        started = self.clock()
        while not isinstance(step := self.attempt(tokens_estimate, started, timeout_s), Grant):
            self.sleep(step)
        return step

    def settle(self, grant: Grant, actual_tokens: int) -> None:
        """Correct a grant's token estimate with what the endpoint reported."""
        delta = grant.tokens - actual_tokens
        if delta:
            self.bucket.adjust_tokens(delta, self.clock())

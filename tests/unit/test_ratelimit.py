"""Shared rate limits: the bucket arithmetic, its window invariant, and the Redis script."""

from __future__ import annotations

import math
import uuid

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from fleet.ratelimit import (
    Grant,
    Limit,
    Limits,
    MemoryBucket,
    RateLimiter,
    RateLimitError,
    RedisBucket,
    bucket_key,
    key_fingerprint,
)
from tests.integration.brokers import redis_url


class FakeClock:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        """Start at t = 1000 s."""
        self.now = 1000.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds``."""
        self.now += seconds


def window_totals(events: list[tuple[float, int]], window_s: float = 60.0) -> int:
    """Largest sum of amounts in any window [t, t + window_s) starting at an event."""
    return max(
        (sum(a for u, a in events if t <= u < t + window_s) for t, _ in events),
        default=0,
    )


@pytest.mark.parametrize(
    ("per_minute", "fraction", "burst"),
    [(60, 0.25, 15), (30, 0.5, 15), (3, 0.25, 1), (10, 1.0, 10), (1000, 0.0, 1)],
)
def test_limit_splits_into_burst_and_refill(per_minute, fraction, burst):
    """The burst is the given fraction (at least 1) and burst + a minute of refill <= limit."""
    limit = Limit.of(per_minute, fraction, margin_s=1.0)
    assert limit.burst == burst
    assert limit.burst + 60 * limit.refill_per_s <= per_minute


def test_memory_bucket_grants_burst_then_waits_for_refill():
    """A fresh bucket grants its burst at once, then says how long to wait for one more."""
    limits = Limits(Limit(60, 6, margin_s=0), Limit(10_000, 5_000, margin_s=0))
    bucket = MemoryBucket(limits)
    assert [bucket.try_acquire(1, 10, 0.0) for _ in range(6)] == [0.0] * 6
    wait = bucket.try_acquire(1, 10, 0.0)
    assert wait == pytest.approx(1 / limits.requests.refill_per_s)
    assert bucket.try_acquire(1, 10, wait) == 0.0


def test_both_buckets_or_neither():
    """When tokens are short, the request is not taken either."""
    limits = Limits(Limit(60, 10, margin_s=0), Limit(120, 20, margin_s=0))
    bucket = MemoryBucket(limits)
    assert bucket.try_acquire(1, 20, 0.0) == 0.0
    assert bucket.try_acquire(1, 5, 0.0) > 0
    assert bucket.requests_state is not None
    assert bucket.requests_state.level == 9  # the refused attempt took no request


def test_settle_credits_back_an_overestimate():
    """A grant of 100 tokens that used 40 gives 60 back."""
    clock = FakeClock()
    limits = Limits(Limit(60, 10), Limit(1000, 100))
    limiter = RateLimiter(MemoryBucket(limits), limits, clock, clock.sleep)
    grant = limiter.acquire(100)
    assert limiter.poll(60) > 0
    limiter.settle(grant, 40)
    assert limiter.poll(60) == 0.0


def test_oversized_request_is_refused_not_waited_for():
    """An estimate larger than the token bucket can never be granted: an error, no sleep."""
    clock = FakeClock()
    limits = Limits.per_minute(60, 1000)
    limiter = RateLimiter(MemoryBucket(limits), limits, clock, clock.sleep)
    with pytest.raises(RateLimitError, match="exceed the bucket sizes"):
        limiter.acquire(limits.tokens.burst + 1)
    assert clock.now == 1000.0


def test_acquire_times_out():
    """When the wait would pass the timeout, acquire raises instead of sleeping it out."""
    clock = FakeClock()
    limits = Limits(Limit(2, 1), Limit(1000, 500))
    limiter = RateLimiter(MemoryBucket(limits), limits, clock, clock.sleep)
    limiter.acquire(1)
    with pytest.raises(RateLimitError, match="no grant within"):
        limiter.acquire(1, timeout_s=5)


def test_key_fingerprint_hides_the_key():
    """Bucket keys name a hash of the API key, never the key."""
    key = "sk-live-" + "x" * 20
    assert key not in bucket_key("groq", key)
    assert key_fingerprint(key) in bucket_key("groq", key)
    assert key_fingerprint(None) == "nokey"
    assert key_fingerprint(key) != key_fingerprint(key + "y")


@given(
    rpm=st.integers(2, 120),
    tpm=st.integers(50, 5000),
    fraction=st.floats(0.05, 0.95),
    margin=st.floats(0.0, 2.0),
    steps=st.lists(
        st.tuples(st.floats(0.0, 20.0), st.integers(1, 50), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=80,
    ),
)
def test_no_60s_window_exceeds_the_limits(rpm, tpm, fraction, margin, steps):
    """Whatever the arrival pattern, estimates and settlements: never over rpm/tpm in 60 s."""
    limits = Limits.per_minute(rpm, tpm, fraction, margin)
    clock = FakeClock()
    limiter = RateLimiter(MemoryBucket(limits), limits, clock, clock.sleep)
    requests: list[tuple[float, int]] = []
    tokens: list[tuple[float, int]] = []
    for gap, estimate, used_share in steps:
        clock.sleep(gap)
        amount = min(estimate, limits.tokens.burst)
        grant = limiter.acquire(amount, timeout_s=math.inf)
        used = math.floor(amount * used_share)  # never above the estimate
        requests.append((clock.now, 1))
        tokens.append((clock.now, used))
        limiter.settle(grant, used)
    assert window_totals(requests) <= rpm
    assert window_totals(tokens) <= tpm


@pytest.mark.integration
def test_redis_bucket_matches_the_memory_bucket():
    """The Lua script and the in-process arithmetic agree, step by step, on real Redis."""
    limits = Limits(Limit(30, 6, margin_s=0.5), Limit(900, 200, margin_s=0.5))
    steps = [(0.0, 40), (0.0, 40), (0.1, 100), (0.2, 10), (3.0, 150), (0.0, 5), (9.0, 120)]
    with redis_url() as url:
        client = redis.Redis.from_url(url)
        real = RedisBucket(client, bucket_key("emu", uuid.uuid4().hex), limits)
        fake = MemoryBucket(limits)
        now = 5000.0
        for gap, amount in steps:
            now += gap
            assert real.try_acquire(1, amount, now) == pytest.approx(
                fake.try_acquire(1, amount, now)
            )
            real.adjust_tokens(-3, now)
            fake.adjust_tokens(-3, now)
        assert client.ttl(f"{real._keys[1]}") > 0  # idle buckets expire


@pytest.mark.integration
def test_redis_bucket_is_shared_between_clients():
    """Two limiters (two workers) on one Redis draw from one bucket."""
    limits = Limits(Limit(10, 3, margin_s=0), Limit(1000, 500, margin_s=0))
    prefix = bucket_key("emu", uuid.uuid4().hex)
    with redis_url() as url:
        a = RateLimiter(RedisBucket(redis.Redis.from_url(url), prefix, limits), limits, lambda: 1.0)
        b = RateLimiter(RedisBucket(redis.Redis.from_url(url), prefix, limits), limits, lambda: 1.0)
        assert [a.poll(10), b.poll(10), a.poll(10)] == [0.0, 0.0, 0.0]
        assert b.poll(10) > 0
        a.settle(Grant(10, 0.0), 10)  # nothing to correct: no change
        assert a.poll(10) > 0

"""The autoscaler lease on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from fleet.autoscaler.lock import Lease
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A client on an empty database."""
    with redis_url() as url:
        yield redis.Redis.from_url(url)


def test_one_holder_at_a_time(client: redis.Redis) -> None:
    """The second lease cannot acquire while the first holds and renews."""
    a, b = Lease(client, 5.0), Lease(client, 5.0)
    assert a.acquire()
    assert not b.acquire()
    assert a.acquire()  # renews
    assert a.holder_now() == a.holder


def test_expired_lease_is_taken_over(client: redis.Redis) -> None:
    """When the holder stops renewing, another takes over after the TTL."""
    a, b = Lease(client, 0.3), Lease(client, 0.3)
    assert a.acquire()
    time.sleep(0.45)
    assert b.acquire()
    assert not a.renew()  # the old holder learns it lost the lease
    assert not a.held


def test_release_only_frees_our_own_lease(client: redis.Redis) -> None:
    """A stale holder's release never deletes the new holder's lease."""
    a, b = Lease(client, 0.2), Lease(client, 5.0)
    assert a.acquire()
    time.sleep(0.3)
    assert b.acquire()
    a.release()
    assert b.holder_now() == b.holder
    b.release()
    assert b.holder_now() is None

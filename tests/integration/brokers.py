"""Real brokers for integration tests.

Redis: the machine's server on 127.0.0.1:6379 with an empty database number picked for
this run (flushed afterwards), or a private ``redis-server`` the tests start when none
answers. RabbitMQ: the machine's server with a queue-name namespace unique to the run
(queues deleted afterwards). Under ``CI=true`` a missing RabbitMQ fails instead of
skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
from kombu import Connection

from fleet.catalog import default_catalog
from fleet.embedded import embedded_redis
from fleet.queues import all_queue_names

REDIS_HOST = "127.0.0.1"
# Point at a port with nothing on it to exercise the fallback to a private redis-server.
REDIS_PORT = int(os.environ.get("FLEET_TEST_REDIS_PORT", "6379"))
AMQP_URL = os.environ.get("FLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def in_ci() -> bool:
    """True under CI, where a missing service is a failure."""
    return os.environ.get("CI") == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _claim_empty_db(client_for: Callable[[int], redis.Redis]) -> int | None:
    for db in range(15, 0, -1):
        client = client_for(db)
        # SETNX a claim key so two concurrent runs never share a database.
        if client.dbsize() == 0 and client.set("fleet-test-claim", "1", nx=True, ex=3600):
            return db
    return None


@contextmanager
def redis_url() -> Iterator[str]:
    """A Redis URL with an empty database for this test session."""
    if _reachable(REDIS_HOST, REDIS_PORT):
        db = _claim_empty_db(lambda n: redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n))
        if db is not None:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
            try:
                yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
            finally:
                client.flushdb()
            return
    if in_ci():
        pytest.fail(
            f"Redis is required under CI=true and none answers on {REDIS_HOST}:{REDIS_PORT}"
        )
    with embedded_redis() as url:
        yield url


@contextmanager
def rabbitmq_namespace() -> Iterator[tuple[str, str]]:
    """(amqp URL, queue namespace) on the machine's RabbitMQ; queues removed afterwards."""
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no RabbitMQ"
        if in_ci():
            pytest.fail(
                f"RabbitMQ is required under CI=true and is not reachable: {type(exc).__name__}"
            )
        pytest.skip("RabbitMQ not reachable")
    namespace = f"t{uuid.uuid4().hex[:8]}."
    try:
        yield AMQP_URL, namespace
    finally:
        with Connection(AMQP_URL) as conn:
            channel = conn.channel()
            for name in all_queue_names(default_catalog(), namespace):
                try:
                    channel.queue_delete(name)
                except Exception:  # noqa: BLE001 - missing queues are fine
                    channel = conn.channel()

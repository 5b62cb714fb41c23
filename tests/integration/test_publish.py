"""submit_many's prebuilt messages are Celery's own: kombu's document key for key, run by stock Celery."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.settings import Settings
from fleet.stats import QueueStats
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "kind": "batch",
    "model": {"name": "noop", "params_b": 0.001, "dtype": "fp32"},
    "input": {"op": "noop", "note": "ünïcode"},
    "requirements": {"accelerators": ["cpu"]},
    "priority": 7,
}


class NoStats:
    """Queue statistics that say nothing: placement then never moves between two publishes."""

    def read(self, names: list[str]) -> dict[str, QueueStats]:  # noqa: ARG002, D102 - the interface
        return {}


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with redis_url() as url:
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        with Fleet(settings, app=create_app(settings), stats=NoStats()) as client:
            yield client


def raw_messages(fleet: Fleet, queue: str) -> list[dict[str, Any]]:
    """The kombu documents on every priority band of ``queue``, oldest first."""
    client = redis.Redis.from_url(fleet.settings.broker_url)
    out = []
    for key in client.scan_iter(f"{queue}*"):
        out += [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]
        client.delete(key)
    return out


def comparable(message: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A document without what differs per message (ids, delivery tag, submission time)."""
    message = json.loads(json.dumps(message))
    body = json.loads(base64.b64decode(message.pop("body")))
    body[1]["placement"].pop("submitted_at")
    ids = {message["headers"].pop("id"), message["headers"].pop("root_id")}
    ids.add(message["properties"].pop("correlation_id"))
    assert len(ids) == 1
    message["properties"].pop("delivery_tag")
    return message, body


def test_a_prebuilt_message_is_the_document_celery_and_kombu_write(fleet: Fleet) -> None:
    """Apart from ids, delivery tag and submit time, submit_many's message equals submit's (Celery's path)."""
    one = fleet.submit(SPEC)
    queue = one.placement.queue
    [through_celery] = raw_messages(fleet, queue)
    many = fleet.submit_many([SPEC, SPEC])
    prebuilt = raw_messages(fleet, queue)
    assert [m["headers"]["id"] for m in prebuilt] == [h.id for h in many]
    assert len({m["properties"]["delivery_tag"] for m in prebuilt}) == 2
    assert comparable(prebuilt[0]) == comparable(through_celery)
    assert comparable(prebuilt[1]) == comparable(through_celery)


def test_a_stock_celery_worker_runs_what_submit_many_publishes(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A plain Celery worker (its own ``fleet.run``, no fleet code) runs every message, ids intact."""
    specs = [{**SPEC, "input": {"op": "noop", "n": i}, "priority": i % 10} for i in range(12)]
    handles = fleet.submit_many(specs)
    queues = sorted({h.placement.queue for h in handles})
    env = {**os.environ, "FLEET_BROKER_URL": fleet.settings.broker_url}
    cmd = [
        sys.executable, "-m", "celery", "-A", "tests.integration.stock_app", "worker",
        "-Q", ",".join(queues), "-c", "1", "-P", "solo", "-n", "stock@test",
        "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
    ]  # fmt: skip
    log = tmp_path / "stock.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        results = [h.get(timeout=60) for h in handles]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [r["task_id"] for r in results] == [h.id for h in handles]
    assert [r["input"]["n"] for r in results] == list(range(12))
    assert {r["delivered_to"] for r in results} == set(queues)
    assert all(r["queue"] == r["delivered_to"] for r in results)
    assert all(r["time_limit"] == [6 * 3600, 6 * 3600 - 60] for r in results)

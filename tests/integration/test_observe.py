"""observe reads fleet's own messages on Redis: the spec for run-time samples, the submit time for age."""

from __future__ import annotations

import time

import pytest
import redis

from fleet.autoscaler.observe import decode_spec, sample_service_s
from fleet.catalog import default_catalog
from fleet.client import Fleet
from fleet.settings import Settings
from fleet.stats import decode_task, oldest_age_s
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
SPEC = {"kind": "inference", "model": {"name": "m", "params_b": 8}, "tokens_in": 100, "tokens_out": 20,
        "requirements": {"accelerators": ["nvidia-l4"]}}  # fmt: skip


def test_queued_messages_decode_to_spec_submit_time_and_run_time() -> None:
    """A queued fleet.run message yields its spec, its submit time and a positive run-time sample."""
    with redis_url() as url:
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        before = time.time()
        with Fleet(settings) as fleet:
            queue = fleet.submit_many([SPEC] * 3)[0].placement.queue
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{queue}*"))
        raw = client.lindex(keys[0], -1)
        assert raw is not None
        decoded = decode_task(raw)
        assert decoded is not None
        assert decode_spec(raw) == decoded[0][0]
        assert decoded[0][0]["model"]["params_b"] == 8
        assert decoded[1]["placement"]["submitted_at"] >= before
        age = oldest_age_s(client, queue, time.time())
        assert age is not None
        assert 0 <= age < 60
        sample = sample_service_s(client, queue, default_catalog(), "")
        assert sample is not None
        assert sample > 0
    assert decode_task(b"not json") is None

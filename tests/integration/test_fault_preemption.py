"""Fault 6: a spot interruption notice, served by a local metadata fake, drains a real worker.

The worker polls the fake (``FLEET_METADATA_URL``); once the notice is switched on it
stops taking work, gives its running task ``min(grace, time left - margin)``, sends it
back to its queue unacked, records the interruption for the autoscaler and exits; a
second worker completes the task.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from fleet.autoscaler.config import parse_config
from fleet.autoscaler.loop import build_autoscaler
from fleet.client import Fleet
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.providers.fake import FakeProvider
from fleet.registry import InterruptionRecord, recent_interruptions, record_interruption
from fleet.settings import Settings
from tests.fakes.metadata_server import MetadataServer
from tests.faults import FaultLedger
from tests.integration.brokers import redis_url
from tests.integration.conftest import Broker
from tests.integration.faultkit import sleep_spec
from tests.integration.test_autoscaler_faults import CONFIG as FAKE_L4_POOL
from tests.integration.test_end_to_end import queue_depths
from tests.integration.test_fault_shutdown import events, ran, wait_started

pytestmark = [pytest.mark.integration, pytest.mark.fault]

NOTICE_S = 6.0  # the notice window the fake announces
MARGIN_S = 2.0  # FLEET_PREEMPTION_MARGIN_S: so the drain budget is about 4 s
EXIT_MARGIN_S = 8.0

SPOT_KEY = "gcp/us-central1/g2-standard-12/spot"
L4_TASK = {
    "kind": "inference",
    "model": {"name": "m", "params_b": 8, "dtype": "bf16"},
    "tokens_in": 2000,
    "tokens_out": 500,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


def test_spot_notice_drains_the_worker_and_another_completes_the_task(
    broker: Broker, fleet: Fleet, logs: Path, faults: FaultLedger
) -> None:
    """AWS notice mid-task: worker exits within the window, task requeued, done once elsewhere, interruption recorded."""
    task_s = 14.0
    with MetadataServer() as fake:
        env = {
            **broker.env,
            "FLEET_LOG_FORMAT": "json",
            "FLEET_SHUTDOWN_GRACE_S": "60",  # longer than the notice: the window must win
            "FLEET_CLOUD": "aws",
            "FLEET_METADATA_URL": fake.url,
            "FLEET_PREEMPTION_POLL_S": "0.3",
            "FLEET_PREEMPTION_MARGIN_S": str(MARGIN_S),
            "FLEET_INSTANCE_ID": "i-0spot",
            "FLEET_OFFER": "aws/us-east-1/c7i.large/spot",
        }
        first = spawn_worker(env, "cpu", logs)
        second: LocalWorker | None = None
        try:
            wait_ready(broker.app, [first])
            handle = fleet.submit(sleep_spec(task_s, "spot"))
            wait_started(first, handle.id)
            assert first.proc.poll() is None  # no notice yet: it keeps working
            fake.notice_aws(time.time() + NOTICE_S)
            faults.inject("spot-notice")
            t0 = time.monotonic()
            rc = first.proc.wait(timeout=NOTICE_S + EXIT_MARGIN_S)
            took = time.monotonic() - t0
            assert rc == 0, first.log_tail()
            assert took < task_s  # it did not wait for the task

            [preempted] = events(first, "worker.preempted")
            assert preempted["cloud"] == "aws"
            assert preempted["action"] == "terminate"
            assert preempted["drain_budget_s"] <= NOTICE_S - MARGIN_S
            assert [e["tasks"] for e in events(first, "worker.requeued")] == [[handle.id]]
            # IMDSv2: every GET carried the token the PUT handed out.
            gets = fake.requests("/latest/meta-data/spot/instance-action")
            assert gets
            assert all(r.headers.get("x-aws-ec2-metadata-token") in fake.state.tokens for r in gets)
            assert queue_depths(broker, [handle.placement.queue]) == {handle.placement.queue: 1}

            if broker.settings.is_redis:
                client = redis.Redis.from_url(broker.settings.broker_url)
                [record] = recent_interruptions(client, broker.settings.namespace)
                assert record.instance_id == "i-0spot"
                assert record.offer == "aws/us-east-1/c7i.large/spot"
                assert record.cloud == "aws"
                assert record.hostname == first.node

            calm = {**env, "FLEET_CLOUD": "none"}  # the replacement gets no notice
            second = spawn_worker(calm, "cpu", logs)
            wait_ready(broker.app, [second])
            result = handle.get(timeout=task_s + 30)
            assert result["worker"] == second.node
            assert ran(second, handle.id, "task.finished") == 1
            assert ran(first, handle.id, "task.finished") == 0
            faults.account(submitted=1, completed=1)
        finally:
            stop_workers([w for w in (first, second) if w is not None])
            if broker.settings.is_redis:
                client = redis.Redis.from_url(broker.settings.broker_url)
                for key in client.scan_iter(
                    match=f"{broker.settings.namespace}fleet:interruption:*"
                ):
                    client.delete(key)


def test_an_interrupted_offer_is_replaced_on_another_offer(faults: FaultLedger) -> None:
    """A worker's recorded spot interruption makes the real loop replace the capacity on-demand."""
    with redis_url() as url:
        config = parse_config(FAKE_L4_POOL, env={"FLEET_BROKER_URL": url})
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        scaler = build_autoscaler(config, settings, locked=False)
        fake = scaler.providers["fake"]
        assert isinstance(fake, FakeProvider)
        with Fleet(settings) as client:
            client.submit_many([L4_TASK] * 30)
        first = scaler.step(now=1000.0)
        assert first.plan is not None
        spot = {launch.offer.key for launch in first.plan.launches}
        assert spot == {SPOT_KEY}
        victim = min(fake.instances)
        # What the worker on `victim` does on its notice (workers.preemption), then the cloud
        # takes the machine away.
        record_interruption(
            redis.Redis.from_url(url),
            InterruptionRecord(
                hostname=f"l4-{victim}@fake",
                cloud="gcp",
                action="preempt",
                at=1001.0,
                deadline=1031.0,
                instance_id=victim,
                offer=SPOT_KEY,
            ),
        )
        faults.inject("spot-interruption")
        fake.terminate(victim, 1001.0)
        second = scaler.step(now=1002.0)
        assert second.snapshot is not None
        assert [i.offer.key for i in second.snapshot.interruptions] == [SPOT_KEY]
        assert second.plan is not None
        replacement = second.plan.launches
        assert len(replacement) == 1  # the lost instance, nothing more
        assert {launch.offer.key for launch in replacement} == {
            SPOT_KEY.replace("spot", "on_demand")
        }

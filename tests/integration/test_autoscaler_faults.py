"""Provider faults through the real loop (observe on a real Redis, plan, act) with the fake provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fleet.autoscaler.config import AutoscalerConfig, parse_config
from fleet.autoscaler.loop import Autoscaler, build_autoscaler
from fleet.autoscaler.model import ErrorKind
from fleet.client import Fleet
from fleet.providers.fake import FakeProvider
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = [pytest.mark.integration, pytest.mark.fault]

CONFIG = """
[fleet]
max_launches_per_loop = 3
[[pools]]
name = "l4"
provider = "fake"
accelerator = "nvidia-l4"
price_as = "gcp/us-central1/g2-standard-12"
markets = ["spot", "on_demand"]
max_instances = 3
drain_target_s = 10
scale_out_cooldown_s = 0
capacity_backoff_s = 600
"""
TASK: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "m", "params_b": 8, "dtype": "bf16"},
    "tokens_in": 2000,
    "tokens_out": 500,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


@pytest.fixture
def setup() -> Iterator[tuple[Autoscaler, FakeProvider, Settings]]:
    """An autoscaler over the fake provider and a backlog of 30 L4 tasks on a real Redis."""
    with redis_url() as url:
        config: AutoscalerConfig = parse_config(CONFIG, env={"FLEET_BROKER_URL": url})
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        scaler = build_autoscaler(config, settings, locked=False)
        fake = scaler.providers["fake"]
        assert isinstance(fake, FakeProvider)
        with Fleet(settings) as fleet:
            fleet.submit_many([TASK] * 30)
        yield scaler, fake, settings


def test_capacity_error_falls_back_and_the_offer_is_avoided_for_the_backoff(setup: Any) -> None:
    """Spot has no capacity: the next plan launches on-demand; after the back-off spot is tried again."""
    scaler, fake, _ = setup
    spot_key = "gcp/us-central1/g2-standard-12/spot"
    fake.fail_offers[spot_key] = ErrorKind.CAPACITY
    first = scaler.step(now=1000.0)
    assert first.acted is not None
    assert first.acted.failed
    assert all(e.kind is ErrorKind.CAPACITY for e in first.acted.failed)
    second = scaler.step(now=1001.0)
    assert second.plan is not None
    assert second.plan.launches
    assert {launch.offer.market for launch in second.plan.launches} == {"on_demand"}
    fake.fail_offers.clear()
    for instance_id in list(fake.instances):  # capacity goes away again, so the pool wants more
        fake.terminate(instance_id, 1002.0)
    later = scaler.step(now=1000.0 + 601.0)
    assert later.plan is not None
    assert {launch.offer.market for launch in later.plan.launches} == {"spot"}


def test_throttling_never_multiplies_launches(setup: Any) -> None:
    """While the provider throttles, retries across loops never create more than max_instances."""
    scaler, fake, _ = setup
    fake.throttle_next = 5
    for i in range(8):
        report = scaler.step(now=2000.0 + i)
        assert report.plan is not None
        assert len(report.plan.launches) <= 3  # max_launches_per_loop
    live = list(fake.instances.values())
    assert len(live) <= 3
    tokens = [call.token for call in fake.launch_calls]
    created = {i.token for i in live}
    assert created <= set(tokens)

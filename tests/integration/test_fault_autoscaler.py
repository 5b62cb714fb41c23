"""Autoscaler faults (issue 6, fault 8) on real parts.

* ``kill -9`` of a running ``fleet autoscale`` right after it launched: the instance it
  launched is found by the next autoscaler (the provider's own record is the record), no
  second instance is bought for the same backlog, the work completes once, and scale-in
  leaves nothing behind.
* Provider errors and throttling on every offer, loop after loop: launches per loop stay
  within ``max_launches_per_loop`` and live instances within ``max_instances``.

The budget property (never exceeded whatever the inputs) is a hypothesis test in
``tests/unit/test_planner.py::test_budgets_are_never_broken``, also in this suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.autoscaler.config import parse_config
from fleet.autoscaler.loop import build_autoscaler
from fleet.autoscaler.model import ErrorKind
from fleet.client import Fleet
from fleet.providers.fake import FakeProvider
from fleet.providers.local import LocalProvider
from fleet.settings import Settings
from tests.faults import FaultLedger
from tests.integration.brokers import redis_url

pytestmark = [pytest.mark.integration, pytest.mark.fault]

LOCAL_POOL = """
[fleet]
loop_interval_s = 0.5
lock_ttl_s = 2
launch_grace_s = 600
max_launches_per_loop = 2
local_state_dir = "{state}"

[[pools]]
name = "local-l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
max_instances = 2  # room for a second instance, so a double launch would show
drain_target_s = 600
idle_before_scale_in_s = 2
scale_out_cooldown_s = 0
scale_in_cooldown_s = 0
"""

FAKE_POOLS = """
[fleet]
max_launches_per_loop = 2
[[pools]]
name = "l4"
provider = "fake"
accelerator = "nvidia-l4"
price_as = "gcp/us-central1/g2-standard-12"
markets = ["spot", "on_demand"]
max_instances = 4
drain_target_s = 10
scale_out_cooldown_s = 0
capacity_backoff_s = 0
"""

L4_TASK: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
    "input": {"prompt": "after the crash", "seed": 4},
    "tokens_in": 50,
    "tokens_out": 8,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


@pytest.fixture
def local_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A Redis and the environment a `fleet autoscale` process and its workers get."""
    with redis_url() as url:
        env = {
            **os.environ,
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "FLEET_LOG_FORMAT": "json",
        }
        yield tmp_path, env


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_kill_9_after_launch_leaves_no_orphan_and_no_second_launch(
    local_env: tuple[Path, dict[str, str]], faults: FaultLedger
) -> None:
    """The restarted autoscaler adopts the instance the killed one launched, then scales to zero."""
    tmp, env = local_env
    state = tmp / "state"
    config_path = tmp / "fleet.toml"
    config_path.write_text(LOCAL_POOL.format(state=state))
    settings = Settings.from_env(env)
    with Fleet(settings) as fleet:
        handles = [fleet.submit(dict(L4_TASK, idempotency_key=f"crash-{i}")) for i in range(3)]
    first = subprocess.Popen(
        [sys.executable, "-m", "fleet", "autoscale", "--config", str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: any(state.glob("local-*.json")), 60, "the first launch")
        first.send_signal(signal.SIGKILL)
        faults.inject("autoscaler kill -9 after launch")
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    config = parse_config(config_path.read_text(), env=env)
    scaler = build_autoscaler(config, settings, locked=False)
    provider = scaler.providers["local"]
    assert isinstance(provider, LocalProvider)
    try:
        launched_before = {i.id for i in provider.list_instances(time.time())}  # type: ignore[union-attr]
        assert len(launched_before) == 1, launched_before
        report = scaler.step()
        assert report.plan is not None
        assert not report.plan.launches, "the adopted instance is capacity: nothing more to buy"
        results = [h.get(timeout=120) for h in handles]
        assert {r["task_id"] for r in results} == {h.id for h in handles}
        faults.account(submitted=len(handles), completed=len(results))

        def gone() -> bool:
            scaler.step()
            return not provider.list_instances(time.time())

        _wait(gone, 90, "scale-in to zero")
        assert not list(state.glob("local-*.json")), "no state file (no orphan) is left"
    finally:
        provider.terminate_all(time.time())


@pytest.mark.parametrize("kind", [ErrorKind.CAPACITY, ErrorKind.THROTTLED, ErrorKind.OTHER])
def test_provider_errors_on_every_offer_never_cause_a_launch_storm(
    kind: ErrorKind, faults: FaultLedger
) -> None:
    """Every launch fails for 10 loops: each loop tries at most the cap; then capacity is bounded."""
    with redis_url() as url:
        config = parse_config(FAKE_POOLS, env={"FLEET_BROKER_URL": url})
        settings = Settings.from_env({"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url})
        scaler = build_autoscaler(config, settings, locked=False)
        fake = scaler.providers["fake"]
        assert isinstance(fake, FakeProvider)
        task = dict(L4_TASK, tokens_in=2000, tokens_out=500)
        with Fleet(settings) as fleet:
            fleet.submit_many([task] * 40)
        for offer in (
            "gcp/us-central1/g2-standard-12/spot",
            "gcp/us-central1/g2-standard-12/on_demand",
        ):
            fake.fail_offers[offer] = kind
        calls = 0
        for i in range(10):
            report = scaler.step(now=5000.0 + i)
            assert report.plan is not None
            assert len(report.plan.launches) <= config.fleet.max_launches_per_loop
            assert len(fake.launch_calls) - calls <= config.fleet.max_launches_per_loop
            calls = len(fake.launch_calls)
        faults.inject(f"provider {kind.value} on every launch", 10)
        assert not fake.instances
        fake.fail_offers.clear()
        for i in range(10):
            scaler.step(now=6000.0 + i)
        assert 0 < len(fake.instances) <= 4  # max_instances, not one per failed attempt

"""A CPU worker's task slots: one per device, leased like GPUs, so pool processes run at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.app import create_app
from fleet.client import Fleet
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.brokers import redis_url
from tests.integration.faultkit import sleep_spec

pytestmark = pytest.mark.integration


def test_a_cpu_worker_with_two_devices_runs_two_tasks_at_once_on_distinct_slots(
    tmp_path: Path,
) -> None:
    """--devices 2 --concurrency 2 on cpu: two 1 s tasks hold slots 0 and 1 at the same time.

    Before the fix a cpu worker had one slot whatever ``--devices`` said, so its second pool
    process waited for the first to finish: both reported device 0, one second apart.
    """
    with redis_url() as url:
        env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
        env["FLEET_ARTIFACT_DIR"] = str(tmp_path / "artifacts")
        settings = Settings.from_env(env)
        worker = spawn_worker(env, "cpu", tmp_path, devices=2, concurrency=2)
        try:
            wait_ready(create_app(settings), [worker])
            with Fleet(settings) as fleet:
                handles = fleet.submit_many([sleep_spec(1.0, "a"), sleep_spec(1.0, "b")])
                a, b = (h.get(timeout=60) for h in handles)
        finally:
            stop_workers([worker])
    assert sorted(a["devices"] + b["devices"]) == [0, 1]
    # Each ran its 1 s sleep holding its slot; one after the other they end >= 1 s apart.
    ends = [r["started_at"] + r["run_s"] for r in (a, b)]
    assert abs(ends[0] - ends[1]) < 1.0, (a, b)

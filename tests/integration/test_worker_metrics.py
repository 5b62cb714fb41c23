"""A real worker's metrics endpoint after known work: 20 tasks counted, the queue back at 0."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.app import create_app
from fleet.client import Fleet
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
SPEC = {
    "kind": "inference",
    "model": {"name": "tiny", "params_b": 0.5, "dtype": "bf16"},
    "input": {"prompt": "x"},
    "tokens_in": 10,
    "tokens_out": 3,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_twenty_tasks_on_l4_give_a_counter_of_twenty_and_an_empty_queue(tmp_path: Path) -> None:
    """After 20 tasks on inference.nvidia-l4 the worker reports 20 successes and a queue depth of 0."""
    port = free_port()
    with redis_url() as url:
        env = {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url}
        settings = Settings.from_env(env)
        worker = spawn_worker(env, "nvidia-l4", tmp_path, concurrency=2, metrics_port=port)
        try:
            wait_ready(create_app(settings), [worker])
            with Fleet(settings) as fleet:
                for h in fleet.submit_many([SPEC] * 20):
                    h.get(timeout=60)
            deadline = time.monotonic() + 20
            while True:
                samples = scrape(port)
                count = samples.get(
                    (
                        "fleet_tasks_total",
                        (
                            ("accelerator", "nvidia-l4"),
                            ("kind", "inference"),
                            ("outcome", "success"),
                        ),
                    ),
                    0,
                )
                depth = samples.get(
                    ("fleet_queue_depth", (("queue", "inference.nvidia-l4"), ("state", "ready")))
                )
                if (count == 20 and depth == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            stop_workers([worker])
    assert count == 20
    assert depth == 0
    assert (
        samples[
            (
                "fleet_task_duration_seconds_count",
                (("accelerator", "nvidia-l4"), ("kind", "inference")),
            )
        ]
        == 20
    )

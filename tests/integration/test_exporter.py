"""The standalone exporter against a real Redis broker, scraped over HTTP."""

from __future__ import annotations

import queue
import threading
import time
import urllib.error
import urllib.request

import pytest

from fleet.catalog import default_catalog
from fleet.client import Fleet
from fleet.obs.exporter import run_exporter
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration

SPEC = {
    "kind": "inference",
    "model": {"name": "m", "params_b": 8},
    "tokens_out": 4,
    "requirements": {"accelerators": ["nvidia-l4"]},
}
WANT = 'fleet_queue_depth{queue="inference.nvidia-l4",state="ready"} 5.0'


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_exporter_serves_queue_depth_from_redis(tmp_path):
    """Five queued L4 tasks show as fleet_queue_depth 5 on the exporter's /metrics."""
    with redis_url() as url:
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path),
        }
        settings = Settings.from_env(env)
        with Fleet(settings) as fleet:
            handles = fleet.submit_many([SPEC] * 5)
        assert {h.placement.queue for h in handles} == {"inference.nvidia-l4"}

        stop = threading.Event()
        ports: queue.Queue[int] = queue.Queue()
        thread = threading.Thread(
            target=run_exporter,
            args=(settings, default_catalog(), 0),
            kwargs={"interval_s": 0.2, "stop": stop, "on_listening": ports.put},
            daemon=True,
        )
        thread.start()
        try:
            port = ports.get(timeout=10)
            deadline = time.monotonic() + 10
            body = scrape(port)
            while WANT not in body and time.monotonic() < deadline:
                time.sleep(0.1)
                body = scrape(port)
            assert WANT in body
            assert 'fleet_queue_depth{queue="inference.nvidia-l4",state="unacked"} 0.0' in body
            assert 'fleet_queue_oldest_age_seconds{queue="inference.nvidia-l4"}' in body
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not thread.is_alive()
        with pytest.raises(urllib.error.URLError):  # the server is shut down, its socket closed
            scrape(port)

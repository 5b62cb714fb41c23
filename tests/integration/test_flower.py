"""Flower, started by ``python -m fleet.obs.flower``, sees a real emulated fleet worker and its queues."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from fleet.app import create_app
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
pytest.importorskip("flower", reason="flower is not installed (pip install flower)")

FLOWER_TIMEOUT_S = 30.0
# Flower 2 answers its HTTP API only to authenticated clients (or with
# FLOWER_UNAUTHENTICATED_API=true), so the test uses basic auth, passed the way the launcher
# recommends: in FLOWER_BASIC_AUTH, which Flower reads itself.
AUTH = "fleet-test:not-a-real-secret"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the launcher must refuse it; nothing binds here


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, auth: str) -> object:
    token = base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})  # noqa: S310 - a loopback http URL we built
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - a loopback http URL we built
        return json.loads(resp.read())


@pytest.fixture
def redis_env(tmp_path) -> Iterator[dict[str, str]]:
    with redis_url() as url:
        yield {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_flower_lists_emulated_worker_and_its_queues(redis_env, tmp_path):
    port = _free_port()
    env = {**os.environ, **redis_env, "FLOWER_BASIC_AUTH": AUTH}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    flower_log = tmp_path / "flower.log"
    app = create_app(Settings.from_env(redis_env))
    workers = []
    with flower_log.open("wb") as log:
        flower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet.obs.flower",
                "--port",
                str(port),
                "--address",
                "127.0.0.1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        worker = spawn_worker(redis_env, "nvidia-l4", tmp_path)
        workers.append(worker)
        wait_ready(app, [worker])

        seen: dict = {}
        deadline = time.monotonic() + FLOWER_TIMEOUT_S
        while time.monotonic() < deadline:
            assert flower.poll() is None, flower_log.read_text(errors="replace")
            try:
                seen = _get_json(f"http://127.0.0.1:{port}/api/workers?refresh=1", AUTH)  # type: ignore[assignment]
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                seen = {}
            if worker.node in seen and seen[worker.node].get("active_queues"):
                break
            time.sleep(0.5)
        log_text = flower_log.read_text(errors="replace")
        assert worker.node in seen, f"Flower did not list {worker.node}: {sorted(seen)}\n{log_text}"
        queues = {q["name"] for q in seen[worker.node]["active_queues"]}
        assert "inference.nvidia-l4" in queues, queues
        # The launcher echoes its command with the broker password masked (none here) and
        # Flower runs on fleet's app.
        assert "fleet flower: celery -A fleet.app" in log_text
        assert "not-a-real-secret" not in log_text
        # Without credentials the API stays closed.
        with pytest.raises(urllib.error.HTTPError) as denied:
            _get_json(f"http://127.0.0.1:{port}/api/workers", "fleet-test:wrong")
        assert denied.value.code == 401
    finally:
        _stop(flower)
        stop_workers(workers)
    assert flower.returncode is not None
    for w in workers:
        assert w.proc.returncode is not None


@pytest.mark.fault
def test_flower_launcher_refuses_public_address_without_auth(redis_env, faults):
    faults.inject("flower without auth off loopback")
    env = {**os.environ, **redis_env}
    env.pop("FLOWER_BASIC_AUTH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.obs.flower",
            "--address",
            ALL_INTERFACES,
            "--port",
            str(_free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to start Flower" in result.stderr
    faults.account(submitted=0, completed=0)

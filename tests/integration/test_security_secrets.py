"""Secrets stay out of logs, status output, errors and the result store.

A private Redis with a password (``requirepass``) is the broker and result store; a real
worker runs tasks whose input holds a secret. The broker password and a sensitive task's
input must appear nowhere: the worker's log file, client logs, ``fleet status`` (text and
``--json``), the error a failed task raises in the client, and the result keys read
straight from Redis. A non-sensitive task failing the same way does carry its input in
its error: that is what ``sensitive`` removes, and it shows the search would find it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from fleet.app import create_app
from fleet.cli import main
from fleet.client import Fleet
from fleet.embedded import embedded_redis
from fleet.settings import Settings
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.procs import worker_process

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WAIT_S = float(os.environ.get("FLEET_TEST_BAD_INPUT_WAIT_S", "30"))
PASSWORD = f"s3cr3t-broker-{uuid.uuid4().hex[:10]}"
INPUT_SECRET = f"s3cr3t-input-{uuid.uuid4().hex[:10]}"
PLAIN_SECRET = f"s3cr3t-plain-{uuid.uuid4().hex[:10]}"
EMBED: dict[str, Any] = {
    "kind": "embedding",
    "model": {"name": "hash-embed", "params_b": 0.0227, "dtype": "fp32"},
    "tokens_in": 4,
    "requirements": {"accelerators": ["cpu"]},
}
BATCH: dict[str, Any] = {
    "kind": "batch",
    "model": {"name": "tiny", "params_b": 0.001, "dtype": "fp32"},
    "tokens_in": 1,
    "tokens_out": 1,
    "requirements": {"accelerators": ["cpu"]},
}


@pytest.fixture
def secret_broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Redis that requires PASSWORD; the URLs carry it."""
    with embedded_redis() as plain_url:
        redis.Redis.from_url(plain_url).config_set("requirepass", PASSWORD)
        url = plain_url.replace("redis://", f"redis://:{PASSWORD}@")
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        }
        settings = Settings.from_env(env)
        yield Broker("redis", settings, env, create_app(settings))


def test_secrets_appear_in_no_log_status_error_or_result(
    secret_broker: Broker,
    faults: FaultLedger,
    logs: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker password and a sensitive input are in no log, status, client error or result."""
    broker = secret_broker
    caplog.set_level(logging.INFO)
    faults.inject("secret in input")
    faults.inject("password in broker URL")
    with (
        Fleet(broker.settings, app=broker.app, stats_interval_s=0.2) as fleet,
        worker_process(broker.app, broker.env, "cpu", log_dir=logs) as (proc, node),
    ):
        ok = fleet.submit({**EMBED, "input": {"texts": [INPUT_SECRET]}, "sensitive": True})
        bad = fleet.submit({**BATCH, "input": {"op": INPUT_SECRET}, "sensitive": True})
        plain = fleet.submit({**BATCH, "input": {"op": PLAIN_SECRET}})
        assert ok.get(timeout=WAIT_S)["output"]["embeddings"]
        errors = {}
        for name, handle in (("sensitive", bad), ("plain", plain)):
            with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the task raised
                handle.get(timeout=WAIT_S)
            errors[name] = f"{type(info.value).__name__}: {info.value}"
        for args in (["status"], ["status", "--json"]):
            for key, value in broker.env.items():
                monkeypatch.setenv(key, value)
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            errors[" ".join(args)] = result.output
        assert proc.poll() is None
    worker_log = (logs / f"worker-{node.replace('@', '_')}.log").read_text()
    client_out = capsys.readouterr()
    client_logs = caplog.text + client_out.out + client_out.err
    store = redis.Redis.from_url(broker.settings.result_backend)
    results = b"\n".join(
        store.get(key) or b"" for key in store.scan_iter("celery-task-meta-*")
    ).decode()
    assert bad.id in results, "the failed sensitive task's error is in the store"

    places = {
        "worker log": worker_log,
        "client logs": client_logs,
        "sensitive task error": errors["sensitive"],
        "fleet status": errors["status"],
        "fleet status --json": errors["status --json"],
        "result store": results,
    }
    for where, text in places.items():
        assert PASSWORD not in text, f"broker password in {where}"
        assert INPUT_SECRET not in text, f"sensitive input in {where}"
    assert "details withheld" in errors["sensitive"]
    assert ":***@" in worker_log  # the URL is shown, masked
    assert json.dumps(PLAIN_SECRET)[1:-1] in errors["plain"], "a plain task's error names its input"
    assert PLAIN_SECRET in worker_log  # and its log lines do: the search above would find one
    faults.account(submitted=3, completed=3)

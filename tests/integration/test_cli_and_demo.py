"""The CLI against a real broker, and `make demo`'s entry point end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from tests.integration.conftest import Broker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def fleet_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fleet.cli ARGS`` with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_cli_submit_waits_for_the_result(broker: Broker, tmp_path: Path) -> None:
    """`fleet submit --json --wait` enqueues on the model's queue and prints the real result."""
    spec = {
        "kind": "embedding",
        "model": {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"},
        "input": {"texts": ["spot is cheap", "on-demand is not"]},
        "tokens_in": 8,
        "requirements": {"accelerators": ["cpu"]},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**broker.env, "HF_HUB_OFFLINE": "1"}
    worker = spawn_worker(env, "cpu", tmp_path, engine="transformers", models=("all-minilm-l6-v2",))
    try:
        wait_ready(broker.app, [worker], timeout_s=180)
        out = fleet_cli(env, "submit", str(path), "--json", "--wait", "120")
    finally:
        stop_workers([worker])
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["queue"] == f"{broker.settings.namespace}embedding.cpu@all-minilm-l6-v2"
    assert row["result"]["engine"]["name"] == "transformers"
    assert row["result"]["output"]["dim"] == 384
    assert len(row["result"]["output"]["embeddings"]) == 2


def test_cli_submit_refuses_bad_input_without_touching_the_broker(tmp_path: Path) -> None:
    """An invalid spec exits 2 naming the field, even with no broker reachable at all."""
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps({"kind": "inference", "model": {"name": "x", "params_b": 8}, "priority": 12})
    )
    out = fleet_cli({"FLEET_BROKER_URL": "redis://:secretpw@127.0.0.1:1/0"}, "submit", str(path))
    assert out.returncode == 2
    assert "priority" in out.stderr
    assert "secretpw" not in out.stderr + out.stdout


def test_cli_submit_reports_an_unreachable_broker_without_the_password(tmp_path: Path) -> None:
    """A valid spec with no broker exits 1, and the message masks the URL's password."""
    path = tmp_path / "ok.json"
    path.write_text((ROOT / "examples" / "embed-minilm.json").read_text())
    env = {"FLEET_BROKER_URL": "redis://:secretpw@127.0.0.1:1/0"}
    out = fleet_cli(env, "submit", str(path), timeout=180)
    assert out.returncode == 1
    assert "secretpw" not in out.stderr + out.stdout
    assert "***" in out.stderr


def test_demo_runs_end_to_end_on_its_own_redis() -> None:
    """`fleet demo` with no broker configured starts its own, runs every task and stops cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # Real engines: MiniLM and tiny-llama on transformers; the big models on reference workers.
    text = " ".join(out.stdout.split())
    assert "transformers" in text
    assert "all-minilm-l6-v2" in text
    assert "tiny-llama" in text
    assert "random" in text  # tiny-llama's weights, said in every row it made
    assert "reference handler" in text
    assert "throwaway Redis" in out.stdout
    assert "(emulated)" in out.stdout
    assert "judge (405B bf16)" in out.stdout
    assert "nvidia-h200.x8" in out.stdout
    assert "cheaper" in out.stdout
    assert "queues still holding work: 0" in out.stdout
    # The multi-agent workflow: steps placed one by one, one of them on an API pool
    # served by the EMULATED OpenAI-compatible server, at least three families in all.
    assert "workflow incident-triage" in out.stdout
    assert "EMULATED OpenAI-compatible" in " ".join(out.stdout.split())
    assert "api-groq (emulated)" in out.stdout
    families = re.search(r"workflow done on (\d+) accelerator families", out.stdout)
    assert families is not None, out.stdout[-3000:]
    assert int(families[1]) >= 3
    # The autoscaling phase: local pools scale from zero and back to zero.
    assert "local-l4: 0 ->" in out.stdout
    assert "-> 0 instances" in out.stdout
    assert "30/30 tasks done" in out.stdout
    assert "scaled back to 0 by the autoscaler" in out.stdout
    assert "metrics while it runs: http://127.0.0.1:" in out.stdout
    assert "make flower" in out.stdout


def test_cli_bulk_submit_is_all_or_nothing(broker: Broker, tmp_path: Path) -> None:
    """A JSON-lines file is submitted in one go; one unplaceable line sends nothing at all."""
    good = {
        "kind": "inference",
        "model": {"name": "m", "params_b": 8},
        "tokens_out": 4,
        "requirements": {"accelerators": ["nvidia-l4"]},
    }
    bad = {"kind": "inference", "model": {"name": "huge", "params_b": 3000}, "tokens_out": 4}
    ok_file = tmp_path / "ok.jsonl"
    ok_file.write_text("\n".join(json.dumps(good) for _ in range(3)) + "\n")
    out = fleet_cli(broker.env, "submit", str(ok_file), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 3
    queue = rows[0]["queue"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    refused = fleet_cli(broker.env, "submit", str(mixed))
    assert refused.returncode == 2
    from tests.integration.test_end_to_end import purge, queue_depths  # noqa: PLC0415

    try:
        assert queue_depths(broker, [queue])[queue] == 3  # only the first file's tasks
    finally:
        purge(broker, [queue])

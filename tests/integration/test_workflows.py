"""Workflows on real brokers and real emulated workers: placed step by step, run on Celery canvas.

Two emulated chips (``nvidia-l4`` and ``cpu``) and an API worker for ``groq`` (forwarding
to fleet's EMULATED OpenAI-compatible server, started here) serve every test of a broker. The join
(a chord) needs a result backend with chords, so on RabbitMQ these tests keep Redis as
the result backend; the default ``rpc://`` backend runs linear workflows
(``test_linear_workflow_on_the_default_rpc_backend``) and refuses joins before publishing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from fleet.app import create_app
from fleet.catalog import default_catalog
from fleet.catalog.apis import api_key_env, base_url_env, routing_apis
from fleet.client import Fleet
from fleet.emulated.openai_server import EmulatedOpenAIServer
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.settings import Settings
from fleet.workflow import WorkflowError, WorkflowStepError, parse_workflow
from tests.integration.brokers import rabbitmq_namespace, redis_url
from tests.integration.conftest import Broker

pytestmark = pytest.mark.integration

RESULT_TIMEOUT_S = float(os.environ.get("FLEET_TEST_WORKFLOW_TIMEOUT_S", "30"))
L4 = {"accelerators": ["nvidia-l4"]}
CPU = {"accelerators": ["cpu"]}
LLAMA_8B = {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"}


@dataclass(frozen=True)
class Rig:
    """A broker with a chord-capable result backend and two emulated workers on it."""

    kind: str
    settings: Settings
    app: Celery
    workers: tuple[LocalWorker, ...]


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Redis, or RabbitMQ with results in Redis; L4, CPU and API (groq) workers, started together."""
    log_dir = tmp_path_factory.mktemp("workflow-logs")
    with ExitStack() as stack:
        endpoint = stack.enter_context(EmulatedOpenAIServer(api_key="test-key-not-secret"))
        backend = stack.enter_context(redis_url())
        if request.param == "redis":
            broker, namespace = backend, ""
        else:
            broker, namespace = stack.enter_context(rabbitmq_namespace())
        env = {
            "FLEET_BROKER_URL": broker,
            "FLEET_RESULT_BACKEND": backend,
            "FLEET_NAMESPACE": namespace,
            "FLEET_ARTIFACT_DIR": str(tmp_path_factory.mktemp("artifacts")),
            base_url_env("groq"): endpoint.base_url,
            api_key_env("groq"): "test-key-not-secret",
        }
        settings = Settings.from_env(env)
        app = create_app(settings)
        workers = [spawn_worker(env, acc, log_dir) for acc in ("nvidia-l4", "cpu")]
        workers.append(spawn_worker(env, "api", log_dir, api="groq", pool="threads", concurrency=2))
        try:
            wait_ready(app, workers)
            yield Rig(request.param, settings, app, tuple(workers))
        finally:
            stop_workers(workers)


@pytest.fixture
def client(rig: Rig) -> Iterator[Fleet]:
    """A client on the rig's broker."""
    with Fleet(rig.settings, app=rig.app, stats_interval_s=0.2) as fleet:
        yield fleet


def diamond(wid: str, middle_op: str = "echo") -> dict[str, Any]:
    """A diamond: draft (L4) -> quote (CPU, echoes the draft) and index (CPU) -> judge (L4)."""
    return {
        "id": wid,
        "steps": [
            {"id": "draft", "kind": "inference", "model": LLAMA_8B, "requirements": L4,
             "input": {"prompt": "the queue", "seed": 3}, "tokens_in": 100, "tokens_out": 12},
            {"id": "quote", "after": ["draft"], "kind": "batch", "model": LLAMA_8B,
             "requirements": CPU, "tokens_in": 50, "tokens_out": 10,
             "input": {"op": middle_op, "payload": {"$join": ["draft said: ", {"$from": "draft", "path": "text"}]}}},
            {"id": "index", "after": ["draft"], "kind": "embedding", "requirements": CPU,
             "model": {"name": "hash-embed", "params_b": 0.0227, "dtype": "fp32"},
             "input": {"texts": [{"$from": "draft", "path": "text"}]}, "tokens_in": 20},
            {"id": "judge", "after": ["quote", "index"], "kind": "batch", "model": LLAMA_8B,
             "requirements": L4, "tokens_in": 50, "tokens_out": 10,
             "input": {"op": "echo", "payload": {"quoted": {"$from": "quote", "path": "payload"},
                                                 "dim": {"$from": "index", "path": "dim"}}}},
        ],
    }  # fmt: skip


def test_diamond_workflow_threads_outputs_across_chips(rig: Rig, client: Fleet) -> None:
    """Each step runs where it was placed; outputs flow downstream; every step has its cost."""
    workflow = parse_workflow(diamond("wf-diamond"))
    run = client.submit_workflow(workflow)
    placed = {p.step.id: p.placement.accelerator for p in run.steps}
    assert placed == {"draft": "nvidia-l4", "quote": "cpu", "index": "cpu", "judge": "nvidia-l4"}

    result = run.get(timeout=RESULT_TIMEOUT_S)

    records = {r["step_id"]: r for r in result["steps"]}
    assert list(records) == ["draft", "quote", "index", "judge"]
    assert {sid: r["accelerator"] for sid, r in records.items()} == placed
    assert all(r["workflow_id"] == "wf-diamond" for r in records.values())
    assert records["draft"]["emulated"]  # an L4 here is a CPU process standing in for one
    draft_text = records["draft"]["output"]["text"]
    assert draft_text
    assert records["quote"]["output"]["payload"] == f"draft said: {draft_text}"
    assert result["output"]["payload"] == {
        "quoted": f"draft said: {draft_text}",
        "dim": records["index"]["output"]["dim"],
    }
    for planned in run.steps:
        record = records[planned.step.id]
        assert record["task_id"] == planned.task_id
        assert record["estimated_cost_usd"] == pytest.approx(planned.placement.estimated_cost_usd)
        assert record["estimated_cost_usd"] > 0
    assert result["estimated_cost_usd"] == pytest.approx(
        sum(p.placement.estimated_cost_usd for p in run.steps)
    )
    assert result["actual_cost_usd"] is None  # emulated chips bill by the hour, not per call


def test_failing_middle_step_fails_the_workflow_and_stops_later_steps(
    rig: Rig, client: Fleet
) -> None:
    """A step that fails on its worker fails the workflow naming both ids; its dependants never run."""
    workflow = parse_workflow(diamond("wf-broken", middle_op="explode"))
    run = client.submit_workflow(workflow)

    with pytest.raises(WorkflowStepError) as failure:
        run.get(timeout=RESULT_TIMEOUT_S)

    assert failure.value.workflow_id == "wf-broken"
    assert failure.value.step_id == "quote"
    assert "wf-broken" in str(failure.value)
    assert "quote" in str(failure.value)
    assert "input.op" in str(failure.value)
    judge = run.steps_by_id["judge"].task_id
    assert run.states()["judge"] != "SUCCESS"
    assert run.states()["draft"] == "SUCCESS"
    logs = "".join(Path(w.log_path).read_text(errors="replace") for w in rig.workers)
    assert run.steps_by_id["draft"].task_id in logs  # a step that ran is in a worker's log
    assert judge not in logs  # the judge step never reached a worker


def test_unplaceable_step_publishes_nothing(client: Fleet) -> None:
    """A step nothing can run is refused before the canvas is sent, naming workflow and step."""
    from fleet.placement import NoPlacementError  # noqa: PLC0415

    data = diamond("wf-too-big")
    data["steps"][3]["model"] = {"name": "giant", "params_b": 4000, "dtype": "bf16"}
    with pytest.raises(NoPlacementError, match="workflow wf-too-big: step judge"):
        client.submit_workflow(parse_workflow(data))


def test_linear_workflow_on_the_default_rpc_backend(broker: Broker, logs: Path) -> None:
    """With the broker's default backend (rpc:// on RabbitMQ) a chain runs; a join is refused."""
    linear = {
        "id": "wf-linear",
        "steps": [
            {"id": "one", "kind": "batch", "model": LLAMA_8B, "requirements": CPU,
             "input": {"op": "echo", "payload": "first"}},
            {"id": "two", "after": ["one"], "kind": "batch", "model": LLAMA_8B,
             "requirements": CPU,
             "input": {"op": "echo", "payload": {"$join": [{"$from": "one", "path": "payload"}, "+second"]}}},
        ],
    }  # fmt: skip
    with (
        Fleet(broker.settings, app=broker.app, stats_interval_s=0.2) as fleet,
        ExitStack() as stack,
    ):
        if broker.kind == "rabbitmq":
            with pytest.raises(WorkflowError, match="rpc://"):
                fleet.submit_workflow(parse_workflow(diamond("wf-join")))
        worker = spawn_worker(broker.env, "cpu", logs)
        stack.callback(stop_workers, [worker])
        wait_ready(broker.app, [worker])
        result = fleet.submit_workflow(parse_workflow(linear)).get(timeout=RESULT_TIMEOUT_S)
    assert result["output"]["payload"] == "first+second"
    assert [r["step_id"] for r in result["steps"]] == ["one", "two"]


def test_workflow_with_an_api_step_records_its_billed_cost(rig: Rig) -> None:
    """An API step (emulated endpoint) feeds a CPU step and an L4 step: three families, one API pool."""
    data = diamond("wf-api")
    data["steps"][0] = {
        "id": "draft", "kind": "inference", "model": LLAMA_8B,
        "requirements": {"accelerators": ["api-groq"]},
        "input": {"prompt": "name three queues"}, "tokens_in": 20, "tokens_out": 8,
    }  # fmt: skip
    catalog = routing_apis(default_catalog())  # as a config with [[api_pools]] does
    with Fleet(rig.settings, app=rig.app, catalog=catalog, stats_interval_s=0.2) as fleet:
        run = fleet.submit_workflow(parse_workflow(data))
        result = run.get(timeout=RESULT_TIMEOUT_S)

    records = {r["step_id"]: r for r in result["steps"]}
    assert {r["accelerator"] for r in records.values()} == {"api-groq", "cpu", "nvidia-l4"}
    draft = records["draft"]
    assert draft["queue"].endswith("inference.api-groq")
    assert draft["output"]["emulated"] is True  # fleet's emulated endpoint, not a real provider
    assert draft["actual_cost_usd"] > 0
    assert result["actual_cost_usd"] == pytest.approx(draft["actual_cost_usd"])
    assert records["quote"]["output"]["payload"] == f"draft said: {draft['output']['text']}"


def _cli(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLEET_BROKER_URL": rig.settings.broker_url,
        "FLEET_RESULT_BACKEND": rig.settings.result_backend,
        "FLEET_NAMESPACE": rig.settings.namespace,
    }
    return subprocess.run(  # our own CLI, fixed arguments
        [sys.executable, "-m", "fleet", *args], env=env, capture_output=True, text=True,
        timeout=RESULT_TIMEOUT_S + 30, check=False,
    )  # fmt: skip


def test_cli_submits_a_workflow_file_and_reports_each_step(rig: Rig, tmp_path: Path) -> None:
    """`fleet submit --workflow F --wait S --json`: placements, then per-step results and costs."""
    path = tmp_path / "diamond.json"
    path.write_text(json.dumps(diamond("wf-cli")))

    done = _cli(rig, "submit", "--workflow", str(path), "--wait", str(RESULT_TIMEOUT_S), "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [s["step"] for s in report["steps"]] == ["draft", "quote", "index", "judge"]
    assert {s["step"]: s["queue"] for s in report["steps"]}["quote"].endswith("batch.cpu")
    steps = report["result"]["steps"]
    assert [r["step_id"] for r in steps] == ["draft", "quote", "index", "judge"]
    assert all(r["estimated_cost_usd"] > 0 for r in steps)


def test_cli_names_the_failed_step_and_exits_1(rig: Rig, tmp_path: Path) -> None:
    """A failing step: exit status 1 and a message naming the workflow and the step."""
    path = tmp_path / "broken.yaml"
    path.write_text(json.dumps(diamond("wf-cli-broken", middle_op="explode")))

    done = _cli(rig, "submit", "--workflow", str(path), "--wait", str(RESULT_TIMEOUT_S))

    assert done.returncode == 1
    assert "workflow wf-cli-broken: step quote failed" in " ".join(done.stderr.split())

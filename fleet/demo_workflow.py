"""The demo's multi-agent workflow: four steps, each placed on its own, one on an API pool.

``plan`` (a 70B planner) feeds ``research`` (an 8B call on the Groq API pool, served
here by fleet's EMULATED OpenAI-compatible server, never the real provider) and
``index`` (embeddings of the plan); ``judge`` (an 8B agent call) reads both. The chip
steps run on the demo's emulated workers; the API step on an API worker started here.
Each step's placement, its estimated cost and, for the API step, the cost billed from
the tokens the endpoint reported are printed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleet.catalog.apis import api_key_env, base_url_env, routing_apis
from fleet.client import Fleet
from fleet.emulated.openai_server import EmulatedOpenAIServer
from fleet.localworkers import spawn_worker, stop_workers, wait_ready
from fleet.workflow import Workflow, parse_workflow
from fleet.workflow_run import place_steps

API_PROVIDER = "groq"
RESULT_TIMEOUT_S = 60.0
# Only ever sent to the local EMULATED endpoint; a real key would come from the environment.
DEMO_KEY = "emulated-demo-key"


def agent_workflow() -> Workflow:
    """The workflow: plan -> research (API pool) and index -> judge."""
    llama8 = {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"}
    plan_text = {"$from": "plan", "path": "text"}
    chips = {"external_apis": False}  # the chip steps stay on the demo's emulated workers
    return parse_workflow(
        {
            "id": "incident-triage",
            "steps": [
                {"id": "plan", "kind": "inference",
                 "model": {"name": "llama-3.3-70b-instruct", "params_b": 70, "dtype": "fp8"},
                 "input": {"prompt": "a plan for the incident", "seed": 11},
                 "tokens_in": 3000, "tokens_out": 48, "slo": {"deadline_s": 120}, "requirements": chips},
                {"id": "research", "after": ["plan"], "kind": "inference", "model": llama8,
                 "requirements": {"accelerators": [f"api-{API_PROVIDER}"]},
                 "input": {"prompt": {"$join": ["find evidence for: ", plan_text]}},
                 "tokens_in": 80, "tokens_out": 16, "slo": {"deadline_s": 10}},
                {"id": "index", "after": ["plan"], "kind": "embedding",
                 "model": {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"},
                 "input": {"texts": [plan_text]}, "tokens_in": 60,
                 "requirements": {**chips, "runtimes": ["cuda", "rocm", "cpu"]}},
                {"id": "judge", "after": ["research", "index"], "kind": "inference",
                 "model": llama8,
                 "input": {"prompt": {"$join": ["judge: ", {"$from": "research", "path": "text"}]},
                           "seed": 5},
                 "tokens_in": 600, "tokens_out": 24, "slo": {"deadline_s": 30}, "priority": 5,
                 "requirements": chips},
            ],
        }
    )  # fmt: skip


def api_routing(fleet: Fleet) -> Fleet:
    """A client like ``fleet`` whose placement also considers the catalog's API pools."""
    return Fleet(fleet.settings, app=fleet.app, catalog=routing_apis(fleet.catalog))


def chip_queues(fleet: Fleet, workflow: Workflow) -> list[str]:
    """The queues of the workflow's chip steps (the demo starts workers for them)."""
    with api_routing(fleet) as api_fleet:
        planned = place_steps(workflow, api_fleet.route)
    return [p.placement.queue for p in planned if not p.placement.accelerator.startswith("api-")]


@contextlib.contextmanager
def api_worker(fleet: Fleet, env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """The EMULATED endpoint and one API worker forwarding to it; yields the endpoint's URL."""
    with EmulatedOpenAIServer(api_key=DEMO_KEY) as endpoint:
        api_env = {
            **env,
            base_url_env(API_PROVIDER): endpoint.base_url,
            api_key_env(API_PROVIDER): DEMO_KEY,
        }
        worker = spawn_worker(api_env, "api", log_dir, api=API_PROVIDER, pool="threads",
                              concurrency=2, loglevel="WARNING")  # fmt: skip
        try:
            wait_ready(fleet.app, [worker])
            yield endpoint.base_url
        finally:
            stop_workers([worker])


def workflow_phase(fleet: Fleet, env: dict[str, str], log_dir: Path, console: Console) -> None:
    """Run the multi-agent workflow and print where each step went, what it cost, what it said."""
    workflow = agent_workflow()
    with (
        api_worker(fleet, env, log_dir) as url,
        api_routing(fleet) as api_fleet,
    ):
        console.print(
            f"\n[bold]workflow[/] {workflow.id}: {len(workflow.steps)} steps, each placed on its own "
            f"(API pool api-{API_PROVIDER} served by the EMULATED OpenAI-compatible server at {url})"
        )
        api_fleet.refresh_stats()
        run = api_fleet.submit_workflow(workflow)
        placed = Table("step", "after", "queue", "accelerator", "est. $", title="workflow steps")
        for p in run.steps:
            placed.add_row(p.step.id, ",".join(p.step.after), p.placement.queue,
                           p.placement.accelerator, f"{p.placement.estimated_cost_usd:.6f}")  # fmt: skip
        console.print(placed)
        result = run.get(timeout=RESULT_TIMEOUT_S)
    done = Table("step", "ran on", "est. $", "billed $", "output", title="workflow results")
    for r in result["steps"]:
        output = r["output"]
        emulated = r.get("emulated") or output.get("emulated")
        billed = r.get("actual_cost_usd")
        summary = output.get("text") or f"{len(output.get('embeddings', []))} vectors"
        done.add_row(r["step_id"], f"{r['accelerator']}{' (emulated)' if emulated else ''}",
                     f"{r['estimated_cost_usd']:.6f}", "" if billed is None else f"{billed:.6f}",
                     str(summary)[:48])  # fmt: skip
    console.print(done)
    families = sorted({r["accelerator"] for r in result["steps"]})
    console.print(
        f"workflow done on {len(families)} accelerator families ({', '.join(families)}): "
        f"estimated ${result['estimated_cost_usd']:.6f}"
        + (f", API billed ${result['actual_cost_usd']:.6f}" if result["actual_cost_usd"] else "")
    )

"""``make demo``: the whole path of a mixed workload, on a throwaway broker, in under two minutes.

1. Uses ``FLEET_BROKER_URL`` when set, else starts a private Redis on a free port.
2. Routes a multi-agent workload (MiniLM embeddings, tiny-llama agent calls, a 70B call, a
   405B-class call, a tiny-llama LoRA fine-tune) and starts, for each accelerator chosen,
   workers on this CPU: a ``transformers`` engine worker holding the registry models its
   queues need (real MiniLM weights; tiny-llama, whose weights are random), and a
   ``reference`` worker for the models no engine here can hold (70B, 405B). Workers standing
   in for a chip this machine lacks are EMULATED and say so; reference output says so too.
3. Submits everything in one batch, prints where each task went and why, what each engine
   returned, and the estimated cost against running the same work on on-demand H100s
   (AWS p5).
3b. Runs a multi-agent workflow (``fleet.demo_workflow``) whose steps are placed one by
   one, on three chip families and one API pool served by the EMULATED OpenAI-compatible
   server, printing each step's placement and cost.
4. Stops every process it started, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fleet.client import Fleet, TaskHandle
from fleet.demo_workflow import agent_workflow, chip_queues, workflow_phase
from fleet.embedded import embedded_redis
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.placement import NoPlacementError, Policy, place
from fleet.queues import parse_queue
from fleet.settings import Settings, masked
from fleet.spec import TaskSpec, parse_spec
from fleet.status import collect

console = Console(width=None if sys.stdout.isatty() else 132)
RESULT_TIMEOUT_S = 120.0
ENGINE_READY_S = 240.0  # engine workers import torch and load their models before consuming

TEXTS = [
    "spot capacity is cheaper than on-demand capacity",
    "on-demand instances cost more but are not interrupted",
    "the cat sat on the mat",
]


def workload() -> list[tuple[str, dict[str, Any]]]:
    """The demo's multi-agent pipeline: (step name, TaskSpec JSON)."""
    minilm = {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"}
    tiny = {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"}
    steps: list[tuple[str, dict[str, Any]]] = [
        (
            f"embed docs {i}",
            {
                "kind": "embedding",
                "model": minilm,
                "input": {"texts": TEXTS},
                "tokens_in": 40,
                # chips whose runtime the transformers engine serves (a TPU would need vLLM)
                "requirements": {"runtimes": ["cuda", "rocm", "cpu"]},
            },
        )
        for i in range(3)
    ]
    steps += [
        (
            f"agent call {i} (tiny-llama)",
            {
                "kind": "inference",
                "model": tiny,
                "input": {"prompt": f"Agent {i}: the queue on the cluster", "temperature": 0},
                "tokens_in": 12,
                "tokens_out": 24,
                "slo": {"deadline_s": 30},
                "priority": 5,
                # an emulated L4 running the real engine on this CPU
                "requirements": {"accelerators": ["nvidia-l4"]},
            },
        )
        for i in range(4)
    ]
    steps += [
        (
            "planner (70B)",
            {
                "kind": "inference",
                "model": {"name": "llama-3.3-70b-instruct", "params_b": 70, "dtype": "fp8"},
                "input": {"prompt": "a plan for the cluster", "seed": 11},
                "tokens_in": 3000,
                "tokens_out": 48,
                "slo": {"deadline_s": 120},
            },
        ),
        (
            "judge (405B bf16)",
            {
                "kind": "inference",
                "model": {"name": "llama-3.1-405b-instruct", "params_b": 405, "dtype": "bf16"},
                "input": {"prompt": "the final answer", "seed": 5},
                "tokens_in": 4000,
                "tokens_out": 32,
                "slo": {"deadline_s": 300},
            },
        ),
        (
            "fine-tune (tiny-llama LoRA)",
            {
                "kind": "fine_tune",
                "model": tiny,
                "input": {"steps": 20, "seed": 2},
                "tokens_in": 20_000,
                "budget": {"max_usd": 5},
                "requirements": {"accelerators": ["nvidia-l4"]},
            },
        ),
    ]
    return steps


def h100_baseline(spec: TaskSpec) -> TaskSpec:
    """The same task pinned to on-demand H100s on AWS (p5): what a homogeneous fleet pays."""
    data = spec.model_dump(mode="json")
    data["requirements"] = {
        "accelerators": ["nvidia-h100"],
        "clouds": ["aws"],
        "markets": ["on_demand"],
    }
    data["slo"] = {}
    data["budget"] = {}
    return parse_spec(data)


@contextlib.contextmanager
def broker_url() -> Iterator[str]:
    """FLEET_BROKER_URL when configured, else a throwaway Redis."""
    configured = os.environ.get("FLEET_BROKER_URL")
    if configured:
        console.print(f"broker: {masked(configured)} (FLEET_BROKER_URL)")
        yield configured
        return
    with embedded_redis() as url:
        console.print(f"broker: throwaway Redis at {url} (no FLEET_BROKER_URL configured)")
        yield url


@dataclass
class WorkerPlan:
    """One worker the demo starts: where, how many devices, which engine and models."""

    accelerator: str
    engine: str
    devices: int = 1
    models: set[str] = field(default_factory=set)


def plan_workers(queues: Iterable[str]) -> list[WorkerPlan]:
    """The workers that serve ``queues``, one per accelerator and engine.

    A transformers worker for model queues (holding the models of its inference and
    embedding queues; training loads on demand), a reference worker for plain queues.
    """
    plans: dict[tuple[str, str], WorkerPlan] = {}
    for name in queues:
        ref = parse_queue(name)
        if ref is None:
            continue
        engine = "reference" if ref.model is None else "transformers"
        plan = plans.setdefault((ref.accelerator, engine), WorkerPlan(ref.accelerator, engine))
        plan.devices = max(plan.devices, ref.devices)
        if ref.model is not None and (
            ref.kind.value in ("inference", "embedding") or not plan.models
        ):
            plan.models.add(ref.model)
    return sorted(plans.values(), key=lambda p: (p.accelerator, p.engine))


@contextlib.contextmanager
def demo_workers(
    fleet: Fleet, env: dict[str, str], plans: list[WorkerPlan], log_dir: Path
) -> Iterator[list[LocalWorker]]:
    """Start the planned workers (engine workers load their models before they consume)."""
    workers: list[LocalWorker] = []
    try:
        workers.extend(
            spawn_worker(env, p.accelerator, log_dir, devices=p.devices, loglevel="WARNING",
                         engine=p.engine, models=tuple(sorted(p.models)))
            for p in plans
        )  # fmt: skip
        wait_ready(fleet.app, workers, timeout_s=ENGINE_READY_S)
        yield workers
    finally:
        stop_workers(workers)


def _summary(output: dict[str, Any]) -> str:
    kind = output.get("kind")
    if kind == "embedding":
        return f"{len(output['embeddings'])} vectors of dim {output['dim']}"
    if kind == "inference":
        return f"{str(output['text'])[:40]!r}"
    if kind in ("fine_tune", "training"):
        where = output.get("artifact") or output.get("checkpoint")
        return f"loss {output['loss_first']:.3f} -> {output['loss_last']:.3f}; {Path(str(where)).name} written"
    return str(output)[:60]


def _made_by(r: dict[str, Any]) -> str:
    engine = r.get("engine") or {}
    if r.get("reference", True):
        return "reference handler (NOT a real model)"
    model = r.get("model") or {}
    note = "" if model.get("pretrained") else ", random weights"
    speed = f", {r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""
    version = str(engine.get("version") or engine.get("name")).split(" (", 1)[0]
    return f"{version}: {model.get('name')}{note}{speed}"


def _print_routes(named: list[tuple[str, TaskSpec]], handles: list[TaskHandle]) -> None:
    table = Table(
        "step", "queue", "offer the estimate uses", "why", "est. $", title="where each task went"
    )
    for (name, _), h in zip(named, handles, strict=True):
        p = h.placement
        table.add_row(
            name,
            p.queue,
            f"{p.offer.cloud} {p.offer.instance_type} {p.offer.market.value}",
            p.reasons[0],
            f"{p.estimated_cost_usd:.6f}",
        )
    console.print(table)


def _print_results(named: list[tuple[str, TaskSpec]], handles: list[TaskHandle]) -> None:
    table = Table("step", "ran on", "made by", "result", title="results")
    for (name, _), h in zip(named, handles, strict=True):
        r = h.get(timeout=RESULT_TIMEOUT_S)
        tag = " (emulated)" if r["emulated"] else ""
        table.add_row(
            name,
            f"{r['accelerator']}{tag} x{len(r['devices'])}",
            _made_by(r),
            _summary(r["output"]),
        )
    console.print(table)


def _print_costs(
    fleet: Fleet, named: list[tuple[str, TaskSpec]], handles: list[TaskHandle]
) -> None:
    ours = baseline = 0.0
    missing: list[str] = []
    for (name, spec), h in zip(named, handles, strict=True):
        try:
            base = place(h100_baseline(spec), fleet.catalog, None, Policy.COST)
        except NoPlacementError as exc:
            reason = next(
                (r.reason for r in exc.rejected if r.accelerator == "nvidia-h100"), str(exc)
            )
            missing.append(f"{name}: cannot run on H100s ({reason})")
            continue
        ours += h.placement.estimated_cost_usd
        baseline += base.estimated_cost_usd
    console.print(
        f"\nestimated cost of the tasks both fleets can run: fleet ${ours:.6f} vs on-demand H100 (AWS p5) ${baseline:.6f}"
        + (f"  ->  {baseline / ours:.1f}x cheaper" if ours > 0 else "")
    )
    for line in missing:
        console.print(f"  not comparable: {line}")
    console.print(
        "  (estimates from the catalog's prices and the throughput model; the workers here run on this CPU, so their wall time says nothing about the chips)"
    )


CONFIG = Path(__file__).resolve().parents[1] / "infra" / "fleet.toml"
AUTOSCALE_TIMEOUT_S = 100.0


def autoscale_phase(settings: Settings, state_dir: Path) -> None:
    """Show the autoscaler scaling local emulated pools from zero and back to zero."""
    from fleet.autoscaler.config import load_config  # noqa: PLC0415 - demo-only imports
    from fleet.autoscaler.loop import build_autoscaler  # noqa: PLC0415
    from fleet.cli_ops import record_step  # noqa: PLC0415
    from fleet.obs.metrics import FleetMetrics  # noqa: PLC0415

    base = load_config(CONFIG, env={})
    fleet_cfg = base.fleet.model_copy(
        update={
            "broker_url": settings.broker_url,
            "local_state_dir": str(state_dir),
            "loop_interval_s": 1.0,
        }
    )
    config = base.model_copy(update={"fleet": fleet_cfg})
    with Fleet(settings) as fleet:
        scaler = build_autoscaler(config, settings, locked=True)
        metrics = FleetMetrics()
        server, _thread = metrics.serve(0)
        port = server.server_port
        console.print(
            f"metrics while it runs: http://127.0.0.1:{port}/metrics\n"
            f"Flower on this broker: FLEET_BROKER_URL={masked(settings.broker_url)} make flower"
        )
        provider_of = {p.name: p.provider for p in scaler.config.pools}
        console.print(
            f"\n[bold]autoscaling[/] with {CONFIG.name}: local pools {', '.join(p.name for p in scaler.config.pools)} "
            f"(cloud pools skipped here: {', '.join(scaler.skipped)})"
        )
        chat = {
            "kind": "inference",
            "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
            "tokens_in": 200,
            "tokens_out": 24,
            "requirements": {"accelerators": ["nvidia-l4"]},
        }
        embed = {
            "kind": "embedding",
            "model": {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"},
            "input": {"texts": TEXTS},
            "tokens_in": 40,
            "requirements": {"accelerators": ["cpu"]},
        }
        handles = fleet.submit_many(
            [{**chat, "input": {"prompt": "the fleet", "seed": i}} for i in range(24)] + [embed] * 6
        )
        console.print(
            f"submitted {len(handles)} tasks to queues with no workers: {', '.join(sorted({h.placement.queue for h in handles}))}"
        )
        started = time.monotonic()
        peak: dict[str, int] = {}
        drained = False
        provider = scaler.providers["local"]
        try:
            while time.monotonic() - started < AUTOSCALE_TIMEOUT_S:
                report = scaler.step()
                if report.active:
                    record_step(metrics, report, provider_of)
                for d in report.plan.decisions if report.plan else ():
                    peak[d.pool] = max(peak.get(d.pool, 0), d.current + len(d.launches))
                    if d.launches or d.terminations:
                        console.print(
                            f"  t=+{time.monotonic() - started:4.1f}s {d.pool}: {d.current} -> {d.desired} instances, "
                            f"${d.usd_per_hour_before:.3g}/h -> ${d.usd_per_hour_after:.3g}/h ({d.reasons[0]})"
                        )
                done = sum(h.state == "SUCCESS" for h in handles)
                if done == len(handles) and not provider.list_instances(time.time()):
                    drained = True
                    break
                time.sleep(1.0)
        finally:
            server.shutdown()
            server.server_close()
            provider.terminate_all(time.time())  # type: ignore[attr-defined]
            if scaler.lease is not None:
                scaler.lease.release()
        done = sum(h.state == "SUCCESS" for h in handles)
        peaks = ", ".join(f"{k} {v}" for k, v in sorted(peak.items()) if v)
        ending = (
            f"every pool scaled back to 0 by the autoscaler after {time.monotonic() - started:.0f} s"
            if drained
            else f"not drained within {AUTOSCALE_TIMEOUT_S:.0f} s: the demo stopped the rest"
        )
        console.print(
            f"autoscaling: {done}/{len(handles)} tasks done; peak instances {peaks}; {ending}"
            " (emulated workers: local processes standing in for the chips)"
        )


def run_demo() -> int:
    """Run the demo; returns the process exit code."""
    started = time.monotonic()
    named = [(name, parse_spec(raw)) for name, raw in workload()]

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    try:
        with broker_url() as url, tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp:
            backend = url if url.startswith(("redis://", "rediss://")) else "rpc://"
            env = {
                "FLEET_BROKER_URL": url,
                "FLEET_RESULT_BACKEND": os.environ.get("FLEET_RESULT_BACKEND", backend),
                "FLEET_ARTIFACT_DIR": str(Path(tmp) / "artifacts"),
                "HF_HUB_OFFLINE": "1",  # engines never reach a model hub
            }
            settings = Settings.from_env({**os.environ, **env})
            with Fleet(settings) as fleet:
                queues = [fleet.route(spec).queue for _, spec in named]
                queues += chip_queues(fleet, agent_workflow())  # the workflow's chip steps
                plans = plan_workers(queues)
                console.print(
                    f"starting {len(plans)} workers on this CPU (emulated where the chip is not here): "
                    + ", ".join(
                        f"{p.accelerator} {p.engine}{' ' + '+'.join(sorted(p.models)) if p.models else ''}"
                        for p in plans
                    )
                )
                with demo_workers(fleet, env, plans, Path(tmp)):
                    fleet.refresh_stats()  # the workers just registered: see them now
                    handles = fleet.submit_many([spec for _, spec in named])
                    _print_routes(named, handles)
                    _print_results(named, handles)
                    report = collect(settings, fleet.catalog, fleet.app)
                    labels = [
                        f"{w.accelerator} x{w.devices} ({'emulated' if w.emulated else 'real'})"
                        for w in report.workers
                    ]
                    console.print(f"workers: {', '.join(labels)}")
                    console.print(
                        f"queues still holding work: {sum(q.ready for q in report.queues)}"
                    )
                    workflow_phase(fleet, env, Path(tmp), console)
                _print_costs(fleet, named, handles)
            if CONFIG.exists():
                autoscale_phase(settings, Path(tmp) / "instances")
    except KeyboardInterrupt:
        console.print("\ninterrupted: every process the demo started has been stopped")
        return 130
    console.print(
        f"\ndemo finished in {time.monotonic() - started:.1f} s; all processes it started are stopped"
    )
    return 0

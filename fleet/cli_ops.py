"""Ops commands: ``fleet config check``, ``plan``, ``autoscale``, ``scale``, ``drain``."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from fleet.autoscaler.config import AutoscalerConfig, ConfigError, load_config
from fleet.autoscaler.model import Plan, Snapshot, Termination
from fleet.cli import EXIT_INPUT, console, err, main
from fleet.cli import catalog as catalog_group
from fleet.settings import Settings, masked


def _config(path: str) -> AutoscalerConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[red]invalid config:[/] {escape(str(exc))}")
        sys.exit(EXIT_INPUT)


def _settings(config: AutoscalerConfig) -> Settings:
    env = dict(os.environ)
    if config.fleet.broker_url and not env.get("FLEET_BROKER_URL"):
        env["FLEET_BROKER_URL"] = config.fleet.broker_url
    env.setdefault("FLEET_NAMESPACE", config.fleet.namespace)
    return Settings.from_env(env)


def print_plan(plan: Plan, skipped: list[str]) -> None:
    """The decision table: pool, current, desired, launches, terminations, reasons, $/h."""
    table = Table(
        "pool",
        "current",
        "desired",
        "launch",
        "terminate",
        "$/h before",
        "$/h after",
        "reasons",
        title="plan",
    )
    for d in plan.decisions:
        launches = ", ".join(
            f"{launch.offer.instance_type} {launch.offer.market}" for launch in d.launches
        )
        table.add_row(
            d.pool,
            str(d.current),
            str(d.desired),
            launches or "-",
            str(len(d.terminations)) if d.terminations else "-",
            f"{d.usd_per_hour_before:.4g}",
            f"{d.usd_per_hour_after:.4g}",
            "; ".join(d.reasons),
        )
    console.print(table)
    for a in plan.api_pools:
        console.print(
            f"API pool api-{a.provider}: {a.current_concurrency} -> {a.desired_concurrency}"
            f" concurrent calls; {'; '.join(a.reasons)}",
            markup=False,
        )
    for u in plan.unsatisfiable:
        console.print(f"[yellow]unsatisfiable:[/] {u.queue} ({u.ready} ready): {u.reason}")
    if skipped:
        console.print(
            f"skipped pools (their provider is not available in this installation): {', '.join(skipped)}"
        )
    console.print(
        f"fleet spend: ${plan.usd_per_hour_before:.4g}/h -> ${plan.usd_per_hour_after:.4g}/h"
    )


def _autoscaler(config: AutoscalerConfig, *, locked: bool) -> Any:  # noqa: ANN401 - avoids importing the loop at CLI start
    from fleet.autoscaler.loop import build_autoscaler  # noqa: PLC0415 - keep `fleet --help` light

    return build_autoscaler(
        config, _settings(config), locked=locked, lock_url=os.environ.get("FLEET_LOCK_URL")
    )


@main.group()
def config() -> None:
    """Autoscaler configuration files."""


@config.command("check")
@click.argument("path")
def config_check(path: str) -> None:
    """Validate PATH (TOML); exit 2 naming each bad key."""
    cfg = _config(path)
    console.print(
        f"{path}: ok, {len(cfg.pools)} pools ({', '.join(f'{p.name}:{p.provider}' for p in cfg.pools)})"
    )


@main.command("plan")
@click.option("--config", "config_path", required=True, help="Autoscaler TOML.")
@click.option(
    "--snapshot",
    "snapshot_path",
    help="Plan from a saved snapshot (JSON) instead of the live broker.",
)
@click.option("--save-snapshot", "save_path", help="Also write the observed snapshot to this file.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(
    config_path: str, snapshot_path: str | None, save_path: str | None, as_json: bool
) -> None:
    """The decision table for the current state (nothing is changed)."""
    from fleet.autoscaler.planner import plan as make_plan  # noqa: PLC0415
    from fleet.autoscaler.snapshot_io import load_snapshot, save_snapshot  # noqa: PLC0415
    from fleet.catalog import default_catalog  # noqa: PLC0415

    cfg = _config(config_path)
    skipped: list[str] = []
    if snapshot_path:
        snap = load_snapshot(Path(snapshot_path))
        decided = make_plan(snap, cfg, default_catalog(), snap.taken_at)
    else:
        scaler = _autoscaler(cfg, locked=False)
        report = scaler.step(dry_run=True)
        decided, skipped = report.plan, report.skipped_pools
        if save_path:
            save_snapshot(report.snapshot, Path(save_path))
    if as_json:
        click.echo(
            json.dumps({**decided.to_dict(), "skipped_pools": skipped}, indent=2, default=str)
        )
    else:
        print_plan(decided, skipped)


@main.command()
@click.option("--config", "config_path", required=True, help="Autoscaler TOML.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--dry-run", is_flag=True, help="Plan and print, change nothing (no lease taken).")
@click.option(
    "--metrics-port",
    type=int,
    default=0,
    show_default=True,
    help="Serve Prometheus metrics on 127.0.0.1:PORT (0: off).",
)
def autoscale(config_path: str, once: bool, dry_run: bool, metrics_port: int) -> None:
    """Run the autoscaler: observe queues, plan, launch and drain capacity."""
    from fleet.obs.logs import configure_logging  # noqa: PLC0415

    configure_logging()
    cfg = _config(config_path)
    try:
        scaler = _autoscaler(cfg, locked=not dry_run)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        sys.exit(EXIT_INPUT)
    console.print(
        f"autoscaler on {masked(scaler.settings.broker_url)}, pools: {', '.join(p.name for p in scaler.config.pools)}"
    )

    metrics: Any = None
    if metrics_port:
        from fleet.obs.metrics import FleetMetrics  # noqa: PLC0415

        metrics = FleetMetrics()
        metrics.serve(metrics_port)
        console.print(f"metrics on http://127.0.0.1:{metrics_port}/metrics")
    provider_of = {p.name: p.provider for p in scaler.config.pools}

    def show(report: Any) -> None:  # noqa: ANN401 - StepReport
        if not report.active:
            console.print("standby: another autoscaler holds the lease")
            return
        if metrics is not None:
            record_step(metrics, report, provider_of)
        if report.plan.launches or report.plan.terminations or once or dry_run:
            print_plan(report.plan, report.skipped_pools)

    if once or dry_run:
        show(scaler.step(dry_run=dry_run))
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        scaler.run(stop, show)
    except KeyboardInterrupt:
        stop.set()


def record_step(metrics: Any, report: Any, provider_of: Mapping[str, str]) -> None:  # noqa: ANN401 - FleetMetrics, StepReport
    """Feed one autoscaler pass into the metrics: queues, instances, spend, decisions, errors."""
    from fleet.stats import QueueStats  # noqa: PLC0415

    snap = report.snapshot
    metrics.observe_queues(
        {n: QueueStats(n, q.ready, q.unacked, q.consumers) for n, q in snap.queues.items()}
    )
    metrics.observe_plan(report.plan, snap.instances)
    for error in report.acted.failed if report.acted else ():
        metrics.record_provider_error(error, provider_of.get(error.pool, "unknown"))


@main.command()
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--addr", default="127.0.0.1", show_default=True)
@click.option("--interval", type=float, default=5.0, show_default=True)
def exporter(port: int, addr: str, interval: float) -> None:
    """Serve fleet_* metrics (queue depths, workers) for FLEET_BROKER_URL without an autoscaler."""
    from fleet.catalog import default_catalog  # noqa: PLC0415
    from fleet.obs.exporter import run_exporter  # noqa: PLC0415
    from fleet.obs.logs import configure_logging  # noqa: PLC0415

    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(
        f"exporter on http://{addr}:{port}/metrics for {masked(Settings.from_env().broker_url)}"
    )
    try:
        run_exporter(Settings.from_env(), default_catalog(), port, addr, interval, stop)
    except KeyboardInterrupt:
        stop.set()


@main.command()
@click.argument("pool")
@click.argument("count", type=int)
@click.option("--config", "config_path", required=True, help="Autoscaler TOML.")
def scale(pool: str, count: int, config_path: str) -> None:
    """Set POOL to COUNT instances now (within max_instances and budgets; scale-in drains first)."""
    cfg = _config(config_path)
    try:
        target = cfg.pool(pool)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/]")
        sys.exit(EXIT_INPUT)
    if not 0 <= count <= target.max_instances:
        err.print(
            f"[red]count must be within 0..max_instances ({target.max_instances}) of {pool}[/]"
        )
        sys.exit(EXIT_INPUT)
    pinned = target.model_copy(
        update={"min_instances": count, "max_instances": count, "scale_out_cooldown_s": 0.0}
    )
    cfg2 = cfg.model_copy(
        update={"pools": tuple(pinned if p.name == pool else p for p in cfg.pools)}
    )
    scaler = _autoscaler(cfg2, locked=False)
    report = scaler.step(dry_run=True)
    snap: Snapshot = report.snapshot
    mine = sorted(
        (i for i in snap.instances if i.pool == pool and i.state.value in ("pending", "running")),
        key=lambda i: -i.launched_at,
    )
    extra = [
        Termination(pool, i.id, i.usd_per_hour, f"fleet scale {pool} {count}")
        for i in mine[: max(0, len(mine) - count)]
    ]
    launches = [launch for launch in report.plan.launches if launch.pool == pool]
    from fleet.autoscaler.model import Plan, PoolDecision  # noqa: PLC0415

    decision = PoolDecision(
        pool,
        len(mine),
        count,
        tuple(launches),
        tuple(extra),
        (f"operator: scale to {count}",),
        0.0,
        0.0,
    )
    manual = Plan(snap.taken_at, (decision,))
    acted = scaler.actuator.act(manual, snap, time.time())
    console.print(
        f"{pool}: {len(mine)} -> {count}: launched {len(acted.launched)}, draining {len(acted.draining)}, terminated {len(acted.terminated)}"
    )
    for e in acted.failed:
        console.print(f"[yellow]launch failed:[/] {e.kind} {e.message}")
    _finish_drains(scaler, manual)


def _finish_drains(scaler: Any, plan: Plan, timeout_s: float = 600.0) -> None:  # noqa: ANN401 - Autoscaler
    """Re-observe and progress drains until every planned termination is done (with a progress bar)."""
    from rich.progress import Progress  # noqa: PLC0415

    waiting = {t.instance_id for t in plan.terminations}
    total = len(waiting)
    deadline = time.monotonic() + timeout_s
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("draining: running tasks finish first", total=total)
        while waiting and time.monotonic() < deadline:
            report = scaler.step(dry_run=True)
            acted = scaler.actuator.act(
                Plan(report.snapshot.taken_at, ()), report.snapshot, time.time()
            )
            waiting = (waiting & {i.id for i in report.snapshot.instances}) - set(acted.terminated)
            bar.update(task, completed=total - len(waiting))
            if waiting:
                time.sleep(2)


@main.command()
@click.argument("target")
@click.option("--config", "config_path", required=True, help="Autoscaler TOML.")
def drain(target: str, config_path: str) -> None:
    """Drain a POOL (stop consuming, finish tasks, then terminate its instances) or one WORKER (stop consuming)."""
    cfg = _config(config_path)
    scaler = _autoscaler(cfg, locked=False)
    report = scaler.step(dry_run=True)
    snap: Snapshot = report.snapshot
    if any(p.name == target for p in cfg.pools):
        terms = tuple(
            Termination(target, i.id, i.usd_per_hour, f"fleet drain {target}")
            for i in snap.instances
            if i.pool == target
        )
        from fleet.autoscaler.model import PoolDecision  # noqa: PLC0415

        manual = Plan(
            snap.taken_at,
            (PoolDecision(target, len(terms), 0, (), terms, ("operator: drain",), 0.0, 0.0),),
        )
        scaler.actuator.act(manual, snap, time.time())
        _finish_drains(scaler, manual)
        console.print(f"pool {target}: {len(terms)} instance(s) drained and stopped")
        return
    worker = next((w for w in snap.workers if w.hostname == target), None)
    if worker is None:
        err.print(f"[red]{target!r} is neither a pool in {config_path} nor a live worker[/]")
        sys.exit(EXIT_INPUT)
    for queue in worker.queues:
        scaler.app.control.cancel_consumer(queue, destination=[target], reply=True)
    console.print(
        f"worker {target} stopped consuming {len(worker.queues)} queue(s); its running tasks finish"
    )


@main.command()
@click.option("--trace", "trace_path", required=True, help="Trace file (JSON lines).")
@click.option(
    "--config", "config_path", required=True, help="Autoscaler TOML (its pools are the capacity)."
)
@click.option(
    "--policy",
    type=click.Choice(["fleet", "homogeneous", "cheapest"]),
    default="fleet",
    show_default=True,
)
@click.option(
    "--spot-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Spot interruptions per instance-hour.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--bucket-s",
    type=click.FloatRange(min=1.0),
    default=300.0,
    show_default=True,
    help="The tight bound buys whole instances per bucket of this many seconds.",
)
@click.option(
    "--bound-time-s",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Solver time limit for the tight bound.",
)
@click.option("--bound/--no-bound", default=True, show_default=True, help="Compute the bounds.")
@click.option("--json", "as_json", is_flag=True)
def simulate(
    trace_path: str,
    config_path: str,
    policy: str,
    spot_rate: float,
    seed: int,
    bucket_s: float,
    bound_time_s: float,
    bound: bool,
    as_json: bool,
) -> None:
    """Replay a trace through the real placement and planner on a virtual clock.

    Beside the run's cost it reports two bounds on the config's pools, each knowing the
    whole trace: ``bound_usd``, the optimum that buys whole instances per ``--bucket-s``
    bucket with boot charged (``fleet.sim.ilp``; a tight reference, not a strict lower
    bound), ``lp_bound_usd``, the fractional LP below every policy
    (``fleet.sim.lowerbound``), and ``cost_over_bound``. A bound that cannot be solved
    prints why (stderr) and is NaN; the command still exits 0.
    """
    from fleet.catalog import default_catalog  # noqa: PLC0415
    from fleet.sim.engine import simulate as run_sim  # noqa: PLC0415
    from fleet.sim.trace import TraceError, read_trace  # noqa: PLC0415

    cfg = _config(config_path)
    try:
        trace = read_trace(Path(trace_path))
    except (OSError, TraceError) as exc:
        err.print(f"[red]bad trace:[/] {exc}")
        sys.exit(EXIT_INPUT)
    catalog = default_catalog()
    result = run_sim(trace, cfg, catalog, policy, spot_interruptions_per_hour=spot_rate, seed=seed)
    data = result.to_dict()
    if bound:
        data |= _bounds(trace, cfg, catalog, bucket_s, bound_time_s, data["total_cost_usd"])
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    keys = ["policy", "tasks", "completed", "rejected", "total_cost_usd", "cost_per_1k_tasks_usd"]
    keys += ["p50_latency_s", "p95_latency_s", "slo_attainment"]
    if bound:
        keys += ["bound_usd", "bound_gap", "lp_bound_usd", "cost_over_bound"]
    for key in keys:
        value = data[key]
        console.print(f"{key:24} {value:.4g}" if isinstance(value, float) else f"{key:24} {value}")
    for pool, u in data["utilisation"].items():
        console.print(f"utilisation {pool:12} {u:.1%}")
    for buy in data.get("bound_buys", ()):
        models = f" holding {', '.join(buy['models'])}" if buy["models"] else ""
        console.print(
            f"bound buys   {buy['offer']} {buy['market']}{models}: peak {buy['peak']},"
            f" {buy['instance_buckets']} instance-buckets, ${buy['cost_usd']:.4g}"
        )


def _bounds(
    trace: Any,  # noqa: ANN401 - list[TraceEvent], imported lazily
    config: AutoscalerConfig,
    catalog: Any,  # noqa: ANN401 - Catalog, imported lazily
    bucket_s: float,
    time_limit_s: float,
    cost_usd: float,
) -> dict[str, Any]:
    """The tight bound and the LP for ``trace`` on ``config``'s pools, as ``simulate`` reports them.

    A bound that is not solved to optimality is NaN, and why is printed on stderr.
    """
    from fleet.sim.ilp import tight_bound  # noqa: PLC0415
    from fleet.sim.lowerbound import lower_bound  # noqa: PLC0415

    tight = tight_bound(trace, catalog, config, bucket_s=bucket_s, time_limit_s=time_limit_s)
    lp = lower_bound(trace, catalog, config, bucket_s=bucket_s)
    for name, status in (("tight bound", tight.status), ("LP bound", lp.status)):
        if status != "optimal":
            err.print(f"[yellow]{name} not solved:[/] {escape(status)}")
    usable = tight.cost_usd > 0 and not math.isnan(tight.cost_usd)
    return {
        "bound_usd": tight.cost_usd,
        "bound_status": tight.status,
        "bound_gap": tight.gap,
        "bound_dual_usd": tight.dual_bound_usd,
        "bound_bucket_s": tight.bucket_s,
        "bound_solve_s": tight.solve_s,
        "bound_buys": [
            {
                "offer": b.offer,
                "market": b.market,
                "models": list(b.models),
                "peak": b.peak,
                "instance_buckets": sum(b.counts),
                "cost_usd": b.cost_usd,
            }
            for b in tight.buys
        ],
        "lp_bound_usd": lp.cost_usd,
        "lp_bound_status": lp.status,
        "cost_over_bound": cost_usd / tight.cost_usd if usable else math.nan,
    }


@catalog_group.command("refresh")
@click.option("--cloud", type=click.Choice(["aws", "gcp", "azure"]), required=True)
@click.option(
    "--out",
    "out_dir",
    help="Directory for the new catalog version (default .fleet/catalog/<date>-<cloud>).",
)
@click.option("--region", default="us-east-1", show_default=True, help="AWS region to refresh.")
@click.option("--endpoint-url", help="AWS endpoint override (tests: a moto server).")
def catalog_refresh(cloud: str, out_dir: str | None, region: str, endpoint_url: str | None) -> None:
    """Pull current prices into a new catalog version; the shipped catalog stays the offline default."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from rich.progress import Progress  # noqa: PLC0415

    from fleet.catalog import DATA_DIR  # noqa: PLC0415

    today = datetime.now(UTC).date().isoformat()
    source = Path(os.environ.get("FLEET_CATALOG_DIR") or DATA_DIR)
    out = Path(out_dir or f".fleet/catalog/{today}-{cloud}")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"refreshing {cloud} prices", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            if cloud == "aws":
                from fleet.pricing.aws import refresh_aws  # noqa: PLC0415 - optional SDK

                updated = refresh_aws(
                    source,
                    out,
                    region=region,
                    endpoint_url=endpoint_url,
                    pricing_endpoint_url=endpoint_url,
                    progress=progress,
                    today=today,
                )
            elif cloud == "gcp":
                from fleet.pricing.gcp import refresh_gcp  # noqa: PLC0415

                updated = refresh_gcp(source, out, today=today, progress=progress)
            else:
                from fleet.pricing.azure import refresh_azure  # noqa: PLC0415

                updated = refresh_azure(source, out, today=today, progress=progress)
        except ImportError as exc:
            err.print(
                f"[red]the {cloud} SDK is not installed (pip install 'fleet[{cloud}]'):[/] {exc.name}"
            )
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - any SDK or network failure: one line, no secrets
            err.print(f"[red]{cloud} price refresh failed:[/] {type(exc).__name__}")
            sys.exit(1)
    console.print(
        f"{updated} {cloud} offers updated; new catalog in {out}. Use it with: export FLEET_CATALOG_DIR={out}"
    )

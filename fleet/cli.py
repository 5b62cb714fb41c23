"""The ``fleet`` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad input or unplaceable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from fleet.catalog import Catalog, CatalogError, default_catalog, load_catalog
from fleet.models.registry import ModelConfigError, ModelRegistry
from fleet.placement import NoPlacementError, Placement, Policy, place
from fleet.settings import Settings, masked
from fleet.spec import SpecError, TaskSpec, check_size, parse_spec

# Not a terminal (a pipe, a file, CI): wide enough that tables never truncate names,
# so `fleet catalog | grep p5.48xlarge` works.
console = Console(width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 250)

EXIT_INPUT = 2


def _load_catalog(path: str | None) -> Catalog:
    try:
        return load_catalog(Path(path)) if path else default_catalog()
    except CatalogError as exc:
        err.print(f"[red]catalog error:[/] {exc}")
        sys.exit(EXIT_INPUT)


def _read_specs(path: str) -> list[dict[str, Any]]:
    """A file holding one spec (a JSON object), a JSON list of specs, or JSON lines."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    stripped = text.strip()
    if not stripped:
        raise SpecError([("", f"{path}: empty file")])
    if stripped[0] == "[":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise SpecError([("", f"{path}: invalid JSON: {exc}")]) from None
        return [d if isinstance(d, dict) else {"_": d} for d in data]
    if stripped[0] == "{" and "\n{" not in stripped:
        try:
            return [json.loads(stripped)]
        except json.JSONDecodeError as exc:
            raise SpecError([("", f"{path}: invalid JSON: {exc}")]) from None
    out = []
    for n, line in enumerate(stripped.splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SpecError([("", f"{path} line {n}: invalid JSON: {exc}")]) from None
    return out


def _parse_one(path: str) -> TaskSpec:
    try:
        specs = _read_specs(path)
    except SpecError as exc:
        _spec_error(exc)
    except OSError as exc:
        err.print(f"[red]cannot read {path}:[/] {exc.strerror}")
        sys.exit(EXIT_INPUT)
    if len(specs) != 1:
        _spec_error(SpecError([("", f"{path}: expected one spec, found {len(specs)}")]))
    try:
        return parse_spec(specs[0])
    except SpecError as exc:
        _spec_error(exc)


def _spec_error(exc: SpecError) -> NoReturn:
    err.print("[red]invalid task spec:[/]")
    for field, msg in exc.errors:
        err.print(f"  {escape(field or '(spec)')}: {escape(msg)}")
    sys.exit(EXIT_INPUT)


def _no_placement(exc: NoPlacementError, *, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "error": "no accelerator can run this task",
                    "rejected": [
                        {"accelerator": r.accelerator, "reason": r.reason} for r in exc.rejected
                    ],
                },
                indent=2,
            )
        )
    elif not exc.rejected:  # refused before any accelerator was weighed (context too long)
        err.print(f"[red]{escape(str(exc))}[/]")
    else:
        err.print("[red]no accelerator can run this task:[/]")
        for r in exc.rejected:
            err.print(f"  {r.accelerator:18} {r.reason}")
    sys.exit(EXIT_INPUT)


def _registry() -> ModelRegistry:
    """The model registry of ``FLEET_CONFIG`` (built-ins without one); a bad config exits 2."""
    from fleet.routing import env_registry  # noqa: PLC0415

    try:
        return env_registry()
    except ModelConfigError as exc:
        err.print(f"[red]invalid config:[/] {escape(str(exc))}")
        sys.exit(EXIT_INPUT)


def _print_placement(p: Placement) -> None:
    o = p.offer
    console.print(f"[bold]queue[/]      {p.queue}")
    console.print(
        f"[bold]offer[/]      {o.cloud} {o.region} {o.instance_type} ({o.market.value}, ${o.usd_per_hour:g}/h, {o.accelerator_count} devices)"
    )
    console.print(
        f"[bold]estimate[/]   ${p.estimated_cost_usd:.6g}, run {p.estimated_duration_s:,.3g} s, wait {p.estimated_wait_s:,.3g} s"
    )
    for reason in p.reasons:
        console.print(f"  - {reason}")
    table = Table("accelerator", "not chosen because", box=None, show_header=True, pad_edge=False)
    for r in p.rejected:
        table.add_row(r.accelerator, r.reason)
    console.print(table)


@click.group()
@click.version_option(package_name="fleet")
def main() -> None:
    """fleet: typed AI tasks on the right accelerator, at the lowest cost that meets the deadline."""


@main.command()
@click.argument("spec_file", required=False)
@click.option(
    "--workflow", "workflow_file", help="A workflow file (YAML or JSON): every step's placement."
)
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.option(
    "--policy", type=click.Choice([p.value for p in Policy]), default="cost", show_default=True
)
@click.option("--pin", help="Accelerator for --policy pinned.")
@click.option("--catalog", "catalog_dir", help="Catalog directory (default: shipped).")
def route(
    spec_file: str | None,
    workflow_file: str | None,
    as_json: bool,
    policy: str,
    pin: str | None,
    catalog_dir: str | None,
) -> None:
    """Show where SPEC_FILE (a TaskSpec JSON file, - for stdin) would run, without a broker."""
    if workflow_file is not None or spec_file is None:
        from fleet import cli_workflow  # noqa: PLC0415

        cli_workflow.route_workflow(
            _one_source(spec_file, workflow_file), _load_catalog(catalog_dir), Policy(policy),
            as_json=as_json,
        )  # fmt: skip
        return
    spec = _parse_one(spec_file)
    catalog = _load_catalog(catalog_dir)
    try:
        p = place(spec, catalog, None, Policy(policy), pin, models=_registry())
    except NoPlacementError as exc:
        _no_placement(exc, as_json=as_json)
    except (ValueError, KeyError) as exc:
        err.print(f"[red]{exc}[/]")
        sys.exit(EXIT_INPUT)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        _print_placement(p)


SUBMIT_CHUNK = 1000


def _submit_with_progress(fleet: Any, specs: list[TaskSpec], policy: Policy) -> list[Any]:  # noqa: ANN401 - Fleet and its handles
    """Place every spec first (nothing is sent if one cannot run), then publish in chunks with a progress bar."""
    from rich.progress import Progress  # noqa: PLC0415

    for i, spec in enumerate(specs):
        try:
            fleet.route(spec, policy)
        except NoPlacementError as exc:
            exc.args = (f"[{i}] {exc}",)
            raise
    handles: list[Any] = []
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"submitting {len(specs):,} tasks", total=len(specs))
        for start in range(0, len(specs), SUBMIT_CHUNK):
            chunk = specs[start : start + SUBMIT_CHUNK]
            handles += fleet.submit_many(chunk, policy=policy)
            bar.advance(task, len(chunk))
    return handles


def _check_sizes(specs: list[TaskSpec], limit: int) -> None:
    """Exit 2 naming the first spec over ``limit`` bytes serialized (``[index]`` for many)."""
    for i, spec in enumerate(specs):
        try:
            check_size(spec, limit)
        except SpecError as exc:
            where = f"[{i}]" if len(specs) > 1 else ""
            _spec_error(SpecError([(where, message) for _, message in exc.errors]))


def _one_source(spec_file: str | None, workflow_file: str | None) -> str:
    """The workflow file, when exactly one of SPEC_FILE and --workflow is given; else exit 2."""
    if (spec_file is None) == (workflow_file is None):
        err.print("[red]give a SPEC_FILE or --workflow FILE (one of them)[/]")
        sys.exit(EXIT_INPUT)
    return str(workflow_file)


@main.command()
@click.argument("spec_file", required=False)
@click.option("--workflow", "workflow_file", help="A workflow file (YAML or JSON) to run.")
@click.option("--json", "as_json", is_flag=True, help="Print task ids and placements as JSON.")
@click.option(
    "--policy", type=click.Choice([p.value for p in Policy]), default="cost", show_default=True
)
@click.option(
    "--wait", "wait_s", type=float, default=None, help="Wait up to this many seconds for results."
)
def submit(
    spec_file: str | None,
    workflow_file: str | None,
    as_json: bool,
    policy: str,
    wait_s: float | None,
) -> None:
    """Submit the task(s) in SPEC_FILE: one spec, a JSON list, or JSON lines; or --workflow FILE."""
    if workflow_file is not None or spec_file is None:
        from fleet import cli_workflow  # noqa: PLC0415

        path = _one_source(spec_file, workflow_file)
        cli_workflow.submit_workflow_cli(path, Policy(policy), wait_s, as_json=as_json)
    else:
        _submit_specs(spec_file, as_json, policy, wait_s)


def _not_submitted(exc: Exception, settings: Settings) -> NoReturn:
    """Exit 1 for a publish that failed: refused (a nack) or unreachable, password masked."""
    from fleet.submiterrors import SubmitError  # noqa: PLC0415

    if isinstance(exc, SubmitError):  # it says which, and names the queues
        err.print(f"[red]not submitted:[/] {escape(str(exc))}")
    else:
        err.print(
            f"[red]cannot reach the broker at {masked(settings.broker_url)}:[/] {type(exc).__name__}"
        )
    sys.exit(1)


def _submit_specs(spec_file: str, as_json: bool, policy: str, wait_s: float | None) -> None:
    from kombu.exceptions import OperationalError  # noqa: PLC0415 - keep `fleet route` light

    from fleet.client import Fleet  # noqa: PLC0415

    try:
        specs = [parse_spec(s) for s in _read_specs(spec_file)]
    except SpecError as exc:
        _spec_error(exc)
    except OSError as exc:
        err.print(f"[red]cannot read {spec_file}:[/] {exc.strerror}")
        sys.exit(EXIT_INPUT)
    settings = Settings.from_env()
    _check_sizes(specs, settings.max_task_bytes)  # before any chunk is sent
    with Fleet(settings) as fleet:
        try:
            handles = (
                _submit_with_progress(fleet, specs, Policy(policy))
                if len(specs) > 1
                else [fleet.submit(specs[0], policy=Policy(policy))]
            )
        except NoPlacementError as exc:
            _no_placement(exc, as_json=as_json)
        except OperationalError as exc:
            _not_submitted(exc, settings)
        rows = []
        for h in handles:
            row: dict[str, Any] = {"id": h.id, **h.placement.to_dict()}
            if wait_s is not None:
                row["result"] = h.get(timeout=wait_s)
            rows.append(row)
    if as_json:
        click.echo(json.dumps(rows if len(rows) > 1 else rows[0], indent=2, default=str))
        return
    for row in rows:
        offer = row["offer"]
        console.print(
            f"{row['id']}  ->  [bold]{row['queue']}[/]  ({offer['cloud']} {offer['instance_type']} {offer['market']}, est ${row['estimated_cost_usd']:.6g})"
        )
        if "result" in row:
            console.print(f"  result: {json.dumps(row['result'].get('output'), default=str)[:400]}")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
@click.option("--catalog", "catalog_dir", help="Catalog directory (default: shipped).")
@click.pass_context
def catalog(ctx: click.Context, as_json: bool, catalog_dir: str | None) -> None:
    """List accelerator families, priced offers and API pools (``catalog refresh`` pulls live prices)."""
    if ctx.invoked_subcommand is not None:
        return
    cat = _load_catalog(catalog_dir)
    if as_json:
        from dataclasses import asdict  # noqa: PLC0415

        click.echo(
            json.dumps(
                {
                    "version": cat.version,
                    "accelerators": [
                        {
                            **asdict(f),
                            "runtimes": sorted(f.runtimes),
                            "dtypes": sorted(f.dtypes),
                            "kinds": sorted(f.kinds),
                        }
                        for f in cat.families.values()
                    ],
                    "offers": [asdict(o) for o in cat.offers],
                    "api_offers": [{**asdict(o), "accelerator": o.accelerator} for o in cat.apis],
                },
                indent=2,
            )
        )
        return
    fam = Table(
        Column("accelerator", no_wrap=True, min_width=16),
        "memory/device",
        "TB/s",
        "bf16 TFLOPS",
        "runtimes",
        "dtypes",
        "offers",
        title=f"accelerators (catalog {cat.version})",
    )
    for f in cat.families.values():
        mem = "host RAM" if f.per_vcpu else f"{f.memory_gb:g} GB"
        unit = " /vCPU" if f.per_vcpu else ""
        fam.add_row(
            f.name,
            mem,
            f"{f.memory_bandwidth_gbps / 1000:g}{unit}",
            f"{f.bf16_tflops:g}{unit}",
            ",".join(sorted(f.runtimes)),
            ",".join(sorted(f.dtypes)),
            str(len(cat.offers_by_family[f.name])),
        )
    console.print(fam)
    # Names never shrink or wrap: `fleet catalog | grep p5.48xlarge` must find them.
    offers = Table(
        "cloud",
        "region",
        Column("instance", no_wrap=True, min_width=max(len(o.instance_type) for o in cat.offers)),
        Column("accelerator", no_wrap=True, min_width=16),
        "n",
        "GB/dev",
        "on-demand $/h",
        "spot $/h",
        "price date",
        title="offers",
    )
    for o in cat.offers:
        offers.add_row(
            o.cloud,
            o.region,
            o.instance_type,
            o.accelerator,
            str(o.accelerator_count),
            f"{o.accelerator_memory_gb:g}",
            "" if o.on_demand_usd_per_hour is None else f"{o.on_demand_usd_per_hour:g}",
            "" if o.spot_usd_per_hour is None else f"{o.spot_usd_per_hour:g}",
            o.price_date,
        )
    console.print(offers)
    if cat.apis:
        _print_api_offers(cat)


def _print_api_offers(cat: Catalog) -> None:
    """The token-priced API pools: queue inference.api-<provider>, $/M tokens, speed, limits."""
    apis = Table(
        Column("pool", no_wrap=True, min_width=14),
        Column("model", no_wrap=True),
        "$/M in",
        "$/M out",
        "tok/s",
        "ttft s",
        "req/min",
        "tok/min",
        "context",
        "data",
        title="API pools (token-priced; routed to only when enabled: \\[\\[api_pools]] or FLEET_API_POOLS=1)",
    )
    for o in cat.apis:
        apis.add_row(
            o.accelerator,
            o.model,
            f"{o.usd_per_m_input:g}",
            f"{o.usd_per_m_output:g}",
            f"{o.tokens_per_s:g}",
            f"{o.ttft_s:g}",
            str(o.requests_per_min),
            str(o.tokens_per_min),
            str(o.context_tokens),
            o.residency if o.external else f"{o.residency} (self-hosted)",
        )
    console.print(apis)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--all", "all_queues", is_flag=True, help="Show empty queues too.")
@click.option(
    "--config", "config_path", help="Autoscaler TOML: also show pools (instances, desired, $/h)."
)
@click.option(
    "--watch", "watch_s", type=float, default=None, help="Refresh every SECONDS, with drain rates."
)
def status(as_json: bool, all_queues: bool, config_path: str | None, watch_s: float | None) -> None:
    """Queues (depth, rate, oldest age), pools, workers (accelerator, emulated, active tasks), dead letters."""
    import time  # noqa: PLC0415

    from kombu.exceptions import OperationalError  # noqa: PLC0415
    from redis import RedisError  # noqa: PLC0415

    from fleet.app import create_app  # noqa: PLC0415
    from fleet.autoscaler.config import ConfigError, load_config  # noqa: PLC0415
    from fleet.status import collect  # noqa: PLC0415

    settings = Settings.from_env()
    try:
        config = load_config(config_path) if config_path else None
    except ConfigError as exc:
        err.print(f"[red]invalid config:[/] {exc}")
        sys.exit(EXIT_INPUT)
    app = create_app(settings)
    previous: Any = None
    while True:
        try:
            report = collect(settings, default_catalog(), app, all_queues=all_queues, config=config)
        except (OperationalError, RedisError, OSError) as exc:
            err.print(
                f"[red]cannot reach the broker at {masked(settings.broker_url)}:[/] {type(exc).__name__}"
            )
            sys.exit(1)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2))
        else:
            _print_status(report, previous)
        if watch_s is None:
            return
        previous = report
        try:
            time.sleep(watch_s)
        except KeyboardInterrupt:
            return


def _print_status(report: Any, previous: Any) -> None:  # noqa: ANN401 - StatusReport
    """The readable tables; with a previous report, each queue's drain rate (messages/s)."""
    before = {q.name: q.ready + q.unacked for q in previous.queues} if previous is not None else {}
    elapsed = report.taken_at - previous.taken_at if previous is not None else 0.0
    qt = Table(
        "queue",
        "ready",
        "unacked",
        "consumers",
        "rate/s",
        "oldest age",
        "by priority",
        title=f"queues on {report.broker}",
    )
    for q in report.queues:
        rate = (
            f"{(before.get(q.name, 0) - q.ready - q.unacked) / elapsed:+.2f}" if elapsed > 0 else ""
        )
        age = report.oldest_age_s.get(q.name)
        qt.add_row(q.name, str(q.ready), str(q.unacked), str(q.consumers), rate, "" if age is None else f"{age:,.1f} s",
                   " ".join(f"p{k}:{v}" for k, v in sorted(q.by_priority.items())))  # fmt: skip
    console.print(qt)
    if report.pools:
        pt = Table("pool", "instances", "desired", "$/h", title="pools")
        for p in report.pools:
            pt.add_row(p.pool, str(p.instances), str(p.desired), f"{p.usd_per_hour:.4g}")
        console.print(pt)
    wt = Table(
        "worker", "accelerator", "devices", "kind", "engine", "models", "ready", "queues",
        "active tasks", title="workers",
    )  # fmt: skip
    for w in report.workers:
        wt.add_row(w.hostname, w.accelerator, str(w.devices), "emulated" if w.emulated else "real",
                   w.engine, ", ".join(w.models) or "-", "yes" if w.ready else "loading",
                   str(w.queues), "" if w.active is None else str(w.active))  # fmt: skip
    console.print(wt)
    console.print(f"dead letters: {report.dead_letters}")


@main.command()
@click.option(
    "--accelerator",
    default="auto",
    show_default=True,
    help="auto (detect) or a canonical name to emulate.",
)
@click.option(
    "--devices", type=int, default=None, help="Devices to use or emulate (default: detected, or 1)."
)
@click.option(
    "--concurrency", type=int, default=None, help="Pool processes (default: one per device)."
)
@click.option(
    "--pool",
    default="prefork",
    show_default=True,
    type=click.Choice(["prefork", "solo", "threads"]),
)
@click.option(
    "--hostname", default=None, help="Celery node name (default: <accelerator>-<id>@<host>)."
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT."
)
@click.option(
    "--api",
    "api",
    default=None,
    metavar="PROVIDER",
    help="Run an API worker for this provider (inference.api-PROVIDER, threads pool).",
)
@click.option(
    "--engine",
    type=click.Choice(["transformers", "vllm", "reference"]),
    default=None,
    envvar="FLEET_ENGINE",
    help="Engine that runs the work (default: transformers with --model, else reference).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A registry model to load before consuming (repeatable; FLEET_MODELS=a,b).",
)
@click.option(
    "--config",
    "config_path",
    default=None,
    envvar="FLEET_CONFIG",
    help="Fleet config whose [[models]] extend the registry.",
)
def worker(
    accelerator: str,
    devices: int | None,
    concurrency: int | None,
    pool: str,
    hostname: str | None,
    loglevel: str,
    metrics_port: int | None,
    api: str | None,
    engine: str | None,
    models: tuple[str, ...],
    config_path: str | None,
) -> None:
    """Run a Celery worker on exactly the queues this machine's chip (and its models) can serve."""
    from workers.main import Serve, start  # noqa: PLC0415
    from workers.serving import ServingError  # noqa: PLC0415

    if not models and os.environ.get("FLEET_MODELS"):
        models = tuple(m.strip() for m in os.environ["FLEET_MODELS"].split(",") if m.strip())
    if api is not None and (engine or models):
        err.print("[red]--api excludes --engine and --model[/] (an API worker forwards)")
        sys.exit(EXIT_INPUT)
    serve = Serve(engine or ("transformers" if models else "reference"), models, config_path)

    if api is not None:
        from fleet.catalog.apis import api_providers  # noqa: PLC0415

        known = api_providers(default_catalog())
        if accelerator != "auto" or api not in known:
            why = "--api excludes --accelerator" if accelerator != "auto" else "no API offers"
            err.print(f"[red]{why} for {api!r}[/] (providers: {', '.join(known) or 'none'})")
            sys.exit(EXIT_INPUT)
        start(accelerator, devices, concurrency, pool, hostname, loglevel, metrics_port, api)
        return
    catalog_names = default_catalog().names()
    if accelerator != "auto" and accelerator not in catalog_names:
        from fleet.spec import closest_accelerators  # noqa: PLC0415

        close = closest_accelerators(accelerator)
        err.print(
            f"[red]unknown accelerator {accelerator!r}[/]"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
        sys.exit(EXIT_INPUT)
    try:
        start(
            accelerator, devices, concurrency, pool, hostname, loglevel, metrics_port, serve=serve
        )
    except ServingError as exc:
        err.print(f"[red]cannot start the worker:[/] {exc}")
        sys.exit(EXIT_INPUT)


@main.command()
def demo() -> None:
    """Run the end-to-end demo on a throwaway Redis (see README)."""
    from fleet.demo import run_demo  # noqa: PLC0415

    sys.exit(run_demo())


# Ops commands (config check, plan, autoscale, scale, drain), `dlq` and `models` register
# themselves on `main`.
from fleet import cli_dlq, cli_models, cli_ops  # noqa: E402

__all__ = ["cli_dlq", "cli_models", "cli_ops", "main"]

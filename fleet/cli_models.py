"""``fleet models list|show NAME|verify [NAME...]|build tiny-llama DIR``: the model registry.

The registry is the built-ins plus the ``[[models]]`` of ``--config`` (default
``FLEET_CONFIG``); weights are fetched or built into ``FLEET_MODEL_CACHE``. Exit codes as
the rest of the CLI: 0 ok, 1 a model failed to verify, 2 an unknown model, an invalid
config or a build directory that is not a tiny-llama build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.markup import escape
from rich.table import Table

from fleet.cli import EXIT_INPUT, console, err, main
from fleet.models.registry import ModelConfigError, registry_from_file
from fleet.settings import Settings

if TYPE_CHECKING:
    from fleet.models.registry import ModelEntry, ModelRegistry

RANDOM = "RANDOM WEIGHTS"
CONFIG_HELP = "Fleet config whose [[models]] extend the built-ins (default: FLEET_CONFIG)."


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    err.print(f"[red]{escape(message)}[/]")
    sys.exit(code)


def _registry(config_path: str | None, settings: Settings) -> ModelRegistry:
    path = config_path or settings.config_path
    try:
        return registry_from_file(path)
    except ModelConfigError as exc:
        message = str(exc)
        _fail(
            f"invalid config: {message if message.startswith(f'{path}:') else f'{path}: {message}'}"
        )


def _entries(registry: ModelRegistry, names: tuple[str, ...]) -> list[ModelEntry]:
    try:
        return [registry.get(n) for n in names] if names else list(registry)
    except KeyError as exc:
        _fail(str(exc.args[0]))


def format_params(params_b: float) -> str:
    """``7B``, ``22.7M``: a parameter count given in billions, for people."""
    if params_b >= 1:
        return f"{params_b:.3g}B"
    return f"{params_b * 1000:.3g}M"


def _weights_kind(entry: ModelEntry) -> str:
    return "pretrained" if entry.pretrained else RANDOM


def summary(entry: ModelEntry) -> dict[str, Any]:
    """One row of ``fleet models list --json``."""
    return {
        "name": entry.name,
        "aliases": list(entry.aliases),
        "task": entry.task.value,
        "params_b": entry.params_b,
        "dtype": entry.dtype.value,
        "max_context": entry.max_context,
        "format": entry.format,
        "engines": list(entry.engines),
        "source": entry.source.kind,
        "pretrained": entry.pretrained,
        "weights": _weights_kind(entry),
    }


def details(entry: ModelEntry, registry: ModelRegistry, cache: Path) -> dict[str, Any]:
    """Everything ``fleet models show --json`` prints: the entry, sizes and where it resolves."""
    from fleet.models.verify import locate  # noqa: PLC0415 - keeps `fleet --help` light

    where = locate(entry, cache)
    return {
        **entry.model_dump(mode="json"),
        "weights": _weights_kind(entry),
        "kinds": sorted(k.value for k in entry.kinds),
        "revision": entry.revision,
        "source_description": entry.source.describe(),
        "weights_gb": entry.weights_gb,
        "load_gbps": registry.load_gbps,
        "load_s": entry.load_s(registry.load_gbps),
        "resolved": {"path": str(where.path) if where.path else None, "note": where.note},
    }


@main.group()
def models() -> None:
    """The model registry: list, show, verify and build models (see fleet.models)."""


@models.command("list")
@click.option("--config", "config_path", help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_models(*, config_path: str | None, as_json: bool) -> None:
    """Every model: task, size, context, engines, weights source; RANDOM WEIGHTS marked."""
    registry = _registry(config_path, Settings.from_env())
    if as_json:
        click.echo(json.dumps([summary(e) for e in registry], indent=2))
        return
    table = Table("name", "task", "params", "dtype", "context", "engines", "source", "weights")
    for e in registry:
        weights = f"[bold yellow]{RANDOM}[/]" if not e.pretrained else "pretrained"
        table.add_row(
            e.name, e.task.value, format_params(e.params_b), e.dtype.value, f"{e.max_context:,}",
            ", ".join(e.engines), e.source.kind, weights,
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(registry)} model(s)")


@models.command("show")
@click.argument("name")
@click.option("--config", "config_path", help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def show_model(*, name: str, config_path: str | None, as_json: bool) -> None:
    """One model in full: fields, card, weights source, size, load time, where it resolves."""
    settings = Settings.from_env()
    registry = _registry(config_path, settings)
    (entry,) = _entries(registry, (name,))
    info = details(entry, registry, settings.model_cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    resolved = info["resolved"]
    rows = [
        ("name", entry.name),
        ("aliases", ", ".join(entry.aliases) or "-"),
        ("task", f"{entry.task.value} (serves {', '.join(info['kinds'])})"),
        ("weights", info["weights"]),
        ("params", f"{format_params(entry.params_b)} ({entry.params_b:g} B)"),
        ("dtype", entry.dtype.value),
        ("context", f"{entry.max_context:,} tokens"),
        ("format", entry.format + (f" on {entry.base}" if entry.base else "")),
        ("engines", ", ".join(entry.engines)),
        (
            "engine args",
            json.dumps(entry.engine_args, sort_keys=True) if entry.engine_args else "-",
        ),
        ("source", info["source_description"]),
        ("revision", entry.revision),
        ("size", f"{entry.weights_gb:.4g} GB"),
        ("load", f"{info['load_s']:.3g} s at {registry.load_gbps:g} GB/s"),
        ("resolves to", resolved["path"] or "-"),
        ("", resolved["note"]),
        ("card", entry.card or "-"),
    ]
    for key, value in rows:
        console.print(f"[bold]{key:12}[/] {escape(value)}")


@models.command("verify")
@click.argument("names", nargs=-1)
@click.option("--config", "config_path", help=CONFIG_HELP)
def verify_models(*, names: tuple[str, ...], config_path: str | None) -> None:
    """Resolve (fetch or build once) and load each model's weights; exit 1 if any fails.

    NAMES default to every model. Each load is light: one sentence encoded, or one forward
    pass, with the first engine library installed here. Nothing reaches a model hub.
    """
    from fleet.models.verify import verify  # noqa: PLC0415 - torch loads only to verify

    settings = Settings.from_env()
    registry = _registry(config_path, settings)
    failed = 0
    for entry in _entries(registry, names):
        verdict = verify(entry, registry, settings.model_cache)
        random = f" [yellow]{RANDOM}[/]" if not entry.pretrained else ""
        if verdict.ok:
            console.print(f"[green]OK[/]   {entry.name}{random}: {escape(verdict.detail)}")
        else:
            failed += 1
            detail = verdict.detail.removeprefix(f"model {entry.name}: ")
            console.print(f"[red]FAIL[/] {entry.name}: {escape(detail)}")
    if failed:
        err.print(f"[red]{failed} model(s) failed to verify[/]")
        sys.exit(1)


@models.command("build")
@click.argument("model", type=click.Choice(["tiny-llama"]))
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
def build_model(*, model: str, directory: Path, seed: int) -> None:
    """Build MODEL into DIRECTORY; the same seed gives the same bytes. Its weights are random.

    DIRECTORY is created, or replaced when it holds an earlier build; any other non-empty
    directory is refused (exit 2).
    """
    from fleet.models import tinyllama  # noqa: PLC0415 - torch loads only to build

    if directory.exists() and any(directory.iterdir()) and not tinyllama.is_built(directory):
        _fail(f"{directory} is not empty and holds no {model} build; refusing to replace it")
    tinyllama.build(directory, seed)
    manifest = json.loads((directory / tinyllama.MANIFEST).read_text("utf-8"))
    console.print(f"built {model} (seed {seed}) in {escape(str(directory))}")
    console.print(f"model.safetensors sha256 {manifest['files']['model.safetensors']}")
    console.print(
        f"[bold yellow]{RANDOM}[/]: not a pretrained model; {manifest['parameters']:,} parameters"
        " drawn at random, its text is gibberish"
    )

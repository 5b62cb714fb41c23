"""``fleet dlq list|show ID|requeue ID|requeue --all``: the dead-letter queue from the shell.

Exit codes as the rest of the CLI: 0 ok, 1 broker unreachable, 2 unknown id or an
entry that cannot be resubmitted (its spec is invalid or fits nowhere now).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.markup import escape
from rich.table import Table

from fleet.cli import EXIT_INPUT, console, err, main
from fleet.dlq import DeadLetter, DeadLetterQueue, UnknownEntryError
from fleet.settings import Settings, masked

if TYPE_CHECKING:
    from collections.abc import Callable

    from fleet.client import TaskHandle
    from fleet.execution import ExecutionStore

T = TypeVar("T")


def _queue() -> DeadLetterQueue:
    from fleet.app import create_app  # noqa: PLC0415 - keep `fleet --help` light

    settings = Settings.from_env()
    return DeadLetterQueue(settings, create_app(settings))


def _store(settings: Settings) -> ExecutionStore | None:
    from fleet.execution import RedisExecutionStore, state_url  # noqa: PLC0415

    url = state_url(os.environ, settings.broker_url)
    return (
        None if url is None else RedisExecutionStore.from_url(url, settings.namespace, settings.tls)
    )


def _broker_call(dlq: DeadLetterQueue, call: Callable[[], T]) -> T:
    from kombu.exceptions import OperationalError  # noqa: PLC0415
    from redis import RedisError  # noqa: PLC0415

    try:
        return call()
    except UnknownEntryError as exc:
        err.print(f"[red]{escape(str(exc.args[0]))}[/]")
        sys.exit(EXIT_INPUT)
    except (OperationalError, RedisError, OSError) as exc:
        err.print(
            f"[red]cannot reach the broker at {masked(dlq.settings.broker_url)}:[/] {type(exc).__name__}"
        )
        sys.exit(1)


def _row(e: DeadLetter) -> dict[str, Any]:
    return {
        "task_id": e.task_id,
        "reason": e.reason,
        "attempts": e.attempts,
        "queue": e.queue,
        "dead_lettered_at": e.dead_lettered_at,
        "error": e.error,
    }


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


@main.group()
def dlq() -> None:
    """Dead-lettered tasks: list, show and requeue them (see fleet.dlq)."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_entries(as_json: bool) -> None:  # noqa: FBT001 - click passes flags as booleans
    """Every dead-lettered task, oldest first (browsing loses none)."""
    queue = _queue()
    entries = _broker_call(queue, queue.entries)
    if as_json:
        click.echo(json.dumps([_row(e) for e in entries], indent=2))
        return
    table = Table("task id", "reason", "attempts", "queue", "when", "error", title=queue.name)
    for e in entries:
        table.add_row(
            e.task_id, e.reason, str(e.attempts), e.queue or "-", _when(e.dead_lettered_at),
            escape(e.error[:80]),
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(entries)} dead-lettered task(s)")


@dlq.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def show(task_id: str, as_json: bool) -> None:  # noqa: FBT001 - click passes flags as booleans
    """One entry in full: spec, placement, reason, last error (TASK_ID or a unique prefix)."""
    queue = _queue()
    entry = _broker_call(queue, lambda: queue.find(task_id))
    if as_json:
        click.echo(json.dumps(entry.shown(), indent=2))
        return
    for key, value in entry.shown().items():
        shown = json.dumps(value) if isinstance(value, dict) else str(value)
        if key == "dead_lettered_at":
            shown = _when(entry.dead_lettered_at)
        console.print(f"[bold]{key:17}[/] {escape(shown)}")


def _requeue_failed(entry: DeadLetter, exc: Exception) -> str:
    return f"{entry.task_id}: not requeued ({type(exc).__name__}: {exc})"


@dlq.command()
@click.argument("task_id", required=False)
@click.option("--all", "every", is_flag=True, help="Requeue every entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the new task ids as JSON.")
def requeue(task_id: str | None, every: bool, as_json: bool) -> None:  # noqa: FBT001 - click flags
    """Resubmit TASK_ID's spec (placed again, attempts reset) and remove its entry; or --all."""
    from fleet.client import Fleet  # noqa: PLC0415
    from fleet.placement import NoPlacementError  # noqa: PLC0415
    from fleet.spec import SpecError  # noqa: PLC0415

    if every == (task_id is not None):
        err.print("[red]give a TASK_ID or --all (not both)[/]")
        sys.exit(EXIT_INPUT)
    queue = _queue()
    store = _store(queue.settings)
    done: list[tuple[DeadLetter, TaskHandle | Exception]]
    with Fleet.from_env() as fleet:
        if every:
            done = _broker_call(queue, lambda: queue.requeue_all(fleet, store))
        else:
            try:
                done = [_broker_call(queue, lambda: queue.requeue(task_id or "", fleet, store))]
            except (SpecError, NoPlacementError) as exc:
                entry = queue.find(task_id or "")
                _fail(_requeue_failed(entry, exc))
    rows = [
        {"old_task_id": e.task_id, "task_id": r.id, "queue": r.placement.queue}
        if not isinstance(r, Exception)
        else {"old_task_id": e.task_id, "error": str(r)}
        for e, r in done
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                err.print(
                    f"[yellow]{escape(row['old_task_id'])}: not requeued: {escape(row['error'])}"
                )
            else:
                console.print(
                    f"requeued {row['old_task_id']} -> {row['task_id']} on {row['queue']}"
                )
    if any("error" in row for row in rows):
        sys.exit(EXIT_INPUT)


def _fail(message: str) -> NoReturn:
    err.print(f"[red]{escape(message)}[/]")
    sys.exit(EXIT_INPUT)

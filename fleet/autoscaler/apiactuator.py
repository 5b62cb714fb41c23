"""Act on API pools: set the running API workers' in-flight limits through Celery remote control.

An API pool's desired concurrency (``ApiPoolDecision.desired_concurrency``) is spread
over its live workers (``accelerator == api-<provider>``), the first ones taking the
remainder, at least 1 each (a worker with nothing to do keeps one slot so it can pick the
next call up). Each change is one broadcast to one worker of fleet's own absolute
command, ``fleet_api_concurrency(n=target)`` (``workers.apicontrol``): the worker sets
its consumer's prefetch count, and so the calls it has in flight, to ``target`` clamped
to its pool's threads. Celery's ``pool_grow`` / ``pool_shrink`` / ``autoscale`` are not
used: API workers run the threads pool, which implements none of them.

A worker whose reported concurrency (``WorkerObservation.concurrency``; 0 when unknown)
differs from its share gets the command; one whose share is above its thread count is
clamped there and keeps reporting that, so it gets the command again on each loop (cheap,
and harmless: the command is absolute).

No worker, no change: starting API workers is the job of whatever runs them (``fleet
worker --api <provider>``); the decision still reports what it wants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.autoscaler.model import ApiPoolDecision, WorkerObservation
from fleet.obs.logs import get_logger

log = get_logger("fleet.autoscaler")
COMMAND = "fleet_api_concurrency"  # the name of the remote-control function in workers.apicontrol


@dataclass(frozen=True, slots=True)
class ConcurrencyChange:
    """Set one worker to ``target`` concurrent calls (``current`` 0 when unknown)."""

    provider: str
    hostname: str
    current: int
    target: int


def concurrency_changes(
    decisions: Iterable[ApiPoolDecision], workers: Iterable[WorkerObservation]
) -> list[ConcurrencyChange]:
    """The per-worker changes that carry the API decisions out (pure; sorted by host)."""
    by_provider: dict[str, list[WorkerObservation]] = {}
    for w in workers:
        if w.accelerator.startswith("api-"):
            by_provider.setdefault(w.accelerator.removeprefix("api-"), []).append(w)
    out: list[ConcurrencyChange] = []
    for d in decisions:
        hosts = sorted(by_provider.get(d.provider, []), key=lambda w: w.hostname)
        if not hosts:
            continue
        each, extra = divmod(d.desired_concurrency, len(hosts))
        for i, w in enumerate(hosts):
            target = max(1, each + (1 if i < extra else 0))
            if target != w.concurrency:
                out.append(ConcurrencyChange(d.provider, w.hostname, w.concurrency, target))
    return out


class Control(Protocol):
    """The part of ``celery.app.control.Control`` this module uses."""

    def broadcast(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        destination: list[str] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Any:  # noqa: ANN401
        """Celery's remote-control broadcast."""


def apply_concurrency(control: Control, changes: Iterable[ConcurrencyChange]) -> int:
    """Send each change to its worker (no reply awaited); returns how many were sent."""
    sent = 0
    for c in changes:
        control.broadcast(COMMAND, arguments={"n": c.target}, destination=[c.hostname])
        sent += 1
        log.info(
            "autoscaler.api_concurrency",
            provider=c.provider,
            worker=c.hostname,
            command=COMMAND,
            current=c.current,
            target=c.target,
        )
    return sent

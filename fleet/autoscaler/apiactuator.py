"""Act on API pools: set the running API workers' concurrency through Celery remote control.

An API pool's desired concurrency (``ApiPoolDecision.desired_concurrency``) is spread
over its live workers (``accelerator == api-<provider>``), the first ones taking the
remainder, at least 1 each (a worker with nothing to do keeps one slot so it can pick the
next call up). Each change is one of Celery's remote-control broadcasts:

* worker concurrency known (``WorkerObservation.concurrency > 0``): ``pool_grow(n)`` or
  ``pool_shrink(n)`` by the difference;
* unknown: ``autoscale(max=target, min=target)``, which sets it absolutely (the worker
  must run with ``--autoscale``; a worker without it ignores the command).

No worker, no change: starting API workers is the job of whatever runs them (``fleet
worker --accelerator api-<provider>``); the decision still reports what it wants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.autoscaler.model import ApiPoolDecision, WorkerObservation
from fleet.obs.logs import get_logger

log = get_logger("fleet.autoscaler")
CONTROL_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class ConcurrencyChange:
    """Set one worker to ``target`` concurrent calls (``current`` 0 when unknown)."""

    provider: str
    hostname: str
    current: int
    target: int

    @property
    def command(self) -> tuple[str, int]:
        """The remote-control command and its count: ``pool_grow``, ``pool_shrink`` or ``autoscale``."""
        if self.current <= 0:
            return "autoscale", self.target
        if self.target > self.current:
            return "pool_grow", self.target - self.current
        return "pool_shrink", self.current - self.target


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

    def pool_grow(self, n: int = 1, destination: list[str] | None = None, **kwargs: Any) -> Any:  # noqa: ANN401
        """Celery's ``pool_grow`` broadcast."""

    def pool_shrink(self, n: int = 1, destination: list[str] | None = None, **kwargs: Any) -> Any:  # noqa: ANN401
        """Celery's ``pool_shrink`` broadcast."""

    def autoscale(
        self,
        max: int,  # noqa: A002 - Celery's parameter name
        min: int,  # noqa: A002
        destination: list[str] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Any:  # noqa: ANN401
        """Celery's ``autoscale`` broadcast."""


def apply_concurrency(control: Control, changes: Iterable[ConcurrencyChange]) -> int:
    """Send each change to its worker; returns how many were sent."""
    sent = 0
    for c in changes:
        command, n = c.command
        dest = [c.hostname]
        if command == "pool_grow":
            control.pool_grow(n, destination=dest)
        elif command == "pool_shrink":
            control.pool_shrink(n, destination=dest)
        else:
            control.autoscale(max=n, min=n, destination=dest)
        sent += 1
        log.info(
            "autoscaler.api_concurrency",
            provider=c.provider,
            worker=c.hostname,
            command=command,
            n=n,
            target=c.target,
        )
    return sent

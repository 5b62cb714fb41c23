"""Does the RabbitMQ consumer timeout outlast our longest task? Checked at worker start-up.

RabbitMQ closes the channel of a consumer that holds an unacknowledged delivery longer
than its *consumer timeout*, and the message is delivered again: with late acks, a task
still running past that timeout would be run twice (issue 6, fault 4). From 3.12 the
timeout can be set per queue (``x-consumer-timeout``, which ``fleet.app`` sets to the
redelivery window); below 3.12 only the server-wide ``consumer_timeout`` in
``rabbitmq.conf`` counts (default 30 min: shorter than a 6 h batch or a 24 h training).

The decision is pure (``effective_consumer_timeout``, ``check_consumer_timeout``); the
thin I/O edge (``warn_if_consumer_timeout_short``) reads the server version from the AMQP
handshake and, below 3.12, finds the server-wide value from, in order:

1. ``FLEET_RABBITMQ_CONSUMER_TIMEOUT_MS``, declared by operations (``0``/``off``: disabled);
2. ``rabbitmqctl eval 'application:get_env(rabbit, consumer_timeout).'`` when the broker
   is on this host and the CLI can reach the node (``FLEET_RABBITMQCTL`` names the
   binary, ``FLEET_RABBITMQ_NODE`` the node; both optional);
3. the documented default, 1,800,000 ms.

It logs ``broker.consumer_timeout_short`` (WARNING) naming both figures, where the figure
came from, and the fix, when the timeout is shorter than the longest time limit of the
kinds the worker consumes. It never stops the worker: a warning is the contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from fleet.obs.logs import get_logger
from fleet.queues import parse_queue
from fleet.settings import Settings, masked
from fleet.spec import TaskKind

log = get_logger("fleet.brokercheck")

DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000
PER_QUEUE_TIMEOUT_SINCE = (3, 12)
DECLARED_ENV = "FLEET_RABBITMQ_CONSUMER_TIMEOUT_MS"
PROBE_TIMEOUT_S = 10.0
PROBE_EXPR = "application:get_env(rabbit, consumer_timeout)."
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class TimeoutSource(StrEnum):
    """Where the effective consumer timeout was found."""

    QUEUE_ARGUMENT = "x-consumer-timeout queue argument (RabbitMQ 3.12+)"
    DECLARED = DECLARED_ENV
    RABBITMQCTL = "rabbitmqctl eval on the local node"
    DEFAULT = "RabbitMQ's documented default (30 min)"


@dataclass(frozen=True, slots=True)
class ConsumerTimeout:
    """The timeout in force: ``ms`` None means disabled (no redelivery by timeout)."""

    ms: int | None
    source: TimeoutSource


@dataclass(frozen=True, slots=True)
class TimeoutFinding:
    """The outcome of the check; ``short`` is what warrants the warning."""

    timeout: ConsumerTimeout
    longest_limit_s: int
    server_version: str

    @property
    def short(self) -> bool:
        """True when a task may run longer than the broker waits for its ack."""
        return self.timeout.ms is not None and self.timeout.ms < self.longest_limit_s * 1000

    def fix(self) -> str:
        """What an operator should do about a short timeout."""
        needed = self.longest_limit_s * 1000
        return (
            f"set consumer_timeout = {needed} (or more) in rabbitmq.conf and restart the node, "
            f"or upgrade RabbitMQ to 3.12+ where fleet sets x-consumer-timeout per queue"
        )


def parse_version(text: str) -> tuple[int, ...]:
    """``"3.10.8"`` -> ``(3, 10, 8)``; trailing text after the numbers is ignored."""
    numbers = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    if numbers is None:
        return ()
    return tuple(int(p) for p in numbers.group(1).split("."))


def parse_declared(value: str | None) -> ConsumerTimeout | None:
    """``FLEET_RABBITMQ_CONSUMER_TIMEOUT_MS`` as declared by operations (None: not set).

    Milliseconds; ``0``, ``off``, ``false`` or ``infinity`` mean disabled.

    Raises:
        ValueError: anything else.

    """
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if value in {"0", "off", "false", "infinity", "disabled"}:
        return ConsumerTimeout(None, TimeoutSource.DECLARED)
    try:
        ms = int(value)
    except ValueError:
        raise ValueError(
            f"{DECLARED_ENV} must be milliseconds (or 0/off for disabled), got {value!r}"
        ) from None
    if ms < 0:
        raise ValueError(f"{DECLARED_ENV} must not be negative, got {ms}")
    return ConsumerTimeout(ms, TimeoutSource.DECLARED)


def parse_probe(output: str) -> ConsumerTimeout | None:
    """The output of ``rabbitmqctl eval`` on ``consumer_timeout`` (None: no usable answer).

    ``{ok,5000}`` -> 5000 ms; ``{ok,false}``/``{ok,infinity}`` -> disabled; ``undefined``
    (not set, so the default applies) or anything unrecognised -> None.
    """
    found = re.search(r"\{ok,\s*([0-9]+|false|infinity)\s*\}", output)
    if found is None:
        return None
    value = found.group(1)
    ms = None if value in {"false", "infinity"} else int(value)
    return ConsumerTimeout(ms, TimeoutSource.RABBITMQCTL)


def effective_consumer_timeout(
    server_version: str,
    queue_argument_ms: int | None,
    declared: ConsumerTimeout | None,
    probed: ConsumerTimeout | None,
) -> ConsumerTimeout:
    """The consumer timeout that applies to fleet's queues (pure).

    From 3.12 the queue argument wins; below it, the first of declared, probed and
    the documented default.

    Args:
        server_version: from the AMQP handshake (``"3.10.8"``).
        queue_argument_ms: the ``x-consumer-timeout`` fleet declares on its queues.
        declared: ``parse_declared`` of the operator's variable (None: not set).
        probed: ``parse_probe`` of ``rabbitmqctl`` (None: not asked or no answer).

    """
    if parse_version(server_version) >= PER_QUEUE_TIMEOUT_SINCE and queue_argument_ms:
        return ConsumerTimeout(queue_argument_ms, TimeoutSource.QUEUE_ARGUMENT)
    return declared or probed or ConsumerTimeout(DEFAULT_CONSUMER_TIMEOUT_MS, TimeoutSource.DEFAULT)


def longest_time_limit_s(
    queues: Iterable[str], namespace: str, limits: Mapping[TaskKind, int]
) -> int:
    """The longest hard time limit of the task kinds behind ``queues`` (0 if none is fleet's)."""
    kinds = {ref.kind for q in queues if (ref := parse_queue(q, namespace)) is not None}
    return max((limits[k] for k in kinds), default=0)


def check_consumer_timeout(
    timeout: ConsumerTimeout, longest_limit_s: int, server_version: str
) -> TimeoutFinding:
    """Compare the timeout with the longest task limit (pure; see ``TimeoutFinding.short``)."""
    return TimeoutFinding(timeout, longest_limit_s, server_version)


# --------------------------------------------------------------------------- I/O edge


def is_local(url: str) -> bool:
    """True when the broker URL points at this host (only then is rabbitmqctl worth asking)."""
    host = (urlsplit(url).hostname or "localhost").lower()
    return host in LOCAL_HOSTS


def probe_rabbitmqctl(env: Mapping[str, str]) -> ConsumerTimeout | None:
    """Ask the local node for its ``consumer_timeout`` (None when it cannot be asked).

    Bounded by ``PROBE_TIMEOUT_S``; any failure (no CLI, no cookie, node down) is None.
    """
    binary = env.get("FLEET_RABBITMQCTL") or shutil.which("rabbitmqctl")
    if not binary:
        return None
    argv = [binary]
    if env.get("FLEET_RABBITMQ_NODE"):
        argv += ["-n", env["FLEET_RABBITMQ_NODE"]]
    try:
        done = subprocess.run(  # noqa: S603 - the operator's rabbitmqctl with a fixed expression
            [*argv, "eval", PROBE_EXPR],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
            env=dict(env),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_probe(done.stdout) if done.returncode == 0 else None


def server_version(
    broker_url: str, ssl: dict[str, Any] | None = None, timeout_s: float = 5.0
) -> str:
    """The RabbitMQ version from the AMQP handshake (``server_properties``).

    Raises:
        Exception: whatever kombu raises when the broker cannot be reached.

    """
    from kombu import Connection  # noqa: PLC0415 - only workers on RabbitMQ need it

    with Connection(broker_url, ssl=ssl or False, connect_timeout=timeout_s) as conn:
        conn.ensure_connection(max_retries=1)
        props = conn.connection.server_properties or {}
        version = props.get("version", "")
        return version.decode() if isinstance(version, bytes) else str(version)


def warn_if_consumer_timeout_short(
    settings: Settings,
    queues: Iterable[str],
    limits: Mapping[TaskKind, int],
    queue_argument_ms: int | None,
    ssl: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> TimeoutFinding | None:
    """Log ``broker.consumer_timeout_short`` when it applies (RabbitMQ only; None on Redis).

    ``ssl`` is the broker's ``broker_use_ssl``. A broker that cannot be reached now is
    logged and skipped (the worker's own connection retries will report it).

    Raises:
        ValueError: ``FLEET_RABBITMQ_CONSUMER_TIMEOUT_MS`` is malformed.

    """
    if settings.is_redis:
        return None
    env = os.environ if env is None else env
    declared = parse_declared(env.get(DECLARED_ENV))
    try:
        version = server_version(settings.broker_url, ssl)
    except Exception as exc:  # noqa: BLE001 - any failure: skip the check, never the worker
        log.warning(
            "broker.consumer_timeout_unchecked",
            broker=masked(settings.broker_url),
            error=type(exc).__name__,
        )
        return None
    needs_probe = (
        parse_version(version) < PER_QUEUE_TIMEOUT_SINCE
        and declared is None
        and is_local(settings.broker_url)
    )
    probed = probe_rabbitmqctl(env) if needs_probe else None
    timeout = effective_consumer_timeout(version, queue_argument_ms, declared, probed)
    finding = check_consumer_timeout(
        timeout, longest_time_limit_s(queues, settings.namespace, limits), version
    )
    fields = {
        "server_version": version,
        "consumer_timeout_ms": timeout.ms,
        "source": str(timeout.source),
        "longest_task_limit_s": finding.longest_limit_s,
    }
    if finding.short:
        log.warning("broker.consumer_timeout_short", **fields, fix=finding.fix())
    else:
        log.info("broker.consumer_timeout_ok", **fields)
    return finding

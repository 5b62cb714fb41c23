"""The RabbitMQ consumer-timeout check: which timeout applies, and when it is too short."""

from __future__ import annotations

import pytest

from fleet.app import REDELIVERY_WINDOW_S, TIME_LIMITS
from fleet.brokercheck import (
    DEFAULT_CONSUMER_TIMEOUT_MS,
    ConsumerTimeout,
    TimeoutSource,
    check_consumer_timeout,
    effective_consumer_timeout,
    is_local,
    longest_time_limit_s,
    parse_declared,
    parse_probe,
    parse_version,
)
from fleet.spec import TaskKind

QUEUE_ARG = REDELIVERY_WINDOW_S * 1000
DECLARED = ConsumerTimeout(7_200_000, TimeoutSource.DECLARED)
PROBED = ConsumerTimeout(5000, TimeoutSource.RABBITMQCTL)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.10.8", (3, 10, 8)), ("3.12.0-rc.1", (3, 12, 0)), ("4.0", (4, 0)), ("", ())],
)
def test_parse_version(text, expected):
    """Versions compare as number tuples; suffixes are dropped."""
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("version", "declared", "probed", "expected"),
    [
        # From 3.12 the per-queue argument fleet sets is what counts.
        ("3.12.0", None, PROBED, ConsumerTimeout(QUEUE_ARG, TimeoutSource.QUEUE_ARGUMENT)),
        ("4.0.2", DECLARED, None, ConsumerTimeout(QUEUE_ARG, TimeoutSource.QUEUE_ARGUMENT)),
        # Below 3.12: the operator's declaration, then rabbitmqctl, then the default.
        ("3.10.8", DECLARED, PROBED, DECLARED),
        ("3.10.8", None, PROBED, PROBED),
        (
            "3.11.9",
            None,
            None,
            ConsumerTimeout(DEFAULT_CONSUMER_TIMEOUT_MS, TimeoutSource.DEFAULT),
        ),
    ],
)
def test_effective_timeout_by_version_and_source(version, declared, probed, expected):
    """The timeout in force and where it came from."""
    assert effective_consumer_timeout(version, QUEUE_ARG, declared, probed) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5000", ConsumerTimeout(5000, TimeoutSource.DECLARED)),
        ("off", ConsumerTimeout(None, TimeoutSource.DECLARED)),
        ("0", ConsumerTimeout(None, TimeoutSource.DECLARED)),
    ],
)
def test_parse_declared(value, expected):
    """Milliseconds, or 0/off for a disabled timeout; unset is None."""
    assert parse_declared(value) == expected


@pytest.mark.parametrize("value", ["5s", "-1", "soon"])
def test_parse_declared_refuses_nonsense(value):
    """A malformed declaration names the variable."""
    with pytest.raises(ValueError, match="FLEET_RABBITMQ_CONSUMER_TIMEOUT_MS"):
        parse_declared(value)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("{ok,5000}\n", ConsumerTimeout(5000, TimeoutSource.RABBITMQCTL)),
        ("{ok, 1800000}", ConsumerTimeout(1_800_000, TimeoutSource.RABBITMQCTL)),
        ("{ok,false}", ConsumerTimeout(None, TimeoutSource.RABBITMQCTL)),
        ("undefined\n", None),
        ("Error: unable to perform an operation on node", None),
    ],
)
def test_parse_probe(output, expected):
    """The answer of rabbitmqctl: a value, disabled, or nothing usable (the default then applies)."""
    assert parse_probe(output) == expected


def test_longest_limit_of_the_consumed_kinds():
    """Only the kinds behind the worker's own queues count; foreign queues are ignored."""
    queues = ["ns.inference.nvidia-l4", "ns.embedding.nvidia-l4", "celery"]
    assert longest_time_limit_s(queues, "ns.", TIME_LIMITS) == TIME_LIMITS[TaskKind.INFERENCE]
    queues.append("ns.training.nvidia-l4.x2")
    assert longest_time_limit_s(queues, "ns.", TIME_LIMITS) == TIME_LIMITS[TaskKind.TRAINING]
    assert longest_time_limit_s(["celery"], "", TIME_LIMITS) == 0


@pytest.mark.parametrize(
    ("ms", "limit_s", "short"),
    [
        (5000, 900, True),  # the test node's 5 s against a 15 min inference limit
        (DEFAULT_CONSUMER_TIMEOUT_MS, 24 * 3600, True),  # 30 min default vs a day of training
        (DEFAULT_CONSUMER_TIMEOUT_MS, 900, False),
        (900_000, 900, False),  # equal is enough: the hard limit kills the task first
        (None, 24 * 3600, False),  # disabled: never redelivered by timeout
    ],
)
def test_short_when_below_the_longest_limit(ms, limit_s, short):
    """The warning condition, and the fix it names."""
    finding = check_consumer_timeout(ConsumerTimeout(ms, TimeoutSource.DEFAULT), limit_s, "3.10.8")
    assert finding.short is short
    assert f"consumer_timeout = {limit_s * 1000}" in finding.fix()
    assert "3.12" in finding.fix()


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", True),
        ("amqps://localhost//", True),
        ("amqp://rabbit.prod.internal//", False),
    ],
)
def test_rabbitmqctl_only_asked_for_a_local_broker(url, local):
    """The CLI probe is only tried when the broker is on this host."""
    assert is_local(url) is local

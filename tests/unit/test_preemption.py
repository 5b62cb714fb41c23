"""Spot notices: the three parsers, the HTTP client against the local fake, the watcher, the drain decisions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes.metadata_server import MetadataServer
from workers.preemption import (
    AWS_NOTICE_S,
    AZURE_NOTICE_S,
    GCP_NOTICE_S,
    MetadataClient,
    Notice,
    PreemptionWatcher,
    check,
    cloud_from_dmi,
    parse_aws,
    parse_azure,
    parse_gcp,
    resolve_cloud,
)
from workers.shutdown import (
    GracefulStop,
    Step,
    drain_budget,
    grace_from_env,
    stop_decision,
)

NOW = datetime(2026, 11, 23, 6, 0, 0, tzinfo=UTC).timestamp()


# --- AWS


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, b"Not Found", None),
        (
            200,
            b'{"action": "terminate", "time": "2026-11-23T06:02:00Z"}',
            Notice("aws", "terminate", NOW + 120),
        ),
        (
            200,
            b'{"action": "stop", "time": "2026-11-23T06:01:30Z"}',
            Notice("aws", "stop", NOW + 90),
        ),
        (200, b'{"action": "hibernate"}', Notice("aws", "hibernate", NOW + AWS_NOTICE_S)),
        (
            200,
            b'{"action": "terminate", "time": "soon"}',
            Notice("aws", "terminate", NOW + AWS_NOTICE_S),
        ),
        (200, b'{"action": "reboot", "time": "2026-11-23T06:02:00Z"}', None),
        (200, b"{not json", None),
        (200, b"[]", None),
        (200, b"", None),
        (200, b"\xff\xfe", None),
        (401, b'{"action": "terminate"}', None),
        (0, b"", None),
    ],
)
def test_aws_instance_action(status: int, body: bytes, expected: Notice | None) -> None:
    """404 is no notice; a 200 with a known action is one, its time the deadline (else 2 min)."""
    assert parse_aws(status, body, NOW) == expected


# --- GCE


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"TRUE", Notice("gcp", "preempt", NOW + GCP_NOTICE_S)),
        (200, b"TRUE\n", Notice("gcp", "preempt", NOW + GCP_NOTICE_S)),
        (200, b"FALSE", None),
        (200, b"", None),
        (200, b"maybe", None),
        (403, b"TRUE", None),
        (0, b"", None),
    ],
)
def test_gce_preempted_flag(status: int, body: bytes, expected: Notice | None) -> None:
    """Only a 200 ``TRUE`` is a notice (with GCE's 30 s)."""
    assert parse_gcp(status, body, NOW) == expected


# --- Azure


def azure_doc(*events: dict[str, object]) -> bytes:
    return json.dumps({"DocumentIncarnation": 2, "Events": list(events)}).encode()


PREEMPT = {
    "EventId": "A",
    "EventType": "Preempt",
    "ResourceType": "VirtualMachine",
    "Resources": ["vm-1"],
    "EventStatus": "Scheduled",
    "NotBefore": "Mon, 23 Nov 2026 06:00:45 GMT",
}


@pytest.mark.parametrize(
    ("body", "resource", "expected"),
    [
        (azure_doc(), None, None),
        (azure_doc(PREEMPT), None, Notice("azure", "preempt", NOW + 45)),
        (azure_doc(PREEMPT), "vm-1", Notice("azure", "preempt", NOW + 45)),
        (azure_doc(PREEMPT), "vm-2", None),  # another VM's eviction
        (azure_doc({**PREEMPT, "Resources": []}), "vm-2", Notice("azure", "preempt", NOW + 45)),
        (azure_doc({**PREEMPT, "NotBefore": ""}), None, Notice("azure", "preempt", NOW)),
        (
            azure_doc({**PREEMPT, "NotBefore": "garbage"}),
            None,
            Notice("azure", "preempt", NOW + AZURE_NOTICE_S),
        ),
        (
            azure_doc({**PREEMPT, "NotBefore": 17}),
            None,
            Notice("azure", "preempt", NOW + AZURE_NOTICE_S),
        ),
        (azure_doc({**PREEMPT, "EventType": "Reboot"}), None, None),
        (azure_doc({**PREEMPT, "EventType": "Freeze"}), None, None),
        (
            azure_doc(
                {**PREEMPT, "NotBefore": "Mon, 23 Nov 2026 06:01:00 GMT"},
                PREEMPT,
            ),
            None,
            Notice("azure", "preempt", NOW + 45),  # the earliest event wins
        ),
        (azure_doc("not an event", 3, None), None, None),
        (b'{"Events": "nope"}', None, None),
        (b'{"Events": null}', None, None),
        (b"[1, 2]", None, None),
        (b"{{{", None, None),
        (b"", None, None),
    ],
)
def test_azure_scheduled_events(body: bytes, resource: str | None, expected: Notice | None) -> None:
    """A Preempt event is a notice at its NotBefore; others, other VMs' and malformed bodies are not."""
    assert parse_azure(200, body, NOW, resource) == expected


def test_azure_non_200_is_no_notice() -> None:
    """An error status is no notice, whatever the body."""
    assert parse_azure(500, azure_doc(PREEMPT), NOW) is None


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=599))
def test_no_parser_raises_on_any_body(body: bytes, status: int) -> None:
    """Arbitrary bytes and statuses never crash a parser (a notice or None)."""
    for parse in (parse_aws, parse_gcp, parse_azure):
        result = parse(status, body, NOW)
        assert result is None or isinstance(result, Notice)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_no_parser_raises_on_any_json(value: object) -> None:
    """Any well-formed JSON of the wrong shape is no crash either."""
    body = json.dumps(value).encode()
    for parse in (parse_aws, parse_azure):
        result = parse(200, body, NOW)
        assert result is None or isinstance(result, Notice)


# --- cloud selection


@pytest.mark.parametrize(
    ("env", "vendor", "expected"),
    [
        ({"FLEET_CLOUD": "aws"}, None, "aws"),
        ({"FLEET_CLOUD": "GCP"}, "Amazon EC2", "gcp"),  # the setting wins
        ({"FLEET_CLOUD": "none"}, "Amazon EC2", None),
        ({}, "Amazon EC2\n", "aws"),
        ({}, "Google\n", "gcp"),
        ({}, "Microsoft Corporation\n", "azure"),
        ({}, "QEMU\n", None),
        ({}, None, None),
    ],
)
def test_cloud_is_named_or_detected(
    env: dict[str, str], vendor: str | None, expected: str | None
) -> None:
    """FLEET_CLOUD (or ``none``) wins; else the DMI vendor decides; else no watcher."""
    assert resolve_cloud(env, vendor) == expected


def test_unknown_cloud_name_is_refused() -> None:
    """A misspelt FLEET_CLOUD is an error, not a silently missing watcher."""
    with pytest.raises(ValueError, match="FLEET_CLOUD"):
        resolve_cloud({"FLEET_CLOUD": "ibm"}, None)


def test_dmi_vendor_names() -> None:
    """Vendor strings as the three clouds' VMs report them."""
    assert [cloud_from_dmi(v) for v in ("Amazon EC2", "Google", "Microsoft Corporation", "")] == [
        "aws",
        "gcp",
        "azure",
        None,
    ]


# --- the HTTP client against the local fake


@pytest.fixture
def fake() -> Iterator[MetadataServer]:
    with MetadataServer() as server:
        yield server


def test_aws_client_uses_imdsv2_tokens(fake: MetadataServer) -> None:
    """PUT for a token with a TTL header, then GET with the token; the token is reused."""
    client = MetadataClient("aws", fake.url)
    assert check(client, NOW) is None
    fake.notice_aws(NOW + 100)
    assert check(client, NOW) == Notice("aws", "terminate", NOW + 100)
    puts = fake.requests("/latest/api/token")
    gets = fake.requests("/latest/meta-data/spot/instance-action")
    assert len(puts) == 1
    assert [r.method for r in puts] == ["PUT"]
    assert puts[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert len(gets) == 2
    assert {r.headers["x-aws-ec2-metadata-token"] for r in gets} == fake.state.tokens


def test_aws_client_renews_a_rejected_token(fake: MetadataServer) -> None:
    """A 401 (token expired) gets one fresh token and one retry."""
    client = MetadataClient("aws", fake.url)
    assert check(client, NOW) is None
    fake.state.tokens.clear()  # the service forgot the token
    fake.notice_aws(NOW + 60, action="stop")
    assert check(client, NOW) == Notice("aws", "stop", NOW + 60)
    assert len(fake.requests("/latest/api/token")) == 2


def test_gce_client_sends_metadata_flavor(fake: MetadataServer) -> None:
    """GET instance/preempted with Metadata-Flavor: Google; TRUE once preempted."""
    client = MetadataClient("gcp", fake.url)
    assert check(client, NOW) is None
    fake.notice_gcp()
    assert check(client, NOW) == Notice("gcp", "preempt", NOW + GCP_NOTICE_S)
    assert {r.headers["metadata-flavor"] for r in fake.requests("/computeMetadata")} == {"Google"}


def test_azure_client_sends_metadata_true(fake: MetadataServer) -> None:
    """GET scheduledevents with the api-version and Metadata: true; a Preempt event is a notice."""
    client = MetadataClient("azure", fake.url)
    assert check(client, NOW, "vm-1") is None
    fake.notice_azure(NOW + 40, resources=("vm-1",))
    notice = check(client, NOW, "vm-1")
    assert notice is not None
    assert notice.deadline == pytest.approx(NOW + 40)
    reqs = fake.requests("/metadata/scheduledevents")
    assert all("api-version=2020-07-01" in r.path for r in reqs)
    assert {r.headers["metadata"] for r in reqs} == {"true"}


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_malformed_bodies_from_the_service_are_no_notice(fake: MetadataServer, cloud: str) -> None:
    """Garbage from the metadata service: no notice, no exception."""
    fake.body_override(b"\x00<html>oops")
    assert check(MetadataClient(cloud, fake.url), NOW) is None


def test_unreachable_service_is_no_notice() -> None:
    """Nothing listening: no notice, no exception (the worker keeps polling)."""
    client = MetadataClient("gcp", "http://127.0.0.1:9", timeout_s=0.5)
    assert check(client, NOW) is None


# --- the watcher, with an injected clock and poll


def test_watcher_hands_over_the_first_notice_once() -> None:
    """Polls until a notice, then calls on_notice exactly once with it."""
    answers: list[Notice | None] = [None, None, Notice("gcp", "preempt", NOW + 30)]
    seen_at: list[float] = []
    got: list[Notice] = []

    def poll(now: float) -> Notice | None:
        seen_at.append(now)
        return answers.pop(0) if answers else None

    watcher = PreemptionWatcher(poll, got.append, clock=lambda: NOW)
    assert watcher.poll_once() is None
    assert watcher.poll_once() is None
    assert watcher.poll_once() == Notice("gcp", "preempt", NOW + 30)
    assert watcher.poll_once() == Notice("gcp", "preempt", NOW + 30)
    assert got == [Notice("gcp", "preempt", NOW + 30)]
    assert seen_at == [NOW, NOW, NOW]


# --- drain decisions (workers.shutdown)


@pytest.mark.parametrize(
    ("grace", "now", "deadline", "margin", "expected"),
    [
        (60, 0, None, 10, 60),  # plain SIGTERM: the grace
        (60, 0, 120, 10, 60),  # AWS's two minutes: the grace still fits
        (60, 0, 30, 10, 20),  # GCE's 30 s: time left minus the margin
        (60, 0, 5, 10, 0),  # too late for any grace: requeue at once
        (0, 0, 120, 10, 0),
    ],
)
def test_drain_budget(
    grace: float, now: float, deadline: float | None, margin: float, expected: float
) -> None:
    """Running tasks get min(grace, time left - margin), never less than zero."""
    assert drain_budget(grace, now, deadline, margin) == expected


@pytest.mark.parametrize(
    ("active", "now", "until", "expected"),
    [
        (0, 0, 10, Step.DONE),
        (0, 20, 10, Step.DONE),
        (2, 5, 10, Step.WAIT),
        (1, 10, 10, Step.REQUEUE),
        (1, 11, 10, Step.REQUEUE),
    ],
)
def test_stop_decision(active: int, now: float, until: float, expected: Step) -> None:
    """Wait while tasks run inside the budget; requeue what still runs at its end."""
    assert stop_decision(active, now, until) is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, 60.0), ({"FLEET_SHUTDOWN_GRACE_S": "2.5"}, 2.5), ({"FLEET_SHUTDOWN_GRACE_S": " "}, 60.0)],
)
def test_grace_from_env(env: dict[str, str], expected: float) -> None:
    """FLEET_SHUTDOWN_GRACE_S, default 60 s."""
    assert grace_from_env(env) == expected


@pytest.mark.parametrize("raw", ["-1", "nan", "soon"])
def test_bad_grace_is_refused(raw: str) -> None:
    """A negative or non-numeric grace is an error at start-up."""
    with pytest.raises(ValueError):  # noqa: PT011 - float() and our check word it differently
        grace_from_env({"FLEET_SHUTDOWN_GRACE_S": raw})


class FakeConsumer:
    """Stands in for Celery's consumer: records the cancel Celery's cold shutdown would make."""

    def __init__(self, running: set[str]) -> None:
        """Share the set of running task ids with the stop under test."""
        self.running = running
        self.cancelled: list[set[str]] = []

    def cancel_active_requests(self) -> None:
        """Cancel everything running (the pool children would be terminated)."""
        self.cancelled.append(set(self.running))
        self.running.clear()


def test_graceful_stop_requeues_what_outlives_the_budget() -> None:
    """With a task still running at the deadline, the consumer's running requests are cancelled once."""
    clock = [100.0]
    running = {"t1"}
    consumer = FakeConsumer(running)
    stop = GracefulStop(60, clock=lambda: clock[0], active_ids=lambda: running, poll_s=0.01)
    stop.attach(consumer)
    stop.begin(5.0, "preempted")
    stop.begin(None, "sigterm")  # the SIGTERM that follows a notice keeps the shorter budget
    clock[0] = 106.0
    assert stop.finished.wait(5)
    assert consumer.cancelled == [{"t1"}]
    assert stop.outcome is not None
    assert stop.outcome.requeued == ("t1",)
    assert stop.outcome.reason == "preempted"
    assert stop.outcome.budget_s == 5.0


def test_graceful_stop_cancels_nothing_when_tasks_finish_in_time() -> None:
    """Tasks done inside the grace: nothing is cancelled (they were acked as usual)."""
    clock = [0.0]
    running = {"t1"}
    consumer = FakeConsumer(running)
    stop = GracefulStop(60, clock=lambda: clock[0], active_ids=lambda: running, poll_s=0.01)
    stop.attach(consumer)
    stop.begin()
    clock[0] = 30.0
    running.clear()
    assert stop.finished.wait(5)
    assert consumer.cancelled == []
    assert stop.outcome is not None
    assert stop.outcome.requeued == ()

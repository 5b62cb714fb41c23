"""Bad input on real parts: the size cap at submit, and a real worker fed malformed messages.

Messages are published straight to a fleet queue with kombu, bypassing the client:
non-JSON bytes labelled JSON, JSON of the wrong shape, valid envelopes around invalid
specs, huge numbers, an oversized body, an unknown task name and a pickle whose payload
would create a file. Contract: each is rejected and logged, never executed; the worker
process stays up; every good task on the same queue completes.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from kombu import Producer

from fleet.app import TASK_NAME
from fleet.cli import main
from fleet.client import Fleet
from fleet.queues import queue_name
from fleet.spec import SpecTooLargeError, TaskKind
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.procs import worker_process
from tests.integration.test_end_to_end import purge, queue_depths

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WAIT_S = float(os.environ.get("FLEET_TEST_BAD_INPUT_WAIT_S", "30"))
WORKER_CAP = 64 * 1024  # FLEET_MAX_TASK_BYTES for the worker under test: oversized is cheap
EMBED: dict[str, Any] = {
    "kind": "embedding",
    "model": {"name": "hash-embed", "params_b": 0.0227, "dtype": "fp32"},
    "input": {"texts": ["a good task"]},
    "tokens_in": 4,
    "requirements": {"accelerators": ["cpu"]},
}


class Detonator:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        """Remember the file the payload would create."""
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        """Unpickling calls ``open(path, "w")``."""
        return (open, (str(self.path), "w"))


@dataclass(frozen=True)
class Raw:
    """One message to publish as is: headers task name, body bytes, content type."""

    label: str
    body: bytes
    content_type: str = "application/json"
    task: str = TASK_NAME


EMBED_ENVELOPE = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def envelope(args: Any, kwargs: Any = None) -> bytes:
    """A protocol-2 body ``[args, kwargs, embed]`` in JSON."""
    return json.dumps([args, {} if kwargs is None else kwargs, EMBED_ENVELOPE]).encode()


def bad_messages(marker: Path) -> list[Raw]:
    """One message per bad-input class (the pickle would create ``marker``)."""
    huge_input = {**EMBED, "input": {"texts": ["x" * (2 * WORKER_CAP)]}}
    return [
        Raw("not json", b"\x80\x81 this is {not json"),
        Raw("args not a list", envelope({"spec": EMBED})),
        Raw("spec a string", envelope(["not a spec"])),
        Raw("spec a number", envelope([42])),
        Raw("missing kwargs", json.dumps([[EMBED]]).encode()),
        Raw("body not a list", b'"just a string"'),
        Raw("body a number", b"5"),
        Raw("body null", b"null"),
        Raw("empty body", b""),
        Raw("invalid spec", envelope([{**EMBED, "model": {"name": "m", "params_b": -1}}])),
        Raw("huge numbers", envelope([{**EMBED, "tokens_in": 10**30}])),
        Raw("huge integer", b"[[" + b"9" * 5000 + b"], {}, {}]"),
        Raw("oversized body", envelope([huge_input])),
        Raw("unknown task", envelope([EMBED]), task="fleet.no_such_task"),
        Raw(
            "pickle",
            pickle.dumps(((Detonator(marker),), {}, EMBED_ENVELOPE)),
            content_type="application/x-python-serialize",
        ),
    ]


def publish_raw(broker: Broker, queue: str, messages: list[Raw]) -> list[str]:
    """Publish each message to ``queue`` with Celery's headers around our body; return the ids."""
    amqp = broker.app.amqp
    ids = []
    # The app's connection: its transport options (Redis key separator) match the worker's.
    with broker.app.connection_for_write() as conn:
        producer = Producer(conn.channel())
        kq = amqp.queues[queue]
        for raw in messages:
            task_id = str(uuid.uuid4())
            headers = amqp.create_task_message(task_id, raw.task, (), {}).headers
            producer.publish(
                raw.body,
                exchange=kq.exchange,
                routing_key=kq.routing_key,
                declare=[kq],
                headers={**headers, "task": raw.task},
                content_type=raw.content_type,
                content_encoding="binary" if "pickle" in raw.content_type else "utf-8",
                serializer=None,
            )
            ids.append(task_id)
    return ids


@contextmanager
def cpu_worker(broker: Broker, logs: Path, **env: str) -> Iterator[tuple[Any, Path]]:
    """A real cpu worker with ``env`` added; yields (process, its log file)."""
    with worker_process(broker.app, {**broker.env, **env}, "cpu", log_dir=logs) as (proc, node):
        yield proc, logs / f"worker-{node.replace('@', '_')}.log"


def wait_for_log(path: Path, needles: list[str], timeout_s: float = WAIT_S) -> str:
    """The log's text once every needle is in it (fails naming the missing ones)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text(errors="replace")
        missing = [n for n in needles if n not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            pytest.fail(
                f"not logged within {timeout_s:g} s: {missing}\n--- log tail:\n{text[-4000:]}"
            )
        time.sleep(0.2)


def cpu_queue(broker: Broker) -> str:
    """The queue EMBED lands on."""
    return queue_name(TaskKind.EMBEDDING, "cpu", 1, broker.settings.namespace)


# ------------------------------------------------------------------------------ size cap


def test_oversized_spec_is_refused_at_submit_naming_size_and_limit(
    broker: Broker, faults: FaultLedger
) -> None:
    """submit: a spec over FLEET_MAX_TASK_BYTES raises before anything is published."""
    faults.inject("oversized payload")
    small = replace(broker.settings, max_task_bytes=4096)
    queue = cpu_queue(broker)
    before = queue_depths(broker, [queue])[queue]
    with Fleet(small, app=broker.app, stats_interval_s=0.2) as client:
        with pytest.raises(SpecTooLargeError) as info:
            client.submit({**EMBED, "input": {"texts": ["x" * 5000]}})
        message = str(info.value)
        assert "4,096" in message
        assert "bytes" in message
        assert info.value.size > 4096
        specs = [EMBED, EMBED, {**EMBED, "input": {"texts": ["y" * 5000]}}, EMBED]
        with pytest.raises(SpecTooLargeError, match=r"^\[2\] spec is [\d,]+ bytes"):
            client.submit_many(specs)
    assert queue_depths(broker, [queue])[queue] == before  # all or nothing
    faults.account(submitted=0, completed=0)


def test_fleet_submit_refuses_an_oversized_spec_before_publishing(
    broker: Broker, faults: FaultLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fleet submit``: exit 2, the size and the limit named, the index in a batch, nothing sent."""
    faults.inject("oversized payload")
    for key, value in broker.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLEET_MAX_TASK_BYTES", "2048")
    batch = tmp_path / "batch.jsonl"
    big = {**EMBED, "input": {"texts": ["z" * 3000]}}
    batch.write_text("\n".join(json.dumps(s) for s in [EMBED, EMBED, EMBED, big]) + "\n")
    queue = cpu_queue(broker)
    before = queue_depths(broker, [queue])[queue]
    result = CliRunner().invoke(main, ["submit", str(batch)])
    assert result.exit_code == 2, result.output
    assert "[3]" in result.output
    assert "2,048 bytes" in result.output
    assert queue_depths(broker, [queue])[queue] == before


# ------------------------------------------------------------------ worker under bad input


def test_worker_rejects_every_bad_message_and_completes_the_good_ones(
    broker: Broker, fleet: Fleet, faults: FaultLedger, logs: Path, tmp_path: Path
) -> None:
    """Bad messages interleaved with good tasks: all bad rejected and logged, none run, all good done."""
    marker = tmp_path / "pickle-payload-ran"
    bad = bad_messages(marker)
    queue = cpu_queue(broker)
    purge(broker, [queue])
    with cpu_worker(broker, logs, FLEET_MAX_TASK_BYTES=str(WORKER_CAP)) as (proc, log_path):
        good = []
        for raw in bad:
            faults.inject(f"bad message: {raw.label}")
            good.append(fleet.submit(EMBED))
            publish_raw(broker, queue, [raw])
        good.append(fleet.submit(EMBED))
        results = [h.get(timeout=WAIT_S) for h in good]
        text = wait_for_log(
            log_path,
            [
                "Can't decode message body",  # non-JSON bytes, the 5,000-digit integer
                "Refusing to deserialize untrusted content of type pickle",
                "Received unregistered task of type 'fleet.no_such_task'",
                "Received invalid task message: malformed task body",  # wrong-shape envelopes
                "task.refused",
            ],
        )
        assert proc.poll() is None, "the worker process is still running"
        deadline = time.monotonic() + WAIT_S
        while queue_depths(broker, [queue])[queue] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue_depths(broker, [queue])[queue] == 0, "no bad message is left to redeliver"
    assert not marker.exists(), "the pickle's payload ran"
    assert all(r["output"]["embeddings"] for r in results)
    assert text.count('"event": "task.refused"') >= 4  # invalid spec, huge numbers, oversized...
    assert "task.finished" in text
    faults.account(submitted=len(good), completed=len(results))


json_garbage = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_garbage.map(lambda v: json.dumps(v).encode()),
    st.tuples(json_garbage, json_garbage).map(lambda ak: envelope(*ak)),
    json_garbage.map(lambda spec: envelope([spec])),
    st.dictionaries(st.sampled_from(list(EMBED)), json_garbage, max_size=3).map(
        lambda changes: envelope([{**EMBED, **changes}])
    ),
)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_generated_malformed_bodies_never_stop_the_worker(
    broker: Broker, fleet: Fleet, faults: FaultLedger, logs: Path
) -> None:
    """Hypothesis-generated bodies (bytes, JSON of any shape, envelopes, mutated specs) on a live worker.

    Each example publishes one body and then a good task; the good task completes and the
    worker process stays up. Examples are bounded so the test stays well under 30 s.
    """
    queue = cpu_queue(broker)
    purge(broker, [queue])
    counts = {"submitted": 0, "completed": 0, "bodies": 0}
    with cpu_worker(broker, logs) as (proc, _log_path):

        @settings(
            max_examples=int(os.environ.get("FLEET_TEST_FUZZ_MESSAGES", "25")),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],  # shrinking would restart workers for minutes
        )
        @given(body=bodies)
        @example(body=b"")
        @example(body=b"[1, 2]")
        def one(body: bytes) -> None:
            publish_raw(broker, queue, [Raw("generated", body)])
            counts["bodies"] += 1
            handle = fleet.submit(EMBED)
            counts["submitted"] += 1
            assert handle.get(timeout=WAIT_S)["output"]["embeddings"]
            counts["completed"] += 1
            assert proc.poll() is None

        one()
    faults.inject("malformed message", times=counts["bodies"])
    faults.account(submitted=counts["submitted"], completed=counts["completed"])

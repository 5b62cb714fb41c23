"""Dead-letter entries: built, redacted, round-tripped through JSON, and the client's message."""

from __future__ import annotations

import json

import pytest

from fleet.dlq import MAX_ERROR_CHARS, DeadLetter, dead_letter_queue, redact
from fleet.spec import parse_spec
from workers.handlers import HandlerContext, HandlerError, run_handler
from workers.handlers.faultops import ENABLE_VAR

SPEC = {"kind": "batch", "model": {"name": "m", "params_b": 0.001}, "input": {"op": "fail"}}


def entry(**overrides):
    args = {
        "task_id": "abc-123",
        "spec": SPEC,
        "placement": {"queue": "batch.cpu"},
        "queue": "batch.cpu",
        "reason": "failed",
        "error": "RuntimeError: boom",
        "attempts": 3,
        "now": 1700000000.0,
        "worker": "cpu-1@host",
    }
    return DeadLetter.build(**(args | overrides))


def test_entry_round_trips_through_json():
    """An entry survives JSON (the wire format) unchanged."""
    e = entry()
    assert DeadLetter.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_a_sensitive_input_is_kept_for_requeue_but_never_shown():
    """`fleet dlq show` prints a sensitive spec without its input; the wire entry keeps it."""
    secret = {"prompt": "s3cr3t-payload"}
    e = entry(spec={**SPEC, "input": secret, "sensitive": True})
    assert e.to_dict()["spec"]["input"] == secret
    assert "s3cr3t" not in json.dumps(e.shown())
    assert "s3cr3t" in json.dumps(entry(spec={**SPEC, "input": secret}).shown())


def test_entry_keeps_what_an_operator_needs():
    """Task id, spec, placement, original queue, reason, error, attempts and time are all there."""
    data = entry().to_dict()
    assert set(data) >= {
        "task_id", "spec", "placement", "queue", "reason", "error", "attempts", "dead_lettered_at",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("cannot reach redis://fleet:hunter2@cache:6379/0", "hunter2"),
        ("login failed password=hunter2 for user", "hunter2"),
        ("header Authorization: sk-live-abc", "sk-live-abc"),
    ],
)
def test_errors_are_redacted(text, secret):
    """No secret from an error message reaches an entry."""
    e = entry(error=text)
    assert secret not in e.error
    assert "***" in e.error


def test_errors_are_truncated():
    """A huge error is cut to MAX_ERROR_CHARS."""
    assert len(redact("x" * 10_000)) == MAX_ERROR_CHARS
    assert redact("short") == "short"


def test_unknown_reason_is_refused():
    """Only failed, worker-lost and refused are reasons."""
    with pytest.raises(ValueError, match="reason"):
        entry(reason="bored")


def test_from_dict_refuses_what_is_not_an_entry():
    """A message that is not an entry raises ValueError (browsing skips it)."""
    with pytest.raises(ValueError, match="not a dead-letter entry"):
        DeadLetter.from_dict({"task_id": "x"})


def test_client_message_names_the_dead_letter_queue():
    """The FAILURE the client sees names the queue, the reason, the attempts and how to inspect."""
    msg = entry().message(dead_letter_queue("staging."))
    assert "staging.fleet.dead-letter" in msg
    assert "3 attempt(s)" in msg
    assert "reason failed" in msg
    assert "fleet dlq show abc-123" in msg


def test_fault_ops_are_off_unless_enabled(tmp_path, monkeypatch):
    """Fail and crash are refused as bad input on a worker without FLEET_FAULT_OPS=1."""
    monkeypatch.delenv(ENABLE_VAR, raising=False)
    ctx = HandlerContext("t1", "cpu", True, tmp_path)
    for op in ("fail", "crash"):
        spec = parse_spec(SPEC | {"input": {"op": op}})
        with pytest.raises(HandlerError, match=ENABLE_VAR):
            run_handler(spec, ctx)


def test_fail_op_raises_until_its_flag_exists(tmp_path, monkeypatch):
    """Fail raises an unexpected error until the flag file appears (a transient failure)."""
    monkeypatch.setenv(ENABLE_VAR, "1")
    ctx = HandlerContext("t1", "cpu", True, tmp_path)
    spec = parse_spec(SPEC | {"input": {"op": "fail", "message": "boom", "until": "fixed"}})
    with pytest.raises(RuntimeError, match="boom"):
        run_handler(spec, ctx)
    (tmp_path / "flags").mkdir()
    (tmp_path / "flags" / "fixed").touch()
    assert run_handler(spec, ctx)["recovered"] is True


def test_journal_records_start_and_finish(tmp_path):
    """Journal writes a started and a finished line for the task id."""
    ctx = HandlerContext("t1", "cpu", True, tmp_path)
    run_handler(parse_spec(SPEC | {"input": {"op": "journal", "seconds": 0}}), ctx)
    lines = (tmp_path / "journal" / "t1").read_text().split()
    assert lines[0::2] == ["started", "finished"]

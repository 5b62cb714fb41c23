# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""``fleet route`` and ``fleet catalog`` through click's CliRunner (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet import cli
from fleet.catalog import DATA_DIR, default_catalog
from fleet.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FAMILIES = set(default_catalog().names())
EXIT_INPUT = 2
UNPLACEABLE = {"kind": "inference", "model": {"name": "giant", "params_b": 5000, "dtype": "bf16"}}


def set_width(monkeypatch, columns: int) -> None:
    """Fix the width of the CLI's rich consoles (they read COLUMNS once, at import)."""
    for console in (cli.console, cli.err):
        monkeypatch.setattr(console, "_width", columns)


@pytest.fixture
def runner(monkeypatch):
    """A CliRunner with wide consoles, so rich does not truncate table cells."""
    set_width(monkeypatch, 250)
    return CliRunner()


def route(runner, *args, stdin=None):
    """Invoke ``fleet route`` with ``args``."""
    return runner.invoke(main, ["route", *map(str, args)], input=stdin)


# ------------------------------------------------------------------------------- route


@pytest.mark.parametrize(
    ("example", "queue_prefix"),
    [
        ("llama-405b-bf16.json", "inference.nvidia-h200.x8"),
        ("llama-8b-chat.json", "inference."),
        ("embed-minilm.json", "embedding."),
        ("finetune-8b-lora.json", "fine_tune."),
    ],
)
def test_route_json_prints_the_decision(runner, example, queue_prefix):
    """``route FILE --json`` exits 0 and prints queue, accelerator, offer, estimates, rejected."""
    result = route(runner, EXAMPLES / example, "--json")
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert {
        "queue",
        "accelerator",
        "offer",
        "estimated_cost_usd",
        "estimated_duration_s",
        "rejected",
    } <= set(decision)
    assert {"cloud", "region", "instance_type", "market"} <= set(decision["offer"])
    assert decision["queue"].startswith(queue_prefix)
    assert all(set(r) >= {"accelerator", "reason"} for r in decision["rejected"])
    assert {r["accelerator"] for r in decision["rejected"]} | {decision["accelerator"]} == FAMILIES


def test_route_405b_bf16_explains_h100(runner):
    """The 405B bf16 example lands on h200 x8 and says why h100 cannot hold it."""
    decision = json.loads(route(runner, EXAMPLES / "llama-405b-bf16.json", "--json").stdout)
    reasons = {r["accelerator"]: r["reason"] for r in decision["rejected"]}
    assert decision["accelerator"] == "nvidia-h200"
    assert "640 GB" in reasons["nvidia-h100"]


def test_route_text_output(runner):
    """Plain ``route FILE`` prints the queue, the offer and a row per other accelerator."""
    result = route(runner, EXAMPLES / "llama-405b-bf16.json")
    assert result.exit_code == 0, result.output
    assert "inference.nvidia-h200.x8" in result.stdout
    assert "p5en.48xlarge" in result.stdout
    for family in FAMILIES - {"nvidia-h200"}:
        assert family in result.stdout


def test_route_reads_stdin(runner):
    """``route -`` reads the spec from standard input."""
    spec = (EXAMPLES / "llama-8b-chat.json").read_text(encoding="utf-8")
    from_stdin = route(runner, "-", "--json", stdin=spec)
    from_file = route(runner, EXAMPLES / "llama-8b-chat.json", "--json")
    assert from_stdin.exit_code == 0, from_stdin.output
    assert json.loads(from_stdin.stdout) == json.loads(from_file.stdout)


def test_unplaceable_spec_json_lists_a_reason_per_accelerator(runner):
    """An unplaceable spec exits 2 and the JSON lists one reason for each accelerator."""
    result = route(runner, "-", "--json", stdin=json.dumps(UNPLACEABLE))
    assert result.exit_code == EXIT_INPUT
    body = json.loads(result.stdout)
    assert "error" in body
    reasons = {r["accelerator"]: r["reason"] for r in body["rejected"]}
    assert set(reasons) == FAMILIES
    assert len(body["rejected"]) == len(FAMILIES)
    assert all(reasons.values())


def test_unplaceable_spec_text_lists_a_reason_per_accelerator(runner):
    """An unplaceable spec exits 2 and the text output names every accelerator with a reason."""
    result = route(runner, "-", stdin=json.dumps(UNPLACEABLE))
    assert result.exit_code == EXIT_INPUT
    assert "no accelerator can run this task" in result.stderr
    lines = [line.split() for line in result.stderr.splitlines()[1:] if line.strip()]
    assert {words[0] for words in lines} == FAMILIES
    assert all(len(words) > 1 for words in lines)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"kind": "inference", "model": {"name": "m", "params_b": -1}}, "params_b"),
        pytest.param({"kind": "dance", "model": {"name": "m", "params_b": 1}}, "kind"),
        pytest.param(
            {"kind": "inference", "model": {"name": "m", "params_b": 1}, "priority": 10},
            "priority",
        ),
        pytest.param(
            {"kind": "embedding", "model": {"name": "m", "params_b": 1}, "tokens_out": 3},
            "tokens_out",
        ),
        pytest.param(
            {"kind": "inference", "model": {"name": "m", "params_b": 1}, "colour": "red"},
            "colour",
        ),
    ],
)
def test_invalid_spec_exits_2_naming_the_field(runner, spec, field):
    """An invalid spec exits 2 and the message names the field."""
    result = route(runner, "-", "--json", stdin=json.dumps(spec))
    assert result.exit_code == EXIT_INPUT
    assert "invalid task spec" in result.stderr
    assert field in result.stderr
    assert result.stdout == ""


def test_unknown_accelerator_suggests_nvidia_h100(runner):
    """The bad-accelerator example exits 2 and suggests nvidia-h100."""
    result = route(runner, EXAMPLES / "bad-accelerator.json")
    assert result.exit_code == EXIT_INPUT
    assert "requirements.accelerators" in result.stderr
    assert "'h100'" in result.stderr
    assert "did you mean nvidia-h100" in result.stderr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("{not json", "invalid JSON", id="malformed"),
        pytest.param("[1, 2", "invalid JSON", id="malformed-list"),
        pytest.param(
            json.dumps([UNPLACEABLE, UNPLACEABLE]), "expected one spec, found 2", id="two-specs"
        ),
    ],
)
def test_route_rejects_unreadable_input(runner, text, fragment):
    """Empty, malformed or multi-spec input exits 2 with a message saying what is wrong."""
    result = route(runner, "-", stdin=text)
    assert result.exit_code == EXIT_INPUT
    assert fragment in result.stderr


def test_route_missing_file_exits_2(runner, tmp_path):
    """A spec file that does not exist exits 2 saying it cannot be read."""
    result = route(runner, tmp_path / "absent.json")
    assert result.exit_code == EXIT_INPUT
    assert "cannot read" in result.stderr


@pytest.mark.parametrize(
    ("args", "accelerator"),
    [
        (["--policy", "pinned", "--pin", "nvidia-l4"], "nvidia-l4"),
        (["--policy", "fastest"], None),
    ],
)
def test_route_policy_options(runner, args, accelerator):
    """--policy and --pin reach placement and show in the decision."""
    result = route(runner, EXAMPLES / "llama-8b-chat.json", "--json", *args)
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert decision["policy"] == args[1]
    if accelerator:
        assert decision["accelerator"] == accelerator


def test_route_pinned_without_pin_exits_2(runner):
    """--policy pinned without --pin (and no required accelerator) exits 2."""
    result = route(runner, EXAMPLES / "llama-8b-chat.json", "--policy", "pinned")
    assert result.exit_code == EXIT_INPUT
    assert "pinned needs an accelerator" in result.stderr


def test_route_with_a_catalog_directory(runner, tmp_path):
    """--catalog reads another catalog directory; a bad one exits 2 with a catalog error."""
    ok = route(runner, EXAMPLES / "llama-8b-chat.json", "--json", "--catalog", DATA_DIR)
    assert ok.exit_code == 0, ok.output
    bad = route(runner, EXAMPLES / "llama-8b-chat.json", "--catalog", tmp_path)
    assert bad.exit_code == EXIT_INPUT
    assert "catalog error" in bad.stderr


# ------------------------------------------------------------------------------- catalog


def test_catalog_json_lists_families_and_offers(runner):
    """``catalog --json`` lists 16 accelerators and at least 60 offers."""
    result = runner.invoke(main, ["catalog", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert len(body["accelerators"]) == 16
    assert {a["name"] for a in body["accelerators"]} == FAMILIES
    assert len(body["offers"]) >= 60
    assert body["version"] == default_catalog().version
    p5 = next(o for o in body["offers"] if o["instance_type"] == "p5.48xlarge")
    assert (p5["accelerator"], p5["accelerator_count"]) == ("nvidia-h100", 8)


def test_catalog_text_mentions_families_and_instances(runner):
    """``catalog`` text output names nvidia-h100 and p5.48xlarge (on a wide terminal)."""
    result = runner.invoke(main, ["catalog"])
    assert result.exit_code == 0, result.output
    assert "nvidia-h100" in result.stdout
    assert "p5.48xlarge" in result.stdout


def test_catalog_text_is_greppable_at_80_columns(monkeypatch):
    """At 80 columns (a pipe) ``catalog`` still prints full accelerator and instance names."""
    set_width(monkeypatch, 80)
    result = CliRunner().invoke(main, ["catalog"])
    assert result.exit_code == 0
    assert "nvidia-h100" in result.stdout
    assert "p5.48xlarge" in result.stdout


def test_catalog_bad_directory_exits_2(runner, tmp_path):
    """``catalog --catalog DIR`` on a directory without a catalog exits 2."""
    result = runner.invoke(main, ["catalog", "--catalog", str(tmp_path)])
    assert result.exit_code == EXIT_INPUT
    assert "catalog error" in result.stderr


def test_route_pin_to_unknown_accelerator_exits_2(runner):
    """--pin with a name not in the catalog exits 2 listing the known accelerators."""
    result = route(runner, EXAMPLES / "llama-8b-chat.json", "--policy", "pinned", "--pin", "b200")
    assert result.exit_code == EXIT_INPUT
    assert "nvidia-h100" in result.stderr


def test_invalid_field_with_brackets_is_named(runner):
    """An unknown field whose name looks like markup is still named in the error."""
    spec = {"kind": "inference", "model": {"name": "m", "params_b": 1}, "[b]": 1}
    result = route(runner, "-", stdin=json.dumps(spec))
    assert result.exit_code == EXIT_INPUT
    assert "[b]" in result.stderr

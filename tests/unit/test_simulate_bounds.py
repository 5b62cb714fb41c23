"""`fleet simulate` reports the tight bound, the LP bound and cost over bound."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.sim import ilp
from fleet.sim.trace import write_trace
from tests.unit.test_simulator import L4_PRICE, POOL, one_task


@pytest.fixture
def files(tmp_path):
    """A one-task trace and the one-L4-pool config of the simulator tests."""
    trace, config = tmp_path / "t.jsonl", tmp_path / "c.toml"
    write_trace(one_task(), trace)
    config.write_text(POOL)
    return ["--trace", str(trace), "--config", str(config)]


def test_json_reports_the_bounds(files):
    """The tight bound is one L4 bucket; cost over bound is the run's cost over it."""
    out = CliRunner().invoke(main, ["simulate", *files, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["bound_usd"] == pytest.approx(L4_PRICE * 300 / 3600)
    assert data["bound_status"] == "optimal"
    assert 0 < data["lp_bound_usd"] < data["bound_usd"]
    assert data["cost_over_bound"] == pytest.approx(data["total_cost_usd"] / data["bound_usd"])
    (buy,) = data["bound_buys"]
    assert (buy["offer"], buy["market"], buy["peak"], buy["instance_buckets"]) == (
        "aws/us-east-1/g6.xlarge",
        "on_demand",
        1,
        1,
    )
    assert data["tasks"] == 1  # the run's own keys are kept


def test_bucket_size_is_an_option(files):
    """--bucket-s 60 buys one L4 minute-bucket instead of five."""
    out = CliRunner().invoke(main, ["simulate", *files, "--json", "--bucket-s", "60"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["bound_bucket_s"] == 60
    # 120 s cold start: the launch bucket and the one after it are all boot
    assert data["bound_usd"] == pytest.approx(L4_PRICE * 60 / 3600 * 3)


def test_text_reports_the_bounds(files):
    """The text output names the bound, the LP bound, cost over bound and what the bound buys."""
    out = CliRunner().invoke(main, ["simulate", *files])
    assert out.exit_code == 0, out.output
    for key in ("total_cost_usd", "bound_usd", "lp_bound_usd", "cost_over_bound", "bound buys"):
        assert key in out.stdout


def test_no_bound_skips_them(files):
    """--no-bound reports the run alone."""
    out = CliRunner().invoke(main, ["simulate", *files, "--json", "--no-bound"])
    assert out.exit_code == 0, out.output
    assert "bound_usd" not in json.loads(out.stdout)


def test_unsolved_bound_prints_why_and_still_exits_0(files, monkeypatch):
    """A solver that gives up: NaN bound, the reason on stderr, the run's result, exit 0."""
    monkeypatch.setattr(
        ilp,
        "milp",
        lambda *_, **__: SimpleNamespace(
            status=1, message="Time limit reached.", x=None, fun=None, mip_dual_bound=None,
            mip_gap=None,
        ),
    )  # fmt: skip
    out = CliRunner().invoke(main, ["simulate", *files, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert math.isnan(data["bound_usd"])
    assert math.isnan(data["cost_over_bound"])
    assert data["bound_status"] == "time_limit: Time limit reached."
    assert data["total_cost_usd"] > 0
    assert "tight bound not solved" in out.stderr
    assert "Time limit reached." in out.stderr

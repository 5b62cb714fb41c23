"""The engine benchmark's pure pieces: inputs, ratios and verdicts, rounds, the vLLM port, the table."""

from __future__ import annotations

import pytest

from bench.engines_bench import table_rows, verdict
from bench.engines_common import (
    SENTENCES,
    VLLM_MODULE,
    alternate,
    batches,
    compare,
    embedding_spec,
    generation_spec,
    per_task_ms,
    server_port,
)
from fleet.spec import parse_spec


def test_batches_cycle_through_the_sentences_deterministically() -> None:
    """Batches have the asked size and count, wrap around the sentences, and never vary."""
    got = batches(8, 5)
    assert [len(b) for b in got] == [8] * 5
    assert got[0] == list(SENTENCES[:8])
    assert got[4] == [SENTENCES[(32 + i) % len(SENTENCES)] for i in range(8)]
    assert batches(8, 5) == got


@pytest.mark.parametrize(
    ("fleet_s", "direct_s", "target", "ratio", "met", "stated"),
    [
        ([1.0, 0.5, 9.0], [1.0, 1.0, 1.0], 0.9, 1.0, True, ">= 0.90"),  # medians, not means
        ([1.25], [1.0], 0.9, 0.8, False, ">= 0.90"),
        ([1.0], [1.0 / 0.9], 0.9, 1.0 / 0.9, True, ">= 0.90"),
        ([1.0], [2.0], None, 2.0, None, None),  # no target: neither stated nor judged
    ],
)
def test_compare_is_fleet_rate_over_direct_rate_from_medians(
    fleet_s: list[float],
    direct_s: list[float],
    target: float | None,
    ratio: float,
    met: bool | None,
    stated: str | None,
) -> None:
    """The ratio is fleet's throughput over direct's, each from its median round."""
    got = compare(64, fleet_s, direct_s, target)
    assert got["ratio"] == pytest.approx(ratio)
    assert got["met"] is met
    assert got["target"] == stated
    assert got["fleet_per_s"] == pytest.approx(64 / sorted(fleet_s)[len(fleet_s) // 2])


@pytest.mark.parametrize("rounds", [([], [1.0]), ([1.0], [0.0])])
def test_compare_refuses_rounds_that_measured_nothing(
    rounds: tuple[list[float], list[float]],
) -> None:
    """No rounds, or a round of zero seconds, is an error, never a ratio."""
    with pytest.raises(ValueError, match="positive"):
        compare(1, rounds[0], rounds[1], 0.9)


def test_per_task_ms_splits_a_task_into_fleet_engine_and_direct() -> None:
    """Round medians over tasks per round, and the worker's own medians, in milliseconds."""
    got = per_task_ms(4, [0.4, 0.8, 2.0], [0.2, 0.3, 0.1], [0.07, 0.1, 0.08], [0.05, 0.09, 0.06])
    assert got == pytest.approx(
        {
            "fleet_ms_per_task": 200.0,
            "worker_run_ms_per_task": 80.0,
            "worker_engine_ms_per_task": 60.0,
            "direct_ms_per_task": 50.0,
        }
    )


def test_alternate_runs_one_side_at_a_time_and_swaps_who_goes_first() -> None:
    """Rounds never overlap, the first side alternates, and each side keeps its own times."""
    calls: list[str] = []

    def fleet() -> float:
        calls.append("fleet")
        return 2.0

    def direct() -> float:
        calls.append("direct")
        return 1.0

    fleet_s, direct_s = alternate(fleet, direct, rounds=3)
    assert calls == ["fleet", "direct", "direct", "fleet", "fleet", "direct"]
    assert fleet_s == [2.0, 2.0, 2.0]
    assert direct_s == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("argv", "port"),
    [
        (["/v/bin/python", "-m", VLLM_MODULE, "--model", "/w", "--port", "8123"], 8123),
        (["/v/bin/python", "-m", VLLM_MODULE, "--model", "/w"], None),
        (["/v/bin/python", "-m", VLLM_MODULE, "--port"], None),
        (["python", "-m", "fleet", "worker", "--port", "8123"], None),  # not a vLLM server
    ],
)
def test_server_port_reads_a_vllm_command_line_only(argv: list[str], port: int | None) -> None:
    """The port comes from a vLLM server's argv and from nothing else."""
    assert server_port(argv) == port


def test_the_specs_are_valid_tasks_for_the_builtin_models() -> None:
    """Both benchmark specs parse, for the models and sizes the benchmark names."""
    texts = batches(32, 1)[0]
    emb = parse_spec(embedding_spec(texts))
    gen = parse_spec(generation_spec())
    assert (emb.model.name, emb.input) == ("all-minilm-l6-v2", {"texts": texts})
    assert (gen.model.name, gen.tokens_out) == ("tiny-llama", 32)
    assert gen.input == {"prompt": generation_spec()["input"]["prompt"], "temperature": 0}


def _rate(ratio: float, target: str | None, met: bool | None) -> dict[str, object]:
    return {
        "fleet_per_s": 90.0 * ratio,
        "direct_per_s": 90.0,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def test_table_states_targets_verdicts_and_skips() -> None:
    """Each rate row shows its target and verdict; a skipped vLLM part shows its reason."""
    ready = {"ping_s": 1.0, "ready_s": 6.5, "family_cold_start_s": 60.0}
    results = {
        "embedding": {
            "batch_1": _rate(0.5, None, None),
            "batch_8": _rate(0.8, None, None),
            "batch_32": _rate(0.95, ">= 0.90", True),
        },
        "generation": _rate(0.85, ">= 0.90", False),
        "vllm": {"skipped": "no vLLM virtualenv"},
        "ready": {"reference": ready, "vllm": {"skipped": "no vLLM virtualenv"}},
    }
    rows = table_rows(results)
    assert rows[1].endswith("0.50x")
    assert rows[3].endswith("0.95x  >= 0.90x ok")
    assert rows[4].endswith("0.85x  >= 0.90x MISSED")
    assert rows[5].endswith("skipped: no vLLM virtualenv")
    assert "6.5 s" in rows[6]
    assert "catalog cold start 60 s" in rows[6]
    assert len(rows) == 7
    assert [verdict(True), verdict(False), verdict(None)] == ["ok", "MISSED", ""]

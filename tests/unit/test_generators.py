"""Trace generators: seeded, exactly n sorted valid events, calibrated shapes, a CLI."""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest

from fleet.sim.generators import (
    CONVERSATION_OUTPUT_MEDIAN,
    CONVERSATION_PROMPT_MEDIAN,
    GENERATORS,
    generate,
    main,
)
from fleet.sim.trace import TraceEvent, read_trace, write_trace
from fleet.spec import TaskKind, parse_spec, spec_json

NAMES = sorted(GENERATORS)


def workflows(events: list[TraceEvent]) -> dict[str, list[TraceEvent]]:
    out: dict[str, list[TraceEvent]] = defaultdict(list)
    for e in events:
        assert e.workflow is not None
        out[e.workflow].append(e)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_trace_other_seed_other_trace(name):
    """A seed fixes the trace; another seed changes it."""
    a = generate(name, n=300, seed=1)
    assert a == generate(name, n=300, seed=1)
    assert a != generate(name, n=300, seed=2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [0, 1, 7, 250])
def test_exactly_n_events_sorted_within_duration(name, n):
    """Exactly n events, in time order, all inside [0, duration]."""
    events = generate(name, n=n, seed=3, duration_s=600.0)
    times = [e.t for e in events]
    assert len(events) == n
    assert times == sorted(times)
    assert all(0.0 <= t <= 600.0 for t in times)


@pytest.mark.parametrize("name", NAMES)
def test_every_spec_is_valid(name):
    """Every spec re-parses to itself through its canonical JSON."""
    for e in generate(name, n=500, seed=4):
        assert parse_spec(spec_json(e.spec)) == e.spec


@pytest.mark.parametrize("name", NAMES)
def test_write_read_round_trip(name, tmp_path):
    """write_trace then read_trace gives back the same events."""
    events = generate(name, n=400, seed=5)
    path = tmp_path / "trace.jsonl"
    write_trace(events, path)
    assert read_trace(path) == events


@pytest.mark.parametrize("name", NAMES)
def test_cli_writes_the_same_trace(name, tmp_path):
    """The command line writes what generate returns."""
    path = tmp_path / "t.jsonl"
    argv = [name, "--n", "50", "--seed", "1", "--duration", "900", "--out", str(path)]
    assert main(argv) == 0
    assert read_trace(path) == generate(name, n=50, seed=1, duration_s=900.0)


def test_unknown_name_raises_key_error_listing_valid_names():
    """An unknown generator name is a KeyError naming the valid ones."""
    with pytest.raises(KeyError, match=r"valid: .*multi-agent.*training-mix"):
        generate("nope", n=10)


@pytest.mark.parametrize("bad", [{"n": -1}, {"n": 5, "duration_s": 0.0}])
def test_bad_size_or_duration_is_a_value_error(bad):
    """Negative n or a non-positive duration is rejected."""
    with pytest.raises(ValueError, match=r"n:|duration_s:"):
        generate("interactive-chat", **bad)


@pytest.mark.parametrize("n", [4, 5, 13, 14, 15, 16, 40, 4000])
def test_multi_agent_workflows_embed_then_small_steps_in_time_order(n):
    """Every workflow starts with an embedding, has 3-8 small calls, and is time-ordered."""
    for steps in workflows(generate("multi-agent", n=n, seed=6)).values():
        kinds = [e.spec.kind for e in steps]
        small = [e for e in steps if e.spec.model.params_b == 8]
        assert kinds[0] is TaskKind.EMBEDDING
        assert kinds.count(TaskKind.EMBEDDING) == 1
        assert 3 <= len(small) <= 8
        assert all(e.spec.slo.deadline_s == 30 for e in small)
        assert [e.t for e in steps] == sorted(e.t for e in steps)
        assert steps[0].step == "0-embed"


def test_multi_agent_about_one_workflow_in_twenty_calls_405b():
    """About 5% of workflows include a 405B call, each with a 300 s deadline."""
    flows = workflows(generate("multi-agent", n=4000, seed=7)).values()
    xl = [[e for e in f if e.spec.model.params_b == 405] for f in flows]
    share = sum(1 for calls in xl if calls) / len(xl)
    assert 0.02 <= share <= 0.09
    assert all(e.spec.slo.deadline_s == 300 for calls in xl for e in calls)
    assert max(len(calls) for calls in xl) == 1


def test_chat_medians_match_the_splitwise_conversation_split():
    """Median prompt and output sizes are within 20% of the documented medians."""
    events = generate("interactive-chat", n=5000, seed=8)
    prompt = statistics.median(e.spec.tokens_in for e in events)
    output = statistics.median(e.spec.tokens_out for e in events)
    assert abs(prompt / CONVERSATION_PROMPT_MEDIAN - 1) < 0.2
    assert abs(output / CONVERSATION_OUTPUT_MEDIAN - 1) < 0.2
    assert all(1 <= e.spec.tokens_in <= 32768 and 1 <= e.spec.tokens_out <= 4096 for e in events)
    share_8b = sum(e.spec.model.params_b == 8 for e in events) / len(events)
    assert 0.66 <= share_8b <= 0.74
    e = events[0]
    assert e.spec.slo.deadline_s == pytest.approx(10 + 0.05 * e.spec.tokens_out)


def test_chat_rate_peaks_mid_trace():
    """The middle half of the trace is busier than the two outer quarters together."""
    events = generate("interactive-chat", n=4000, seed=9, duration_s=1000.0)
    middle = sum(250 <= e.t < 750 for e in events)
    assert middle > 0.6 * len(events)


def test_batch_embedding_is_one_job_in_the_first_tenth():
    """Shards arrive in the first 10% with one 0.1-0.4B model, budgets and no deadline."""
    events = generate("batch-embedding", n=1000, seed=10, duration_s=3600.0)
    assert all(e.t <= 360.0 for e in events)
    assert len({e.spec.model.name for e in events}) == 1
    for e in events:
        assert e.spec.kind is TaskKind.EMBEDDING
        assert 0.1 <= e.spec.model.params_b <= 0.4
        assert 1000 <= e.spec.tokens_in <= 20000
        assert e.spec.slo.deadline_s is None
        assert e.spec.budget.max_usd is not None


def test_training_mix_is_mostly_inference_with_budgeted_fine_tunes():
    """Inference dominates; fine-tunes are 8B LoRA with budgets; trainings are 1-3B, full."""
    events = generate("training-mix", n=3000, seed=11)
    by_kind = defaultdict(list)
    for e in events:
        by_kind[e.spec.kind].append(e.spec)
    assert len(by_kind[TaskKind.INFERENCE]) > 0.8 * len(events)
    assert by_kind[TaskKind.FINE_TUNE]
    assert by_kind[TaskKind.TRAINING]
    for s in by_kind[TaskKind.FINE_TUNE]:
        assert s.model.params_b == 8
        assert s.method == "lora"
        assert 1e6 <= s.tokens_in <= 2e7
        assert s.budget.max_usd is not None
        assert s.slo.deadline_s is None
    for s in by_kind[TaskKind.TRAINING]:
        assert 1 <= s.model.params_b <= 3.5
        assert s.method == "full"
        assert 1e7 <= s.tokens_in <= 1e8
        assert s.slo.deadline_s is None

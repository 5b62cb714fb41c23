"""Mélange workloads: seeded, sized like the paper's means, inside the context, with the goal."""

from __future__ import annotations

import itertools
import statistics

import pytest

from fleet.sim.generators import GENERATORS, generate
from fleet.sim.workloads import (
    CONTEXT,
    DEADLINE_S,
    MELANGE_GENERATORS,
    MODEL,
    melange,
    trace_name,
)
from fleet.spec import DType, TaskKind

NAMES = sorted(MELANGE_GENERATORS)


def test_six_names_registered_with_the_generators():
    """All six workloads x goals are reachable through ``generate``."""
    expected = sorted(
        f"melange-{w}{s}" for w in ("arena", "pubmed", "mixed") for s in ("", "-40ms")
    )
    assert expected == NAMES
    assert set(NAMES) <= set(GENERATORS)
    assert trace_name("pubmed", 40.0) == "melange-pubmed-40ms"
    assert trace_name("arena", 120.0) == "melange-arena"


@pytest.mark.parametrize("name", NAMES)
def test_seed_fixes_the_trace(name):
    """The same seed gives the same trace; another seed another."""
    a = generate(name, n=200, seed=7, duration_s=600.0)
    assert a == generate(name, n=200, seed=7, duration_s=600.0)
    assert a != generate(name, n=200, seed=8, duration_s=600.0)


@pytest.mark.parametrize(
    ("name", "tokens_in", "tokens_out"),
    [
        ("melange-arena", 70, 215),
        ("melange-pubmed", 3150, 275),
        ("melange-mixed", 0.8 * 70 + 0.2 * 3150, 0.8 * 215 + 0.2 * 275),
    ],
)
def test_means_match_the_published_ones(name, tokens_in, tokens_out):
    """Mean prompt and output within 5% of the paper's (after clipping to the context)."""
    events = generate(name, n=20_000, seed=1)
    assert statistics.mean(e.spec.tokens_in for e in events) == pytest.approx(tokens_in, rel=0.05)
    assert statistics.mean(e.spec.tokens_out for e in events) == pytest.approx(tokens_out, rel=0.05)


def test_mixed_is_four_fifths_arena():
    """About 80% of the mixed workload's requests are Arena-like."""
    events = generate("melange-mixed", n=10_000, seed=2)
    arena = sum(1 for e in events if str(e.spec.input["prompt"]).startswith("arena"))  # type: ignore[index, call-overload]
    assert arena / len(events) == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_every_request_fits_the_context(name):
    """tokens_in + tokens_out <= 4,096 and both at least 1."""
    for e in generate(name, n=5_000, seed=3):
        assert e.spec.tokens_in >= 1
        assert e.spec.tokens_out >= 1
        assert e.spec.tokens_in + e.spec.tokens_out <= CONTEXT


def test_pubmed_prompts_are_cut_at_the_context():
    """Long PubMed prompts are truncated, so some requests fill the context exactly."""
    events = generate("melange-pubmed", n=5_000, seed=4)
    assert any(e.spec.tokens_in + e.spec.tokens_out == CONTEXT for e in events)


@pytest.mark.parametrize(("name", "tpot_ms"), [(n, 40.0 if "40ms" in n else 120.0) for n in NAMES])
def test_goal_model_and_kind(name, tpot_ms):
    """Llama-2-7B fp16 inference, slo.tpot_ms set, the generous deadline."""
    for e in generate(name, n=50, seed=5):
        assert e.spec.kind is TaskKind.INFERENCE
        assert e.spec.model.name == MODEL["name"]
        assert e.spec.model.dtype is DType.FP16
        assert e.spec.slo.tpot_ms == tpot_ms
        assert e.spec.slo.deadline_s == DEADLINE_S


def test_poisson_at_a_constant_rate():
    """Arrivals are sorted, inside the window, evenly spread (each half holds about half)."""
    events = generate("melange-arena", n=4_000, seed=6, duration_s=1_000.0)
    times = [e.t for e in events]
    assert times == sorted(times)
    assert 0.0 <= times[0] <= times[-1] <= 1_000.0
    assert sum(1 for t in times if t < 500.0) / len(times) == pytest.approx(0.5, abs=0.03)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.1)


def test_no_deadline_and_errors():
    """deadline_s=None leaves the deadline out; bad arguments are ValueErrors."""
    assert melange("arena", 3, deadline_s=None)[0].spec.slo.deadline_s is None
    with pytest.raises(ValueError, match="workload"):
        melange("nope", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n:"):
        melange("arena", -1)
    with pytest.raises(ValueError, match="duration_s"):
        melange("arena", 3, duration_s=0.0)

"""The simulator's SLO check: a task with ``slo.tpot_ms`` meets it only if it decoded that fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.autoscaler.config import load_config
from fleet.catalog import load_catalog
from fleet.sim.engine import simulate
from fleet.sim.results import achieved_tpot_s, decode_tpot_s, meets_slo
from fleet.sim.state import SimTask
from fleet.sim.workloads import melange
from fleet.spec import TaskSpec, parse_spec
from fleet.throughput import Estimate, estimate

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "examples" / "melange" / "catalog")


def spec(tpot_ms: float | None = 40.0, deadline_s: float | None = None, out: int = 100) -> TaskSpec:
    slo = {k: v for k, v in (("tpot_ms", tpot_ms), ("deadline_s", deadline_s)) if v is not None}
    return parse_spec(
        {
            "kind": "inference",
            "model": {"name": "llama-2-7b", "params_b": 6.74, "dtype": "fp16"},
            "tokens_in": 500,
            "tokens_out": out,
            "slo": slo,
        }
    )


def done(
    s: TaskSpec, tpot_s: float | None, *, end: float = 10.0, service_s: float = 5.0
) -> SimTask:
    return SimTask(
        0, s, arrival=0.0, start=end - service_s, end=end, service_s=service_s, tpot_s=tpot_s
    )


@pytest.mark.parametrize(
    ("task", "met"),
    [
        pytest.param(done(spec(40.0), 0.039), True, id="faster-than-goal"),
        pytest.param(done(spec(40.0), 0.040), True, id="exactly-at-goal"),
        pytest.param(done(spec(40.0), 0.041), False, id="slower-than-goal"),
        pytest.param(done(spec(None), 10.0), True, id="no-goal"),
        pytest.param(done(spec(120.0, deadline_s=5.0), 0.01), False, id="fast-but-late"),
        pytest.param(done(spec(120.0, deadline_s=50.0), 0.01), True, id="fast-and-on-time"),
        # No tpot recorded (an API call): the whole call over its tokens, 5 s / 100 = 50 ms.
        pytest.param(done(spec(40.0), None), False, id="api-call-too-slow"),
        pytest.param(done(spec(60.0), None), True, id="api-call-fast-enough"),
        pytest.param(SimTask(0, spec(40.0), 0.0, tpot_s=0.001), False, id="never-finished"),
    ],
)
def test_meets_slo(task, met):
    """Deadline and time per output token, each only when the spec sets it."""
    assert meets_slo(task) is met


def test_no_output_tokens_has_no_tpot():
    """A prompt-only request has no time per output token and meets a tpot goal."""
    s = spec(40.0, out=0)
    assert achieved_tpot_s(done(s, None)) is None
    assert meets_slo(done(s, None))


def test_decode_tpot_reads_the_estimate_or_derives_it():
    """``tpot_s`` when the estimate has it; else (wall time - prefill) / output tokens."""
    s = spec(40.0, out=200)
    family = CATALOG.families["nvidia-a10g"]
    est = estimate(s, family, 1)
    prefill = estimate(s.model_copy(update={"tokens_out": 0}), family, 1).service_s
    plain = Estimate(est.service_s, est.busy_s)
    assert decode_tpot_s(plain, s, family, 1, None) == pytest.approx(
        (est.service_s - prefill) / 200
    )
    assert decode_tpot_s(Estimate(9.0, 1.0, 0.03, 1.0), s, family, 1, None) == 0.03
    assert decode_tpot_s(plain, spec(40.0, out=0), family, 1, None) is None


def single(accelerator: str):
    config = load_config(ROOT / "examples" / "melange" / "fleet.toml", env={})
    return config.model_copy(
        update={"pools": tuple(p for p in config.pools if p.accelerator == accelerator)}
    )


@pytest.mark.parametrize(
    ("accelerator", "tpot_ms", "attainment"),
    [
        # Llama-2-7B fp16 reads 13.5 GB a token: an L4 (300 GB/s) cannot decode in 40 ms.
        ("nvidia-l4", 40.0, 0.0),
        ("nvidia-h100", 40.0, 1.0),
        ("nvidia-l4", 1_000.0, 1.0),
    ],
)
def test_simulation_counts_tpot_misses(accelerator, tpot_ms, attainment):
    """End to end: a chip too slow for the goal meets it for no task; a fast chip for all.

    On the slow chip each task either runs and misses the goal or, where placement knows
    the goal, is rejected: a miss either way.
    """
    trace = melange("arena", 20, seed=1, duration_s=60.0, tpot_ms=tpot_ms)
    result = simulate(trace, single(accelerator), CATALOG, "fleet", seed=1)
    assert result.slo_attainment == attainment
    if attainment:
        assert result.completed == 20

"""Mélange workloads: Llama-2-7B chat, summarisation and a mix, with a time-per-token goal.

The Mélange paper (Griggs et al., "Mélange: Cost Efficient Large Language Model Serving by
Exploiting GPU Heterogeneity", arXiv 2404.14527; github.com/tyler-griggs/melange-release)
serves Llama-2-7B (fp16) for three request-size distributions at a TPOT SLO of 40 or
120 ms. These generators draw traces of the same shape:

- ``melange-arena``: short chat, Chatbot Arena-like. Mean prompt about 70 tokens, mean
  output about 215 (LMSYS-Chat-1M, the Arena conversations the paper samples, reports
  69.5 and 214.5 tokens per turn).
- ``melange-pubmed``: long-document summarisation, PubMed-like. Mean prompt about 3,150
  tokens, mean output about 275 (the means the Mélange evaluation quotes for its PubMed
  sample; not re-measured here).
- ``melange-mixed``: each request Arena-like with probability 0.8, else PubMed-like
  (the paper's 80/20 mixed-context workload).

Each name serves the 120 ms goal; ``...-40ms`` (``melange-arena-40ms`` and so on) the
40 ms goal.

What is published and what is assumed. Only the means above come from published
statistics. Sizes are lognormal with those means; the sigmas are ours, not fitted:
Arena prompt 1.0 and output 0.8 (chat turns span two orders of magnitude), PubMed prompt
0.3 (articles are long and, once cut to the context, bunch up below it) and output 0.5.
Every request fits Llama-2's 4,096-token context: the output is cut to 4,095 tokens and
then the prompt to ``4096 - tokens_out`` (a server truncates the document, not the
answer). The PubMed prompt's lognormal is centred so that the mean *after* that cut is
about 3,150 (``_median_for_clipped_mean``); the Arena draws are almost never cut.

Arrivals are a Poisson process at the constant rate ``n / duration_s``: conditioned on
exactly ``n`` events in the window, ``n`` uniform times, sorted.

The SLO. ``slo.tpot_ms`` carries the goal (120 or 40); the simulator counts a request
whose decode on the chip it ran on is slower than that as missed (``fleet.sim.results``).
The deadline is a generous ``DEADLINE_S`` (300 s) from arrival to the last token, which
covers a cold start (120-150 s in the catalog) plus the stream itself: it is there so
that a fleet cannot meet the per-token goal by letting a queue grow without end, and so
that the offline bound (``fleet.sim.ilp``) cannot defer requests to the end of the trace.
It is not the paper's goal; the per-token one is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import numpy as np

from fleet.sim.trace import TraceEvent
from fleet.spec import TaskSpec, parse_spec

Workload = Literal["arena", "pubmed", "mixed"]
WORKLOADS: tuple[Workload, ...] = ("arena", "pubmed", "mixed")
TPOTS_MS: tuple[float, ...] = (120.0, 40.0)

MODEL = {"name": "llama-2-7b", "params_b": 6.74, "dtype": "fp16"}
CONTEXT = 4096  # Llama-2's context: tokens_in + tokens_out <= CONTEXT
DEADLINE_S = 300.0  # generous: a cold start plus the stream; the per-token goal is the SLO
MIXED_ARENA_SHARE = 0.8  # the paper's mixed workload: 80% Arena, 20% PubMed

ARENA_IN_MEAN, ARENA_OUT_MEAN = 70.0, 215.0  # LMSYS-Chat-1M: 69.5 / 214.5 per turn
PUBMED_IN_MEAN, PUBMED_OUT_MEAN = 3150.0, 275.0  # Mélange's PubMed sample
ARENA_IN_SIGMA, ARENA_OUT_SIGMA = 1.0, 0.8  # assumptions
PUBMED_IN_SIGMA, PUBMED_OUT_SIGMA = 0.3, 0.5  # assumptions


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _clipped_mean(median: float, sigma: float, cap: float) -> float:
    """``E[min(X, cap)]`` for ``X`` lognormal with ``median`` and ``sigma``."""
    mu = math.log(median)
    above = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * _phi(above - sigma) + cap * (1.0 - _phi(above))


def _median_for_clipped_mean(mean: float, sigma: float, cap: float) -> float:
    """The lognormal median whose mean after ``min(., cap)`` is ``mean`` (bisection)."""
    lo, hi = 1.0, cap * 10.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if _clipped_mean(mid, sigma, cap) < mean:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _median(mean: float, sigma: float) -> float:
    return mean / math.exp(sigma**2 / 2)


_ARENA = (_median(ARENA_IN_MEAN, ARENA_IN_SIGMA), _median(ARENA_OUT_MEAN, ARENA_OUT_SIGMA))
# The prompt's cap is the context less a typical output (the cut depends on each output).
_PUBMED = (
    _median_for_clipped_mean(PUBMED_IN_MEAN, PUBMED_IN_SIGMA, CONTEXT - PUBMED_OUT_MEAN),
    _median(PUBMED_OUT_MEAN, PUBMED_OUT_SIGMA),
)


def _sizes(rng: np.random.Generator, *, pubmed: bool) -> tuple[int, int]:
    """``(tokens_in, tokens_out)`` of one request, inside the context."""
    (in_median, out_median), (in_sigma, out_sigma) = (
        (_PUBMED, (PUBMED_IN_SIGMA, PUBMED_OUT_SIGMA))
        if pubmed
        else (_ARENA, (ARENA_IN_SIGMA, ARENA_OUT_SIGMA))
    )
    z_in, z_out = rng.standard_normal(2)
    out = min(CONTEXT - 1, max(1, round(out_median * math.exp(out_sigma * z_out))))
    prompt = min(CONTEXT - out, max(1, round(in_median * math.exp(in_sigma * z_in))))
    return prompt, out


def melange(
    workload: Workload,
    n: int,
    seed: int = 0,
    duration_s: float = 3600.0,
    *,
    tpot_ms: float = 120.0,
    deadline_s: float | None = DEADLINE_S,
) -> list[TraceEvent]:
    """``n`` Llama-2-7B inference requests of ``workload``, Poisson over ``duration_s``.

    Args:
        workload: ``arena``, ``pubmed`` or ``mixed`` (80% Arena, 20% PubMed).
        n: how many requests (exactly).
        seed: the same seed gives the same trace.
        duration_s: the window, seconds; the rate is ``n / duration_s``.
        tpot_ms: ``slo.tpot_ms`` of every request.
        deadline_s: ``slo.deadline_s`` of every request (None: no deadline).

    Raises:
        ValueError: ``n`` negative, ``duration_s`` not positive and finite, or an unknown
            workload.

    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload: one of {', '.join(WORKLOADS)}, got {workload!r}")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration_s: must be positive and finite, got {duration_s}")
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, duration_s, n))
    slo: dict[str, float] = {"tpot_ms": float(tpot_ms)}
    if deadline_s is not None:
        slo["deadline_s"] = float(deadline_s)
    events: list[TraceEvent] = []
    for k, t in enumerate(times):
        pubmed = workload == "pubmed" or (workload == "mixed" and rng.random() >= MIXED_ARENA_SHARE)
        tokens_in, tokens_out = _sizes(rng, pubmed=pubmed)
        spec: TaskSpec = parse_spec(
            {
                "kind": "inference",
                "model": MODEL,
                "input": {"prompt": f"{'pubmed' if pubmed else 'arena'} {k}", "seed": k},
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
                "slo": slo,
            }
        )
        events.append(TraceEvent(min(duration_s, round(float(t), 6)), spec))
    return events


def trace_name(workload: Workload, tpot_ms: float) -> str:
    """The generator name of ``workload`` at ``tpot_ms`` (``melange-arena``, ``...-40ms``)."""
    return f"melange-{workload}" if tpot_ms == TPOTS_MS[0] else f"melange-{workload}-{tpot_ms:g}ms"


MELANGE_GENERATORS: dict[str, Callable[..., list[TraceEvent]]] = {
    trace_name(w, tpot): functools.partial(melange, w, tpot_ms=tpot)
    for w in WORKLOADS
    for tpot in TPOTS_MS
}

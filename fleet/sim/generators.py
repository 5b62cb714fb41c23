"""Synthetic, seeded task traces for the fleet simulator.

Four kinds, each a function of ``(n, seed, duration_s)`` that returns exactly ``n``
events sorted by time within ``[0, duration_s]``; the same seed gives the same trace:

- ``multi-agent``: agent workflows arriving as a Poisson process, each an embedding
  step, 3-8 small-model calls (Llama 3.1 8B), 0-2 large ones (70B) and, in about one
  workflow in 20, a Llama 3.1 405B call; steps a few seconds apart.
- ``batch-embedding``: one large embedding job arriving in a few bursts in the first
  10% of the trace; no deadlines, a budget per task.
- ``interactive-chat``: chat requests with a day-like rise and fall in the arrival rate.
- ``training-mix``: mostly chat inference, a few LoRA fine-tunes and small full trainings.
- ``melange-arena``, ``melange-pubmed``, ``melange-mixed`` and their ``-40ms`` variants:
  the Mélange paper's Llama-2-7B workloads with a TPOT goal (``fleet.sim.workloads``).

Calibration. The public request-size traces (Azure LLM inference trace 2023, ShareGPT,
LMSYS-Chat-1M) cannot be downloaded here. Chat request sizes therefore come from the
statistics of the Azure LLM inference trace 2023 published in the Splitwise paper (Patel
et al., "Splitwise: Efficient Generative LLM Inference Using Phase Splitting", ISCA
2024). For the "conversation" split it reports a median prompt of about 1020 tokens
and a median output of about 129 tokens. (The "coding" split, not used here, has about
1500 and 13.) These are approximations read from the paper's reported medians, not fits
to the raw data. Sizes are lognormal with those medians and sigma 1.0 (prompt) and 1.0
(output). The sigmas are our choice, wide enough to match the paper's CDFs, which span
about two orders of magnitude; they are not fitted values. Prompts are clipped to
[1, 32768] and outputs to [1, 4096]. Workflow shapes, model mix, shares, budgets and
deadlines are stated assumptions, not measurements.

Poisson arrivals conditioned on exactly ``n`` events in the window are ``n`` independent
times with density proportional to the rate, sorted; that is how they are drawn.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from fleet.sim.trace import TraceEvent, write_trace
from fleet.sim.workloads import MELANGE_GENERATORS
from fleet.spec import TaskSpec, parse_spec

T = TypeVar("T")
Model = tuple[str, float]

CONVERSATION_PROMPT_MEDIAN = 1020  # Splitwise (ISCA 2024), Azure 2023 conversation split
CONVERSATION_OUTPUT_MEDIAN = 129  # same source
PROMPT_SIGMA = 1.0  # assumption: lognormal shape, not from the paper
OUTPUT_SIGMA = 1.0  # assumption
MAX_PROMPT = 32768
MAX_OUTPUT = 4096
XL_SHARE = 0.05  # workflows with a 405B call: about one in 20
STEP_GAP_S = (0.5, 5.0)  # seconds between steps of one workflow
MIN_WORKFLOW, MAX_WORKFLOW = 4, 12  # 1 embed + 3 small .. 1 + 8 small + 2 large + 1 xl
SHARE_8B = 0.7  # chat requests on the 8B model; the rest on 70B
TRAIN_SHARE, FINE_TUNE_SHARE = 0.03, 0.07  # training-mix: the rest is chat inference
CHAT_SWING = 0.5  # rate ~ 1 - 0.5 cos(2 pi t / duration): quiet at the ends, 3x at midday

_EMBED_SMALL: tuple[Model, ...] = (
    ("all-minilm-l6-v2", 0.0227),
    ("bge-small-en-v1.5", 0.0334),
    ("all-mpnet-base-v2", 0.1094),
)
_EMBED_BATCH: tuple[Model, ...] = (
    ("bge-base-en-v1.5", 0.109),
    ("e5-large-v2", 0.335),
    ("bge-large-en-v1.5", 0.335),
)
_SMALL_TRAIN: tuple[Model, ...] = (
    ("llama-3.2-1b", 1.24),
    ("qwen2.5-1.5b", 1.54),
    ("llama-3.2-3b", 3.21),
)
_LLAMA_8B: Model = ("llama-3.1-8b-instruct", 8.0)
_LLAMA_70B: Model = ("llama-3.1-70b-instruct", 70.0)
_LLAMA_405B: Model = ("llama-3.1-405b-instruct", 405.0)
# role: model, dtype (None: bf16 or fp8 at random), prompt, output, deadline_s, priority
_AGENT_CALLS: dict[str, tuple[Model, str | None, tuple[int, int], tuple[int, int], float, int]] = {
    "small": (_LLAMA_8B, None, (300, 3000), (20, 300), 30.0, 5),
    "large": (_LLAMA_70B, "fp8", (1000, 6000), (100, 800), 120.0, 4),
    "xl": (_LLAMA_405B, None, (1000, 6000), (200, 800), 300.0, 3),
}


def _rng(n: int, seed: int, duration_s: float) -> np.random.Generator:
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration_s: must be positive and finite, got {duration_s}")
    return np.random.default_rng(seed)


def _spec(kind: str, model: Model, dtype: str, **fields: object) -> TaskSpec:
    data = {"kind": kind, "model": {"name": model[0], "params_b": model[1], "dtype": dtype}}
    return parse_spec(data | fields)


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _log_uniform_int(rng: np.random.Generator, lo: float, hi: float) -> int:
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, hi: int) -> int:
    return min(hi, max(1, round(median * math.exp(sigma * rng.standard_normal()))))


def _poisson_times(
    rng: np.random.Generator, n: int, duration_s: float, swing: float = 0.0
) -> list[float]:
    """``n`` arrivals of a Poisson process with rate ~ 1 - swing*cos(2 pi t / duration_s)."""
    times: list[float] = []
    while len(times) < n:
        t = rng.uniform(0.0, duration_s, n)
        u = rng.uniform(0.0, 1.0 + swing, n)
        keep = u < 1.0 - swing * np.cos(2 * math.pi * t / max(duration_s, 1e-9))
        times.extend(float(x) for x in t[keep])
    return sorted(min(duration_s, round(x, 6)) for x in times[:n])


def _chat_spec(rng: np.random.Generator, k: int, priority: int) -> TaskSpec:
    """One chat request: 70% 8B / 30% 70B, Splitwise-calibrated sizes."""
    model, dtype = (_LLAMA_8B, "bf16") if rng.random() < SHARE_8B else (_LLAMA_70B, "fp8")
    prompt = _lognormal_int(rng, CONVERSATION_PROMPT_MEDIAN, PROMPT_SIGMA, MAX_PROMPT)
    output = _lognormal_int(rng, CONVERSATION_OUTPUT_MEDIAN, OUTPUT_SIGMA, MAX_OUTPUT)
    return _spec(
        "inference",
        model,
        dtype,
        input={"prompt": f"chat {k}", "seed": k},
        tokens_in=prompt,
        tokens_out=output,
        slo={"deadline_s": round(10.0 + 0.05 * output, 3)},
        priority=priority,
    )


def _fit(counts: list[int], target: int) -> list[int]:
    """Resize ``[small, large, xl]`` step counts to sum to ``target`` (0..11)."""
    small, large, xl = counts
    while small + large + xl > target:
        if small > 3:  # noqa: PLR2004
            small -= 1
        elif large:
            large -= 1
        elif xl:
            xl -= 1
        else:
            small -= 1
    while small + large + xl < target:
        if small < 8:  # noqa: PLR2004
            small += 1
        elif large < 2:  # noqa: PLR2004
            large += 1
        else:
            xl += 1
    return [small, large, xl]


def _agent_step(rng: np.random.Generator, role: str, tag: int) -> TaskSpec:
    payload = {"prompt": f"agent step {tag}", "seed": tag}
    if role == "embed":
        tokens = _uniform_int(rng, 200, 2000)
        texts = {"texts": [f"retrieve {tag}"]}
        return _spec("embedding", _pick(rng, _EMBED_SMALL), "fp32", input=texts, tokens_in=tokens)
    model, dtype, size, out, deadline, prio = _AGENT_CALLS[role]
    return _spec(
        "inference",
        model,
        dtype or _pick(rng, ("bf16", "fp8")),
        input=payload,
        tokens_in=_uniform_int(rng, *size),
        tokens_out=_uniform_int(rng, *out),
        slo={"deadline_s": deadline},
        priority=prio,
    )


def multi_agent(n: int, seed: int = 0, duration_s: float = 3600.0) -> list[TraceEvent]:
    """Agent workflows ``wf-<k>``: embed, 3-8 8B calls, 0-2 70B calls, 1 in 20 a 405B call.

    Step ids are ``<index>-<role>`` (``0-embed``, ``1-small``, ``2-large``, ``3-xl``); the
    embedding comes first and the rest in random order, each 0.5-5 s after the previous.
    Workflows start as a Poisson process over the trace less 55 s (the longest workflow).
    The last workflows are resized so the total is exactly ``n``; every workflow keeps its
    embedding and at least three small calls when ``n >= 4``.
    """
    rng = _rng(n, seed, duration_s)
    shapes: list[list[int]] = []
    remaining = n
    while remaining > 0:
        counts = [_uniform_int(rng, 3, 8), _uniform_int(rng, 0, 2), int(rng.random() < XL_SHARE)]
        size = 1 + sum(counts)
        if remaining - size < MIN_WORKFLOW:  # too few would be left for one more workflow
            size = remaining if remaining <= MAX_WORKFLOW else remaining - MIN_WORKFLOW
            counts = _fit(counts, size - 1)
        shapes.append(counts)
        remaining -= size
    margin = (MAX_WORKFLOW - 1) * STEP_GAP_S[1]
    starts = _poisson_times(rng, len(shapes), max(0.0, duration_s - margin))
    events: list[TraceEvent] = []
    for k, ((small, large, xl), start) in enumerate(zip(shapes, starts, strict=True)):
        roles = ["embed", *rng.permutation(["small"] * small + ["large"] * large + ["xl"] * xl)]
        t = start
        for i, role in enumerate(roles):
            if i:
                t += rng.uniform(*STEP_GAP_S)
            spec = _agent_step(rng, str(role), len(events))
            events.append(TraceEvent(min(duration_s, round(t, 6)), spec, f"wf-{k}", f"{i}-{role}"))
    return sorted(events, key=lambda e: e.t)


def batch_embedding(n: int, seed: int = 0, duration_s: float = 3600.0) -> list[TraceEvent]:
    """One embedding job of ``n`` shards, 1,000-20,000 tokens each, with a 0.1-0.4B model.

    Shards arrive in 3-5 bursts inside the first 10% of the trace (each burst spreads
    over about 2% of that window); no deadline, priority 1, a $0.01 cap per shard
    (assumed; about 4x the cost of 20k tokens at $0.13 per million).
    """
    rng = _rng(n, seed, duration_s)
    model = _pick(rng, _EMBED_BATCH)
    window = 0.1 * duration_s
    centers = np.sort(rng.uniform(0.0, 0.8 * window, _uniform_int(rng, 3, 5)))
    burst = rng.integers(len(centers), size=n)
    jitter = rng.exponential(0.02 * window, size=n)
    arrivals = zip(centers[burst], jitter, strict=True)
    times = sorted(min(window, round(float(c + j), 6)) for c, j in arrivals)
    job = f"embed-job-{seed}"
    events: list[TraceEvent] = []
    for k, t in enumerate(times):
        fields: dict[str, object] = {
            "input_uri": f"s3://corpus/{job}/shard-{k:06d}.jsonl",
            "tokens_in": _uniform_int(rng, 1000, 20000),
            "budget": {"max_usd": 0.01},
            "priority": 1,
            "idempotency_key": f"{job}-{k}",
        }
        spec = _spec("embedding", model, "fp32", **fields)
        events.append(TraceEvent(t, spec, workflow=job, step=f"shard-{k}"))
    return events


def interactive_chat(n: int, seed: int = 0, duration_s: float = 3600.0) -> list[TraceEvent]:
    """Chat requests sized like the Azure 2023 conversation split (see the module docstring).

    Arrivals are Poisson with rate ~ 1 - 0.5 cos(2 pi t / duration_s): one compressed
    "day", quiet at both ends and three times busier in the middle. 70% Llama 3.1 8B
    (bf16), 30% 70B (fp8); deadline 10 s + 0.05 s per output token; priority 7.
    """
    rng = _rng(n, seed, duration_s)
    times = _poisson_times(rng, n, duration_s, CHAT_SWING)
    return [TraceEvent(t, _chat_spec(rng, k, 7)) for k, t in enumerate(times)]


def training_mix(n: int, seed: int = 0, duration_s: float = 3600.0) -> list[TraceEvent]:
    """Mostly chat inference (90%), LoRA fine-tunes of 8B (7%), full small trainings (3%).

    Fine-tunes train on 1e6-2e7 tokens (log-uniform) with a $5-50 budget; trainings of
    1-3B models on 1e7-1e8 tokens. Neither has a deadline. Arrivals are homogeneous
    Poisson; inference is as in ``interactive_chat`` at priority 5.
    """
    rng = _rng(n, seed, duration_s)
    events: list[TraceEvent] = []
    for k, t in enumerate(_poisson_times(rng, n, duration_s)):
        u = rng.random()
        if u < TRAIN_SHARE:
            spec = _spec(
                "training",
                _pick(rng, _SMALL_TRAIN),
                "bf16",
                input={"dataset": f"pretrain-{k}", "seed": k},
                tokens_in=_log_uniform_int(rng, 1e7, 1e8),
                training_method="full",
                priority=1,
            )
        elif u < TRAIN_SHARE + FINE_TUNE_SHARE:
            spec = _spec(
                "fine_tune",
                _LLAMA_8B,
                "bf16",
                input={"dataset": f"ft-{k}", "seed": k},
                tokens_in=_log_uniform_int(rng, 1e6, 2e7),
                training_method="lora",
                budget={"max_usd": round(rng.uniform(5.0, 50.0), 2)},
                priority=2,
            )
        else:
            spec = _chat_spec(rng, k, 5)
        events.append(TraceEvent(t, spec))
    return events


GENERATORS: dict[str, Callable[..., list[TraceEvent]]] = {
    "multi-agent": multi_agent,
    "batch-embedding": batch_embedding,
    "interactive-chat": interactive_chat,
    "training-mix": training_mix,
    # Mélange's Llama-2-7B workloads at a 120 or 40 ms TPOT goal (fleet.sim.workloads).
    **MELANGE_GENERATORS,
}


def generate(name: str, *, n: int, seed: int = 0, duration_s: float = 3600.0) -> list[TraceEvent]:
    """The trace ``name`` (a key of ``GENERATORS``) with ``n`` events.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
        ValueError: ``n`` negative or ``duration_s`` not positive.

    """
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; valid: {', '.join(GENERATORS)}") from None
    return gen(n, seed, duration_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.sim.generators NAME --n 500 --seed 1 --duration 3600 --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m fleet.sim.generators", description="Write a synthetic task trace."
    )
    parser.add_argument("name", choices=list(GENERATORS))
    parser.add_argument("--n", type=int, default=500, help="number of tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    args = parser.parse_args(argv)
    try:
        events = generate(args.name, n=args.n, seed=args.seed, duration_s=args.duration)
    except ValueError as exc:
        parser.error(str(exc))
    write_trace(events, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

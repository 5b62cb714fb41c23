"""Serving for the ``transformers`` engine: embeddings and generation on a loaded model.

* ``embed(st, request)``: ``input.texts`` (or ``input.text``; ``input.dim`` accepted only
  as the model's own dimension) through ``SentenceTransformer.encode`` with
  ``normalize_embeddings=True``; unit vectors rounded to ``DECIMALS`` decimals.
  ``tokens_in`` counts the word pieces the model read (special tokens included, each text
  cut at the model's ``max_seq_length``).
* ``generate(model, tokenizer, plan, request, device)`` runs an inference task validated by
  ``workers.engines.inputs.plan_generation`` (with ``input.adapter`` allowed).
  Temperature 0 (the default) is greedy: the same tokens as
  ``model.generate(..., do_sample=False)``. A positive temperature samples (plain
  temperature sampling: no top-k, no top-p) after ``torch.manual_seed(seed)``; the seed
  defaults to the CRC-32 of the task id. ``spec.tokens_out`` (default ``DEFAULT_TOKENS``)
  new tokens, capped so that prompt plus new tokens fit the entry's ``max_context``; a
  prompt that leaves no room is refused. Output ``text`` (special tokens skipped),
  ``token_ids`` (the generated ids, end-of-sequence included), ``seed`` and
  ``finish_reason`` (``stop`` when the model ended early, else ``length``).

Timing is measured, not estimated: a streamer that transformers calls as each token reaches
the host timestamps the tokens. ``ttft_s`` runs from the start of ``generate`` (tokenizing
included) to the first generated token; ``tokens_per_s`` is the tokens after the first over
the time after the first (decode speed), or, with one token, that token over ``ttft_s``.
``tpot_ms`` (``workers.engines.timing``) is the time from the first generated token's
arrival to the last one's over the tokens after the first, in ms; ``slo_tpot_met`` compares
it with ``slo.tpot_ms`` when the spec sets it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.engines.base import EngineOutput
from workers.engines.inputs import DEFAULT_TOKENS, GenerationPlan
from workers.engines.timing import token_pace
from workers.handlers import (
    HandlerError,
    get_texts,
    input_object,
    show,
)

if TYPE_CHECKING:
    from pydantic import JsonValue

    from workers.engines.base import EngineRequest

TorchModel = (
    Any  # a torch.nn.Module (transformers, peft, sentence-transformers); stubs would force casts
)
Tokenizer = Any  # a transformers tokenizer

DECIMALS = 6
EMBED_BATCH = 32


class TokenClock:
    """A transformers streamer that only timestamps: ``put`` is called as tokens arrive.

    transformers puts the prompt first, then each generated token once it is on the host,
    so ``stamps[1:]`` are the generated tokens' arrivals.
    """

    def __init__(self) -> None:
        """Start with no arrivals."""
        self.stamps: list[float] = []

    def put(self, value: object) -> None:  # noqa: ARG002 - only the arrival time matters
        """Record an arrival."""
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def decode_rate(n: int, ttft_s: float, decode_s: float) -> float | None:
    """Tokens per second after the first of ``n`` tokens (the first alone when only one)."""
    if n >= 2 and decode_s > 0:  # noqa: PLR2004 - a rate needs two arrivals
        return (n - 1) / decode_s
    return n / ttft_s if n and ttft_s > 0 else None


def generate(
    model: TorchModel,
    tokenizer: Tokenizer,
    plan: GenerationPlan,
    request: EngineRequest,
    device: str,
) -> EngineOutput:
    """Generate from ``plan.prompt`` with ``model`` (a base model or base plus adapter).

    Raises:
        HandlerError: the prompt leaves no room in the model's context (both numbers named).

    """
    import torch  # noqa: PLC0415 - the worker child only

    t0 = time.perf_counter()
    enc = tokenizer(plan.prompt, return_tensors="pt")
    n_prompt = int(enc["input_ids"].shape[1])
    context = request.model.max_context
    if n_prompt >= context:
        raise HandlerError(
            f"input.prompt: {n_prompt} tokens leave no room in the context of {context}"
        )
    max_new = min(request.spec.tokens_out or DEFAULT_TOKENS, context - n_prompt)
    options: dict[str, Any] = {"do_sample": False}
    if plan.temperature > 0:
        options = {"do_sample": True, "temperature": plan.temperature, "top_k": 0, "top_p": 1.0}
        torch.manual_seed(plan.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = TokenClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new,
            pad_token_id=pad,
            streamer=clock,
            **options,
        )
    ids: list[int] = [int(i) for i in out[0, n_prompt:].tolist()]
    token_ids: list[JsonValue] = list(ids)
    run_s = time.perf_counter() - t0
    first, last = (clock.stamps[1], clock.stamps[-1]) if len(clock.stamps) > 1 else (t0, t0)
    stopped = bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) < max_new
    pace = token_pace(first, last, len(ids), request.spec.slo.tpot_ms)
    return EngineOutput(
        output={
            "text": tokenizer.decode(ids, skip_special_tokens=True),
            "token_ids": token_ids,
            "seed": plan.seed,
            "finish_reason": "stop" if stopped else "length",
        },
        tokens_in=n_prompt,
        tokens_out=len(ids),
        run_s=run_s,
        ttft_s=first - t0 if ids else None,
        tokens_per_s=decode_rate(len(ids), first - t0, last - first),
        extra={"device": device, "adapter": plan.adapter, "temperature": plan.temperature},
        tpot_ms=pace.tpot_ms,
        slo_tpot_met=pace.slo_tpot_met,
    )


def embed(st: TorchModel, request: EngineRequest) -> EngineOutput:
    """Embed ``input.texts`` (or ``input.text``) with the SentenceTransformer ``st``.

    Raises:
        HandlerError: bad texts, an unknown field, or a ``dim`` other than the model's.

    """
    t0 = time.perf_counter()
    data = input_object(request.spec, ("texts", "text", "dim"))
    texts = get_texts(data)
    # get_embedding_dimension: sentence-transformers >= 6 (the older name warns there)
    dimension = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = int(dimension())
    if "dim" in data and data["dim"] != dim:  # the reference handler's option, if it agrees
        raise HandlerError(
            f"input.dim: {request.model.name} embeds in {dim} dimensions, got {show(data['dim'])}"
        )
    if not texts:
        return EngineOutput(
            output={"embeddings": [], "dim": dim}, tokens_in=0, tokens_out=0, run_s=0.0
        )
    vectors = st.encode(
        texts,
        batch_size=EMBED_BATCH,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    # rounded in numpy (float64, as Python's round would see them): a Python loop over
    # every component cost more than the model at small batches
    embeddings: list[JsonValue] = np.round(vectors.astype(np.float64), DECIMALS).tolist()
    tokens = count_tokens(st, texts)
    run_s = time.perf_counter() - t0
    return EngineOutput(
        output={"embeddings": embeddings, "dim": dim},
        tokens_in=tokens,
        tokens_out=0,
        run_s=run_s,
        tokens_per_s=tokens / run_s if run_s > 0 else None,
        extra={"device": str(st.device)},
    )


def count_tokens(st: TorchModel, texts: list[str]) -> int:
    """Word pieces ``st`` reads of ``texts`` (special tokens included, cut at max_seq_length)."""
    # preprocess: sentence-transformers >= 6 (tokenize, its older name, warns there)
    prepare = getattr(st, "preprocess", None) or st.tokenize
    total = 0
    for start in range(0, len(texts), EMBED_BATCH):
        features = prepare(texts[start : start + EMBED_BATCH])
        total += int(features["attention_mask"].sum())
    return total

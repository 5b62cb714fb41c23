"""Text generation: a real word-level trigram language model, trained on first use.

The model is trained once per process on ``corpus.txt`` (shipped beside this module):
counts of every trigram, bigram and unigram of its lowercase words and punctuation.
The next token is drawn from the trigram counts of the last two tokens, backing off
to the bigram counts of the last token and then to the unigram counts when a context
was never seen. Counts are sharpened or flattened by the temperature (weights
``count ** (1 / temperature)``; temperature 0 is greedy).

Input: ``{"prompt": str}``, optional ``"seed"`` (default: CRC-32 of the task id) and
``"temperature"`` (0 to 5, default 0.8). The task's ``tokens_out`` sets the length
(default 32, at most 2048). Output: ``{"text": str, "seed": int}``, the continuation
only; ``tokens_in`` and ``tokens_out`` count prompt and generated tokens. The same
seed, prompt, temperature and length give the same text.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from workers.handlers import (
    MAX_TEXT_CHARS,
    HandlerError,
    get_float,
    get_int,
    input_object,
    stable_hash,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt
    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

    Dist = tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]  # next ids, log counts

ENGINE = "cpu-reference:trigram-lm-v1"
DEFAULT_TOKENS = 32
MAX_TOKENS = 2048
DEFAULT_TEMPERATURE = 0.8
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**63 - 1
BOUNDARY = "."
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[.,;:!?]")
_PUNCT = frozenset(".,;:!?")
_SENTENCE_END = frozenset(".!?")
_UNKNOWN = -1


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lowercase words and punctuation marks."""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Sequence[str], *, capitalize: bool) -> str:
    """Join tokens into text: no space before punctuation, capitals after a sentence end."""
    out: list[str] = []
    for token in tokens:
        word = token.capitalize() if capitalize else token
        out.append(word if token in _PUNCT or not out else f" {word}")
        capitalize = token in _SENTENCE_END
    return "".join(out)


def _dist(counts: Counter[int]) -> Dist:
    ids = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
    logs = np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
    return ids, logs


@dataclass(frozen=True, slots=True)
class TrigramModel:
    """Next-token distributions of a trigram model with backoff."""

    vocab: tuple[str, ...]
    index: dict[str, int]
    trigrams: dict[tuple[int, int], Dist]
    bigrams: dict[int, Dist]
    unigrams: Dist

    @classmethod
    def train(cls, tokens: Sequence[str]) -> TrigramModel:
        """Count the trigrams, bigrams and unigrams of ``tokens``."""
        vocab = tuple(sorted({*tokens, BOUNDARY}))
        index = {t: i for i, t in enumerate(vocab)}
        seq = [index[BOUNDARY]] * 2 + [index[t] for t in tokens]
        tri: defaultdict[tuple[int, int], Counter[int]] = defaultdict(Counter)
        bi: defaultdict[int, Counter[int]] = defaultdict(Counter)
        for a, b, c in zip(seq, seq[1:], seq[2:], strict=False):
            tri[a, b][c] += 1
            bi[b][c] += 1
        return cls(
            vocab=vocab,
            index=index,
            trigrams={k: _dist(v) for k, v in tri.items()},
            bigrams={k: _dist(v) for k, v in bi.items()},
            unigrams=_dist(Counter(seq[2:])),
        )

    def ids(self, tokens: Sequence[str]) -> list[int]:
        """Map tokens to ids; tokens outside the vocabulary get an id no context has."""
        return [self.index.get(t, _UNKNOWN) for t in tokens]

    def next_dist(self, a: int, b: int) -> Dist:
        """Return the distribution after ``a b``, backing off to ``b`` and then to none."""
        return self.trigrams.get((a, b)) or self.bigrams.get(b) or self.unigrams

    def generate(
        self, context: Sequence[int], n: int, rng: np.random.Generator, temperature: float
    ) -> list[str]:
        """Sample ``n`` tokens continuing ``context`` (ids)."""
        boundary = self.index[BOUNDARY]
        a, b = ([boundary, boundary, *context])[-2:]
        out: list[str] = []
        for _ in range(n):
            ids, logs = self.next_dist(a, b)
            if temperature == 0:
                pick = int(np.argmax(logs))
            else:
                weights = np.exp((logs - logs.max()) / temperature)
                cum = np.cumsum(weights)
                pick = min(
                    int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(ids) - 1
                )
            a, b = b, int(ids[pick])
            out.append(self.vocab[b])
        return out


@cache
def corpus_model() -> TrigramModel:
    """Return the model trained on the shipped corpus (trained once per process)."""
    text = resources.files(__package__).joinpath("corpus.txt").read_text(encoding="utf-8")
    return TrigramModel.train(tokenize(text))


def handle(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Continue the prompt of an ``inference`` task."""
    data = input_object(spec, ("prompt", "seed", "temperature"))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise HandlerError("input.prompt: expected a string")
    if len(prompt) > MAX_TEXT_CHARS:
        raise HandlerError(
            f"input.prompt: at most {MAX_TEXT_CHARS:,} characters, got {len(prompt):,}"
        )
    seed = get_int(data, "seed", stable_hash(ctx.task_id), 0, MAX_SEED)
    temperature = get_float(data, "temperature", DEFAULT_TEMPERATURE, 0.0, MAX_TEMPERATURE)
    n = min(spec.tokens_out, MAX_TOKENS) if spec.tokens_out else DEFAULT_TOKENS
    model = corpus_model()
    prompt_tokens = tokenize(prompt)
    tokens = model.generate(model.ids(prompt_tokens), n, np.random.default_rng(seed), temperature)
    starts_sentence = not prompt_tokens or prompt_tokens[-1] in _SENTENCE_END
    return {
        "engine": ENGINE,
        "tokens_in": len(prompt_tokens),
        "tokens_out": len(tokens),
        "text": detokenize(tokens, capitalize=starts_sentence),
        "seed": seed,
    }

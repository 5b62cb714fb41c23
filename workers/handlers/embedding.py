"""Hashing embeddings: a real, deterministic text embedding computed on the CPU.

Each text is tokenized into lowercase words and the character trigrams of each word
(padded ``<word>``). Every feature is hashed with CRC-32 (stable across processes,
unlike ``hash()``) into one of ``BUCKETS`` counts; the count vector is multiplied by
a fixed Gaussian random projection to ``dim`` dimensions and L2-normalised. The
projection is seeded from the model name, so one model always gives one embedding
space, and texts sharing words and spellings get a high cosine similarity. A text
without a word (empty, punctuation only) embeds to the zero vector.

Input: ``{"texts": [str, ...]}`` or ``{"text": str}``, optional ``"dim"`` (8 to 4096,
default 384). Output: ``{"embeddings": [[float, ...], ...], "dim": n}``, values
rounded to 6 decimals; ``tokens_in`` counts words.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from workers.handlers import get_int, get_texts, input_object, stable_hash

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt
    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

ENGINE = "cpu-reference:hashing-embedding-v1"
BUCKETS = 4096
DEFAULT_DIM = 384
MIN_DIM = 8
MAX_DIM = 4096
DECIMALS = 6
_CHUNK = 256  # texts per projection; bounds the dense count matrix to 4 MiB
_WORD = re.compile(r"\w+")
_KEYS = ("texts", "text", "dim")


def words(text: str) -> list[str]:
    """Split ``text`` into lowercase words."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=65_536)
def _word_buckets(word: str) -> tuple[int, ...]:
    padded = f"<{word}>"
    feats = [f"w:{word}"] + [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
    return tuple(stable_hash(f) % BUCKETS for f in feats)


def bucket_counts(text: str) -> tuple[npt.NDArray[np.float32], int]:
    """Return the hashed feature counts of ``text`` and its number of words."""
    tokens = words(text)
    idx = [b for w in tokens for b in _word_buckets(w)]
    counts = np.bincount(np.asarray(idx, dtype=np.intp), minlength=BUCKETS)
    return counts.astype(np.float32), len(tokens)


@lru_cache(maxsize=4)
def projection(model: str, dim: int) -> npt.NDArray[np.float32]:
    """Return the fixed ``BUCKETS x dim`` Gaussian projection of ``model``'s space."""
    rng = np.random.default_rng(stable_hash(f"embedding:{model}"))
    matrix = rng.standard_normal((BUCKETS, dim), dtype=np.float32)
    matrix.setflags(write=False)
    return matrix


def embed(texts: Sequence[str], model: str, dim: int = DEFAULT_DIM) -> tuple[list[JsonValue], int]:
    """Embed ``texts`` in ``model``'s space; return the rounded vectors and the words read."""
    proj = projection(model, dim)
    out: list[JsonValue] = []
    n_words = 0
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        counts = np.zeros((len(chunk), BUCKETS), dtype=np.float32)
        for row, text in enumerate(chunk):
            counts[row], n = bucket_counts(text)
            n_words += n
        vecs = (counts @ proj).astype(np.float64)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs /= np.where(norms > 0, norms, 1.0)
        out.extend(np.round(vecs, DECIMALS).tolist())
    return out, n_words


def _run(spec: TaskSpec, data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    texts = get_texts(data)
    dim = get_int(data, "dim", DEFAULT_DIM, MIN_DIM, MAX_DIM)
    embeddings, n_words = embed(texts, spec.model.name, dim)
    return {
        "engine": ENGINE,
        "tokens_in": n_words,
        "tokens_out": 0,
        "embeddings": embeddings,
        "dim": dim,
    }


def handle(spec: TaskSpec, _ctx: HandlerContext) -> dict[str, JsonValue]:
    """Embed the texts of an ``embedding`` task."""
    return _run(spec, input_object(spec, _KEYS))


def handle_batch(spec: TaskSpec, _ctx: HandlerContext) -> dict[str, JsonValue]:
    """Embed the texts of a ``batch`` task with ``"op": "embed"``."""
    return _run(spec, input_object(spec, ("op", *_KEYS)))

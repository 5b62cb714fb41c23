"""Check that a registry entry's weights are there and load: ``fleet models verify``.

``locate(entry, cache)`` says where the weights resolve now, or why not, without fetching or
building anything (``fleet models show``). ``choose_check(entry, missing)`` is the pure
choice of how to load them: the first of the entry's engines whose library is importable
here. ``verify(entry, registry, cache)`` resolves the weights (fetching or building them
once, as a worker would) and loads them lightly with that library:

* embedding, ``transformers``: sentence-transformers encodes one sentence;
* generation (or ``lora``, on its base), ``transformers``: the tokenizer, the model and one
  forward pass; vLLM serves the same Hugging Face directory, so this check stands for it
  too (its server is not started);
* ``gguf``, ``vllm``: the GGUF header (magic, version, tensor count);
* ``reference``: the reference handlers read no weights; resolving them is the check.

torch and the engine libraries load inside ``verify`` only; nothing reaches a model hub
(``HF_HUB_OFFLINE=1`` is set before they load).
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.models import fetch, tinyllama
from fleet.models.weights import WeightsError, build_dir, resolve

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from fleet.models.registry import ModelEntry, ModelRegistry

SENTENCE = "fleet checks that these weights load."
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class Location:
    """Where an entry's weights are now (``path``, or None) and a note saying how or why not."""

    path: Path | None
    note: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of verifying one model: ``detail`` says what loaded, or why it failed."""

    model: str
    ok: bool
    check: str | None
    detail: str


def locate(entry: ModelEntry, cache: Path) -> Location:
    """Where ``entry``'s weights resolve now, without fetching or building them."""
    src = entry.source
    if src.kind == "build":
        target = build_dir(entry, cache)
        if tinyllama.is_built(target):
            return Location(target, "built")
        return Location(None, f"not built yet: built into {target} on first use")
    if src.kind == "uri":
        found = fetch.cached(entry, cache)
        if found is not None:
            return Location(found, "fetched")
        return Location(
            None, f"not fetched yet: fetched into {fetch.cache_dir(entry, cache)} on first use"
        )
    try:  # path, package and hf_cache resolve without writing anything
        return Location(resolve(entry, cache), "present")
    except WeightsError as exc:
        return Location(None, str(exc))


def _libraries(entry: ModelEntry) -> tuple[str, ...]:
    if entry.format == "lora":
        return ("torch", "transformers", "peft")
    if entry.task == "embedding":
        return ("torch", "transformers", "sentence_transformers")
    return ("torch", "transformers")


def _find_missing(modules: Iterable[str]) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"missing package {module} (pip install 'fleet[engines]')"
    return None


def choose_check(
    entry: ModelEntry, missing: Callable[[Iterable[str]], str | None] = _find_missing
) -> tuple[str | None, tuple[str, ...]]:
    """How to load ``entry``: the first engine whose library is here, and why not the others.

    Args:
        entry: the model.
        missing: why the given modules cannot be imported, or None (default: ``find_spec``).

    Returns:
        The check (``transformers``, ``gguf`` or ``reference``), or None when no engine
        can load the weights here, and one reason per engine passed over.

    """
    passed: list[str] = []
    for engine in entry.engines:
        if engine == "reference":
            return "reference", tuple(passed)
        if engine == "vllm" and entry.format == "gguf":
            return "gguf", tuple(passed)
        why = missing(_libraries(entry))
        if why is None:
            return "transformers", tuple(passed)
        passed.append(f"{engine}: {why}")
    return None, tuple(passed)


def verify(entry: ModelEntry, registry: ModelRegistry, cache: Path) -> Verdict:
    """Resolve ``entry``'s weights (fetching or building once) and load them lightly.

    Never raises for a broken model: every failure (missing weights, a bad checksum, a load
    error) is a Verdict with ``ok`` False and the reason.
    """
    check, passed = choose_check(entry)
    if check is None:
        return Verdict(entry.name, ok=False, check=None, detail="; ".join(passed))
    try:
        weights = resolve(entry, cache)
        base = resolve(registry.get(entry.base), cache) if entry.base else None
    except WeightsError as exc:
        return Verdict(entry.name, ok=False, check=check, detail=str(exc))
    except KeyError as exc:  # a lora base the registry lacks (the registry refuses those)
        return Verdict(entry.name, ok=False, check=check, detail=str(exc.args[0]))
    try:
        detail = _load(check, entry, weights, base)
    except Exception as exc:  # noqa: BLE001 - any load failure is this model's FAIL line
        return Verdict(entry.name, ok=False, check=check, detail=f"{type(exc).__name__}: {exc}")
    return Verdict(entry.name, ok=True, check=check, detail=f"{detail} ({weights})")


def _load(check: str, entry: ModelEntry, weights: Path, base: Path | None) -> str:
    if check == "reference":
        return "reference engine: reads no weights; they resolve"
    if check == "gguf":
        return gguf_header(weights)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one line per model, no bars
    if entry.task == "embedding" and entry.format != "lora":
        return _encode_one(weights)
    return _forward_one(weights, base)


def _encode_one(weights: Path) -> str:
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - loads torch

    model = SentenceTransformer(str(weights), device="cpu", local_files_only=True)
    vectors = model.encode([SENTENCE])
    if vectors.shape[0] != 1 or not all(math.isfinite(float(x)) for x in vectors[0]):
        raise ValueError(f"encode returned {vectors.shape} with non-finite values")
    return f"sentence-transformers encoded one sentence: {vectors.shape[1]} dimensions"


def _forward_one(weights: Path, base: Path | None) -> str:
    import torch  # noqa: PLC0415 - only when verifying
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    model_dir = base or weights
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    if base is not None:
        from peft import PeftModel  # noqa: PLC0415

        model = PeftModel.from_pretrained(model, str(weights))
    model.eval()
    ids = tokenizer(SENTENCE, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the forward pass gave non-finite logits")
    n = int(ids["input_ids"].shape[1])
    return f"transformers forward pass: {n} tokens -> logits over {logits.shape[-1]} tokens"


def gguf_header(path: Path) -> str:
    """A one-line summary of a GGUF file's header.

    Raises:
        ValueError: not a GGUF file (wrong magic, or shorter than a header).

    """
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:  # noqa: PLR2004 - magic, version, two counts
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    version, tensors, keys = struct.unpack("<IQQ", head[4:24])
    return f"gguf v{version} header: {tensors} tensors, {keys} metadata keys (vLLM loads it)"

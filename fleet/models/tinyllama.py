"""``tiny-llama``: a small Llama-architecture model with a real tokenizer, built deterministically.

Its weights are RANDOM (seeded), not a pretrained model: it exists so that real engines
(transformers, vLLM) run a real Llama graph and tokenizer on small hardware and in tests.
The same seed gives the same bytes in every file (same transformers and tokenizers
versions): ``build(directory, seed)`` trains a byte-level BPE tokenizer on fleet's shipped
corpus (``workers/handlers/corpus.txt``), initialises ``LlamaForCausalLM`` under
``torch.manual_seed(seed)`` and writes safetensors, the tokenizer, a model card saying the
weights are random, and ``fleet-model.json`` (seed and the sha256 of every file).

The directory is written atomically: built beside the target, then renamed into place, so a
reader never sees half a model. Importing this module is cheap; torch loads inside ``build``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.models.atomic import atomic_dir

VOCAB_SIZE = 512
SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim 64: a size every vLLM attention backend serves
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
SPECIALS = ("<s>", "</s>", "<pad>")
MANIFEST = "fleet-model.json"
CARD = """---
license: apache-2.0
tags: [fleet, random-weights, test-model]
---
# tiny-llama (fleet test model): RANDOM WEIGHTS

This is NOT a pretrained model. Its weights were drawn at random by
`torch.manual_seed({seed})` and `LlamaForCausalLM` initialisation; its text is gibberish.
It has the Llama architecture ({layers} layers, hidden {hidden}, {heads} attention heads,
{kv} key-value heads, context {ctx}) and a real byte-level BPE tokenizer ({vocab} tokens)
trained on fleet's shipped corpus, so real engines (transformers, vLLM) load and run it.
Built by `fleet models build tiny-llama DIR --seed {seed}`; the same seed gives the same bytes.
"""


def corpus_text() -> str:
    """The text the tokenizer is trained on (shipped with the reference handlers)."""
    return resources.files("workers.handlers").joinpath("corpus.txt").read_text("utf-8")


def _train_tokenizer(directory: Path) -> Any:  # noqa: ANN401 - a transformers tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    bos, eos, pad = SPECIALS
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad
    )
    fast.model_max_length = SHAPE["max_position_embeddings"]
    fast.save_pretrained(str(directory))
    return fast


def _write_model(directory: Path, seed: int, tokenizer: Any) -> int:  # noqa: ANN401
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    shape: dict[str, Any] = dict(SHAPE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(directory: Path) -> bool:
    """Whether ``directory`` holds a complete build (its manifest is written last)."""
    return (directory / MANIFEST).is_file()


def build(directory: str | Path, seed: int = 0) -> Path:
    """Build tiny-llama into ``directory`` (created; replaced if it holds an older build).

    Returns:
        The directory.

    """
    target = Path(directory)
    with atomic_dir(target) as work:
        tokenizer = _train_tokenizer(work)
        n_params = _write_model(work, seed, tokenizer)
        card = CARD.format(
            seed=seed,
            layers=SHAPE["num_hidden_layers"],
            hidden=SHAPE["hidden_size"],
            heads=SHAPE["num_attention_heads"],
            kv=SHAPE["num_key_value_heads"],
            ctx=SHAPE["max_position_embeddings"],
            vocab=len(tokenizer),
        )
        (work / "README.md").write_text(card, encoding="utf-8")
        files = {p.name: _sha256(p) for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {
            "name": "tiny-llama",
            "seed": seed,
            "parameters": n_params,
            "pretrained": False,
            "files": files,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m fleet.models.tinyllama DIR [SEED]``: build in a process of its own."""
    import sys  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else argv
    print(build(args[0], int(args[1]) if len(args) > 1 else 0))  # noqa: T201


if __name__ == "__main__":
    main()

"""Training and LoRA fine-tuning for the ``transformers`` engine: a short causal-LM loop.

``train(model, tokenizer, request)`` trains a deep copy of the loaded ``model`` (the serving
copy is never changed: later inference on this process gives the same tokens as before):

* ``full`` (``training``, or ``training_method: "full"``): every weight, AdamW at lr 1e-3;
  the checkpoint is the model's ``save_pretrained`` (``model.safetensors``, config) and the
  tokenizer.
* ``lora`` (``fine_tune``): a peft ``LoraConfig`` adapter (rank ``input.rank``, alpha twice
  the rank, no dropout) on ``input.target_modules`` (default ``q_proj``, ``v_proj``), AdamW
  at lr 5e-3; the checkpoint is the adapter's ``save_pretrained``
  (``adapter_model.safetensors`` + ``adapter_config.json``), which an inference task serves
  through ``input.adapter``.

Data: ``input.texts`` (or ``input.text``), else the lines of fleet's shipped corpus
(``fleet.models.tinyllama.corpus_text()``). Each text is tokenized, followed by the
end-of-sequence token, all are joined and cut into ``BLOCK`` token blocks (the remainder
dropped; text shorter than a block trains as one short block). Each step trains on
``BATCH`` blocks drawn with replacement by a generator seeded with ``input.seed`` (default
0); ``torch.manual_seed(seed)`` fixes the adapter's initial weights, so a run is
reproducible on one device. The loss is the mean next-token loss on the first
``EVAL_BLOCKS`` blocks, recorded before the first step, every ``LOG_EVERY`` steps and after
the last. A run whose loss did not fall is refused (``input.lr`` named).

Artifacts go to ``request.artifact_dir/<task_id>/`` atomically: written into a temporary
directory beside it, then renamed; a task run twice replaces its own directory.
``fleet-training.json`` beside the weights records method, base model, revision and curve.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.models.atomic import atomic_dir
from workers.engines.base import EngineError, EngineOutput
from workers.handlers import HandlerError, describe, get_float, get_int, get_texts, input_object

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch
    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.engines.base import EngineRequest

TorchModel = Any  # a torch.nn.Module (a transformers or peft model); stubs would force casts
Tokenizer = Any  # a transformers tokenizer

BLOCK = 64
BATCH = 8
EVAL_BLOCKS = 16
LOG_EVERY = 5
DEFAULT_STEPS = 20
MAX_STEPS = 5000
DEFAULT_LR = {"full": 1e-3, "lora": 5e-3}
DEFAULT_RANK = 8
MAX_RANK = 256
DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_SEED = 2**63 - 1
MANIFEST = "fleet-training.json"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_KEYS = ("steps", "lr", "seed", "texts", "text")
_LORA_KEYS = ("rank", "target_modules")


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """A training task's validated options (``texts`` None: the shipped corpus)."""

    method: str
    steps: int
    lr: float
    seed: int
    rank: int
    target_modules: tuple[str, ...]
    texts: tuple[str, ...] | None


def plan_training(spec: TaskSpec) -> TrainPlan:
    """Validate a training or fine-tune task's input.

    Raises:
        HandlerError: an option is unknown, of the wrong type or out of bounds; it is named.

    """
    method = spec.method
    lora = method == "lora"
    data = input_object(spec, (*_KEYS, *(_LORA_KEYS if lora else ())), required=False)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    if lora and "target_modules" in data:
        raw = data["target_modules"]
        if not isinstance(raw, list) or not raw or not all(isinstance(t, str) and t for t in raw):
            raise HandlerError(
                f"input.target_modules: expected a non-empty list of module names, got {describe(raw)}"
            )
        targets = tuple(str(t) for t in raw)
    texts = tuple(get_texts(data)) if "texts" in data or "text" in data else None
    return TrainPlan(
        method=method,
        steps=get_int(data, "steps", DEFAULT_STEPS, 1, MAX_STEPS),
        lr=get_float(data, "lr", DEFAULT_LR[method], 1e-6, 1.0),
        seed=get_int(data, "seed", 0, 0, MAX_SEED),
        rank=get_int(data, "rank", DEFAULT_RANK, 1, MAX_RANK) if lora else 0,
        target_modules=targets,
        texts=texts,
    )


def blocks(
    token_lists: Sequence[Sequence[int]], eos: int | None, block: int = BLOCK
) -> list[list[int]]:
    """Join token lists (each followed by ``eos``) and cut them into ``block``-token blocks.

    A remainder shorter than a block is dropped; text shorter than one block is one short
    block. Fewer than 2 tokens in all give no block (nothing to predict).
    """
    stream = [t for ids in token_lists for t in (*ids, *(() if eos is None else (eos,)))]
    if len(stream) < block:
        return [stream] if len(stream) >= 2 else []  # noqa: PLR2004 - a target needs a context
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def _sig(value: float) -> float:
    """Round to 6 significant digits (a small loss must not round to 0)."""
    return float(f"{value:.6g}")


def train(model: TorchModel, tokenizer: Tokenizer, request: EngineRequest) -> EngineOutput:
    """Train a copy of ``model`` on the task's data and write the checkpoint.

    Args:
        model: the loaded serving model (left unchanged).
        tokenizer: its tokenizer.
        request: the training or fine-tune task; ``artifact_dir`` must be set.

    Returns:
        The loss curve, the trainable parameter count and the artifact directory;
        ``tokens_in`` is the tokens trained on (steps x batch x block).

    Raises:
        HandlerError: bad input (named), too little text, or the loss did not fall (``input.lr``).
        EngineError: no ``artifact_dir`` was given.

    """
    import torch  # noqa: PLC0415 - the worker child only

    t0 = time.perf_counter()
    plan = plan_training(request.spec)
    if request.artifact_dir is None:
        raise EngineError("artifact_dir: training needs a directory to write its checkpoint")
    if not _SAFE_ID.fullmatch(request.task_id):
        raise HandlerError(f"task_id: {request.task_id!r} is not a safe directory name")
    from fleet.models.tinyllama import corpus_text  # noqa: PLC0415

    texts = (
        plan.texts
        if plan.texts is not None
        else [s for s in corpus_text().splitlines() if s.strip()]
    )
    token_lists = [
        tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts
    ]
    data = blocks(token_lists, tokenizer.eos_token_id)
    if not data:
        field = "input.texts" if plan.texts is not None else "texts"
        raise HandlerError(f"{field}: too little text to train on (need at least 2 tokens)")
    device = next(model.parameters()).device
    table = torch.tensor(data, dtype=torch.long, device=device)

    torch.manual_seed(plan.seed)
    work = copy.deepcopy(model)
    if plan.method == "lora":
        work = _with_lora(work, plan)
    else:
        work.requires_grad_(True)  # noqa: FBT003 - torch's positional flag
    params = [p for p in work.parameters() if p.requires_grad]
    curve, tokens = _fit(work, params, table, plan)
    first, last = curve[0], curve[-1]
    if not math.isfinite(last) or last >= first:
        raise HandlerError(
            f"input.lr: training did not lower the loss ({first:.4g} -> {last:.4g}); try a smaller lr or more steps"
        )
    train_s = time.perf_counter() - t0
    target = request.artifact_dir / request.task_id
    manifest: dict[str, JsonValue] = {
        "task_id": request.task_id,
        "method": plan.method,
        "base_model": request.model.name,
        "base_revision": request.model.revision,
        "base_weights": str(request.weights),
        "steps": plan.steps,
        "lr": plan.lr,
        "seed": plan.seed,
        "loss_curve": [_sig(v) for v in curve],
    }
    _save_atomic(target, work, tokenizer, plan.method, manifest)
    return EngineOutput(
        output={
            "method": plan.method,
            "steps": plan.steps,
            "loss_first": _sig(first),
            "loss_last": _sig(last),
            "loss_curve": [_sig(v) for v in curve],
            "trainable_params": sum(int(p.numel()) for p in params),
            "artifact": str(target),
            "format": "safetensors",
            "seed": plan.seed,
            "lr": plan.lr,
            **(
                {"rank": plan.rank, "target_modules": list(plan.target_modules)}
                if plan.rank
                else {}
            ),
        },
        tokens_in=tokens,
        tokens_out=0,
        run_s=time.perf_counter() - t0,
        tokens_per_s=tokens / train_s if train_s > 0 else None,
        extra={"device": str(device)},
    )


def _fit(
    work: TorchModel, params: list[torch.nn.Parameter], table: torch.Tensor, plan: TrainPlan
) -> tuple[list[float], int]:
    """Run ``plan.steps`` AdamW steps on ``work``; return the loss curve and tokens trained."""
    import torch  # noqa: PLC0415

    optimizer = torch.optim.AdamW(params, lr=plan.lr)
    picks = torch.Generator().manual_seed(plan.seed)  # on the CPU: the same draws on any device
    evaluation = table[:EVAL_BLOCKS]

    def eval_loss() -> float:
        work.eval()
        with torch.no_grad():
            loss = float(work(input_ids=evaluation, labels=evaluation, use_cache=False).loss)
        work.train()
        return loss

    curve = [eval_loss()]
    tokens = 0
    for step in range(1, plan.steps + 1):
        rows = torch.randint(0, len(table), (BATCH,), generator=picks).to(table.device)
        batch = table[rows]
        loss = work(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch.numel())
        if step % LOG_EVERY == 0 or step == plan.steps:
            curve.append(eval_loss())
    work.eval()
    return curve, tokens


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one FutureWarning peft 0.21 triggers in transformers 5 (a deprecated name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def _with_lora(model: TorchModel, plan: TrainPlan) -> TorchModel:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    config = LoraConfig(
        r=plan.rank,
        lora_alpha=2 * plan.rank,
        lora_dropout=0.0,
        target_modules=list(plan.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft():
            return get_peft_model(model, config)
    except ValueError as exc:  # peft: a target module the model does not have
        raise HandlerError(f"input.target_modules: {exc}") from exc


def _save_atomic(
    target: Path,
    model: TorchModel,
    tokenizer: Tokenizer,
    method: str,
    manifest: dict[str, JsonValue],
) -> None:
    """Write the checkpoint into a temporary directory beside ``target``, then rename it."""
    with atomic_dir(target) as work:
        model.save_pretrained(str(work))  # safetensors: the only format transformers 5 writes
        if method == "full":
            tokenizer.save_pretrained(str(work))
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

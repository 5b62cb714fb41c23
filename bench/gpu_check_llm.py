"""The Llama parts of the GPU check (``bench/gpu_check.py``), and the throughput model's view.

* ``tiny-llama``: fleet's 3.16M-parameter test model (random weights) built by
  ``fleet.models.tinyllama.build``; greedy fp32 generation of 32 tokens on the CPU and on
  the device, compared token by token, with the smallest top-1/top-2 logit margin seen
  (a margin near 0 explains a legitimate divergence).
* ``lora``: bf16 LoRA steps with peft on a randomly initialised Llama of Llama 3.2 1B's
  shape: the loss curve, the time per step and the peak of
  ``torch.cuda.max_memory_allocated()``.
* ``throughput``: a randomly initialised model of Llama 3.1 8B's configuration, built in
  bf16 on the device, greedy decoding at batch 1 and 32 through transformers' ``generate``
  (eager, no vLLM): time to first token, tokens/s per stream and in aggregate.

The ``lora`` and ``throughput`` results go through ``bench.gpu_check_predict.with_predictions``,
which puts fleet's throughput model for the detected chip beside the measured figures.

Each part raises :class:`~bench.gpu_check_parts.Skipped` when the device cannot run it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.gpu_check_parts import (
    Context,
    Skipped,
    fleet_module,
    free_device,
    peak_gb,
    random_llama,
    reset_peak,
    shape_json,
    sync_device,
)
from bench.gpu_check_predict import with_predictions
from bench.gpu_check_pure import compare_tokens

PROMPT = "The fleet routes each task to the chip that"
GREEDY_TOKENS = 32
LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# Llama 3.2 1B's configuration: 1.24B parameters; 20 bf16 LoRA steps of 8 x 512 tokens
# fit in well under a minute on an H100.
LLAMA_1B: dict[str, Any] = {
    **LLAMA_8B,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "rope_scaling": {**LLAMA_8B["rope_scaling"], "factor": 32.0},
    "tie_word_embeddings": True,
}
SMALL: dict[str, Any] = {  # --small: the same code on a toy shape, for the CPU rehearsal
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "rope_theta": 500000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK = 16
LORA_LR = 1e-3
DATA_VOCAB = 1000  # training ids come from the first 1000: a distribution LoRA can learn
BATCH_BUDGET_S = 60.0  # the most one batch size of the throughput part may take
GENERATION_NOTE = (
    "transformers generate, eager, greedy, one process: not a serving engine. fleet's "
    "model is fitted to served engines (vLLM, TensorRT-LLM), so ratios well below 1 are "
    "expected here; per_stream is one stream's decode rate, aggregate a busy server's"
)


# --------------------------------------------------------------------------- tiny-llama


def _greedy(directory: Path, device: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    auto: Any = AutoModelForCausalLM  # its from_pretrained confuses mypy
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = auto.from_pretrained(str(directory), dtype=torch.float32)
    model = model.to(device).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt").to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **encoded,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    sync_device(device)
    seconds = time.perf_counter() - start
    prompt_len = int(encoded["input_ids"].shape[1])
    margins = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in out.scores]
    tokens = [int(t) for t in out.sequences[0, prompt_len:].tolist()]
    del model
    free_device(device)
    return {
        "tokens": tokens,
        "prompt_tokens": prompt_len,
        "min_top2_margin": min(margins),
        "generate_s": round(seconds, 4),
    }


def part_tiny_llama(ctx: Context) -> dict[str, Any]:
    """Greedy generation of tiny-llama in fp32 on the CPU and on the device, compared."""
    tinyllama = fleet_module("fleet.models.tinyllama")
    directory = tinyllama.build(ctx.work_dir / "tiny-llama", seed=0)
    out: dict[str, Any] = {
        "model": "tiny-llama: fleet.models.tinyllama.build(seed=0)",
        "random_weights": True,
        "dtype": "fp32",
        "prompt": PROMPT,
        "new_tokens": GREEDY_TOKENS,
        "cpu": _greedy(directory, "cpu"),
    }
    if not ctx.device_ok:
        out["device"] = {"name": ctx.device, "skipped": ctx.device_reason}
        return out
    out["device"] = {"name": ctx.device, **_greedy(directory, ctx.device)}
    out["comparison"] = compare_tokens(out["device"]["tokens"], out["cpu"]["tokens"]).as_json()
    return out


# --------------------------------------------------------------------------- LoRA


def part_lora(ctx: Context) -> dict[str, Any]:
    """bf16 LoRA steps (peft) on a random Llama of Llama 3.2 1B's shape, on the device.

    Raises:
        Skipped: the device cannot run work.

    """
    if not ctx.device_ok:
        raise Skipped(ctx.device_reason or f"{ctx.device} cannot run work")
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    steps, batch, seq = (4, 2, 32) if ctx.small else (20, 8, 512)
    reset_peak(ctx.device)
    base, init_s, moved = random_llama(SMALL if ctx.small else LLAMA_1B, ctx.device)
    shape = shape_json(base)
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    vocab = min(DATA_VOCAB, shape["vocab_size"])
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(ctx.device)
    optimizer = torch.optim.AdamW(trainable, lr=LORA_LR)
    losses: list[float] = []
    step_s: list[float] = []
    for _ in range(steps):
        sync_device(ctx.device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # float() waits for the device
        step_s.append(time.perf_counter() - start)
    steady = statistics.median(step_s[1:]) if len(step_s) > 1 else step_s[0]
    out: dict[str, Any] = {
        "random_weights": True,
        "model": {"shape": "llama-3.2-1b" if not ctx.small else "small", **shape},
        "built_on_device_s": round(init_s, 3),
        "moved_after_build": moved,
        "lora": {"rank": LORA_RANK, "targets": list(LORA_TARGETS), "lr": LORA_LR},
        "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
        "trainable_params": sum(p.numel() for p in trainable),
        "steps": steps,
        "tokens_per_step": batch * seq,
        "losses": [round(v, 5) for v in losses],
        "loss_decreased": losses[-1] < losses[0],
        "step_s": [round(v, 4) for v in step_s],
        "median_step_s": round(steady, 4),
        "tokens_per_s": round(batch * seq / steady, 1),
        "peak_memory_gb": peak_gb(ctx.device),
    }
    del model, base, optimizer, loss
    free_device(ctx.device)
    return with_predictions("lora", out, ctx.accelerator)


# --------------------------------------------------------------------------- throughput


def _timed_generate(
    model: Any,  # noqa: ANN401 - a transformers model
    prompts: Any,  # noqa: ANN401 - a torch tensor
    batch: int,
    new: int,
    device: str,
) -> tuple[float, list[float], int]:
    """Greedy ``generate`` of ``new`` tokens for the first ``batch`` prompts, timed.

    Returns:
        The wall seconds, the seconds (from the call) at which each step's tokens reached
        the host (the prompt first, then one entry per new token: transformers hands the
        streamer each step's tokens after copying them to the CPU, which waits for the
        device), and the number of tokens generated per stream.

    """
    import torch  # noqa: PLC0415
    from transformers.generation.streamers import BaseStreamer  # noqa: PLC0415

    marks: list[float] = []

    class Arrivals(BaseStreamer):
        def put(self, value: Any) -> None:  # noqa: ANN401, ARG002 - the tokens are not needed
            marks.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = prompts[:batch].to(device)
    sync_device(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            streamer=Arrivals(),
        )
    sync_device(device)
    total = time.perf_counter() - start
    return total, [m - start for m in marks], int(out.shape[1] - ids.shape[1])


def _measure(model: Any, prompts: Any, batch: int, new: int, device: str) -> dict[str, Any]:  # noqa: ANN401
    _timed_generate(model, prompts, batch, 2, device)  # warm this batch shape
    total, marks, produced = _timed_generate(model, prompts, batch, new, device)
    ttft = marks[1] if len(marks) > 1 else None
    steps = len(marks) - 2  # decode steps after the first token
    decode_s = marks[-1] - marks[1] if steps > 0 else 0.0
    per_stream = steps / decode_s if decode_s > 0 else None
    return {
        "ttft_s": None if ttft is None else round(ttft, 4),
        "total_s": round(total, 4),
        "new_tokens": produced,
        "per_stream_tokens_per_s": None if per_stream is None else round(per_stream, 2),
        "aggregate_tokens_per_s": None if per_stream is None else round(batch * per_stream, 2),
        "end_to_end_tokens_per_s": round(batch * produced / total, 2),
    }


def part_throughput(ctx: Context) -> dict[str, Any]:
    """Greedy decode tokens/s of a random bf16 Llama 3.1 8B configuration on the device.

    Raises:
        Skipped: the device cannot run work.

    """
    if not ctx.device_ok:
        raise Skipped(ctx.device_reason or f"{ctx.device} cannot run work")
    import torch  # noqa: PLC0415

    tokens_in, tokens_out, batches = (16, 8, (1, 4)) if ctx.small else (128, 128, (1, 32))
    reset_peak(ctx.device)
    model, init_s, moved = random_llama(SMALL if ctx.small else LLAMA_8B, ctx.device)
    model.eval()
    shape = shape_json(model)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape["vocab_size"], (max(batches), tokens_in), generator=generator)
    _timed_generate(model, prompts, 1, 4, ctx.device)  # load kernels and cuBLAS handles
    measured: dict[str, Any] = {}
    for batch in batches:
        refusal = ctx.guard.refusal(f"throughput at batch {batch}", BATCH_BUDGET_S)
        measured[str(batch)] = (
            {"skipped": refusal}
            if refusal
            else _measure(model, prompts, batch, tokens_out, ctx.device)
        )
    out: dict[str, Any] = {
        "random_weights": True,
        "model": {"config": "llama-3.1-8b" if not ctx.small else "small", **shape},
        "attention": getattr(model.config, "_attn_implementation", None),
        "built_on_device_s": round(init_s, 3),
        "moved_after_build": moved,
        "engine": GENERATION_NOTE,
        "timing": "token arrival on the host: ttft is the first new token, decode the rest",
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "batches": measured,
        "peak_memory_gb": peak_gb(ctx.device),
    }
    del model
    free_device(ctx.device)
    return with_predictions("throughput", out, ctx.accelerator)

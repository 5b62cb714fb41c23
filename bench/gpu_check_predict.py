"""fleet's throughput model beside the GPU check's measured figures (``bench/gpu_check.py``).

:func:`with_predictions` adds, to the ``lora`` and ``throughput`` results, what
``fleet.throughput.estimate`` predicts for one device of the detected accelerator and the
ratio measured / predicted. ``fleet.throughput`` needs pydantic (through ``fleet.spec``):
on a lent machine without it the result records why, and ``--annotate FILE`` adds the
predictions later, where fleet is installed, with the same function.
"""

from __future__ import annotations

from typing import Any

from bench.gpu_check_parts import fleet_module
from bench.gpu_check_pure import ratios


def _spec(kind: str, params_b: float, tokens_in: int, tokens_out: int = 0) -> Any:  # noqa: ANN401
    spec = fleet_module("fleet.spec")
    return spec.TaskSpec(
        kind=spec.TaskKind(kind),
        model=spec.ModelRef(name="random-llama", params_b=float(params_b), dtype=spec.DType.BF16),
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        training_method="lora" if kind == "fine_tune" else None,
    )


def predict_generation(
    accelerator: str, params_b: float, tokens_in: int, tokens_out: int, batches: list[int]
) -> dict[str, dict[str, float]]:
    """What fleet's throughput model predicts for greedy decoding on one device of ``accelerator``.

    Per batch size: ``ttft_s`` (prefill of ``batch x tokens_in`` tokens); at batch 1
    ``per_stream_tokens_per_s`` (one stream's decode rate); above 1
    ``aggregate_tokens_per_s`` (a busy server's rate, which the model does not tie to a
    batch size). Derived from ``fleet.throughput.estimate``: the prefill alone is the
    estimate with no output tokens, and the decode rates are ``tokens_out`` over the rest
    of ``service_s`` (one stream) and of ``busy_s`` (aggregate).

    Raises:
        ImportError: fleet.throughput cannot be imported (pydantic missing).
        KeyError: the catalog does not know ``accelerator``.

    """
    throughput = fleet_module("fleet.throughput")
    family = fleet_module("fleet.catalog").default_catalog().family(accelerator)
    prefill = throughput.estimate(_spec("inference", params_b, tokens_in), family, 1).service_s
    full = throughput.estimate(_spec("inference", params_b, tokens_in, tokens_out), family, 1)
    per_stream = tokens_out / (full.service_s - prefill)
    aggregate = tokens_out / (full.busy_s - prefill)
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        ttft = throughput.estimate(_spec("inference", params_b, tokens_in * batch), family, 1)
        rate = (
            {"per_stream_tokens_per_s": per_stream}
            if batch == 1
            else {"aggregate_tokens_per_s": aggregate}
        )
        out[str(batch)] = {"ttft_s": ttft.service_s, **rate}
    return out


def predict_lora(accelerator: str, params_b: float, tokens_per_step: int) -> dict[str, float]:
    """What fleet's throughput model predicts for one LoRA step: seconds and tokens/s.

    Raises:
        ImportError: fleet.throughput cannot be imported (pydantic missing).
        KeyError: the catalog does not know ``accelerator``.

    """
    throughput = fleet_module("fleet.throughput")
    family = fleet_module("fleet.catalog").default_catalog().family(accelerator)
    step = throughput.estimate(_spec("fine_tune", params_b, tokens_per_step), family, 1).service_s
    return {"median_step_s": step, "tokens_per_s": tokens_per_step / step}


def with_predictions(part: str, result: dict[str, Any], accelerator: str | None) -> dict[str, Any]:
    """``result`` (of the ``lora`` or ``throughput`` part) with fleet's predictions added.

    Adds ``predicted`` and ``ratio`` (measured over predicted: above 1 is faster than the
    model, except for ``ttft_s`` and ``median_step_s``, where above 1 is slower), or
    ``predicted: None`` and ``predicted_reason`` when there is no accelerator or fleet's
    throughput model cannot be imported here. Pure apart from importing fleet's modules.
    """
    out = {k: v for k, v in result.items() if k not in {"predicted", "ratio", "predicted_reason"}}
    params_b = float(result["model"]["params_b"])
    try:
        if accelerator is None:
            raise LookupError("no accelerator to predict for (none detected, or a CPU rehearsal)")  # noqa: TRY301 - one reason path
        if part == "lora":
            predicted: dict[str, Any] = predict_lora(
                accelerator, params_b, result["tokens_per_step"]
            )
            ratio: dict[str, Any] = ratios({k: result[k] for k in predicted}, predicted)
        else:
            batches = [int(b) for b in result["batches"]]
            predicted = predict_generation(
                accelerator, params_b, result["tokens_in"], result["tokens_out"], batches
            )
            ratio = {b: ratios(result["batches"][b], p) for b, p in predicted.items()}
    except (ImportError, LookupError) as exc:
        return {**out, "predicted": None, "predicted_reason": f"{type(exc).__name__}: {exc}"}
    return {**out, "predicted": predicted, "ratio": ratio, "predicted_for": accelerator}

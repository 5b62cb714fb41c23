"""Compatibility, pure: can this spec run on this accelerator family or offer, and if not, why.

Memory fit is the heart of it. A task needs:

* inference, batch, embedding: weights at the dtype's bytes per parameter, times
  ``INFERENCE_HEADROOM`` for the KV cache and activations;
* training, and full fine-tuning: ``TRAINING_BYTES_PER_PARAM`` bytes per parameter
  (mixed-precision Adam: bf16 weights and gradients, fp32 master weights and two
  fp32 moments = 2 + 2 + 4 + 8), times ``TRAINING_HEADROOM`` for activations;
* LoRA fine-tuning: frozen weights at the dtype plus optimizer state for a small
  adapter (``LORA_TRAINABLE_FRACTION`` of the parameters), times the training headroom.

An offer can hold a task when some number of its devices does: tensor parallelism
over ``d`` devices, ``d`` a power of two, or all of the instance's devices when that
is the only way to fit. A task never spans instances.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.catalog import Family, Offer
from fleet.spec import BYTES_PER_PARAM, TaskKind, TaskSpec

INFERENCE_HEADROOM = 1.2
TRAINING_BYTES_PER_PARAM = 16.0
TRAINING_HEADROOM = 1.2
LORA_TRAINABLE_FRACTION = 0.02


def memory_needed_gb(spec: TaskSpec) -> float:
    """Accelerator memory (GB, 1e9 bytes) the task needs in total across its devices."""
    params = spec.model.params_b  # billions of parameters -> GB per byte of each
    weights = params * BYTES_PER_PARAM[spec.model.dtype]
    if spec.kind in (TaskKind.TRAINING, TaskKind.FINE_TUNE):
        if spec.method == "full":
            return params * TRAINING_BYTES_PER_PARAM * TRAINING_HEADROOM
        adapter = params * LORA_TRAINABLE_FRACTION * TRAINING_BYTES_PER_PARAM
        return (weights + adapter) * TRAINING_HEADROOM
    return weights * INFERENCE_HEADROOM


def devices_needed(need_gb: float, per_device_gb: float, count: int) -> int | None:
    """Smallest tensor-parallel degree on an instance of ``count`` devices that holds ``need_gb``.

    Powers of two first; the whole instance when its device count is not a power of two
    and nothing smaller fits. None when the instance cannot hold it at all.
    """
    if per_device_gb <= 0:
        return None
    d = 1
    while d <= count:
        if d * per_device_gb >= need_gb:
            return d
        d *= 2
    return count if count * per_device_gb >= need_gb else None


def family_rejection(spec: TaskSpec, family: Family) -> str | None:
    """Why ``family`` can never run ``spec`` (requirements, kind, dtype, runtime), or None."""
    req = spec.requirements
    if req.accelerators and family.name not in req.accelerators:
        return f"not in requirements.accelerators ({', '.join(req.accelerators)})"
    if family.name in req.exclude:
        return "excluded by requirements.exclude"
    if spec.kind.value not in family.kinds:
        return f"does not run {spec.kind} tasks (runs {', '.join(sorted(family.kinds))})"
    if spec.model.dtype.value not in family.dtypes:
        return f"no {spec.model.dtype} support (supports {', '.join(sorted(family.dtypes))})"
    if req.runtimes and not family.runtimes & {r.value for r in req.runtimes}:
        wanted = ", ".join(r.value for r in req.runtimes)
        return f"runtime {', '.join(sorted(family.runtimes))} is not one of {wanted}"
    return None


@dataclass(frozen=True, slots=True)
class Fit:
    """Whether an offer holds a task: ``devices`` used, or ``reason`` it cannot."""

    devices: int | None
    reason: str = ""


def offer_fit(spec: TaskSpec, offer: Offer, need_gb: float) -> Fit:
    """Memory fit of ``spec`` (needing ``need_gb``) on ``offer``, per-device minimum included."""
    per_device = offer.accelerator_memory_gb
    minimum = spec.requirements.min_accelerator_memory_gb
    if minimum is not None and per_device < minimum:
        return Fit(None, f"{per_device:g} GB per device < min_accelerator_memory_gb {minimum:g}")
    devices = devices_needed(need_gb, per_device, offer.accelerator_count)
    if devices is None:
        total = per_device * offer.accelerator_count
        return Fit(
            None,
            f"needs {need_gb:,.1f} GB; {offer.instance_type} holds"
            f" {offer.accelerator_count} x {per_device:g} = {total:,.0f} GB",
        )
    return Fit(devices)

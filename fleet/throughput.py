"""The throughput model: how long a task takes on ``n`` devices of a family, pure.

Generation is memory-bandwidth bound per stream and compute bound in aggregate:

* one stream decodes at ``bandwidth x decode_efficiency / weight bytes`` tokens/s
  (each token reads every weight once);
* a busy server batches streams, so the device-time one task occupies is its tokens
  over the aggregate rate ``min(per_stream x batch_gain, compute / (2 x params))``;
* prefill, embedding and training are compute bound: 2 FLOPs per parameter per token
  forward, 6 for training (4 for LoRA, which skips weight gradients), at a model-FLOPs
  utilisation that falls for models too small to fill the device
  (``saturation_params_b``).

``decode_efficiency`` and ``batch_gain`` were fitted to published MLPerf, TensorRT-LLM,
ROCm, JetStream and Neuron figures (``tests/unit/test_throughput.py`` checks the fit).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.catalog import Family
from fleet.spec import BYTES_PER_PARAM, TaskKind, TaskSpec

PEAK_MFU = 0.5
TRAINING_MFU = 0.4


@dataclass(frozen=True, slots=True)
class Estimate:
    """``service_s``: wall time of the task once started; ``busy_s``: device time it uses.

    ``busy_s`` is below ``service_s`` for generation, where a server batches many
    streams; cost is charged on ``busy_s``.
    """

    service_s: float
    busy_s: float


def units(family: Family, devices: int, vcpus: int | None) -> float:
    """How many of the family's per-unit figures an allocation has (devices, or vCPUs)."""
    if family.per_vcpu:
        return float(vcpus or 0)
    return float(devices)


def _mfu(family: Family, params_b: float, n: float, peak: float) -> float:
    per_unit = params_b / n
    return peak * min(1.0, per_unit / family.saturation_params_b)


def estimate(spec: TaskSpec, family: Family, devices: int, vcpus: int | None = None) -> Estimate:
    """Estimate ``spec`` on ``devices`` devices of ``family`` (``vcpus`` for cpu offers).

    Raises:
        ValueError: a cpu offer without a vCPU count.

    """
    n = units(family, devices, vcpus)
    if n <= 0:
        raise ValueError(f"{family.name}: no vCPU count to size the estimate")
    params = spec.model.params_b * 1e9
    if spec.kind in (TaskKind.TRAINING, TaskKind.FINE_TUNE):
        flops_per_token = 6.0 if spec.method == "full" else 4.0
        rate = n * family.bf16_tflops * 1e12 * _mfu(family, spec.model.params_b, n, TRAINING_MFU)
        seconds = flops_per_token * params * spec.tokens_in / rate
        return Estimate(seconds, seconds)
    compute = n * family.bf16_tflops * 1e12 * _mfu(family, spec.model.params_b, n, PEAK_MFU)
    prefill = 2.0 * params * spec.tokens_in / compute
    if spec.kind is TaskKind.EMBEDDING or spec.tokens_out == 0:
        return Estimate(prefill, prefill)
    weight_gb = spec.model.params_b * BYTES_PER_PARAM[spec.model.dtype]
    compute_cap = compute / (2.0 * params)  # tokens/s the matrix units allow
    per_stream = min(
        n * family.memory_bandwidth_gbps * family.decode_efficiency / weight_gb, compute_cap
    )
    aggregate = min(per_stream * family.batch_gain, compute_cap)
    return Estimate(
        prefill + spec.tokens_out / per_stream,
        prefill + spec.tokens_out / aggregate,
    )


def aggregate_tokens_per_s(
    family: Family, params_b: float, dtype_bytes: float, devices: int
) -> float:
    """Aggregate decode rate of a busy server (used by the calibration test and the planner)."""
    n = float(devices)
    compute = n * family.bf16_tflops * 1e12 * _mfu(family, params_b, n, PEAK_MFU)
    compute_cap = compute / (2.0 * params_b * 1e9)
    bandwidth_rate = (
        n * family.memory_bandwidth_gbps * family.decode_efficiency / (params_b * dtype_bytes)
    )
    return min(min(bandwidth_rate, compute_cap) * family.batch_gain, compute_cap)

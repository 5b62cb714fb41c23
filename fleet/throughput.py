"""The throughput model: how long a task takes on ``n`` devices of a family, pure.

Contract of :func:`estimate` for generation (inference and batch with ``tokens_out > 0``):

1. **KV-cache capacity.** Memory left after the weights, ``devices x memory_gb x
   USABLE_MEMORY - params x BYTES_PER_PARAM[dtype]``, over :func:`kv_bytes_per_token`,
   is how many tokens of context the server holds at once (cpu offers: unlimited, their
   memory is the instance's RAM, sized elsewhere).
2. **Step time.** One decode step for ``B`` streams of mean context ``c`` takes
   ``max((weights + B x c x kv) / (bandwidth x devices x decode_efficiency),
   B x 2 x params / (compute x mfu))``: memory bound (every weight and every stream's KV
   cache is read once) until the matrix units saturate. Each stream gets one token per
   step, so TPOT is the step time and the aggregate rate ``B / step``. The mean context is
   ``tokens_in + tokens_out / 2`` (a stream's cache grows linearly while it decodes).
3. **Operating point.** The server runs the largest batch ``B >= 1`` that (a) holds every
   stream's full context (``capacity / (tokens_in + tokens_out)``), (b) is at most the
   family's ``batch_gain`` (the engine's stream cap: 256 on accelerators, as vLLM's
   ``max_num_seqs``), and (c) keeps the step within the goal: ``slo.tpot_ms``, else, with
   ``slo.deadline_s``, the TPOT that ends the decode by ``(1 - DEADLINE_SLACK) x
   deadline`` after the prefill (the rest is left for queueing). No goal: (a) and (b).
   When even ``B = 1`` misses the goal the estimate says so with its ``tpot_s``; callers
   decide.
4. **Times.** Prefill is compute bound, ``ttft = 2 x params x tokens_in / compute``;
   ``service_s = ttft + tokens_out x tpot`` and ``busy_s = ttft + tokens_out x tpot / B``
   (the prefill has the devices to itself, the decode shares them with ``B - 1`` others).

Embedding, training and fine-tuning are compute bound: 2 FLOPs per parameter per token
forward, 6 for training (4 for LoRA, which skips weight gradients). Model-FLOPs
utilisation falls for models too small to fill the device (``saturation_params_b``).

Sources: ``decode_efficiency`` was fitted to the published MLPerf, TensorRT-LLM, ROCm,
JetStream and Neuron rows in ``shared/reference/throughput-researched.csv``
(``tests/unit/test_throughput.py`` holds the table and each row's fit); the KV sizes come
from the models' published configurations (see :func:`kv_bytes_per_token`); the
operating-point rule follows Mélange (Griggs et al., arXiv 2404.14527), whose findings the
tests restate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from fleet.catalog import Family
from fleet.spec import BYTES_PER_PARAM, DType, ModelRef, TaskKind, TaskSpec

PEAK_MFU = 0.5
TRAINING_MFU = 0.4
USABLE_MEMORY = 0.9  # of device memory for weights and KV cache (vLLM's gpu_memory_utilization)
DEADLINE_SLACK = 0.2  # share of a deadline left for queueing when it sets the TPOT goal
_KIB = 1024.0
# KV bytes per token at 16 bits of the architectures we know, by size in billions of
# parameters: layers x KV heads x head dim x 2 (K and V) x 2 bytes.
_MHA_KIB = {7.0: 512.0, 13.0: 800.0}  # Llama-2-7B 32x4096x2x2; Llama-2-13B 40x5120x2x2
# GQA, 8 KV heads of 128: Llama-3/3.1-8B 32 layers; Llama-2/3-70B 80; Llama-3.1-405B 126.
_GQA_KIB = {8.0: 128.0, 70.0: 320.0, 405.0: 504.0}
_MHA_NAMES = ("llama-2", "llama2", "opt-")  # families without grouped-query attention
_LLAMA2_GQA_FROM_B = 30.0  # Llama-2-34B and 70B use GQA
_SAME_SIZE = 0.15  # a size within 15% of a known one is that architecture


def _kv_dtype_bytes(dtype: DType) -> float:
    """The KV cache's bytes per element: 8-bit serving quantises it too, int4 does not."""
    return {DType.FP32: 4.0, DType.FP8: 1.0, DType.INT8: 1.0}.get(dtype, 2.0)


def kv_bytes_per_token(model: ModelRef) -> float:
    """Bytes of KV cache one token of context takes, from the model's name and size.

    A name with ``llama-2``, ``llama2`` or ``opt-`` is multi-head attention (MHA), any
    other grouped-query (GQA), except that Llama-2 models above 30B are GQA (Llama-2-70B).
    OPT-66B, 64 layers x 9216 x 2 x 2 bytes, is 2.25 MiB; the MHA rule gives 2.23.
    A size within 15% of a known architecture takes its figure (``_MHA_KIB``, ``_GQA_KIB``:
    layers x KV heads x head dim x 2 x 2 bytes from the published configurations:
    Llama-2-7B 0.5 MiB, 13B 800 KiB; Llama-3.1-8B 128 KiB, 70B 320 KiB, 405B 504 KiB);
    other sizes interpolate geometrically between the neighbouring anchors, and beyond the
    ends scale as MHA ``params^(2/3)`` (layers x hidden) or GQA ``params^(1/3)`` (layers
    only: KV heads stay at 8). The cache is kept
    in 16 bits, 8 for fp8 and int8 weights, 32 for fp32 (see ``_kv_dtype_bytes``).
    """
    name = model.name.lower()
    mha = any(m in name for m in _MHA_NAMES) and not (
        model.params_b > _LLAMA2_GQA_FROM_B and "llama" in name
    )
    table, power = (_MHA_KIB, 2 / 3) if mha else (_GQA_KIB, 1 / 3)
    return _kib_at(table, model.params_b, power) * _KIB * _kv_dtype_bytes(model.dtype) / 2.0


def _kib_at(table: dict[float, float], p: float, power: float) -> float:
    """KiB per token at ``p`` billion parameters, monotone in ``p`` when the table is.

    An anchor's figure within ``_SAME_SIZE`` of it, geometric interpolation between the
    neighbouring anchors' bands, ``params^power`` beyond the ends.
    """
    same = [a for a in table if abs(p / a - 1) <= _SAME_SIZE]
    if same:
        return table[min(same, key=lambda a: abs(p / a - 1))]
    below = [a for a in table if a * (1 + _SAME_SIZE) < p]
    above = [a for a in table if a * (1 - _SAME_SIZE) > p]
    if below and above:
        lo, hi = max(below), min(above)
        x0, x1 = lo * (1 + _SAME_SIZE), hi * (1 - _SAME_SIZE)
        t = math.log(p / x0) / math.log(x1 / x0)
        return float(table[lo] * (table[hi] / table[lo]) ** t)
    if below:
        lo = max(below)
        return float(table[lo] * (p / (lo * (1 + _SAME_SIZE))) ** power)
    hi = min(above)
    return float(table[hi] * (p / (hi * (1 - _SAME_SIZE))) ** power)


TARGET_UTILISATION = 0.8  # devices busy over devices bought at steady load (planner, placement)


@dataclass(frozen=True, slots=True)
class Estimate:
    """``service_s``: wall time of the task once started; ``busy_s``: device time it uses.

    ``busy_s`` is below ``service_s`` for generation, where a server batches ``batch``
    streams; cost is charged on ``busy_s``. ``tpot_s`` is the time per output token at
    that batch (0 without generation), ``ttft_s`` the prefill.
    """

    service_s: float
    busy_s: float
    tpot_s: float = 0.0
    ttft_s: float = 0.0
    batch: int = 1


def units(family: Family, devices: int, vcpus: int | None) -> float:
    """How many of the family's per-unit figures an allocation has (devices, or vCPUs)."""
    if family.per_vcpu:
        return float(vcpus or 0)
    return float(devices)


def _mfu(family: Family, params_b: float, n: float, peak: float) -> float:
    per_unit = params_b / n
    return peak * min(1.0, per_unit / family.saturation_params_b)


def _compute(family: Family, n: float, params_b: float, dtype_bytes: float) -> float:
    """Inference FLOP/s: 8-bit weights on a family with fp8 run at twice its BF16 rate."""
    fast = 2.0 if dtype_bytes == 1.0 and "fp8" in family.dtypes else 1.0
    return fast * n * family.bf16_tflops * 1e12 * _mfu(family, params_b, n, PEAK_MFU)


@dataclass(frozen=True, slots=True)
class _Server:
    """One model served on ``n`` units: the constants a step time needs (SI units)."""

    params: float  # parameters
    weight_bytes: float
    kv_bytes: float  # per token of context
    bandwidth: float  # bytes/s, after decode_efficiency
    compute: float  # FLOP/s, after MFU
    capacity_tokens: float  # KV-cache tokens held at once
    max_batch: int

    @classmethod
    def of(
        cls, family: Family, n: float, params_b: float, dtype_bytes: float, kv: float
    ) -> _Server:
        weights = params_b * 1e9 * dtype_bytes
        free = n * family.memory_gb * 1e9 * USABLE_MEMORY - weights
        return cls(
            params=params_b * 1e9,
            weight_bytes=weights,
            kv_bytes=kv,
            bandwidth=n * family.memory_bandwidth_gbps * 1e9 * family.decode_efficiency,
            compute=_compute(family, n, params_b, dtype_bytes),
            capacity_tokens=math.inf if family.per_vcpu else max(0.0, free / kv),
            max_batch=max(1, int(family.batch_gain)),
        )

    def step_s(self, batch: int, context: float) -> float:
        """Seconds of one decode step of ``batch`` streams of mean ``context`` tokens."""
        memory = (self.weight_bytes + batch * context * self.kv_bytes) / self.bandwidth
        return max(memory, batch * 2.0 * self.params / self.compute)

    def batch(self, full: float, context: float, goal_s: float | None) -> int:
        """The largest batch that holds ``full``-token streams and keeps ``goal_s`` per step."""
        cap = float(self.max_batch)
        if full > 0:
            cap = min(cap, self.capacity_tokens / full)
        if goal_s is not None:
            cap = min(cap, goal_s * self.compute / (2.0 * self.params))
            if context > 0:
                cap = min(
                    cap, (goal_s * self.bandwidth - self.weight_bytes) / (context * self.kv_bytes)
                )
        return max(1, math.floor(cap * (1 + 1e-12)))

    def run(self, tokens_in: float, tokens_out: float, goal_s: float | None) -> Estimate:
        """The estimate for one request at the operating point (contract items 3 and 4)."""
        ttft = 2.0 * self.params * tokens_in / self.compute
        context = tokens_in + tokens_out / 2.0
        b = self.batch(tokens_in + tokens_out, context, goal_s)
        tpot = self.step_s(b, context)
        return Estimate(ttft + tokens_out * tpot, ttft + tokens_out * tpot / b, tpot, ttft, b)


@lru_cache(maxsize=4096)
def _server(family: Family, n: float, model: ModelRef) -> _Server:
    """``model`` served on ``n`` units of ``family`` (cached: it does not depend on the request)."""
    dtype_bytes = BYTES_PER_PARAM[model.dtype]
    return _Server.of(family, n, model.params_b, dtype_bytes, kv_bytes_per_token(model))


def tpot_goal_s(spec: TaskSpec, ttft_s: float) -> float | None:
    """The per-token goal in seconds: ``slo.tpot_ms``, else one derived from the deadline."""
    if spec.slo.tpot_ms is not None:
        return spec.slo.tpot_ms / 1000.0
    if spec.slo.deadline_s is None or spec.tokens_out <= 0:
        return None
    return max(0.0, (1 - DEADLINE_SLACK) * spec.slo.deadline_s - ttft_s) / spec.tokens_out


def estimate(spec: TaskSpec, family: Family, devices: int, vcpus: int | None = None) -> Estimate:
    """Estimate ``spec`` on ``devices`` devices of ``family`` (``vcpus`` for cpu offers).

    See the module docstring for the contract. Embedding, training and prompts with no
    output give ``batch`` 1 and ``tpot_s`` 0.

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
    server = _server(family, n, spec.model)
    prefill = 2.0 * params * spec.tokens_in / server.compute
    if spec.kind is TaskKind.EMBEDDING or spec.tokens_out == 0:
        return Estimate(prefill, prefill, ttft_s=prefill)
    return server.run(spec.tokens_in, spec.tokens_out, tpot_goal_s(spec, prefill))


def aggregate_tokens_per_s(
    family: Family,
    params_b: float,
    dtype_bytes: float,
    devices: int,
    tokens_in: int = 1000,
    tokens_out: int = 1000,
    kv_bytes: float | None = None,
    tpot_s: float | None = None,
) -> float:
    """Output tokens/s of a server busy with ``tokens_in``/``tokens_out`` requests.

    ``tokens_out / busy_s`` of :func:`estimate`'s operating point (prefill included), at
    the per-token goal ``tpot_s`` (None: no goal). ``kv_bytes`` per token defaults to
    :func:`kv_bytes_per_token` of an unnamed (GQA) model of this size and dtype.
    """
    if kv_bytes is None:
        dtype = min(BYTES_PER_PARAM, key=lambda d: abs(BYTES_PER_PARAM[d] - dtype_bytes))
        kv_bytes = kv_bytes_per_token(ModelRef(name="m", params_b=params_b, dtype=dtype))
    server = _Server.of(family, float(devices), params_b, dtype_bytes, kv_bytes)
    return tokens_out / server.run(tokens_in, tokens_out, tpot_s).busy_s

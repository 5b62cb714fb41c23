# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""The throughput model against published figures, and the shape of its estimates."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.catalog import default_catalog
from fleet.compat import devices_needed, memory_needed_gb
from fleet.spec import BYTES_PER_PARAM, DType, ModelRef, parse_spec
from fleet.throughput import (
    DEADLINE_SLACK,
    USABLE_MEMORY,
    aggregate_tokens_per_s,
    estimate,
    kv_bytes_per_token,
)

CATALOG = default_catalog()
ROOT = Path(__file__).resolve().parents[2]
GPU_LIKE = sorted(n for n, f in CATALOG.families.items() if not f.per_vcpu)


class Published(NamedTuple):
    """One published aggregate decode rate from shared/reference/throughput-researched.csv.

    ``tokens_in``/``tokens_out`` is the request shape the figure was measured at, and
    ``tpot_ms`` the per-token bound of the scenario (None: throughput at any latency).
    """

    model: str
    params_b: float
    dtype: str
    family: str
    devices: int
    tokens_per_s: float
    source: str
    tokens_in: int = 1000
    tokens_out: int = 1000
    tpot_ms: float | None = None


# MLPerf Llama-2-70B Server (OpenOrca): 265 output tokens per sample on average (the CSV);
# the input length, about 300 tokens, is our assumption, not in the CSV (the fit is
# sensitive to it: at 600 these rows fit 0.6 to 0.7, at 200 1.1 to 1.4). The Server
# scenario bounds TPOT at 200 ms (the CSV's note); the bound does not bind at these shapes.
MLPERF = {"tokens_in": 300, "tokens_out": 265, "tpot_ms": 200.0}
# The fit (model over published) is in each row's comment and in its test id.
PUBLISHED = [
    # MLPerf v4.1 Server: 1.12, 0.91, 1.00
    Published("Llama-2-70B", 70, "fp8", "nvidia-h100", 8, 21605.8, "MLPerf v4.1 Server", **MLPERF),
    Published("Llama-2-70B", 70, "fp8", "nvidia-h200", 8, 29228.2, "MLPerf v4.1 Server", **MLPERF),
    Published("Llama-2-70B", 70, "fp8", "amd-mi300x", 8, 21028.2, "MLPerf v4.1 Server", **MLPERF),
    # TRT-LLM perf-overview 1000/1000, FP8: 0.81, 1.14, 1.52, 0.92, 0.94, 1.47
    Published("Llama-3.1-8B", 8, "fp8", "nvidia-h100", 1, 15220, "TRT-LLM 1000/1000"),
    Published("Llama-3.3-70B", 70, "fp8", "nvidia-h100", 2, 4205, "TRT-LLM 1000/1000"),
    Published("Llama-3.1-405B", 405, "fp8", "nvidia-h100", 8, 2919, "TRT-LLM 1000/1000"),
    Published("Llama-3.1-8B", 8, "fp8", "nvidia-h200", 1, 17744, "TRT-LLM 1000/1000"),
    Published("Llama-3.3-70B", 70, "fp8", "nvidia-h200", 1, 2909, "TRT-LLM 1000/1000"),
    Published("Llama-3.1-405B", 405, "fp8", "nvidia-h200", 8, 3330, "TRT-LLM 1000/1000"),
    # TRT-LLM 128/128 and 2048/2048, 128/2048 (the old model had no sequence-length term):
    # 0.93, 1.11, 1.07, 0.81, 1.87 (405B on 8 GPUs: TP8 communication is not modelled, so
    # the 405B rows run 1.5x to 1.9x high)
    Published("Llama-3.1-8B", 8, "fp8", "nvidia-h100", 1, 28312, "TRT-LLM 128/128", 128, 128),
    Published("Llama-3.1-8B", 8, "fp8", "nvidia-h200", 1, 27911, "TRT-LLM 128/128", 128, 128),
    Published("Llama-3.3-70B", 70, "fp8", "nvidia-h100", 2, 6378, "TRT-LLM 128/128", 128, 128),
    Published("Llama-3.1-8B", 8, "fp8", "nvidia-h100", 1, 9305, "TRT-LLM 2048/2048", 2048, 2048),
    Published("Llama-3.1-405B", 405, "fp8", "nvidia-h100", 8, 4340, "TRT-LLM 128/2048", 128, 2048),
    # AMD ROCm vLLM 0.8.3, FP8 weights and KV: 1.27, 1.38, 1.44, 1.40, 1.54
    Published("Llama-3.1-405B", 405, "fp8", "amd-mi300x", 8, 4331.6, "ROCm vLLM", 128, 2048),
    Published("Llama-3.1-70B", 70, "fp8", "amd-mi300x", 8, 16364.9, "ROCm vLLM", 128, 2048),
    Published("Llama-3.1-70B", 70, "fp8", "amd-mi300x", 8, 13290.4, "ROCm vLLM", 500, 2000),
    Published("Llama-3.1-70B", 70, "fp8", "amd-mi300x", 8, 8216.5, "ROCm vLLM", 2048, 2048),
    Published("Llama-3.1-405B", 405, "fp8", "amd-mi300x", 8, 2154.3, "ROCm vLLM", 2048, 2048),
    # JetStream-PyTorch on TPU v5e-8, cache 2048 (in/out up to 1024): 1.00, 1.30, 0.71,
    # 0.69. The Llama-2 rows' fixed batches (96, 48) are what the KV cap gives (94, 53).
    Published("Llama-3-8B", 8, "bf16", "google-tpu-v5e", 8, 8249, "JetStream b128", 1024, 1024),
    Published("Llama-3-8B", 8, "int8", "google-tpu-v5e", 8, 10873, "JetStream b256", 1024, 1024),
    Published("Llama-2-7B", 7, "bf16", "google-tpu-v5e", 8, 3663, "JetStream b96", 1024, 1024),
    Published("Llama-2-13B", 13, "bf16", "google-tpu-v5e", 8, 2056, "JetStream b48", 1024, 1024),
    # Neuron SDK 2.14 inf2.48xlarge batch 256, seq 128 (9 in, 119 out): 1.04
    Published("OPT-66B", 66, "bf16", "aws-inferentia2", 12, 1782.9, "Neuron b256", 9, 119),
]
# Left out on purpose (conditions the model does not represent, or hardware not in the catalog):
# - B200 and GB200 rows (MLPerf preview, TRT-LLM FP4): not catalog families.
# - MLPerf Offline rows: no latency bound; the Server rows stand for that benchmark.
# - Lenovo H200 MLPerf rows: same hardware and software as NVIDIA's H200 row above.
# - Oracle MI300X 405B rows: older vLLM, fixed batch sizes.
# - Inferentia2 Llama-2-13B batch 1 and every hosted-API row (Cerebras, Groq, SambaNova,
#   Fireworks, Bedrock, Azure): per-stream rates, or hardware and batching unknown.


def ratio(row: Published) -> float:
    """Model prediction over the published figure."""
    model = ModelRef(name=row.model, params_b=row.params_b, dtype=DType(row.dtype))
    predicted = aggregate_tokens_per_s(
        CATALOG.family(row.family),
        row.params_b,
        BYTES_PER_PARAM[model.dtype],
        row.devices,
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
        kv_bytes=kv_bytes_per_token(model),
        tpot_s=None if row.tpot_ms is None else row.tpot_ms / 1000,
    )
    return predicted / row.tokens_per_s


def row_id(row: Published) -> str:
    """The row's test id, with its fit."""
    shape = f"{row.tokens_in}/{row.tokens_out}"
    return f"{row.model}-{row.dtype}-{row.devices}x{row.family}-{shape}-fit{ratio(row):.2f}"


@pytest.mark.parametrize("row", PUBLISHED, ids=row_id)
def test_each_published_row_within_2x(row):
    """Each representative published rate is predicted within a factor of two."""
    assert 0.5 <= ratio(row) <= 2.0, f"{row.model} on {row.devices}x {row.family}: {ratio(row):.2f}"


def test_calibration_geometric_mean_error_below_1_4x():
    """Across the table, the mean |log(predicted/published)| is below log(1.4)."""
    errors = [abs(math.log(ratio(row))) for row in PUBLISHED]
    assert sum(errors) / len(errors) < math.log(1.4)


def test_published_table_matches_the_reference_csv():
    """Each row of the table is a row of shared/reference/throughput-researched.csv."""
    path = next(
        (
            base / "shared" / "reference" / "throughput-researched.csv"
            for base in (ROOT, *ROOT.parents)
            if (base / "shared" / "reference" / "throughput-researched.csv").is_file()
        ),
        None,
    )
    if path is None:
        pytest.skip("shared/reference/throughput-researched.csv is not beside this checkout")
    with path.open(newline="", encoding="utf-8") as fh:
        published = {
            float(r["tokens_per_s_aggregate"])
            for r in csv.DictReader(fh)
            if r["tokens_per_s_aggregate"].strip()
        }
    assert {row.tokens_per_s for row in PUBLISHED} <= published


# ---------------------------------------------------------------------------- estimate shape


def generation(params_b, dtype, tokens_in, tokens_out, kind="inference"):
    """A generation spec."""
    return parse_spec(
        {
            "kind": kind,
            "model": {"name": "m", "params_b": params_b, "dtype": dtype},
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
    )


params_st = st.floats(min_value=0.01, max_value=1000)
dtype_st = st.sampled_from([d.value for d in DType])
family_st = st.sampled_from(GPU_LIKE)
tokens_st = st.integers(min_value=0, max_value=10**7)


def fitted_devices(spec, family) -> int:
    """The tensor-parallel degree placement would use: the fewest devices that hold the model."""
    need = memory_needed_gb(spec)
    return devices_needed(need, CATALOG.family(family).memory_gb, 64) or 1


@given(
    st.floats(min_value=0.2, max_value=1000),
    dtype_st,
    family_st,
    tokens_st,
    st.integers(1, 10**6),
)
def test_generation_service_time_at_least_busy_time(params_b, dtype, family, t_in, t_out):
    """For generation (models of 0.2B and up), a stream's wall time is never below its device time."""
    spec = generation(params_b, dtype, t_in, t_out)
    est = estimate(spec, CATALOG.family(family), fitted_devices(spec, family))
    assert est.service_s >= est.busy_s > 0


@pytest.mark.parametrize(
    ("params_b", "dtype", "family"),
    [
        (0.1, "int4", "nvidia-h100"),
        (0.05, "int8", "nvidia-h200"),
        (0.02, "bf16", "nvidia-a100-80gb"),
        (0.015625, "fp32", "amd-mi300x"),
    ],
)
def test_small_model_generation_service_time_at_least_busy_time(params_b, dtype, family):
    """Even a tiny model's single-stream wall time is at least the device time it is charged."""
    est = estimate(generation(params_b, dtype, 0, 1000), CATALOG.family(family), 1)
    assert est.service_s >= est.busy_s


@given(
    params_st,
    dtype_st,
    family_st,
    st.integers(1, 64),
    tokens_st,
    st.integers(0, 10**6),
    st.integers(1, 10**6),
    st.sampled_from(["inference", "batch"]),
)
def test_more_tokens_out_take_longer(params_b, dtype, family, devices, t_in, t_out, extra, kind):
    """busy_s grows with tokens_out; so does service_s, unless fewer streams then fit.

    A longer request can leave KV room for one stream fewer, and each stream of the
    smaller batch decodes faster: its wall time may then fall by up to that one stream.
    """
    fam = CATALOG.family(family)
    fewer = estimate(generation(params_b, dtype, t_in, t_out, kind), fam, devices)
    more = estimate(generation(params_b, dtype, t_in, t_out + extra, kind), fam, devices)
    assert more.service_s > fewer.service_s or more.batch < fewer.batch
    assert more.service_s >= fewer.service_s * (1 - 1 / fewer.batch)
    assert more.busy_s > fewer.busy_s


@given(
    params_st,
    dtype_st,
    family_st,
    st.integers(1, 32),
    st.integers(1, 32),
    tokens_st,
    tokens_st,
    st.sampled_from(["inference", "batch", "embedding", "training", "fine_tune"]),
)
def test_more_devices_never_slower(params_b, dtype, family, d1, d2, t_in, t_out, kind):
    """More devices never add device time, nor wall time unless they batch more streams.

    The extra memory holds more streams' KV caches; a server that batches them runs each
    stream at about the same speed, or slower where the matrix units bound the step.
    """
    fewer, more = sorted((d1, d2))
    data = {"kind": kind, "model": {"name": "m", "params_b": params_b, "dtype": dtype}}
    data["tokens_in"] = max(t_in, 1) if kind in ("training", "fine_tune") else t_in
    if kind in ("inference", "batch", "fine_tune"):
        data["tokens_out"] = t_out
    spec = parse_spec(data)
    fam = CATALOG.family(family)
    slow, fast = estimate(spec, fam, fewer), estimate(spec, fam, more)
    assert fast.busy_s <= slow.busy_s * (1 + 1e-12)
    assert fast.service_s <= slow.service_s * (1 + 1e-12) or fast.batch > slow.batch


@pytest.mark.parametrize("kind", ["embedding", "training", "fine_tune"])
def test_non_generation_service_equals_busy(kind):
    """Embedding and training occupy the devices for their whole run."""
    data = {"kind": kind, "model": {"name": "m", "params_b": 1}, "tokens_in": 10_000}
    est = estimate(parse_spec(data), CATALOG.family("nvidia-l4"), 1)
    assert est.service_s == est.busy_s > 0


def test_lora_is_cheaper_than_full_training():
    """LoRA (4 FLOPs/param/token) takes two thirds of full training (6) on the same devices."""
    base = {"kind": "training", "model": {"name": "m", "params_b": 8}, "tokens_in": 10**6}
    full = estimate(parse_spec(base), CATALOG.family("nvidia-h100"), 8)
    lora = estimate(
        parse_spec(base | {"training_method": "lora"}), CATALOG.family("nvidia-h100"), 8
    )
    assert lora.service_s == pytest.approx(full.service_s * 4 / 6)


def test_cpu_estimate_scales_with_vcpus_and_needs_them():
    """Cpu estimates are per vCPU: more vCPUs are faster, and none is an error."""
    spec = generation(0.1, "fp32", 100, 100)
    cpu = CATALOG.family("cpu")
    assert estimate(spec, cpu, 1, vcpus=16).service_s < estimate(spec, cpu, 1, vcpus=4).service_s
    with pytest.raises(ValueError, match="vCPU"):
        estimate(spec, cpu, 1, vcpus=None)


def test_smaller_dtype_decodes_faster():
    """Fewer bytes per weight mean a faster single stream (bandwidth bound)."""
    fam = CATALOG.family("nvidia-h100")
    by_dtype = {
        d: estimate(generation(70, d, 0, 1000), fam, 8).service_s for d in ("fp32", "bf16", "fp8")
    }
    assert by_dtype["fp32"] > by_dtype["bf16"] > by_dtype["fp8"]
    assert BYTES_PER_PARAM[DType.FP8] < BYTES_PER_PARAM[DType.BF16]


def test_single_stream_rate_is_bandwidth_over_weights():
    """At a goal only batch 1 meets, one stream of 8B bf16 on one H100 reads its weights per token."""
    fam = CATALOG.family("nvidia-h100")
    data = {"kind": "inference", "model": {"name": "m", "params_b": 8}, "tokens_out": 1000}
    est = estimate(parse_spec(data | {"slo": {"tpot_ms": 1}}), fam, 1)
    kv = kv_bytes_per_token(ModelRef(name="m", params_b=8))  # 128 KiB, at 500 tokens mean
    assert est.batch == 1
    assert est.tpot_s == pytest.approx((16e9 + 500 * kv) / (3350e9 * fam.decode_efficiency))
    assert est.service_s == pytest.approx(1000 * est.tpot_s)


# ---------------------------------------------------------------------------- KV cache, batch

LLAMA2_7B = {"name": "meta-llama/Llama-2-7b-hf", "params_b": 6.74, "dtype": "fp16"}
MIB = 1024.0**2


def llama2_7b(tokens_in, tokens_out, **slo):
    """A Llama-2-7B fp16 request (the Mélange model), with optional SLO goals."""
    return parse_spec(
        {
            "kind": "inference",
            "model": LLAMA2_7B,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "slo": slo,
        }
    )


@pytest.mark.parametrize(
    ("name", "params_b", "dtype", "kib"),
    [
        ("meta-llama/Llama-2-7b-hf", 6.74, "fp16", 512),  # 32 layers x 4096 x 2 x 2 bytes
        ("Llama2-13B-chat", 13, "bf16", 800),  # 40 x 5120 x 2 x 2
        ("Llama-2-70B", 70, "bf16", 320),  # GQA: 80 x 8 heads x 128 x 2 x 2
        ("meta-llama/Llama-3.1-8B-Instruct", 8, "bf16", 128),  # 32 x 8 x 128 x 2 x 2
        ("Llama-3.3-70B", 70, "bf16", 320),
        ("Llama-3.1-405B", 405, "bf16", 504),  # 126 x 8 x 128 x 2 x 2
        ("Llama-3.1-405B-FP8", 405, "fp8", 252),  # 8-bit weights keep an 8-bit cache
        ("Llama-3.1-8B-AWQ", 8, "int4", 128),  # int4 weights keep a 16-bit cache
    ],
)
def test_kv_bytes_per_token_of_known_architectures(name, params_b, dtype, kib):
    """Known architectures take their published KV size per token."""
    model = ModelRef(name=name, params_b=params_b, dtype=DType(dtype))
    assert kv_bytes_per_token(model) == pytest.approx(kib * 1024)


@given(st.floats(min_value=0.01, max_value=1000), st.floats(min_value=1.01, max_value=10))
def test_kv_bytes_per_token_grow_with_size(params_b, factor):
    """The fallback never gives a larger model a smaller cache per token."""
    small = kv_bytes_per_token(ModelRef(name="m", params_b=params_b))
    large = kv_bytes_per_token(ModelRef(name="m", params_b=min(params_b * factor, 100_000)))
    assert large >= small > 0


def test_kv_capacity_of_llama2_7b_on_a10g_caps_the_batch():
    """A10G: (0.9 x 24 - 13.48) GB over 0.5 MiB is about 15,500 tokens, 54 streams of 285."""
    capacity = (USABLE_MEMORY * 24e9 - 6.74e9 * 2) / (0.5 * MIB)
    assert 15_000 < capacity < 16_000
    est = estimate(llama2_7b(70, 215), CATALOG.family("nvidia-a10g"), 1)
    assert est.batch == math.floor(capacity / 285) == 54
    long = estimate(llama2_7b(3150, 275), CATALOG.family("nvidia-a10g"), 1)
    assert long.batch == math.floor(capacity / 3425) == 4


def test_batch_is_capped_at_the_family_stream_limit():
    """A small model on a large chip batches at most batch_gain (256) streams."""
    fam = CATALOG.family("nvidia-h200")
    est = estimate(generation(1, "bf16", 100, 100), fam, 1)
    assert est.batch == int(fam.batch_gain) == 256


@pytest.mark.parametrize("tpot_ms", [30, 40, 60, 120, 500])
def test_tpot_rises_with_the_batch_the_goal_allows(tpot_ms):
    """A looser TPOT goal runs a larger batch, each stream slower but cheaper per token."""
    fam = CATALOG.family("nvidia-a100-80gb")
    tight = estimate(llama2_7b(2000, 500, tpot_ms=tpot_ms), fam, 1)
    loose = estimate(llama2_7b(2000, 500, tpot_ms=tpot_ms * 1.5), fam, 1)
    assert tight.tpot_s <= tpot_ms / 1000 or tight.batch == 1
    assert loose.batch >= tight.batch
    assert loose.tpot_s >= tight.tpot_s
    assert loose.busy_s <= tight.busy_s


def test_operating_batch_is_the_largest_that_meets_the_goal():
    """At 40 ms on an A100, one more stream would miss the goal."""
    fam = CATALOG.family("nvidia-a100-80gb")
    est = estimate(llama2_7b(2000, 500, tpot_ms=40), fam, 1)
    assert 1 < est.batch < 256
    assert est.tpot_s <= 0.040
    bigger = estimate(llama2_7b(2000, 500), fam, 1)  # no goal: the KV cap
    assert bigger.batch > est.batch
    assert bigger.tpot_s > 0.040


def test_a_goal_even_batch_1_misses_returns_batch_1_and_its_tpot():
    """An L4 cannot decode Llama-2-7B fp16 at 20 ms a token: batch 1, the real (slower) tpot."""
    est = estimate(llama2_7b(100, 100, tpot_ms=20), CATALOG.family("nvidia-l4"), 1)
    assert est.batch == 1
    assert est.tpot_s > 0.020


def test_busy_time_is_the_prefill_plus_a_share_of_the_decode():
    """busy_s = ttft + tokens_out x tpot / batch; service_s = ttft + tokens_out x tpot."""
    est = estimate(llama2_7b(500, 300), CATALOG.family("nvidia-a100-80gb"), 1)
    assert est.batch > 1
    assert est.service_s == pytest.approx(est.ttft_s + 300 * est.tpot_s)
    assert est.busy_s == pytest.approx(est.ttft_s + 300 * est.tpot_s / est.batch)


def test_a_deadline_sets_the_tpot_goal():
    """With only a deadline, decode ends by (1 - DEADLINE_SLACK) x deadline after prefill."""
    fam = CATALOG.family("nvidia-a100-80gb")
    deadline = 30.0
    est = estimate(llama2_7b(2000, 1000, deadline_s=deadline), fam, 1)
    goal = ((1 - DEADLINE_SLACK) * deadline - est.ttft_s) / 1000
    assert est.tpot_s <= goal
    assert est.batch < estimate(llama2_7b(2000, 1000), fam, 1).batch
    same = estimate(llama2_7b(2000, 1000, tpot_ms=goal * 1000), fam, 1)
    assert same.batch == est.batch


def test_estimate_fields_for_embedding_and_training():
    """Without generation: batch 1, tpot 0, and embedding's ttft is its whole run."""
    emb = parse_spec({"kind": "embedding", "model": {"name": "m", "params_b": 1}, "tokens_in": 9})
    est = estimate(emb, CATALOG.family("nvidia-l4"), 1)
    assert (est.batch, est.tpot_s, est.ttft_s) == (1, 0.0, est.service_s)


def test_cpu_batches_at_most_its_stream_limit():
    """Cpu servers keep a small batch (batch_gain 8) and no KV limit."""
    est = estimate(generation(0.5, "fp32", 100, 100), CATALOG.family("cpu"), 1, vcpus=16)
    assert est.batch == int(CATALOG.family("cpu").batch_gain) == 8


# ---------------------------------------------------------------------------- Mélange
# Griggs et al., "Mélange" (arXiv 2404.14527): Llama-2-7B fp16 on L4, A10G, A100-80GB and
# H100 at $0.70, $1.01, $3.67 and $7.52 an hour. Our model's figures (batch, tpot, output
# tokens/s, millions of tokens per dollar) are printed by ``melange_table`` below.

MELANGE_PRICES = {
    "nvidia-l4": 0.70,
    "nvidia-a10g": 1.01,
    "nvidia-a100-80gb": 3.67,
    "nvidia-h100": 7.52,
}


def tokens_per_usd(family: str, tokens_in: int, tokens_out: int, tpot_ms: float) -> float:
    """Output tokens per dollar of one chip of ``family`` at the operating point."""
    est = estimate(llama2_7b(tokens_in, tokens_out, tpot_ms=tpot_ms), CATALOG.family(family), 1)
    return tokens_out / est.busy_s * 3600 / MELANGE_PRICES[family]


def melange_table() -> str:
    """Each chip's batch, tpot, tokens/s and tokens per dollar for the Mélange shapes."""
    lines = []
    for t_in, t_out in ((25, 25), (70, 215), (2000, 2000), (3150, 275)):
        for tpot in (40, 120):
            for fam, price in MELANGE_PRICES.items():
                spec = llama2_7b(t_in, t_out, tpot_ms=tpot)
                e = estimate(spec, CATALOG.family(fam), 1)
                rate = t_out / e.busy_s
                lines.append(
                    f"{t_in}/{t_out} @{tpot} ms {fam}: batch {e.batch}, tpot"
                    f" {e.tpot_s * 1000:.0f} ms, {rate:,.0f} tok/s,"
                    f" {rate * 3600 / price / 1e6:.2f} M tok/$"
                )
    return "\n".join(lines)


def test_melange_table_prints():
    """The figures the report quotes (run with -s to see them)."""
    print(melange_table())


@pytest.mark.xfail(
    strict=True,
    reason=(
        "Mélange measured A10G up to 1.72x A100's tokens/$ for small requests; this roofline "
        "model gives 0.50x at 70/215 and 0.82x at 25/25 (120 ms): an A100 at batch 256 is "
        "bandwidth bound at 30 ms a step, and per dollar an A10G has only 1.07x its "
        "bandwidth and 0.81x its BF16 compute, so no batch makes it 1.3x cheaper. The "
        "serving overheads that slow a large batch in practice are not modelled."
    ),
)
@pytest.mark.parametrize(("t_in", "t_out"), [(25, 25), (70, 215)])
def test_melange_small_requests_favour_a10g(t_in, t_out):
    """Small requests at 120 ms: A10G tokens/$ is 1.3x to 2.2x A100's (paper: up to 1.72x)."""
    ratio_ = tokens_per_usd("nvidia-a10g", t_in, t_out, 120) / tokens_per_usd(
        "nvidia-a100-80gb", t_in, t_out, 120
    )
    assert 1.3 <= ratio_ <= 2.2


def test_melange_small_requests_favour_a_cheap_chip_at_a_loose_goal():
    """25/25 at 120 ms: the L4 (cheapest per FLOP) beats the A100 per dollar.

    Our model's reading of Mélange's finding that cheap chips win small requests at a
    loose goal; the paper's A10G-over-A100 figure itself does not fit (xfail above).
    """
    assert tokens_per_usd("nvidia-l4", 25, 25, 120) > 1.2 * tokens_per_usd(
        "nvidia-a100-80gb", 25, 25, 120
    )


@pytest.mark.parametrize("tpot_ms", [40, 120])
def test_melange_large_requests_favour_a100(tpot_ms):
    """2000/2000: A100 tokens/$ is at least 1.1x A10G's (paper: 1.38x in A100's favour)."""
    assert tokens_per_usd("nvidia-a100-80gb", 2000, 2000, tpot_ms) >= 1.1 * tokens_per_usd(
        "nvidia-a10g", 2000, 2000, tpot_ms
    )


def test_melange_l4_holds_few_long_contexts():
    """L4 (24 GB) holds a handful of 4k-token Llama-2-7B caches, and is not cheapest at 40 ms.

    PubMed-like requests (3,150 in, 275 out) batch in single digits.
    """
    l4 = estimate(llama2_7b(3150, 275, tpot_ms=120), CATALOG.family("nvidia-l4"), 1)
    assert 1 <= l4.batch <= 9
    costs = {f: tokens_per_usd(f, 3150, 275, 40) for f in MELANGE_PRICES}
    assert max(costs, key=costs.__getitem__) != "nvidia-l4"


@pytest.mark.parametrize("family", ["nvidia-l4", "nvidia-a10g"])
@pytest.mark.parametrize(("t_in", "t_out"), [(70, 215), (3150, 275)])
def test_melange_small_chips_at_40ms_miss_or_run_a_tiny_batch(family, t_in, t_out):
    """At 40 ms a token the L4 and A10G either miss the goal or run a batch of at most 10."""
    est = estimate(llama2_7b(t_in, t_out, tpot_ms=40), CATALOG.family(family), 1)
    a100 = estimate(llama2_7b(t_in, t_out, tpot_ms=40), CATALOG.family("nvidia-a100-80gb"), 1)
    assert est.tpot_s > 0.040 or est.batch <= 10
    assert a100.batch > 2 * est.batch

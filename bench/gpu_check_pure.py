"""The pure pieces of the GPU check (``bench/gpu_check.py``): no device, no engine, no clock.

* :func:`compare_vectors` and :func:`compare_tokens` say how far two runs of the same model
  on two devices are apart (embeddings: max abs difference and min cosine; generation: the
  first position where the greedy tokens differ).
* :class:`TimeGuard` decides whether a part still fits the run's budget, on an injected
  clock, and says why not: a part that does not fit is skipped with that reason instead of
  letting the whole run overrun the lent machine's per-command limit.
* :func:`summarise_gpu` turns what ``nvidia-smi`` printed and what ``torch.cuda`` reported
  into the JSON ``detect`` section, naming the chip with ``workers.detect``'s own parser and
  product table, so the check names a chip exactly as a fleet worker would. ``emulated`` is
  written only where a real GPU was seen, and is then always False.
* :func:`ratios` and :func:`overall_status` are the small rules the report is built from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from workers.detect import DetectionError, family_for_product, parse_nvidia_smi

MIN_COSINE = 0.9999
"""Embeddings of the same weights on two devices must agree at least this well."""
SMI_ARGV: tuple[str, ...] = (
    "nvidia-smi",
    "--query-gpu=name,memory.total,driver_version",
    "--format=csv,noheader",
)
_BYTES_PER_GB = 1e9
_SMI_DRIVER_FIELD = 2


@dataclass(frozen=True, slots=True)
class VectorComparison:
    """Two sets of row vectors compared row by row (same rows, same order)."""

    rows: int
    dim: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float

    @property
    def close(self) -> bool:
        """Whether every row pair has a cosine of at least :data:`MIN_COSINE`."""
        return self.min_cosine >= MIN_COSINE

    def as_json(self) -> dict[str, Any]:
        """The comparison as a JSON object, with ``close`` and the threshold it used."""
        return {**asdict(self), "close": self.close, "min_cosine_required": MIN_COSINE}


def compare_vectors(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> VectorComparison:
    """Compare two matrices of row vectors, in float64.

    Args:
        a: rows x dim numbers (a list of lists or a numpy array).
        b: the same shape as ``a``.

    Returns:
        The largest absolute element difference, and the smallest and mean cosine of
        row ``i`` of ``a`` with row ``i`` of ``b``.

    Raises:
        ValueError: the shapes differ, are not two-dimensional or empty, a value is not
            finite, or a row is all zeros (its cosine is undefined).

    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"need two equal, non-empty rows x dim shapes, got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("vectors hold NaN or infinite values")
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    if (norms == 0).any():
        raise ValueError("a row is all zeros: its cosine is undefined")
    cosines = (x * y).sum(axis=1) / norms
    return VectorComparison(
        rows=int(x.shape[0]),
        dim=int(x.shape[1]),
        max_abs_diff=float(np.abs(x - y).max()),
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
    )


@dataclass(frozen=True, slots=True)
class TokenComparison:
    """Two token sequences compared position by position."""

    match: bool
    first_difference: int | None
    length_a: int
    length_b: int

    def as_json(self) -> dict[str, Any]:
        """The comparison as a JSON object."""
        return asdict(self)


def compare_tokens(a: Sequence[int], b: Sequence[int]) -> TokenComparison:
    """Compare two token id sequences.

    Returns:
        ``match`` when they are equal; ``first_difference`` is the first index where they
        differ, the shorter length when one is a prefix of the other, None when equal.

    """
    first = next((i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return TokenComparison(first is None, first, len(a), len(b))


class TimeGuard:
    """The run's time budget: how much is left, and whether a part still fits.

    Args:
        budget_s: seconds the whole run may take, counted from construction.
        clock: monotonic seconds (default :func:`time.monotonic`; tests step a fake).

    Raises:
        ValueError: a budget that is not a positive finite number.

    """

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Start the budget now."""
        if not (math.isfinite(budget_s) and budget_s > 0):
            raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s}")
        self.budget_s = budget_s
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self._clock() - self._start

    def left(self) -> float:
        """Seconds left in the budget, never below 0."""
        return max(0.0, self.budget_s - self.elapsed())

    def refusal(self, what: str, need_s: float) -> str | None:
        """Why ``what``, which may take up to ``need_s`` seconds, must not start now.

        Returns:
            None when ``need_s`` fits in what is left; otherwise the reason to record,
            naming both numbers.

        """
        left = self.left()
        if need_s <= left:
            return None
        return (
            f"time guard: {what} may take up to {need_s:.0f} s but only {left:.0f} s of the "
            f"{self.budget_s:.0f} s budget are left"
        )


@dataclass(frozen=True, slots=True)
class CudaInfo:
    """What ``torch.cuda`` reports about device 0 (None stands for no usable device)."""

    name: str
    capability: tuple[int, int]
    memory_bytes: int
    multiprocessors: int
    count: int
    cuda_version: str | None


def _smi_driver(text: str) -> str | None:
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) > _SMI_DRIVER_FIELD:
            return fields[_SMI_DRIVER_FIELD]
    return None


def summarise_gpu(smi_text: str | None, cuda: CudaInfo | None) -> dict[str, Any]:
    """The ``detect`` section of the report.

    Args:
        smi_text: what ``nvidia-smi`` (:data:`SMI_ARGV`) printed, or None when it is not
            installed or failed.
        cuda: device 0 as ``torch.cuda`` sees it, or None when torch sees no CUDA device.

    Returns:
        ``{"gpu": None, "reason": ..., ...}`` when neither saw a GPU; otherwise ``gpu``
        holds the fleet accelerator name (``nvidia-h100``; None with
        ``detection_error`` when the product is not one fleet knows), ``emulated: False``,
        the product, device count, memory in decimal GB and driver from nvidia-smi, and
        torch's view (name, capability, memory, multiprocessors) with the name it maps to.
        ``cuda_usable`` says whether torch can run work on it.

    """
    smi_error = None
    try:
        smi = parse_nvidia_smi(smi_text) if smi_text else None
    except DetectionError as exc:
        smi, smi_error = None, str(exc)
    seen_by_smi = smi is not None or smi_error is not None
    out: dict[str, Any] = {"nvidia_smi": smi_text, "cuda_usable": cuda is not None}
    if not seen_by_smi and cuda is None:
        smi_said = "is missing or failed" if smi_text is None else "lists no GPU"
        out.update(
            gpu=None,
            reason=f"no NVIDIA GPU: nvidia-smi {smi_said} and torch.cuda.is_available() is False",
        )
        return out
    torch_view = None
    torch_family = None
    if cuda is not None:
        memory_gb = cuda.memory_bytes / _BYTES_PER_GB
        torch_family = family_for_product(cuda.name, memory_gb)
        torch_view = {**asdict(cuda), "memory_gb": round(memory_gb, 2)}
    accelerator = smi.accelerator if smi is not None else torch_family
    out["gpu"] = {
        "accelerator": accelerator,
        "emulated": False,
        "source": "nvidia-smi" if seen_by_smi else "torch.cuda",
        "product": smi.product if smi is not None else (cuda.name if cuda else None),
        "devices": smi.devices if smi is not None else (cuda.count if cuda else None),
        "memory_gb": round(smi.memory_gb, 2) if smi is not None else None,
        "driver_version": _smi_driver(smi_text) if smi_text else None,
        "torch": torch_view,
        "torch_accelerator": torch_family,
        "agree": None if smi is None or cuda is None else smi.accelerator == torch_family,
        "detection_error": smi_error
        or (None if accelerator else f"no fleet accelerator for {cuda.name if cuda else '?'}"),
    }
    out["reason"] = None if cuda is not None else "torch.cuda.is_available() is False"
    return out


def ratios(
    measured: Mapping[str, float | None], predicted: Mapping[str, float | None]
) -> dict[str, float]:
    """``measured[k] / predicted[k]`` for every key both hold as a positive number."""
    return {
        k: m / p
        for k, m in measured.items()
        if (p := predicted.get(k)) is not None and m is not None and p > 0
    }


def overall_status(
    detect: Mapping[str, Any], parts: Mapping[str, Mapping[str, Any]], *, rehearsal: bool = False
) -> str:
    """The run's status.

    ``no-gpu`` without a GPU; ``rehearsal`` when a GPU was seen but the device side ran on
    the CPU (no figure in the report is the GPU's); ``ok`` with a usable GPU and every part
    ok; else ``partial``.
    """
    if detect.get("gpu") is None:
        return "no-gpu"
    if rehearsal:
        return "rehearsal"
    if detect.get("cuda_usable") and all(p.get("status") == "ok" for p in parts.values()):
        return "ok"
    return "partial"

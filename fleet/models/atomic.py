"""Publish a directory atomically: build it beside its target, then rename it into place.

Standard library only (the GPU check imports it on a machine without fleet's dependencies).
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; on success it replaces ``target``.

    Everything in it is made readable by all (``mkdtemp`` makes 0700; caches and artifacts
    are read by other processes). A reader never sees half a directory: on any error the
    work directory is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        for p in (work, *work.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        work.replace(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

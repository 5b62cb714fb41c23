"""Real worker processes for integration tests (thin wrapper over fleet.localworkers)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery

from fleet.localworkers import spawn_worker, stop_workers, wait_ready


@contextmanager
def worker_process(
    app: Celery,
    env: dict[str, str],
    accelerator: str,
    *,
    devices: int = 1,
    concurrency: int = 1,
    pool: str = "prefork",
    log_dir: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start ``fleet worker`` emulating ``accelerator``; yield (process, node) once it answers ping."""
    worker = spawn_worker(
        env, accelerator, log_dir, devices=devices, concurrency=concurrency, pool=pool
    )
    try:
        wait_ready(app, [worker])
        yield worker.proc, worker.node
    finally:
        stop_workers([worker])

"""Real worker processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery

READY_TIMEOUT_S = 60.0


@contextmanager
def worker_process(
    app: Celery,
    env: dict[str, str],
    accelerator: str,
    *,
    devices: int = 1,
    concurrency: int = 1,
    pool: str = "prefork",
    log_dir: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start ``fleet worker`` emulating ``accelerator``; yield (process, node name) once it answers ping."""
    node = f"{accelerator}-{uuid.uuid4().hex[:6]}@test"
    log_path = (log_dir or Path("/tmp")) / f"worker-{node.replace('@', '_')}.log"  # noqa: S108 - test logs
    cmd = [
        sys.executable,
        "-m",
        "fleet.cli",
        "worker",
        "--accelerator",
        accelerator,
        "--devices",
        str(devices),
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--hostname",
        node,
        "--loglevel",
        "INFO",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(app, node, proc, log_path)
            yield proc, node
        finally:
            stop_worker(proc)


def _wait_ready(app: Celery, node: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise RuntimeError(
        f"worker {node} not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
    )


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

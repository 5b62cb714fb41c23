"""Local ``fleet worker`` processes: how the demo, the tests and (later) the local provider start them.

Each process is a real Celery worker (``python -m fleet worker``); with an
accelerator this machine does not have, it is an emulated one and says so. With an
``engine`` and ``models`` it loads those registry models before consuming, and consumes only
their queues (``fleet worker --engine E --model M``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class LocalWorker:
    """A started worker process and its Celery node name."""

    proc: subprocess.Popen[bytes]
    node: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the worker's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def worker_argv(
    accelerator: str,
    node: str,
    *,
    devices: int = 1,
    concurrency: int = 1,
    pool: str = "prefork",
    loglevel: str = "INFO",
    metrics_port: int | None = None,
    api: str | None = None,
    engine: str | None = None,
    models: Sequence[str] = (),
) -> list[str]:
    """The ``python -m fleet worker`` command line of one worker (pure).

    ``api`` (a provider) makes an API worker, which takes no ``--accelerator``; ``engine``
    and each of ``models`` become ``--engine`` and ``--model`` options.
    """
    cmd = [
        sys.executable, "-m", "fleet", "worker",
        "--accelerator", accelerator, "--devices", str(devices), "--concurrency", str(concurrency),
        "--pool", pool, "--hostname", node, "--loglevel", loglevel,
    ]  # fmt: skip
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    if api is not None:
        cmd += ["--api", api]
        cmd[cmd.index("--accelerator") : cmd.index("--accelerator") + 2] = []
    if engine is not None:
        cmd += ["--engine", engine]
    for model in models:
        cmd += ["--model", model]
    return cmd


def spawn_worker(
    env: Mapping[str, str],
    accelerator: str,
    log_dir: Path,
    *,
    devices: int = 1,
    concurrency: int = 1,
    pool: str = "prefork",
    loglevel: str = "INFO",
    node: str | None = None,
    new_session: bool = False,
    metrics_port: int | None = None,
    api: str | None = None,
    engine: str | None = None,
    models: Sequence[str] = (),
) -> LocalWorker:
    """Start one worker process (returns at once; see ``wait_ready``).

    With ``api`` (a provider), an API worker (``fleet worker --api``): ``accelerator``
    is then only its name's prefix, and the pool is threads with ``concurrency`` threads.
    With ``engine``/``models``, a worker of that engine holding those registry models
    (``worker_argv``).

    ``new_session`` detaches it from this process group, so a Ctrl-C meant for the
    parent (an autoscaler) does not reach it: instances outlive the autoscaler.
    """
    name = f"api-{api}" if api is not None else accelerator
    node = node or f"{name}-{uuid.uuid4().hex[:6]}@localhost"
    log_path = log_dir / f"worker-{node.replace('@', '_')}.log"
    cmd = worker_argv(
        accelerator,
        node,
        devices=devices,
        concurrency=concurrency,
        pool=pool,
        loglevel=loglevel,
        metrics_port=metrics_port,
        api=api,
        engine=engine,
        models=models,
    )
    with log_path.open("wb") as log:
        # Our own CLI with a fixed argv: nothing untrusted reaches the command line.
        child_env = {**os.environ, **env}
        proc = subprocess.Popen(
            cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session
        )
    return LocalWorker(proc, node, log_path)


def wait_ready(
    app: Celery, workers: Iterable[LocalWorker], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Block until every worker answers Celery's ping.

    Raises:
        RuntimeError: a worker exited or did not answer in time (with its log's tail).

    """
    pending = {w.node: w for w in workers}
    deadline = time.monotonic() + timeout_s
    while pending:
        for w in pending.values():
            if w.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {w.node} exited with {w.proc.returncode}:\n{w.log_tail()}"
                )
        if time.monotonic() > deadline:
            w = next(iter(pending.values()))
            raise RuntimeError(f"worker {w.node} not ready in {timeout_s:g} s:\n{w.log_tail()}")
        for reply in app.control.ping(destination=sorted(pending), timeout=0.5) or []:
            for name in reply:
                pending.pop(name, None)


def stop_workers(workers: Iterable[LocalWorker], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Warm shutdown (SIGTERM) of all, then SIGKILL for any that hang."""
    started = list(workers)
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in started:
        try:
            w.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()

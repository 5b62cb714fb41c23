"""Device leases on one worker host, across its pool processes.

A worker with ``D`` devices runs up to ``D`` tasks at once, but a task placed on the
``x4`` tier needs four of them. Each task leases its devices before its handler runs
and releases them after, through ``flock`` on one file per device in a directory
private to the worker, so concurrent pool processes never share a device. The lease
is all-or-nothing under a directory-wide lock, so two tasks cannot each hold half of
what both need (no deadlock); a task waits until enough devices are free.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

POLL_S = 0.05


class DeviceLeases:
    """Lease device indices ``0..devices-1`` from lock files in ``directory``."""

    def __init__(self, directory: Path, devices: int) -> None:
        """Create the directory and one lock file per device."""
        if devices < 1:
            raise ValueError("devices must be at least 1")
        self.directory = directory
        self.devices = devices
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(devices):
            (directory / f"device-{i}.lock").touch()
        (directory / "alloc.lock").touch()

    @contextmanager
    def lease(self, n: int, timeout_s: float | None = None) -> Iterator[tuple[int, ...]]:
        """Hold ``n`` devices for the block; yields their indices.

        Raises:
            ValueError: ``n`` is more than this host has.
            TimeoutError: not enough devices became free within ``timeout_s``.

        """
        if n > self.devices:
            raise ValueError(f"task needs {n} devices; this worker has {self.devices}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with ExitStack() as held:
                got = self._try(n, held)
                if got is not None:
                    yield got
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{n} devices not free within {timeout_s:g} s")
            time.sleep(POLL_S)

    def _try(self, n: int, held: ExitStack) -> tuple[int, ...] | None:
        alloc = os.open(self.directory / "alloc.lock", os.O_RDWR)
        try:
            fcntl.flock(alloc, fcntl.LOCK_EX)
            got: list[int] = []
            for i in range(self.devices):
                fd = os.open(self.directory / f"device-{i}.lock", os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.callback(os.close, fd)  # closing the descriptor releases the flock
                got.append(i)
                if len(got) == n:
                    return tuple(got)
            held.close()
            return None
        finally:
            os.close(alloc)

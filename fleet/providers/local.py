"""A provider whose instances are real ``fleet worker`` processes on this machine.

Each instance is one worker process (``fleet.localworkers.spawn_worker``) emulating the
pool's accelerator, named ``<accelerator>-<instance id>@localhost`` and started with
``FLEET_INSTANCE_ID`` set. A pool that declares models (``PoolConfig.worker_env``: the
request's ``FLEET_ENGINE`` and comma-separated ``FLEET_MODELS``) gets workers started with
``--engine E --model M ...`` (``worker_options``). What this provider promises beyond
``fleet.providers.base``:

* **State on disk.** Every launch writes ``<state_dir>/<instance id>.json`` atomically
  (temporary file, then rename): id, pool, accelerator, offer, token, pid, the pid's
  start time, node, launch time, price, devices and tags. Never an environment value:
  the broker URL may hold a password. Instances outlive the provider object and its
  process, like cloud VMs: ``close()`` stops nothing, and a new ``LocalProvider`` on the
  same ``state_dir`` (an autoscaler restarted after a crash) lists, and can terminate,
  the instances the previous one launched.
* **Idempotent by token** while the token's process lives: a launch whose token has a
  live instance in ``state_dir`` returns it; once that process is gone, the token may
  launch again. One provider per ``state_dir`` launches at a time (a lock in-process;
  two autoscalers on one directory are not supported).
* **Listing is liveness.** An instance whose process is alive is RUNNING (readiness is
  the worker's to report, through Celery); a dead one (exited, a zombie, which is
  reaped, or a pid now used by another process, told apart by its start time) is gone:
  its state file is removed and it is not listed. Unreadable state files are skipped.
* **Terminate is a warm shutdown.** SIGTERM lets Celery finish the tasks it is running
  (with late acks the rest go back to the queue); only after ``stop_timeout_s`` does
  the worker get SIGKILL, with its pool processes. Terminate blocks until the process is
  gone, then removes the state file. An unknown or gone id is not an error.
* **Errors are data.** An accelerator the catalog does not know is ``UNSUPPORTED``; a
  process that cannot be started or a state file that cannot be written is ``OTHER``.

Times passed as ``now`` are recorded; the waits in ``terminate`` use the monotonic clock
because they wait for real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, OfferRef, ProviderError
from fleet.catalog import default_catalog
from fleet.localworkers import LocalWorker, spawn_worker
from fleet.providers.base import LaunchRequest, LaunchResult

STATE_VERSION = 1
POLL_S = 0.1
KILL_WAIT_S = 10.0
_ID = re.compile(r"local-[0-9a-f]{10}")
_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class _Record:
    """One state file's content."""

    instance: Instance  # as launched (state PENDING)
    accelerator: str
    pid: int
    start_ticks: int | None  # the pid's start time (/proc/<pid>/stat), to detect reuse
    tags: dict[str, str]
    log_path: str

    def to_json(self) -> dict[str, Any]:
        i = self.instance
        return {
            "version": STATE_VERSION,
            "id": i.id,
            "pool": i.pool,
            "accelerator": self.accelerator,
            "offer": {
                "cloud": i.offer.cloud,
                "region": i.offer.region,
                "instance_type": i.offer.instance_type,
                "market": i.offer.market,
            },
            "token": i.token,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "node": i.workers[0],
            "launched_at": i.launched_at,
            "usd_per_hour": i.usd_per_hour,
            "devices": i.devices,
            "tags": self.tags,
            "log_path": self.log_path,
        }

    @classmethod
    def from_json(cls, data: Any) -> _Record:  # noqa: ANN401 - parsed JSON, checked here
        """Parse a state file's JSON; ValueError, KeyError or TypeError when malformed."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("not a state file of this version")
        offer = data["offer"]
        ticks = data.get("start_ticks")
        tags = data["tags"]
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise TypeError("tags")
        instance = Instance(
            id=_str(data["id"]),
            pool=_str(data["pool"]),
            offer=OfferRef(
                cloud=_str(offer["cloud"]),
                region=_str(offer["region"]),
                instance_type=_str(offer["instance_type"]),
                market=_str(offer["market"]),
            ),
            state=InstanceState.PENDING,
            launched_at=float(data["launched_at"]),
            token=_str(data["token"]),
            usd_per_hour=float(data["usd_per_hour"]),
            devices=int(data["devices"]),
            workers=(_str(data["node"]),),
        )
        pid = data["pid"]
        if not isinstance(pid, int) or pid <= 1:
            raise ValueError("pid")
        return cls(
            instance=instance,
            accelerator=_str(data["accelerator"]),
            pid=pid,
            start_ticks=ticks if isinstance(ticks, int) else None,
            tags=dict(tags),
            log_path=str(data.get("log_path", "")),
        )


def worker_options(env: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """``(engine, models)`` for ``fleet worker`` from a launch's ``FLEET_ENGINE``/``FLEET_MODELS``.

    ``FLEET_MODELS`` is comma-separated (blanks ignored); both absent: ``(None, ())``, a
    plain reference worker.
    """
    engine = env.get("FLEET_ENGINE", "").strip() or None
    models = tuple(m.strip() for m in env.get("FLEET_MODELS", "").split(",") if m.strip())
    return engine, models


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None if there is no such pid."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir(_PROC) if e.isdigit()]  # noqa: PTH208 - a plain listing
    except OSError:
        return []
    for entry in entries:
        try:
            text = (_PROC / entry / "stat").read_text()
            ppid = int(text[text.rfind(")") + 2 :].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _dead(pid: int) -> bool:
    """True once ``pid`` runs no code (gone, or a zombie waiting for its new parent)."""
    stat = _proc_stat(pid)
    return stat is None or stat[0] in {"Z", "X"}


def _wait_dead(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_dead(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL_S)


class LocalProvider:
    """Instances are ``fleet worker`` processes on this machine (see the module contract)."""

    name = "local"

    def __init__(
        self,
        env: Mapping[str, str],
        state_dir: Path,
        log_dir: Path | None = None,
        *,
        concurrency: int = 1,
        stop_timeout_s: float = 30.0,
    ) -> None:
        """Build a provider over ``state_dir`` (created if missing).

        Args:
            env: what every worker process needs (``FLEET_BROKER_URL``,
                ``FLEET_RESULT_BACKEND``, ``FLEET_NAMESPACE``, ``FLEET_ARTIFACT_DIR``...),
                on top of this process's environment. Never written to disk.
            state_dir: where instance state files live; shared by every provider object
                that should see the same instances.
            log_dir: where worker logs go (default ``state_dir/logs``).
            concurrency: Celery pool processes per worker.
            stop_timeout_s: how long ``terminate`` lets a warm shutdown run before SIGKILL.

        """
        self._env = dict(env)
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else self.state_dir / "logs"
        self.concurrency = concurrency
        self.stop_timeout_s = stop_timeout_s
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._workers: dict[str, LocalWorker] = {}  # the processes this object started
        self._lock = threading.Lock()

    # -- the Provider contract -------------------------------------------------------

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Start one worker process for ``request``, idempotently by ``request.token``.

        Returns at once, without waiting for the worker to answer Celery's ping. The
        worker's environment is this provider's ``env``, then ``request.env``, then
        ``FLEET_INSTANCE_ID``.

        Returns:
            The new instance (PENDING), the live one this token already started
            (RUNNING), or an error: UNSUPPORTED for an accelerator the catalog does not
            know, OTHER when the process or its state file cannot be made.

        """
        with self._lock:
            for record in self._records():
                if record.instance.token == request.token and self._alive(record):
                    return LaunchResult(instance=self._listed(record))
            if request.accelerator not in default_catalog().names():
                return LaunchResult(
                    error=self._error(
                        request,
                        ErrorKind.UNSUPPORTED,
                        f"unknown accelerator {request.accelerator!r}",
                        now,
                    )
                )
            return self._start(request, now)

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """Warm-shut-down the instance's worker; SIGKILL after ``stop_timeout_s``.

        Blocks until the process is gone (at most ``stop_timeout_s`` plus a few
        seconds), then removes its state file.

        Returns:
            None when it is gone (or was unknown); an error when it could not be
            signalled or survived SIGKILL (its state file is kept, so a retry can).

        """
        if not _ID.fullmatch(instance_id):
            return None
        record = self._read(self._path(instance_id))
        if record is None:
            return None
        errors = self._stop([record], now)
        return errors[0] if errors else None

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every instance in ``state_dir`` whose process is alive, RUNNING.

        Dead ones are dropped (their state files removed); unreadable files are skipped.
        """
        try:
            records = self._records(strict=True)
        except OSError as exc:
            return ProviderError(
                pool="",
                offer=None,
                kind=ErrorKind.OTHER,
                message=f"cannot read state directory {self.state_dir}: {exc.strerror}",
                at=now,
            )
        return [self._listed(r) for r in records if self._alive(r)]

    # -- beyond the contract ---------------------------------------------------------

    def terminate_all(self, now: float) -> list[ProviderError]:
        """Terminate every instance in ``state_dir`` at once (tests, the demo, cleanup).

        Returns:
            The errors of the ones that could not be stopped (empty when all are gone).

        """
        return self._stop(self._records(), now)

    def local_worker(self, instance_id: str) -> LocalWorker | None:
        """The process handle of an instance this object launched (for ``wait_ready``)."""
        return self._workers.get(instance_id)

    def close(self) -> None:
        """Forget this object's process handles; the instances keep running.

        Like a cloud client's close: the VMs outlive it. Use ``terminate`` or
        ``terminate_all`` to stop them; a later provider on ``state_dir`` finds them.
        """
        self._workers.clear()

    # -- internals -------------------------------------------------------------------

    def _path(self, instance_id: str) -> Path:
        return self.state_dir / f"{instance_id}.json"

    def _start(self, request: LaunchRequest, now: float) -> LaunchResult:
        instance_id = f"local-{secrets.token_hex(5)}"
        node = f"{request.accelerator}-{instance_id}@localhost"
        env = {**self._env, **request.env, "FLEET_INSTANCE_ID": instance_id}
        engine, models = worker_options(request.env)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            worker = spawn_worker(
                env,
                request.accelerator,
                self.log_dir,
                devices=request.devices,
                concurrency=self.concurrency,
                node=node,
                new_session=True,  # instances outlive the autoscaler, like cloud VMs
                engine=engine,
                models=models,
            )
        except (OSError, ValueError) as exc:
            # The type and errno text only: the message of a failed exec names no env value.
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            )
            return LaunchResult(
                error=self._error(request, ErrorKind.OTHER, f"cannot start worker: {reason}", now)
            )
        stat = _proc_stat(worker.proc.pid)
        record = _Record(
            instance=Instance(
                id=instance_id,
                pool=request.pool,
                offer=request.offer,
                state=InstanceState.PENDING,
                launched_at=now,
                token=request.token,
                usd_per_hour=request.usd_per_hour,
                devices=request.devices,
                workers=(node,),
            ),
            accelerator=request.accelerator,
            pid=worker.proc.pid,
            start_ticks=stat[1] if stat else None,
            tags=request.tags(),
            log_path=str(worker.log_path),
        )
        try:
            self._write(record)
        except OSError as exc:
            # An instance nobody can find again would leak: stop it now.
            worker.proc.kill()
            worker.proc.wait()
            return LaunchResult(
                error=self._error(
                    request, ErrorKind.OTHER, f"cannot write state file: {exc.strerror}", now
                )
            )
        self._workers[instance_id] = worker
        return LaunchResult(instance=record.instance)

    def _write(self, record: _Record) -> None:
        path = self._path(record.instance.id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(record.to_json(), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _read(self, path: Path) -> _Record | None:
        try:
            record = _Record.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if record.instance.id == path.stem else None

    def _records(self, *, strict: bool = False) -> list[_Record]:
        """Every readable state file's record (OSError on an unreadable directory if strict)."""
        try:
            names = sorted(os.listdir(self.state_dir))  # noqa: PTH208 - a plain listing
        except FileNotFoundError:
            return []
        except OSError:
            if strict:
                raise
            return []
        out = []
        for name in names:
            if name.endswith(".json") and _ID.fullmatch(name[: -len(".json")]):
                record = self._read(self.state_dir / name)
                if record is not None:
                    out.append(record)
        return out

    @staticmethod
    def _listed(record: _Record) -> Instance:
        i = record.instance
        return Instance(
            id=i.id,
            pool=i.pool,
            offer=i.offer,
            state=InstanceState.RUNNING,
            launched_at=i.launched_at,
            token=i.token,
            usd_per_hour=i.usd_per_hour,
            devices=i.devices,
            workers=i.workers,
        )

    def _alive(self, record: _Record) -> bool:
        """Whether the record's process lives; a dead one's state file is removed."""
        if self._process_alive(record):
            return True
        self._path(record.instance.id).unlink(missing_ok=True)
        self._workers.pop(record.instance.id, None)
        return False

    def _process_alive(self, record: _Record) -> bool:
        pid = record.pid
        worker = self._workers.get(record.instance.id)
        if worker is not None and worker.proc.pid == pid:
            return worker.proc.poll() is None  # polling reaps our own child
        # Our child through another provider object in this process: reap it if it exited.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists but is not ours to signal: the start time below decides
        if not _PROC.is_dir():
            return True
        stat = _proc_stat(pid)
        if stat is None or stat[0] in {"Z", "X"}:
            return False
        return record.start_ticks is None or stat[1] == record.start_ticks

    def _signal(self, record: _Record, sig: signal.Signals) -> str | None:
        """Send ``sig`` if the process is still ours; an error message if not permitted."""
        if not self._process_alive(record):
            return None
        try:
            os.kill(record.pid, sig)
        except ProcessLookupError:
            return None
        except PermissionError:
            return f"not permitted to signal pid {record.pid}"
        return None

    def _wait_gone(self, records: Iterable[_Record], timeout_s: float) -> list[_Record]:
        """Poll until every process has exited or ``timeout_s`` passed; the survivors."""
        pending = list(records)
        deadline = time.monotonic() + timeout_s
        while True:
            pending = [r for r in pending if self._process_alive(r)]
            if not pending or time.monotonic() >= deadline:
                return pending
            time.sleep(POLL_S)

    def _stop(self, records: list[_Record], now: float) -> list[ProviderError]:
        errors: dict[str, ProviderError] = {}
        for record in records:
            message = self._signal(record, signal.SIGTERM)
            if message:
                errors[record.instance.id] = self._instance_error(record, message, now)
        waiting = [r for r in records if r.instance.id not in errors]
        survivors = self._wait_gone(waiting, self.stop_timeout_s)
        children: list[int] = []
        for record in survivors:
            # Past the warm-shutdown window: kill the worker and its pool processes.
            pool = _children(record.pid)
            self._signal(record, signal.SIGKILL)
            for child in pool:
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
            children += pool
        left = self._wait_gone(survivors, KILL_WAIT_S)
        _wait_dead(children, KILL_WAIT_S)
        for record in left:
            errors[record.instance.id] = self._instance_error(
                record, f"pid {record.pid} survived SIGKILL", now
            )
        for record in records:
            if record.instance.id not in errors:
                self._path(record.instance.id).unlink(missing_ok=True)
                self._workers.pop(record.instance.id, None)
        return list(errors.values())

    @staticmethod
    def _error(request: LaunchRequest, kind: ErrorKind, message: str, now: float) -> ProviderError:
        return ProviderError(
            pool=request.pool, offer=request.offer, kind=kind, message=message, at=now
        )

    @staticmethod
    def _instance_error(record: _Record, message: str, now: float) -> ProviderError:
        return ProviderError(
            pool=record.instance.pool,
            offer=record.instance.offer,
            kind=ErrorKind.OTHER,
            message=f"{record.instance.id}: {message}",
            at=now,
        )

"""Supervise one local model server process: start, readiness, health, restart, stop.

``ServerSupervisor`` runs a server command (vLLM's OpenAI-compatible server, in practice) in
its own process group and keeps it serving. Every decision is the pure ``step(state,
observation, now, policy)``; the supervisor's one daemon thread observes the process (is it
running, does ``probe()`` say it serves), applies ``step`` and carries out its actions, so
every spawn and every kill happens on that thread.

Transition table (observations are passive, actions active)::

    phase     observation                          -> phase     actions
    STARTING  probe ok                             -> READY     (announce ready)
    STARTING  exited, or start deadline passed     -> DOWN      KILL    (first start: FAILED)
    READY     probe ok                             -> READY     (failures 0; back-off reset
                                                                 after stable_s of health)
    READY     exited                               -> DOWN      KILL, NOTIFY_DOWN
    READY     probe failed max_probe_failures times-> DOWN      KILL, NOTIFY_DOWN
    DOWN      back-off elapsed                     -> STARTING  SPAWN
    any       stop() called                        -> STOPPED   (SIGTERM, SIGKILL after grace)

Back-off before the n-th consecutive restart: ``base_s * 2**(n-1)`` capped at ``cap_s``
(1, 2, 4 ... 60 s). The first start is not retried: ``start()`` raises ``EngineError`` with
the tail of the server's log when it fails or is not ready within ``ready_timeout_s``.

Contract:

* ``ready`` is True only in READY: while the server is down or restarting it is False.
* ``on_down`` (settable attribute) is called on the supervisor thread each time a READY
  server is found dead or unhealthy, after its process group is killed: requests in flight
  on it have failed (their callers got ``EngineError``) and the caller may requeue work. It
  must return quickly; an exception from it is logged and ignored.
* The server runs in a new session (its own process group): stopping or killing it kills its
  children too. It gets ``SIGTERM`` when the supervisor thread dies (Linux
  ``PR_SET_PDEATHSIG``, so a SIGKILLed worker leaves no orphan) and every live supervisor is
  stopped at interpreter exit (``atexit``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import enum
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fleet.obs.logs import get_logger
from workers.engines.base import EngineError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

log = get_logger("fleet.engine")
_PR_SET_PDEATHSIG = 1
_STARTUP_POLL_S = 0.5
_LIVE: weakref.WeakSet[ServerSupervisor] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How readiness and health are judged and how fast a dead server is restarted."""

    ready_timeout_s: float = 60.0
    base_s: float = 1.0
    cap_s: float = 60.0
    max_probe_failures: int = 3
    stable_s: float = 60.0
    """Seconds of health after which the back-off starts again at ``base_s``."""


def backoff_s(restart: int, policy: RestartPolicy) -> float:
    """Seconds to wait before the ``restart``-th consecutive restart (1-based; pure)."""
    return min(policy.cap_s, policy.base_s * 2.0 ** (max(restart, 1) - 1))


class Phase(enum.StrEnum):
    """Where the server is in its life."""

    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    FAILED = "failed"
    STOPPED = "stopped"


class Action(enum.StrEnum):
    """What the supervisor thread does after a step."""

    SPAWN = "spawn"
    KILL = "kill"
    NOTIFY_DOWN = "notify_down"


@dataclass(frozen=True, slots=True)
class State:
    """The supervisor's memory between steps.

    ``deadline``: STARTING gives up at it, DOWN restarts at it. ``failures``: consecutive
    failed probes while READY. ``restarts``: consecutive deaths (the back-off exponent).
    ``first``: still in the first start, whose failure is final.
    """

    phase: Phase
    since: float
    deadline: float | None = None
    failures: int = 0
    restarts: int = 0
    first: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """What the thread saw: is the process running, did the probe say it serves."""

    alive: bool
    serving: bool
    exit_code: int | None = None


def initial(now: float, policy: RestartPolicy) -> State:
    """The state right after the first spawn."""
    return State(Phase.STARTING, now, now + policy.ready_timeout_s)


def _down(state: State, now: float, policy: RestartPolicy, reason: str) -> State:
    restarts = state.restarts + 1
    restart_at = now + backoff_s(restarts, policy)
    return State(Phase.DOWN, now, restart_at, restarts=restarts, first=False, reason=reason)


def _starting(
    state: State, obs: Observation, now: float, policy: RestartPolicy
) -> tuple[State, tuple[Action, ...]]:
    if obs.alive and obs.serving:
        return State(Phase.READY, now, restarts=state.restarts, first=False), ()
    if obs.alive and (state.deadline is None or now < state.deadline):
        return state, ()
    if obs.alive:
        reason = f"not ready within {policy.ready_timeout_s:g} s"
    else:
        reason = f"server exited with code {obs.exit_code}"
    if state.first:
        return State(Phase.FAILED, now, reason=reason), (Action.KILL,)
    return _down(state, now, policy, reason), (Action.KILL,)


def _ready(
    state: State, obs: Observation, now: float, policy: RestartPolicy
) -> tuple[State, tuple[Action, ...]]:
    if not obs.alive:
        reason = f"server exited with code {obs.exit_code}"
        return _down(state, now, policy, reason), (Action.KILL, Action.NOTIFY_DOWN)
    if not obs.serving:
        failures = state.failures + 1
        if failures >= policy.max_probe_failures:
            reason = f"health probe failed {failures} times"
            return _down(state, now, policy, reason), (Action.KILL, Action.NOTIFY_DOWN)
        return replace(state, failures=failures), ()
    restarts = 0 if now - state.since >= policy.stable_s else state.restarts
    return replace(state, failures=0, restarts=restarts), ()


def step(
    state: State, obs: Observation, now: float, policy: RestartPolicy
) -> tuple[State, tuple[Action, ...]]:
    """The next state and the actions to take (pure; see the module's transition table).

    ``obs`` is ignored in DOWN (no process runs), FAILED and STOPPED (terminal).
    """
    if state.phase is Phase.STARTING:
        return _starting(state, obs, now, policy)
    if state.phase is Phase.READY:
        return _ready(state, obs, now, policy)
    if state.phase is Phase.DOWN and state.deadline is not None and now >= state.deadline:
        deadline = now + policy.ready_timeout_s
        starting = State(Phase.STARTING, now, deadline, restarts=state.restarts, first=False)
        return starting, (Action.SPAWN,)
    return state, ()


def _pdeathsig() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when its parent thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class ServerSupervisor:
    """Keep one server process serving (see the module docstring for the contract)."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        probe: Callable[[], bool],
        log_path: Path,
        *,
        policy: RestartPolicy = RestartPolicy(),
        interval_s: float = 2.0,
        on_down: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "server",
    ) -> None:
        """Remember how to run and probe the server; nothing starts until ``start()``.

        Args:
            command: the server's argv.
            env: its whole environment.
            probe: True when the server serves (vLLM: ``/v1/models`` lists the model); it
                must return within a few seconds and never raise.
            log_path: the server's stdout and stderr go here (appended, one header per start).
            policy: readiness deadline, back-off and health thresholds.
            interval_s: seconds between health probes while READY.
            on_down: called when a READY server is found down (see the module docstring).
            clock: monotonic seconds (injected by tests).
            name: how logs name this server.

        """
        self.command, self.env, self.probe = tuple(command), dict(env), probe
        self.log_path, self.policy, self.interval_s = log_path, policy, interval_s
        self.on_down, self.clock, self.name = on_down, clock, name
        self.state = State(Phase.STOPPED, clock())
        self.spawns = 0
        self.last_pid: int | None = None
        """The process id (and process group id) of the latest server spawned."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._settled = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """True while the server serves."""
        return self.state.phase is Phase.READY

    @property
    def pid(self) -> int | None:
        """The server's process id while one runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Spawn the server and block until it serves (once: later calls return at once).

        Raises:
            EngineError: it exited or did not serve within ``policy.ready_timeout_s``; the
                process group is killed and the message ends with the log's tail.

        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"{self.name}-supervisor", daemon=True
            )
            _LIVE.add(self)
            self._thread.start()
        self._settled.wait()
        if self.state.phase in {Phase.FAILED, Phase.STOPPED} or self.state.first:
            self._thread.join()
            reason = self.state.reason or "stopped while starting"
            raise EngineError(f"{self.name}: {reason}; log tail:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop supervising and terminate the server's process group; idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(grace_s + 10.0)
        self._terminate(grace_s)
        self.state = replace(self.state, phase=Phase.STOPPED)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the server wrote since its latest start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        latest = text.rsplit("\n=== start ", 1)[-1]
        return "\n".join(latest.splitlines()[-lines:])

    # --- the supervisor thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._spawn()
            self.state = initial(self.clock(), self.policy)
            while not self._stop.is_set():
                self.state, actions = step(self.state, self._observe(), self.clock(), self.policy)
                for action in actions:
                    self._act(action)
                if self.state.phase in {Phase.READY, Phase.FAILED}:
                    self._settled.set()
                if self.state.phase is Phase.FAILED:
                    return
                self._stop.wait(self._pause())
        except Exception as exc:  # a bug here must not leave a server unsupervised
            log.exception("engine.supervisor.crashed", server=self.name)
            self.state = State(Phase.FAILED, self.clock(), reason=f"supervisor crashed: {exc}")
        finally:
            self._settled.set()
            self._terminate(grace_s=10.0)

    def _pause(self) -> float:
        state = self.state
        if state.phase is Phase.DOWN and state.deadline is not None:
            return max(0.0, min(state.deadline - self.clock(), self.interval_s))
        return _STARTUP_POLL_S if state.phase is Phase.STARTING else self.interval_s

    def _observe(self) -> Observation:
        proc = self._proc
        if proc is None:
            return Observation(alive=False, serving=False)
        code = proc.poll()
        if code is not None:
            return Observation(alive=False, serving=False, exit_code=code)
        return Observation(alive=True, serving=self.probe())

    def _act(self, action: Action) -> None:
        state = self.state
        if action is Action.SPAWN:
            log.warning("engine.server.restart", server=self.name, attempt=state.restarts)
            try:
                self._spawn()
            except OSError:  # observed as an exited server: back-off, then try again
                log.exception("engine.server.spawn_failed", server=self.name)
                self._proc = None
        elif action is Action.KILL:
            self._kill_group(signal.SIGKILL)
            self._reap(5.0)
        elif action is Action.NOTIFY_DOWN:
            wait_s = round((state.deadline or 0.0) - self.clock(), 1)
            log.warning("engine.server.down", server=self.name, reason=state.reason, wait_s=wait_s)
            callback = self.on_down
            if callback is not None:
                try:
                    callback()
                except Exception:
                    log.exception("engine.server.on_down_failed", server=self.name)

    def _spawn(self) -> None:
        self.spawns += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"=== start {self.spawns}: {' '.join(self.command)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig(),  # noqa: PLW1509 - only a prctl call in the child
            )
        self.last_pid = self._proc.pid
        log.info("engine.server.spawned", server=self.name, pid=self._proc.pid)

    def _kill_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def _reap(self, timeout_s: float) -> bool:
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _terminate(self, grace_s: float) -> None:
        if self._proc is None:
            return
        self._kill_group(signal.SIGTERM)
        if not self._reap(grace_s):
            log.warning("engine.server.kill", server=self.name, grace_s=grace_s)
        self._kill_group(signal.SIGKILL)  # children that outlived their parent
        self._reap(5.0)


@atexit.register
def _stop_all() -> None:
    """Stop every live supervisor when the interpreter exits."""
    for supervisor in list(_LIVE):
        supervisor.stop(grace_s=10.0)

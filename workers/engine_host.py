"""Where a worker's engine lives and when it loads: the parent, the pool processes, or nowhere.

``prepare(me, registry, settings, pool)`` runs in the worker's main process before Celery
starts and returns an ``EngineHost``:

* reference: nothing to load; always ready.
* vllm: the parent starts the supervised server (``workers.engines.vllm``) and waits until
  it serves the model (``GET /v1/models``) before the worker consumes; pool processes reach
  it over HTTP (``FLEET_VLLM_BASE_URL``). When the server dies the supervisor restarts it
  with back-off; a task whose request failed waits, unacked and in the same attempt, until
  the server serves again (``fleet.run``: at most the family's cold start plus the load
  time, then the attempt fails and is retried or dead-lettered by the guard). A worker
  stopped meanwhile requeues those tasks through its graceful-stop drain, as any other.
  (Cancelling the waiting pool processes on the supervisor's signal was tried: Celery's
  ``cancel_active_requests`` outside a shutdown left the worker holding its prefetched
  messages without running them.)
* transformers (in-process): with the prefork pool every pool process loads the models in
  Celery's ``worker_process_init`` (after the fork: the parent never imports torch); Celery
  gives a pool process no task before its initializer returns, and the process start
  timeout is raised to the load deadline. With solo or threads pools the main process loads
  before consuming. Each loaded process marks itself ready (``workers.serving``).

``host.ready()`` feeds the heartbeat (``fleet status``, Flower via ``fleet_identity``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from fleet.catalog import default_catalog
from fleet.models.registry import registry_from_file
from fleet.models.weights import resolve
from fleet.obs.logs import get_logger
from fleet.spec import Runtime
from workers import serving
from workers.engines.base import EngineError

if TYPE_CHECKING:
    from celery import Celery

    from fleet.models.registry import ModelRegistry
    from fleet.settings import Settings
    from workers.engines.base import Engine
    from workers.identity import WorkerIdentity

log = get_logger("fleet.worker")


def device_for(runtime: str, index: int, devices: int) -> str:
    """The torch device of pool process ``index``: ``cpu``, or ``cuda:<i>`` (ROCm too)."""
    if runtime in {"cuda", "rocm"}:
        return f"cuda:{index % max(1, devices)}"
    return "cpu"


def load_deadline_s(me: WorkerIdentity, registry: ModelRegistry) -> float:
    """How long loading may take: the family's cold start plus the held models' load times."""
    family = default_catalog().family(me.accelerator)
    load = sum(registry.get(m).load_s(registry.load_gbps) for m in me.models)
    return family.cold_start_s + load


@dataclass
class EngineHost:
    """The worker's engine placement; see the module docstring."""

    me: WorkerIdentity
    registry: ModelRegistry | None = None
    settings: Settings | None = None
    pool: str = "prefork"
    server: Engine | None = None  # vLLM: the supervised server, owned by the parent
    local: serving.Serving | None = None  # solo/threads: loaded in this process
    _ready_dir: Any = field(default=None)

    def ready(self) -> bool:
        """Whether the engine serves every held model now."""
        if self.me.engine == "reference" or not self.me.models:
            return self.me.engine == "reference" or self.local is not None
        if self.server is not None:
            return all(self.server.ready(m) for m in self.me.models)
        if self.local is not None:
            return True
        return serving.ready_processes(self._ready_dir) >= self.me.concurrency

    def install(self, app: Celery) -> None:
        """Hook in-process loading into the pool processes (prefork), before Celery starts.

        Also adds a worker bootstep whose ``info`` puts engine, models and readiness in
        Celery's ``inspect stats`` reply, which Flower shows on each worker's page.
        """
        app.steps["worker"].add(_info_step(self))
        if self.me.engine == "reference" or self.registry is None or self.settings is None:
            return
        if self.server is not None or self.local is not None:
            return
        app.conf.worker_proc_alive_timeout = load_deadline_s(self.me, self.registry)
        registry, settings, me = self.registry, self.settings, self.me
        ready_dir = self._ready_dir

        @signals.worker_process_init.connect(weak=False)
        def _load(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
            from billiard.process import current_process  # noqa: PLC0415

            index = getattr(current_process(), "index", 0) or 0
            device = device_for(me.runtime, int(index), me.devices)
            engine = serving.build_engine(me.engine, device)
            serving.setup(engine, registry, settings.model_cache, me.models, device)
            serving.mark_ready(ready_dir)
            log.info("engine.ready", engine=me.engine, models=list(me.models), device=device)

    def on_server_down(self) -> None:
        """The vLLM server died (the supervisor restarts it); running tasks wait for it."""
        log.warning(
            "engine.server_down",
            engine=self.me.engine,
            models=list(self.me.models),
            note="restarting; running tasks wait for it, unacked",
        )

    def stop(self) -> None:
        """Stop a server engine this process started, remove the ready markers; idempotent."""
        if self.server is not None:
            self.server.stop()
        if self.local is not None:
            self.local.engine.stop()
        if self._ready_dir is not None:
            shutil.rmtree(self._ready_dir, ignore_errors=True)


def _info_step(host: EngineHost) -> type[bootsteps.StartStopStep]:
    """A bootstep reporting ``{"fleet": {...}}`` in ``inspect stats`` (and so in Flower)."""

    class FleetEngineInfo(bootsteps.StartStopStep):
        def info(self, _worker: Any) -> dict[str, Any]:  # type: ignore[override]  # noqa: ANN401 - Celery's worker
            me = host.me
            return {
                "fleet": {
                    "accelerator": me.accelerator,
                    "emulated": me.emulated,
                    "engine": me.engine,
                    "models": list(me.models),
                    "runtime": me.runtime,
                    "ready": host.ready(),
                }
            }

    return FleetEngineInfo


def prepare(
    me: WorkerIdentity,
    registry: ModelRegistry | None,
    settings: Settings,
    pool: str,
) -> EngineHost:
    """Set up the engine for ``me`` in the worker's main process; see the module docstring.

    Raises:
        workers.engines.base.EngineError: a server engine did not become ready in time.
        fleet.models.weights.WeightsError: weights missing or not fetchable.

    """
    host = EngineHost(me, registry, settings, pool)
    host._ready_dir = serving.ready_dir(os.getpid())  # noqa: SLF001 - set once, here
    if me.engine == "reference" or registry is None:
        return host
    if me.engine == "vllm":
        from workers.engines.vllm import VllmEngine  # noqa: PLC0415

        entry = registry.get(me.models[0])
        weights = resolve(entry, settings.model_cache)
        server = VllmEngine(
            Runtime(me.runtime),
            devices=me.devices,
            accelerator=me.accelerator,
            log_dir=settings.artifact_dir / "vllm-logs",
            on_down=host.on_server_down,
        )
        log.info("engine.starting", engine="vllm", model=entry.name, weights=str(weights))
        server.load(entry, weights)  # waits until /v1/models lists the model
        os.environ.update(server.child_env())  # pool processes reach the server over HTTP
        host.server = server
        log.info("engine.ready", engine="vllm", model=entry.name, url=server.base_url)
        return host
    if pool in {"solo", "threads"}:
        device = device_for(me.runtime, 0, me.devices)
        engine = serving.build_engine(me.engine, device)
        host.local = serving.setup(engine, registry, settings.model_cache, me.models, device)
        log.info("engine.ready", engine=me.engine, models=list(me.models), device=device)
    return host


def process_serving(me: WorkerIdentity, settings: Settings) -> serving.Serving:
    """The serving state of this process, set up now if the process has none yet.

    A pool process of a vLLM worker gets a client of the parent's server; an in-process
    engine whose pool process was not initialised by ``install`` loads here.
    """
    state = serving.current()
    if state is not None:
        return state
    registry = registry_from_file(settings.config_path)
    if me.engine == "vllm":
        from workers.engines.vllm import VllmEngine  # noqa: PLC0415

        client = VllmEngine.from_env(os.environ)
        if client is None:
            raise EngineError("vllm: no server named in this pool process's environment")
        return serving.setup(client, registry, settings.model_cache, me.models, "server")
    device = device_for(me.runtime, 0, me.devices)
    engine = serving.build_engine(me.engine, device)
    return serving.setup(engine, registry, settings.model_cache, me.models, device)

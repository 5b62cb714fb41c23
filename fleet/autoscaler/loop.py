"""The control loop: hold the lease, observe, plan, act, remember; again every interval.

``Autoscaler.step(now)`` is one pass (``fleet autoscale --once`` and the tests call it);
``run`` repeats it until stopped. A standby (lease held elsewhere) observes nothing and
acts on nothing; it takes over when the lease expires. Only pools whose provider is
available here are planned: a pool on a cloud whose provider is not installed is listed
as skipped, never half-acted on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
from celery import Celery

from fleet.autoscaler.actuator import ActReport, Actuator
from fleet.autoscaler.config import AutoscalerConfig
from fleet.autoscaler.lock import Lease
from fleet.autoscaler.memory import carry_samples, smooth_load
from fleet.autoscaler.model import Plan, PoolHistory, Snapshot
from fleet.autoscaler.observe import observe
from fleet.autoscaler.planner import busy_pools
from fleet.autoscaler.planner import plan as make_plan
from fleet.catalog import Catalog
from fleet.providers.base import Provider
from fleet.settings import Settings, is_redis_url
from fleet.tls import redis_client

log = logging.getLogger("fleet.autoscaler")


@dataclass
class StepReport:
    """One pass: whether this autoscaler was active, and what it saw, planned and did."""

    active: bool
    snapshot: Snapshot | None = None
    plan: Plan | None = None
    acted: ActReport | None = None
    skipped_pools: list[str] = field(default_factory=list)


def available_providers(config: AutoscalerConfig, settings: Settings) -> dict[str, Provider]:
    """Providers this installation can drive for the configured pools (local, fake; clouds later)."""
    from fleet.providers.fake import FakeProvider  # noqa: PLC0415 - only when a pool uses it
    from fleet.providers.local import LocalProvider  # noqa: PLC0415

    wanted: set[str] = {p.provider for p in config.pools}
    out: dict[str, Provider] = {}
    if "local" in wanted:
        env = {
            "FLEET_BROKER_URL": settings.broker_url,
            "FLEET_RESULT_BACKEND": settings.result_backend,
            "FLEET_NAMESPACE": settings.namespace,
            "FLEET_ARTIFACT_DIR": str(settings.artifact_dir),
        }
        state = Path(config.fleet.local_state_dir)
        out["local"] = LocalProvider(env, state, state / "logs")
    if "fake" in wanted:
        out["fake"] = FakeProvider(start_running=True)
    out.update(cloud_providers(config, wanted))
    return out


BOOTSTRAP = Path(__file__).resolve().parents[2] / "infra" / "bootstrap"


def _bootstrap(name: str) -> str:
    path = BOOTSTRAP / name
    return path.read_text() if path.exists() else ""


def cloud_providers(config: AutoscalerConfig, wanted: set[str]) -> dict[str, Provider]:
    """AWS, GCP and Azure providers for the clouds that have pools and settings.

    A cloud whose SDK is not installed (its extra: ``fleet[aws]`` ...) is skipped, and its
    pools with it, never half-driven.
    """
    out: dict[str, Provider] = {}
    settings = config.providers
    name = config.fleet_tag
    if "aws" in wanted and settings.aws is not None:
        try:
            from fleet.providers.aws import AwsProvider  # noqa: PLC0415 - optional SDK
        except ImportError:
            log.warning("pools on aws skipped: install fleet[aws]")
        else:
            a = settings.aws
            out["aws"] = AwsProvider(a.region, fleet_name=name, image_id=a.image_id, subnet_id=a.subnet_id,
                                     security_group_ids=a.security_group_ids, instance_profile=a.instance_profile,
                                     user_data=_bootstrap("cloud-init.yaml"), endpoint_url=a.endpoint_url)  # fmt: skip
    if "gcp" in wanted and settings.gcp is not None:
        try:
            from fleet.providers.gcp import GcpProvider  # noqa: PLC0415 - optional SDK
        except ImportError:
            log.warning("pools on gcp skipped: install fleet[gcp]")
        else:
            g = settings.gcp
            out["gcp"] = GcpProvider(g.project, g.zone, fleet_name=name, image=g.image, network=g.network,
                                     service_account=g.service_account, startup_script=_bootstrap("gce-startup.sh"))  # fmt: skip
    if "azure" in wanted and settings.azure is not None:
        try:
            from fleet.providers.azure import AzureProvider  # noqa: PLC0415 - optional SDK
        except ImportError:
            log.warning("pools on azure skipped: install fleet[azure]")
        else:
            z = settings.azure
            out["azure"] = AzureProvider(z.subscription_id, z.resource_group, z.location, fleet_name=name,
                                         subnet_id=z.subnet_id, custom_data=_bootstrap("cloud-init.yaml"))  # fmt: skip
    return out


class Autoscaler:
    """Observe, plan, act, with one lease so that one autoscaler acts at a time."""

    def __init__(
        self,
        config: AutoscalerConfig,
        settings: Settings,
        catalog: Catalog,
        app: Celery,
        providers: Mapping[str, Provider],
        lease: Lease | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Build; ``lease`` None means no locking (tests, --dry-run)."""
        self.settings = settings
        self.catalog = catalog
        self.app = app
        self.providers = dict(providers)
        self.lease = lease
        self.clock = clock
        self.skipped = [p.name for p in config.pools if p.provider not in self.providers]
        usable = tuple(p for p in config.pools if p.provider in self.providers)
        self.config = config.model_copy(update={"pools": usable})
        self.actuator = Actuator(self.config, self.providers, app)
        self.history: dict[str, PoolHistory] = {}
        self.samples: dict[str, tuple[float, float]] = {}  # last head sample per queue
        self.loads: dict[str, tuple[float, float]] = {}  # smoothed running load per queue

    def step(self, *, dry_run: bool = False, now: float | None = None) -> StepReport:
        """One pass of the loop."""
        now = self.clock() if now is None else now
        if self.lease is not None and not self.lease.acquire():
            return StepReport(active=False, skipped_pools=self.skipped)
        horizon = max((p.capacity_backoff_s for p in self.config.pools), default=0.0)
        snapshot = observe(
            settings=self.settings,
            catalog=self.catalog,
            app=self.app,
            providers=self.providers,
            now=now,
            draining=self.actuator.draining,
            errors=self.actuator.recent_errors(now, horizon),
            history=self.history,
            models=self.config.registry,
        )
        queues = carry_samples(snapshot.queues, self.samples)
        queues = smooth_load(queues, self.loads, now, self.config.fleet.namespace)
        snapshot = replace(snapshot, queues=queues)
        decided = make_plan(snapshot, self.config, self.catalog, now)
        acted = None if dry_run else self.actuator.act(decided, snapshot, now)
        if not dry_run:
            self._remember(snapshot, decided, now)
        return StepReport(
            active=True, snapshot=snapshot, plan=decided, acted=acted, skipped_pools=self.skipped
        )

    def _remember(self, snapshot: Snapshot, decided: Plan, now: float) -> None:
        busy = busy_pools(snapshot, self.config, self.catalog)
        for d in decided.decisions:
            old = self.history.get(d.pool, PoolHistory())
            self.history[d.pool] = PoolHistory(
                last_busy_at=now if d.pool in busy else old.last_busy_at,
                last_scale_out_at=now if d.launches else old.last_scale_out_at,
                last_scale_in_at=now if d.terminations else old.last_scale_in_at,
            )

    def run(
        self, stop: threading.Event, on_step: Callable[[StepReport], None] | None = None
    ) -> None:
        """Step every ``loop_interval_s`` until ``stop`` is set; release the lease on the way out."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    report = self.step()
                except (redis.RedisError, OSError) as exc:
                    log.warning(
                        "autoscaler step failed, retrying next interval: %s", type(exc).__name__
                    )
                else:
                    if on_step is not None:
                        on_step(report)
                stop.wait(
                    max(0.0, self.config.fleet.loop_interval_s - (time.monotonic() - started))
                )
        finally:
            if self.lease is not None and self.lease.held:
                self.lease.release()


def lease_for(config: AutoscalerConfig, settings: Settings, lock_url: str | None) -> Lease:
    """The autoscaler lease in the broker's Redis, or in ``lock_url`` (FLEET_LOCK_URL).

    Raises:
        ValueError: the broker is not Redis and no lock URL was given.

    """
    url = lock_url or (settings.broker_url if is_redis_url(settings.broker_url) else None)
    if url is None:
        raise ValueError(
            "the broker is not Redis: set FLEET_LOCK_URL to a Redis for the autoscaler lease"
        )
    return Lease(redis_client(url, settings.tls), config.fleet.lock_ttl_s, settings.namespace)


def build_autoscaler(
    config: AutoscalerConfig, settings: Settings, *, locked: bool, lock_url: str | None = None
) -> Autoscaler:
    """An autoscaler as ``fleet autoscale`` builds it.

    It gets the catalog, a Celery app, the providers available here and, when ``locked``,
    the lease.
    """
    from fleet.app import create_app  # noqa: PLC0415 - builds a Celery app; only when asked
    from fleet.catalog import default_catalog  # noqa: PLC0415

    lease = lease_for(config, settings, lock_url) if locked else None
    return Autoscaler(
        config,
        settings,
        default_catalog(),
        create_app(settings),
        available_providers(config, settings),
        lease,
    )

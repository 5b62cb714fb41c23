"""Spot interruption notices: watch the cloud's metadata service, drain before the machine goes.

A daemon thread in the worker's main process polls, every ``FLEET_PREEMPTION_POLL_S``
seconds (default 5), the metadata endpoint of the cloud it runs on (``FLEET_CLOUD``
``aws|gcp|azure``, else detected from the DMI vendor; ``none`` turns the watcher off).
``FLEET_METADATA_URL`` replaces the base URL ``http://169.254.169.254`` (tests serve a
local fake there, ``tests/fakes/metadata_server.py``).

==========  ===========================================================  ====================
cloud       request                                                      a notice is
==========  ===========================================================  ====================
aws         PUT ``/latest/api/token`` (IMDSv2), then GET                   200 with JSON
            ``/latest/meta-data/spot/instance-action`` with the token     ``{"action", "time"}``
gcp         GET ``/computeMetadata/v1/instance/preempted``                 body ``TRUE``
            (``Metadata-Flavor: Google``)
azure       GET ``/metadata/scheduledevents?api-version=2020-07-01``       an event with
            (``Metadata: true``)                                           ``EventType: Preempt``
==========  ===========================================================  ====================

The parsers (``parse_aws``, ``parse_gcp``, ``parse_azure``: status and body in, ``Notice``
or None out) are pure: a malformed body is no notice, never an exception. The HTTP is
``MetadataClient``; the thread is ``PreemptionWatcher``, with its clock injected.

On a notice the worker (``install``) logs ``worker.preempted`` (cloud, action, deadline),
records the interruption where the autoscaler reads it (``fleet.registry``), and drains
through ``workers.shutdown``: running tasks get ``min(grace, time left - margin)``
(``FLEET_PREEMPTION_MARGIN_S``, default 10), the rest go back to their queues unacked.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import redis
from celery import signals

from fleet.execution import state_url
from fleet.obs.logs import get_logger
from fleet.registry import InterruptionRecord, record_interruption
from fleet.settings import Settings
from fleet.tls import redis_client
from workers.shutdown import GracefulStop, drain_budget, stop_process

log = get_logger("fleet.worker")

CLOUDS = ("aws", "gcp", "azure")
DEFAULT_METADATA_URL = "http://169.254.169.254"
DEFAULT_POLL_S = 5.0
DEFAULT_MARGIN_S = 10.0
HTTP_TIMEOUT_S = 2.0
# Notice windows the clouds document, used when a notice does not carry its own time.
AWS_NOTICE_S = 120.0  # spot instance interruption notice: two minutes
GCP_NOTICE_S = 30.0  # preemptible / spot VMs: 30 s to shut down
AZURE_NOTICE_S = 30.0  # Spot eviction: at least 30 s (scheduled events)
AWS_TOKEN_TTL_S = 21600
AWS_ACTIONS = frozenset({"terminate", "stop", "hibernate"})
DMI_VENDOR = Path("/sys/class/dmi/id/sys_vendor")


@dataclass(frozen=True, slots=True)
class Notice:
    """The machine will be taken away: by ``deadline`` (epoch seconds), for ``action``."""

    cloud: str
    action: str  # aws: terminate | stop | hibernate; gcp and azure: preempt
    deadline: float


# --- pure parsers: (HTTP status, body, now) -> Notice | None


def _json(body: bytes) -> Any:  # noqa: ANN401 - any JSON value
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def parse_aws(status: int, body: bytes, now: float) -> Notice | None:
    """``spot/instance-action``: 404 is no notice; 200 ``{"action", "time"}`` is one.

    ``time`` is ISO 8601 UTC (``2026-11-23T05:58:00Z``); when it is missing or unreadable
    the documented two minutes from ``now`` apply.
    """
    data = _json(body) if status == 200 else None  # noqa: PLR2004 - HTTP OK
    if not isinstance(data, dict) or data.get("action") not in AWS_ACTIONS:
        return None
    deadline = _iso_epoch(data.get("time"))
    return Notice("aws", str(data["action"]), now + AWS_NOTICE_S if deadline is None else deadline)


def parse_gcp(status: int, body: bytes, now: float) -> Notice | None:
    """``instance/preempted``: body ``TRUE`` is a notice (30 s left), anything else is none."""
    if status != 200 or body.strip().upper() != b"TRUE":  # noqa: PLR2004 - HTTP OK
        return None
    return Notice("gcp", "preempt", now + GCP_NOTICE_S)


def parse_azure(status: int, body: bytes, now: float, resource: str | None = None) -> Notice | None:
    """Scheduled events: an event of type ``Preempt`` is a notice.

    Its ``NotBefore`` (RFC 1123, ``Mon, 19 Sep 2016 18:29:47 GMT``) is the deadline; an
    empty one means the event has started (deadline ``now``), an unreadable one gets the
    documented 30 s. With ``resource`` (this VM's name), an event whose ``Resources``
    list names other VMs only is not ours. The earliest of several events wins.
    """
    data = _json(body) if status == 200 else None  # noqa: PLR2004 - HTTP OK
    events = data.get("Events") if isinstance(data, dict) else None
    deadlines: list[float] = []
    for event in events if isinstance(events, list) else ():
        if not isinstance(event, dict) or event.get("EventType") != "Preempt":
            continue
        resources = event.get("Resources")
        if resource and isinstance(resources, list) and resources and resource not in resources:
            continue
        not_before = event.get("NotBefore")
        if not_before == "":
            deadlines.append(now)
        else:
            parsed = _rfc1123_epoch(not_before)
            deadlines.append(now + AZURE_NOTICE_S if parsed is None else parsed)
    return Notice("azure", "preempt", min(deadlines)) if deadlines else None


def _iso_epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _rfc1123_epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def cloud_from_dmi(vendor: str) -> str | None:
    """The cloud a DMI ``sys_vendor`` string names (``Amazon EC2``, ``Google``, ``Microsoft Corporation``)."""
    v = vendor.strip().lower()
    if v.startswith("amazon"):
        return "aws"
    if v.startswith("google"):
        return "gcp"
    if v.startswith("microsoft"):
        return "azure"
    return None


def resolve_cloud(environ: Mapping[str, str], dmi_vendor: str | None) -> str | None:
    """``FLEET_CLOUD`` when set (``none`` switches the watcher off), else the DMI vendor's cloud.

    Raises:
        ValueError: ``FLEET_CLOUD`` names no known cloud.

    """
    named = environ.get("FLEET_CLOUD", "").strip().lower()
    if named == "none":
        return None
    if named:
        if named not in CLOUDS:
            raise ValueError(f"FLEET_CLOUD must be one of aws, gcp, azure, none; got {named!r}")
        return named
    return cloud_from_dmi(dmi_vendor) if dmi_vendor else None


# --- thin HTTP


class MetadataClient:
    """Reads the interruption endpoint of one cloud's metadata service (I/O only)."""

    def __init__(
        self,
        cloud: str,
        base_url: str = DEFAULT_METADATA_URL,
        *,
        timeout_s: float = HTTP_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare for ``cloud``; nothing is sent until ``fetch``."""
        if cloud not in CLOUDS:
            raise ValueError(f"unknown cloud {cloud!r}")
        self.cloud = cloud
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._token_until = 0.0

    def fetch(self) -> tuple[int, bytes]:
        """(status, body) of the cloud's interruption endpoint; 0 and b"" when unreachable."""
        if self.cloud == "gcp":
            return self._get(
                "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}
            )
        if self.cloud == "azure":
            return self._get(
                "/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"}
            )
        status, body = self._get_aws()
        if status == 401:  # noqa: PLR2004 - the token expired: one fresh try
            self._token = None
            status, body = self._get_aws()
        return status, body

    def _get_aws(self) -> tuple[int, bytes]:
        token = self._aws_token()
        if token is None:
            return 0, b""
        return self._get(
            "/latest/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": token}
        )

    def _aws_token(self) -> str | None:
        if self._token is not None and self._clock() < self._token_until:
            return self._token
        status, body = self._request(
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
        )
        if status != 200 or not body:  # noqa: PLR2004 - HTTP OK
            return None
        self._token = body.decode("ascii", "replace").strip()
        self._token_until = self._clock() + AWS_TOKEN_TTL_S - 60
        return self._token

    def _get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        return self._request("GET", path, headers)

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        url = self.base_url + path
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"metadata URL must be http(s): {self.base_url!r}")
        req = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 - scheme checked above
        try:
            with urllib.request.urlopen(req, timeout=self._timeout_s) as resp:  # noqa: S310 - scheme checked above
                return int(resp.status), resp.read(1 << 16)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(1 << 16) if exc.fp is not None else b""
        except (OSError, ValueError):
            return 0, b""


def check(client: MetadataClient, now: float, resource: str | None = None) -> Notice | None:
    """One poll: fetch the cloud's endpoint and parse it."""
    status, body = client.fetch()
    if client.cloud == "aws":
        return parse_aws(status, body, now)
    if client.cloud == "gcp":
        return parse_gcp(status, body, now)
    return parse_azure(status, body, now, resource)


# --- the thread


class PreemptionWatcher:
    """Polls ``poll`` every ``interval_s`` until it returns a notice, then calls ``on_notice`` once."""

    def __init__(
        self,
        poll: Callable[[float], Notice | None],
        on_notice: Callable[[Notice], None],
        *,
        interval_s: float = DEFAULT_POLL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare; call ``start``. ``clock`` gives wall-clock seconds (notices carry wall times)."""
        self._poll = poll
        self._on_notice = on_notice
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-preemption", daemon=True)
        self.notice: Notice | None = None

    def poll_once(self) -> Notice | None:
        """Poll now; a notice is handed to ``on_notice`` (once per watcher)."""
        if self.notice is not None:
            return self.notice
        notice = self._poll(self._clock())
        if notice is not None:
            self.notice = notice
            self._on_notice(notice)
        return notice

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.poll_once() is not None:
                    return
            except Exception as exc:  # noqa: BLE001 - a watcher bug must never kill the worker
                log.warning("preemption.poll_failed", error=type(exc).__name__)
            self._stop.wait(self._interval_s)

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the thread ends within one interval)."""
        self._stop.set()


def env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    """A float setting >= 0 from the environment.

    Raises:
        ValueError: the value is not a number >= 0.

    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {raw!r}")
    return value


def read_dmi_vendor(path: Path = DMI_VENDOR) -> str | None:
    """Return the DMI vendor string, or None where there is none (containers, macOS)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def deadline_iso(deadline: float) -> str:
    """``deadline`` (epoch seconds) as ISO 8601 UTC, for logs."""
    return datetime.fromtimestamp(deadline, tz=UTC).isoformat(timespec="seconds")


# --- wiring into the worker process


def install(
    stop: GracefulStop,
    node: str,
    namespace: str,
    environ: Mapping[str, str] | None = None,
) -> PreemptionWatcher | None:
    """Start the watcher when the worker is ready (main process); None when it is off.

    On a notice: log ``worker.preempted``, record the interruption (``fleet.registry``, in
    the state store when there is one), then drain through ``stop`` with
    ``min(grace, time left - margin)`` and SIGTERM this process.

    Raises:
        ValueError: a malformed ``FLEET_CLOUD`` or interval setting.

    """
    env = os.environ if environ is None else environ
    cloud = resolve_cloud(env, read_dmi_vendor())
    if cloud is None:
        log.info("preemption.off", reason="no cloud named (FLEET_CLOUD) or detected")
        return None
    interval_s = env_float(env, "FLEET_PREEMPTION_POLL_S", DEFAULT_POLL_S)
    margin_s = env_float(env, "FLEET_PREEMPTION_MARGIN_S", DEFAULT_MARGIN_S)
    client = MetadataClient(cloud, env.get("FLEET_METADATA_URL") or DEFAULT_METADATA_URL)
    instance_id = env.get("FLEET_INSTANCE_ID") or None
    store = _store(env)

    def on_notice(notice: Notice) -> None:
        now = time.time()
        budget = drain_budget(stop.grace_s, now, notice.deadline, margin_s)
        log.warning(
            "worker.preempted",
            cloud=notice.cloud,
            action=notice.action,
            deadline=deadline_iso(notice.deadline),
            seconds_left=round(notice.deadline - now, 1),
            drain_budget_s=round(budget, 1),
            instance_id=instance_id,
        )
        record = InterruptionRecord(
            hostname=node,
            cloud=notice.cloud,
            action=notice.action,
            at=now,
            deadline=notice.deadline,
            instance_id=instance_id,
            offer=env.get("FLEET_OFFER") or None,
            region=env.get("FLEET_REGION") or None,
            instance_type=env.get("FLEET_INSTANCE_TYPE") or None,
        )
        if store is not None:
            try:
                record_interruption(store, record, namespace)
            except redis.RedisError as exc:
                log.warning("preemption.record_failed", error=type(exc).__name__)
        stop.begin(budget, "preempted")
        stop_process()

    watcher = PreemptionWatcher(
        lambda now: check(client, now, instance_id), on_notice, interval_s=interval_s
    )

    @signals.worker_ready.connect(weak=False)
    def _start(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        watcher.start()
        log.info("preemption.watching", cloud=cloud, interval_s=interval_s)

    @signals.worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:  # noqa: ANN401 - Celery signal arguments
        watcher.stop()

    return watcher


def _store(env: Mapping[str, str]) -> redis.Redis | None:
    settings = Settings.from_env(env)
    url = state_url(env, settings.broker_url)
    return redis_client(url, settings.tls) if url else None

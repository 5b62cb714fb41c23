"""The Compute Engine provider: GPU VMs in one project and zone (``fleet.providers.base``).

The only module that imports ``google-cloud-compute``. It talks REST (the library's
``transport="rest"``), so tests point it at a local HTTP fake with
``client_options={"api_endpoint": "http://127.0.0.1:PORT"}`` and anonymous credentials.
What it promises beyond the provider contract:

* **Names from tokens.** An instance is named ``fleet-`` + the first 20 hex digits of
  ``sha1(token)`` (a valid GCE name), and ``Instance.id`` is that name. Launch first GETs
  the name: an instance that exists is returned and nothing is inserted. The insert
  carries ``request_id = uuid5(token)`` (GCE's own idempotency key), so a retried insert
  whose first answer was lost creates nothing new; a 409 (already exists) returns the
  existing instance.
* **Tags.** Labels ``fleet``, ``fleet-pool``, ``fleet-accelerator`` and ``fleet-token``
  hold label-safe values (lower case ``[a-z0-9_-]``, at most 63 characters; a value that
  had to change ends in a hash of the original, the token is always hashed). The exact
  values live in metadata items of the same names, with ``fleet-offer`` (the offer key),
  ``fleet-usd-per-hour`` and ``fleet-devices``, from which ``list_instances`` rebuilds
  the instance. ``fleet-env`` holds ``LaunchRequest.env`` as JSON (never secrets, per the
  contract); ``startup-script`` the configured script.
* **Where.** Every instance is created in the provider's zone; ``offer.region`` is not
  consulted (catalog offers name regions, the zone is configuration). The machine type is
  ``zones/{zone}/machineTypes/{offer.instance_type}``.
* **Accelerators.** A2, A3 and G2 machine types carry their GPUs built in: no guest
  accelerators are attached. Only ``n1-*`` types get ``guest_accelerators`` (count
  ``request.devices``) for the families in ``N1_ACCELERATORS``. GPU instances use
  ``on_host_maintenance=TERMINATE`` (GCE cannot live-migrate them). TPU offers
  (``tpu-*``) are TPU VMs of another API: launching one is ``UNSUPPORTED``.
* **Spot.** ``market == "spot"`` sets ``provisioning_model=SPOT`` with
  ``instance_termination_action=DELETE`` (a preempted VM disappears, like a terminated
  one) and no automatic restart; listing reads the market back from the provisioning
  model.
* **Waiting.** Insert waits on the library's ``ExtendedOperation.result`` up to
  ``operation_timeout_s``; an insert still running then is returned as a PENDING
  instance (the token keeps a retry idempotent). Delete does not wait: GCE deletes
  asynchronously and listing shows the instance TERMINATING until it is gone.
* **Errors are data.** API and operation errors map to ``ErrorKind`` by their GCE codes
  (see ``error_kind``); 429s and ``rateLimitExceeded`` (and 503s) are retried with the
  library's ``Retry`` for ``retry_timeout_s`` before THROTTLED is reported. Messages
  carry the error class, codes and server message, never credentials.
* **States.** PROVISIONING, STAGING and REPAIRING list as PENDING; RUNNING as RUNNING;
  STOPPING, STOPPED, SUSPENDING, SUSPENDED and TERMINATED as TERMINATING.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exceptions
from google.cloud import compute_v1

from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, OfferRef, ProviderError
from fleet.providers.base import (
    ACCELERATOR_TAG,
    FLEET_TAG,
    POOL_TAG,
    TOKEN_TAG,
    LaunchRequest,
    LaunchResult,
)

OFFER_KEY = "fleet-offer"
PRICE_KEY = "fleet-usd-per-hour"
DEVICES_KEY = "fleet-devices"
ENV_KEY = "fleet-env"
STARTUP_KEY = "startup-script"
# Namespace of the insert request ids (uuid5 of the token): fixed forever.
REQUEST_ID_NAMESPACE = uuid.UUID("6b0e5f0e-3c57-4c8e-9a59-6f1d8c2a7f10")
# N1 machine types take GPUs as guest accelerators; newer families have them built in.
N1_ACCELERATORS = {
    "nvidia-t4": "nvidia-tesla-t4",
    "nvidia-v100": "nvidia-tesla-v100",
    "nvidia-p100": "nvidia-tesla-p100",
    "nvidia-p4": "nvidia-tesla-p4",
}
GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

_STATES = {
    "PROVISIONING": InstanceState.PENDING,
    "STAGING": InstanceState.PENDING,
    "REPAIRING": InstanceState.PENDING,
    "RUNNING": InstanceState.RUNNING,
}
_CAPACITY = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "RESOURCE_POOL_EXHAUSTED",
}
_QUOTA = {"QUOTA_EXCEEDED", "QUOTAEXCEEDED"}
_THROTTLED = {"RATELIMITEXCEEDED", "USERRATELIMITEXCEEDED", "RATE_LIMIT_EXCEEDED"}
_UNSUPPORTED = {"UNSUPPORTED_OPERATION", "INVALID_MACHINE_TYPE"}
_LABEL_OK = re.compile(r"[a-z0-9_-]{0,63}")
_HTTP_TOO_MANY = 429
_MAX_MESSAGE = 500


def instance_name(token: str) -> str:
    """The GCE instance name for a launch token (``fleet-`` + 20 hex digits of its sha1)."""
    return "fleet-" + hashlib.sha1(token.encode(), usedforsecurity=False).hexdigest()[:20]


def request_id(token: str) -> str:
    """The insert's ``request_id`` for a launch token: a UUID derived from it (uuid5)."""
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, token))


def label_value(value: str, *, always_hash: bool = False) -> str:
    """``value`` as a GCE label value: itself if valid, else a sanitised prefix plus a hash."""
    if not always_hash and _LABEL_OK.fullmatch(value):
        return value
    digest = hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()[:16]
    cleaned = re.sub(r"[^a-z0-9_-]", "-", value.lower())[:40]
    return f"{cleaned}-{digest}" if cleaned else digest


def _cause(exc: BaseException) -> BaseException:
    """The last error behind a ``RetryError`` (retries ran out), else ``exc`` itself."""
    cause = exc.cause if isinstance(exc, gexc.RetryError) else None
    return cause if isinstance(cause, BaseException) else exc


def _details(exc: BaseException) -> list[tuple[str, str]]:
    """(code or reason, message) of each error item an API or operation exception carries."""
    out: list[tuple[str, str]] = []
    for item in getattr(exc, "errors", None) or ():
        if isinstance(item, Mapping):
            code = item.get("reason") or item.get("code") or ""
            message = item.get("message") or ""
        else:  # compute_v1.Errors from an operation
            code = getattr(item, "code", "") or getattr(item, "reason", "")
            message = getattr(item, "message", "")
        out.append((str(code), str(message)))
    return out


def _codes(exc: BaseException) -> set[str]:
    """Every error code or reason an API or operation exception carries, upper case."""
    out: set[str] = set()
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        out.add(reason.upper())
    for item in getattr(exc, "errors", None) or ():
        if isinstance(item, Mapping):
            values = [item.get("reason"), item.get("code")]
        else:  # compute_v1.Errors from an operation
            values = [getattr(item, "code", None), getattr(item, "reason", None)]
        out.update(v.upper() for v in values if isinstance(v, str) and v)
    return out


def error_kind(exc: BaseException) -> ErrorKind:
    """The taxonomy kind of a google-api-core (or operation) exception.

    Codes first (``ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS]``/``RESOURCE_POOL_EXHAUSTED``
    -> CAPACITY, ``QUOTA_EXCEEDED`` -> QUOTA, ``rateLimitExceeded`` -> THROTTLED,
    ``UNSUPPORTED_OPERATION``/invalid machine type -> UNSUPPORTED), then the HTTP status
    (429 -> THROTTLED, 404 naming a machine type -> UNSUPPORTED, 401/403 -> AUTH), else OTHER.
    """
    exc = _cause(exc)
    codes = _codes(exc)
    text = str(exc)
    by_code = (
        (_CAPACITY, ErrorKind.CAPACITY),
        (_QUOTA, ErrorKind.QUOTA),
        (_THROTTLED, ErrorKind.THROTTLED),
        (_UNSUPPORTED, ErrorKind.UNSUPPORTED),
    )
    for known, kind in by_code:
        if codes & known or any(code in text for code in known if "_" in code):
            return kind
    if isinstance(exc, gexc.TooManyRequests):
        return ErrorKind.THROTTLED
    if isinstance(exc, gexc.NotFound) and "machineType" in text:
        return ErrorKind.UNSUPPORTED
    if isinstance(exc, gexc.Unauthorized | gexc.Forbidden | auth_exceptions.GoogleAuthError):
        return ErrorKind.AUTH
    return ErrorKind.OTHER


def _message(exc: BaseException, doing: str) -> str:
    """A one-line, credential-free description of a failed call."""
    exc = _cause(exc)
    codes = ",".join(sorted(_codes(exc)))
    messages = [m for _, m in _details(exc) if m]
    detail = "; ".join(messages) or getattr(exc, "message", None) or str(exc)
    text = f"gcp {doing}: {type(exc).__name__}" + (f" [{codes}]" if codes else "")
    return f"{text}: {detail}"[:_MAX_MESSAGE]


def _retryable(exc: BaseException) -> bool:
    """Throttling (429, rateLimitExceeded) and 503s: worth the library's retry."""
    if isinstance(exc, gexc.TooManyRequests | gexc.ServiceUnavailable):
        return not (_codes(exc) & _CAPACITY)
    return bool(_codes(exc) & _THROTTLED)


def _launched_at(resource: compute_v1.Instance, default: float) -> float:
    try:
        return datetime.fromisoformat(resource.creation_timestamp).timestamp()
    except ValueError:
        return default


class GcpProvider:
    """Compute Engine VMs in one project and zone, tagged for one fleet (see the module)."""

    name = "gcp"

    def __init__(
        self,
        project: str,
        zone: str,
        *,
        fleet_name: str = "fleet",
        image: str = "projects/debian-cloud/global/images/family/debian-12",
        network: str = "global/networks/default",
        service_account: str | None = None,
        startup_script: str = "",
        client: compute_v1.InstancesClient | None = None,
        operation_timeout_s: float = 300.0,
        retry_timeout_s: float = 60.0,
    ) -> None:
        """Configure the provider; the client defaults to REST with the standard credentials chain.

        Args:
            project: the GCP project id.
            zone: the zone every instance is created in (e.g. ``us-central1-a``).
            fleet_name: the value of the ``fleet`` label this provider launches and lists.
            image: the boot disk's source image (a family URL works).
            network: the network of the single interface (with an external NAT address).
            service_account: the instance's service account (cloud-platform scope), if any.
            startup_script: the ``startup-script`` metadata item.
            client: an ``InstancesClient`` to use (tests pass one aimed at a fake); None
                builds ``InstancesClient(transport="rest")`` on first use.
            operation_timeout_s: how long launch waits for the insert operation.
            retry_timeout_s: how long throttled calls are retried before THROTTLED.

        """
        self.project = project
        self.zone = zone
        self.fleet_name = fleet_name
        self.image = image
        self.network = network
        self.service_account = service_account
        self.startup_script = startup_script
        self.operation_timeout_s = operation_timeout_s
        self._client = client
        self._retry = gretry.Retry(
            predicate=_retryable, initial=0.2, maximum=5.0, multiplier=2.0, timeout=retry_timeout_s
        )

    # -- the Provider contract -------------------------------------------------------

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Create one VM for ``request``, idempotently by its token (GET first, then insert).

        Returns:
            The new instance (PENDING), the one this token already made, or an error.

        """
        offer = request.offer
        if offer.instance_type.startswith("tpu-"):
            return LaunchResult(
                error=ProviderError(
                    request.pool,
                    offer,
                    ErrorKind.UNSUPPORTED,
                    f"gcp launch: {offer.instance_type} is a TPU VM, not a Compute Engine machine type",
                    now,
                )
            )
        name = instance_name(request.token)
        try:
            client = self._instances()
            existing = self._get(client, name)
            if existing is not None:
                return LaunchResult(instance=self._to_instance(existing, now))
            insert = compute_v1.InsertInstanceRequest(
                project=self.project,
                zone=self.zone,
                instance_resource=self._resource(name, request),
                request_id=request_id(request.token),
            )
            operation = client.insert(request=insert, retry=self._retry)
            # google-api-core's ExtendedOperation is untyped.
            operation.result(timeout=self.operation_timeout_s)  # type: ignore[no-untyped-call]
        except gexc.Conflict:
            found = self._refetch(name, request, now)
            if isinstance(found, ProviderError):
                return LaunchResult(error=found)
            return LaunchResult(instance=found)
        except concurrent.futures.TimeoutError:
            pass  # still being created: report it pending, the token keeps a retry idempotent
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes data
            return LaunchResult(error=self._error(request.pool, offer, exc, "launch", now))
        return LaunchResult(
            instance=Instance(
                id=name,
                pool=request.pool,
                offer=offer,
                state=InstanceState.PENDING,
                launched_at=now,
                token=request.token,
                usd_per_hour=request.usd_per_hour,
                devices=request.devices,
            )
        )

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """Delete the VM named ``instance_id``; None once accepted, or if it is already gone."""
        try:
            operation = self._instances().delete(
                project=self.project, zone=self.zone, instance=instance_id, retry=self._retry
            )
            if operation.status == compute_v1.Operation.Status.DONE:
                failure = operation.exception()  # type: ignore[no-untyped-call] # untyped in api-core
                if failure is not None and not isinstance(failure, gexc.NotFound):
                    return self._error("", None, failure, "terminate", now)
        except gexc.NotFound:
            return None
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes data
            return self._error("", None, exc, "terminate", now)
        return None

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every VM in the project (any zone) whose ``fleet`` label is this fleet's."""
        label = label_value(self.fleet_name)
        request = compute_v1.AggregatedListInstancesRequest(
            project=self.project, filter=f'labels.fleet = "{label}"'
        )
        try:
            pages = self._instances().aggregated_list(request=request, retry=self._retry)
            out = [
                self._to_instance(resource, now)
                for _, scoped in pages
                for resource in scoped.instances
                if resource.labels.get(FLEET_TAG) == label
            ]
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes data
            return self._error("", None, exc, "list", now)
        return out

    # -- internals -------------------------------------------------------------------

    def _instances(self) -> compute_v1.InstancesClient:
        if self._client is None:
            self._client = compute_v1.InstancesClient(transport="rest")
        return self._client

    def _get(self, client: compute_v1.InstancesClient, name: str) -> compute_v1.Instance | None:
        try:
            return client.get(
                project=self.project, zone=self.zone, instance=name, retry=self._retry
            )
        except gexc.NotFound:
            return None

    def _refetch(self, name: str, request: LaunchRequest, now: float) -> Instance | ProviderError:
        try:
            existing = self._get(self._instances(), name)
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes data
            return self._error(request.pool, request.offer, exc, "launch", now)
        if existing is None:
            return ProviderError(
                request.pool,
                request.offer,
                ErrorKind.OTHER,
                f"gcp launch: {name} conflicts but is not found",
                now,
            )
        return self._to_instance(existing, now)

    def _error(
        self, pool: str, offer: OfferRef | None, exc: BaseException, doing: str, now: float
    ) -> ProviderError:
        return ProviderError(pool, offer, error_kind(exc), _message(exc, doing), now)

    def _resource(self, name: str, request: LaunchRequest) -> compute_v1.Instance:
        offer = request.offer
        machine = offer.instance_type
        gpu = request.accelerator != "cpu" or machine.startswith(GPU_FAMILIES)
        tags = request.tags()
        labels = {key: label_value(value) for key, value in tags.items()}
        labels[FLEET_TAG] = label_value(self.fleet_name)
        labels[TOKEN_TAG] = label_value(request.token, always_hash=True)
        items = {
            **tags,
            FLEET_TAG: self.fleet_name,
            OFFER_KEY: offer.key,
            PRICE_KEY: repr(request.usd_per_hour),
            DEVICES_KEY: str(request.devices),
            ENV_KEY: json.dumps(dict(request.env), sort_keys=True),
        }
        if self.startup_script:
            items[STARTUP_KEY] = self.startup_script
        scheduling = compute_v1.Scheduling(
            on_host_maintenance="TERMINATE" if gpu else "MIGRATE",
            automatic_restart=offer.market != "spot",
        )
        if offer.market == "spot":
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "DELETE"
        resource = compute_v1.Instance(
            name=name,
            machine_type=f"zones/{self.zone}/machineTypes/{machine}",
            labels=labels,
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]
            ),
            scheduling=scheduling,
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=self.image
                    ),
                )
            ],
            network_interfaces=[
                compute_v1.NetworkInterface(
                    network=self.network,
                    access_configs=[
                        compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
                    ],
                )
            ],
        )
        n1_gpu = N1_ACCELERATORS.get(request.accelerator)
        if machine.startswith("n1-") and n1_gpu is not None:
            resource.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_type=f"zones/{self.zone}/acceleratorTypes/{n1_gpu}",
                    accelerator_count=request.devices,
                )
            ]
        if self.service_account:
            resource.service_accounts = [
                compute_v1.ServiceAccount(email=self.service_account, scopes=list(SCOPES))
            ]
        return resource

    def _to_instance(self, resource: compute_v1.Instance, now: float) -> Instance:
        meta = {item.key: item.value for item in resource.metadata.items}
        zone = resource.zone.rsplit("/", 1)[-1] or self.zone
        machine = resource.machine_type.rsplit("/", 1)[-1]
        market = "spot" if resource.scheduling.provisioning_model == "SPOT" else "on_demand"
        parts = meta.get(OFFER_KEY, "").split("/")
        offer = (
            OfferRef(parts[0], parts[1], parts[2], market)
            if len(parts) == len(("cloud", "region", "type", "market"))
            else OfferRef("gcp", zone, machine, market)
        )
        try:
            price = float(meta.get(PRICE_KEY, "0"))
            devices = int(meta.get(DEVICES_KEY, "1"))
        except ValueError:
            price, devices = 0.0, 1
        return Instance(
            id=resource.name,
            pool=meta.get(POOL_TAG, resource.labels.get(POOL_TAG, "")),
            offer=offer,
            state=_STATES.get(resource.status, InstanceState.TERMINATING),
            launched_at=_launched_at(resource, now),
            token=meta.get(TOKEN_TAG, ""),
            usd_per_hour=price,
            devices=devices,
        )


def tags_of(resource: compute_v1.Instance) -> dict[str, str]:
    """The fleet tags of a VM as launched (from its metadata, where they are kept exact)."""
    meta = {item.key: item.value for item in resource.metadata.items}
    return {k: meta[k] for k in (FLEET_TAG, POOL_TAG, ACCELERATOR_TAG, TOKEN_TAG) if k in meta}


__all__ = ["GcpProvider", "error_kind", "instance_name", "label_value", "request_id", "tags_of"]

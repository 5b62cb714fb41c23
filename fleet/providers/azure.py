"""Azure virtual machines as fleet instances (the only module importing azure-mgmt-compute).

What this provider promises beyond ``fleet.providers.base``:

* **One VM per token.** The VM name is ``"fleet-" + sha1(token)[:20]`` (Azure names are
  up to 64 characters of ``[a-zA-Z0-9-]``), and the instance id is that name. ``launch``
  first GETs the VM: one carrying our token tag is returned as is (a ``Failed`` one is
  PUT again, which is how Azure retries a failed provisioning). Otherwise it PUTs it;
  a PUT on the same name is idempotent in ARM, so a retried launch whose first answer
  was lost updates the same VM instead of creating a second. A VM of that name that does
  not carry our token (a hash collision, or someone else's) is left alone: ``OTHER``.
* **Where.** One provider serves one ``location`` and ``resource_group``; an offer of
  another cloud or region is ``UNSUPPORTED``. ``offer.market == "spot"`` makes a Spot VM
  (``priority=Spot``, ``evictionPolicy=Delete``, ``billingProfile.maxPrice=-1``: pay up to
  the on-demand price, never evicted for price).
* **Networking.** No separate network client: the NIC is declared inline in
  ``networkProfile.networkInterfaceConfigurations`` (``networkApiVersion`` 2020-11-01) on
  ``subnet_id``, with ``deleteOption=Delete`` so it goes with the VM, as does the OS disk.
  No public IP is attached.
* **Boot data.** ``custom_data`` (the bootstrap script, e.g. cloud-init) is sent base64
  encoded as ``osProfile.customData`` (the SDK does not encode it). The request's ``env``
  plus ``FLEET_INSTANCE_ID`` goes as base64 JSON in ``userData``, which the VM reads from
  the instance metadata service. Neither may hold a secret: the broker URL comes from the
  cloud's secret store.
* **Tags.** ``request.tags()`` plus ``fleet-usd-per-hour`` and ``fleet-devices``, from
  which ``list_instances`` rebuilds the price and device count.
* **Listing.** ``virtual_machines.list(resource_group)`` filtered here on the ``fleet`` tag.
  provisioningState ``Creating``/``Updating``/``Failed`` (and unknown) is PENDING (a failed
  one is reaped by the actuator's launch grace), ``Succeeded`` RUNNING, ``Deleting``
  TERMINATING. The market comes from ``priority``; ``launched_at`` from ``timeCreated``
  when Azure gives it, else ``now``.
* **Errors are data** (``classify``): ``SkuNotAvailable``, ``ZonalAllocationFailed``,
  ``AllocationFailed``, ``OverconstrainedAllocationRequest``,
  ``OverconstrainedZonalAllocationRequest`` are CAPACITY (``SkuNotAvailable`` means "not
  available to this subscription in this region now", which is capacity or a regional
  restriction; it is treated as capacity so the planner tries another offer and comes
  back later); ``QuotaExceeded`` and ``OperationNotAllowed`` mentioning quota are QUOTA;
  HTTP 429 / ``TooManyRequests`` is THROTTLED (after the SDK's retry policy gave up);
  ``InvalidParameter`` about ``vmSize`` is UNSUPPORTED; 401, 403, ``AuthorizationFailed``
  and credential failures are AUTH; anything else OTHER. A provisioning that fails
  asynchronously is classified the same way and its VM deleted (best effort). Messages
  carry Azure's error code and message only, never request bodies or headers.
* **Terminate** deletes the VM and waits for the operation; a VM that is gone (404, or
  ARM's 204) is success.

Every call waits on the SDK's long-running-operation poller; how long it sleeps between
polls is the client's ``polling_interval`` unless Azure sends ``Retry-After``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as m

from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, OfferRef, ProviderError
from fleet.providers.base import FLEET_TAG, POOL_TAG, TOKEN_TAG, LaunchRequest, LaunchResult

PRICE_TAG = "fleet-usd-per-hour"
DEVICES_TAG = "fleet-devices"
NETWORK_API_VERSION = "2020-11-01"
DEFAULT_IMAGE: dict[str, str] = {
    "publisher": "Canonical",
    "offer": "0001-com-ubuntu-server-jammy",
    "sku": "22_04-lts-gen2",
    "version": "latest",
}
MAX_MESSAGE = 300

CAPACITY_CODES = frozenset(
    {
        "SkuNotAvailable",
        "ZonalAllocationFailed",
        "AllocationFailed",
        "OverconstrainedAllocationRequest",
        "OverconstrainedZonalAllocationRequest",
    }
)
QUOTA_CODES = frozenset({"QuotaExceeded"})
AUTH_CODES = frozenset(
    {
        "AuthorizationFailed",
        "AuthenticationFailed",
        "InvalidAuthenticationToken",
        "InvalidAuthenticationTokenTenant",
        "LinkedAuthorizationFailed",
    }
)
THROTTLE_CODES = frozenset({"TooManyRequests"})
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_TOO_MANY = 429

_STATES = {
    "creating": InstanceState.PENDING,
    "updating": InstanceState.PENDING,
    "migrating": InstanceState.PENDING,
    "failed": InstanceState.PENDING,
    "succeeded": InstanceState.RUNNING,
    "deleting": InstanceState.TERMINATING,
}


def vm_name(token: str) -> str:
    """The VM name for a launch token: ``fleet-`` and 20 hex digits of its SHA-1."""
    return "fleet-" + hashlib.sha1(token.encode(), usedforsecurity=False).hexdigest()[:20]


def _error_body(exc: HttpResponseError) -> tuple[str, str]:
    """(code, message) of an ARM error, from the parsed error or the response body."""
    code = message = ""
    parsed = getattr(exc, "error", None)
    if parsed is not None:
        code, message = parsed.code or "", parsed.message or ""
    if not code and exc.response is not None:
        try:
            body = json.loads(exc.response.text())
        except (ValueError, TypeError, AttributeError):
            body = None
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                code, message = str(err.get("code", "")), str(err.get("message", ""))
    return code, message


def classify(exc: AzureError) -> tuple[ErrorKind, str]:
    """The taxonomy kind of an Azure SDK error and a message safe to log (see the module)."""
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        return ErrorKind.AUTH, "azure credentials unavailable or rejected"
    if not isinstance(exc, HttpResponseError):
        return ErrorKind.OTHER, f"azure {type(exc).__name__}"
    status = exc.status_code or 0
    code, message = _error_body(exc)
    text = f"azure {code or status}: {message}"[:MAX_MESSAGE]
    lowered = message.lower()
    if (
        isinstance(exc, ClientAuthenticationError)
        or code in AUTH_CODES
        or status in {HTTP_UNAUTHORIZED, HTTP_FORBIDDEN}
    ):
        kind = ErrorKind.AUTH
    elif status == HTTP_TOO_MANY or code in THROTTLE_CODES:
        kind = ErrorKind.THROTTLED
    elif code in CAPACITY_CODES:
        kind = ErrorKind.CAPACITY
    elif code in QUOTA_CODES or (code == "OperationNotAllowed" and "quota" in lowered):
        kind = ErrorKind.QUOTA
    elif code == "InvalidParameter" and "vmsize" in lowered.replace(" ", ""):
        kind = ErrorKind.UNSUPPORTED
    else:
        kind = ErrorKind.OTHER
    return kind, text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AzureProvider:
    """Azure VMs in one resource group and location (see the module contract)."""

    name = "azure"

    def __init__(
        self,
        subscription_id: str,
        resource_group: str,
        location: str,
        *,
        fleet_name: str = "fleet",
        image_reference: dict[str, str] | None = None,
        subnet_id: str = "",
        admin_username: str = "fleet",
        ssh_public_key: str = "",
        custom_data: str = "",
        credential: Any = None,  # noqa: ANN401 - any azure TokenCredential
        base_url: str | None = None,
        client: ComputeManagementClient | None = None,
    ) -> None:
        """Build a provider; no network call happens here.

        Args:
            subscription_id: the Azure subscription.
            resource_group: where VMs are created and listed (it must exist).
            location: the region (``eastus``); offers of other regions are UNSUPPORTED.
            fleet_name: the value of the ``fleet`` tag this provider owns.
            image_reference: publisher/offer/sku/version of the OS image (Ubuntu 22.04).
            subnet_id: ARM id of the subnet the inline NIC joins (required by Azure).
            admin_username: the Linux admin user.
            ssh_public_key: its authorized key (password login is always disabled).
            custom_data: the bootstrap script, sent base64 encoded; no secrets.
            credential: a TokenCredential; default ``DefaultAzureCredential()``.
            base_url: the ARM endpoint, for other clouds or tests.
            client: a ready client (tests), overriding credential and base_url.

        """
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.location = location
        self.fleet_name = fleet_name
        self.image_reference = dict(image_reference or DEFAULT_IMAGE)
        self.subnet_id = subnet_id
        self.admin_username = admin_username
        self.ssh_public_key = ssh_public_key
        self.custom_data = custom_data
        if client is None:
            if credential is None:
                from azure.identity import DefaultAzureCredential  # noqa: PLC0415 - costly, optional

                credential = DefaultAzureCredential()
            client = ComputeManagementClient(credential, subscription_id, base_url=base_url)
        self._client = client

    # -- the Provider contract -------------------------------------------------------

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Create the token's VM (or return the one it already made) and wait for it."""
        offer = request.offer
        if offer.cloud != "azure" or offer.region != self.location:
            return LaunchResult(
                error=ProviderError(
                    request.pool,
                    offer,
                    ErrorKind.UNSUPPORTED,
                    f"azure provider for {self.location} cannot launch {offer.key}",
                    now,
                )
            )
        name = vm_name(request.token)
        vms = self._client.virtual_machines
        try:
            existing = self._get(name)
            if existing is not None:
                tags = existing.tags or {}
                if tags.get(TOKEN_TAG) != request.token:
                    return LaunchResult(
                        error=ProviderError(
                            request.pool,
                            offer,
                            ErrorKind.OTHER,
                            f"azure VM {name} exists without this launch's token",
                            now,
                        )
                    )
                if _state_of(existing) != "failed":
                    return LaunchResult(instance=self._instance(existing, now))
            body = self._vm(request, name)
            try:
                vm = vms.begin_create_or_update(self.resource_group, name, body).result()
            except HttpResponseError:
                if self._get(name) is not None:  # an async failure leaves a Failed VM
                    self._delete(name)
                raise
        except AzureError as exc:
            kind, message = classify(exc)
            return LaunchResult(error=ProviderError(request.pool, offer, kind, message, now))
        instance = self._instance(vm, now)
        return LaunchResult(instance=_at(instance, now))

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """Delete the VM and wait; None on success or when it is already gone."""
        try:
            self._delete(instance_id)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            kind, message = classify(exc)
            return ProviderError("", None, kind, message, now)
        return None

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every VM of the resource group carrying our ``fleet`` tag."""
        try:
            vms = list(self._client.virtual_machines.list(self.resource_group))
        except AzureError as exc:
            kind, message = classify(exc)
            return ProviderError("", None, kind, message, now)
        return [
            self._instance(vm, now)
            for vm in vms
            if (vm.tags or {}).get(FLEET_TAG) == self.fleet_name
        ]

    # -- internals -------------------------------------------------------------------

    def _get(self, name: str) -> m.VirtualMachine | None:
        try:
            return self._client.virtual_machines.get(self.resource_group, name)
        except ResourceNotFoundError:
            return None

    def _delete(self, name: str) -> None:
        self._client.virtual_machines.begin_delete(self.resource_group, name).result()

    def _vm(self, request: LaunchRequest, name: str) -> m.VirtualMachine:
        tags = request.tags() | {
            PRICE_TAG: repr(float(request.usd_per_hour)),
            DEVICES_TAG: str(request.devices),
        }
        env = dict(request.env) | {"FLEET_INSTANCE_ID": name}
        linux = m.LinuxConfiguration(disable_password_authentication=True)
        if self.ssh_public_key:
            linux.ssh = m.SshConfiguration(
                public_keys=[
                    m.SshPublicKey(
                        path=f"/home/{self.admin_username}/.ssh/authorized_keys",
                        key_data=self.ssh_public_key,
                    )
                ]
            )
        os_profile = m.OSProfile(
            computer_name=name, admin_username=self.admin_username, linux_configuration=linux
        )
        if self.custom_data:
            os_profile.custom_data = _b64(self.custom_data.encode())
        nic = m.VirtualMachineNetworkInterfaceConfiguration(
            name=f"{name}-nic",
            properties=m.VirtualMachineNetworkInterfaceConfigurationProperties(
                primary=True,
                delete_option="Delete",
                ip_configurations=[
                    m.VirtualMachineNetworkInterfaceIPConfiguration(
                        name=f"{name}-ip",
                        properties=m.VirtualMachineNetworkInterfaceIPConfigurationProperties(
                            primary=True, subnet=m.SubResource(id=self.subnet_id)
                        ),
                    )
                ],
            ),
        )
        properties = m.VirtualMachineProperties(
            hardware_profile=m.HardwareProfile(vm_size=request.offer.instance_type),
            storage_profile=m.StorageProfile(
                image_reference=m.ImageReference(**self.image_reference),
                os_disk=m.OSDisk(
                    create_option="FromImage",
                    delete_option="Delete",
                    managed_disk=m.ManagedDiskParameters(storage_account_type="StandardSSD_LRS"),
                ),
            ),
            os_profile=os_profile,
            network_profile=m.NetworkProfile(
                network_api_version=NETWORK_API_VERSION, network_interface_configurations=[nic]
            ),
            user_data=_b64(json.dumps(env, sort_keys=True).encode()),
        )
        if request.offer.market == "spot":
            properties.priority = "Spot"
            properties.eviction_policy = "Delete"
            properties.billing_profile = m.BillingProfile(max_price=-1)
        return m.VirtualMachine(location=self.location, tags=tags, properties=properties)

    def _instance(self, vm: m.VirtualMachine, now: float) -> Instance:
        tags: Mapping[str, str] = vm.tags or {}
        props = vm.properties
        size = props.hardware_profile.vm_size if props and props.hardware_profile else None
        priority = _text(props.priority) if props else ""
        created = props.time_created if props else None
        try:
            usd = float(tags.get(PRICE_TAG, "0"))
        except ValueError:
            usd = 0.0
        try:
            devices = int(tags.get(DEVICES_TAG, "1"))
        except ValueError:
            devices = 1
        return Instance(
            id=vm.name or "",
            pool=tags.get(POOL_TAG, ""),
            offer=OfferRef(
                "azure",
                (vm.location or self.location).replace(" ", "").lower(),
                _text(size),
                "spot" if priority.lower() == "spot" else "on_demand",
            ),
            state=_STATES.get(_state_of(vm), InstanceState.PENDING),
            launched_at=created.timestamp() if created is not None else now,
            token=tags.get(TOKEN_TAG, ""),
            usd_per_hour=usd,
            devices=devices,
        )


def _state_of(vm: m.VirtualMachine) -> str:
    props = vm.properties
    return _text(props.provisioning_state).lower() if props else ""


def _text(value: object) -> str:
    """An SDK string or str-enum as its plain value (``str()`` of an enum is its name)."""
    if value is None:
        return ""
    return str(value.value) if isinstance(value, Enum) else str(value)


def _at(instance: Instance, now: float) -> Instance:
    """A freshly launched instance is launched at the caller's ``now``."""
    return replace(instance, launched_at=now)


__all__ = ["AzureProvider", "classify", "vm_name"]

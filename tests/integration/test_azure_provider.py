"""AzureProvider against the local HTTPS ARM fake: the shared contract, then Azure specifics.

The real azure-mgmt-compute client talks to ``tests.fakes.arm_server`` (TLS with a
throwaway CA, a fake bearer token); nothing leaves the machine.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError

import tests.contract.conftest as contract_conftest
from fleet.autoscaler.model import ErrorKind, OfferRef, ProviderError
from fleet.catalog import DATA_DIR, load_catalog
from fleet.pricing.azure import prices_of, refresh_azure
from fleet.providers.azure import DEVICES_TAG, PRICE_TAG, AzureProvider, vm_name
from tests.contract import test_provider_contract as contract
from tests.contract.conftest import Harness, make_request
from tests.contract.harness_azure import AZURE_OFFER, azure_harness, make_provider
from tests.fakes.arm_server import ArmFake, arm_server

pytestmark = pytest.mark.integration

NOW = 1_000.0
CONTRACT: list[Callable[..., None]] = [
    fn
    for name, fn in vars(contract).items()
    if name.startswith("test_")
    and callable(fn)
    and inspect.signature(fn).parameters
    and set(inspect.signature(fn).parameters) <= {"harness", "provider"}
]


@pytest.fixture
def arm() -> Iterator[ArmFake]:
    with arm_server() as fake:
        yield fake


@pytest.fixture
def harness(arm: ArmFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with azure_harness(tmp_path, arm) as h:
        # make_request builds requests for the module's OFFER: ask for the harness's.
        monkeypatch.setattr(contract_conftest, "OFFER", h.offer)
        yield h


@pytest.fixture
def azure(harness: Harness) -> AzureProvider:
    assert isinstance(harness.provider, AzureProvider)
    return harness.provider


def test_the_contract_suite_is_found() -> None:
    assert len(CONTRACT) >= 6


@pytest.mark.parametrize("check", CONTRACT, ids=lambda fn: fn.__name__)
def test_contract(check: Callable[..., None], harness: Harness) -> None:
    args = {"harness": harness, "provider": harness.provider}
    check(**{p: args[p] for p in inspect.signature(check).parameters})


def test_spot_put_body(azure: AzureProvider, arm: ArmFake) -> None:
    request = make_request()
    assert request.offer == AZURE_OFFER
    assert azure.launch(request, NOW).error is None
    [body] = arm.put_bodies
    props = body["properties"]
    assert props["priority"] == "Spot"
    assert props["evictionPolicy"] == "Delete"
    assert props["billingProfile"] == {"maxPrice": -1}
    assert props["hardwareProfile"] == {"vmSize": "Standard_NC24ads_A100_v4"}
    nic = props["networkProfile"]["networkInterfaceConfigurations"][0]
    assert nic["properties"]["deleteOption"] == "Delete"
    ip = nic["properties"]["ipConfigurations"][0]["properties"]
    assert ip["subnet"]["id"].endswith("/subnets/s")
    assert props["networkProfile"]["networkApiVersion"] == "2020-11-01"
    assert body["tags"][PRICE_TAG] == "0.05"
    assert body["tags"][DEVICES_TAG] == "1"
    env = json.loads(base64.b64decode(props["userData"]))
    assert env["FLEET_INSTANCE_ID"] == vm_name(request.token)


def test_on_demand_has_no_spot_fields(arm: ArmFake, harness: Harness) -> None:
    provider = make_provider(arm)
    request = make_request()
    on_demand = dataclasses.replace(
        request, offer=dataclasses.replace(AZURE_OFFER, market="on_demand")
    )
    result = provider.launch(on_demand, NOW)
    assert result.instance is not None
    assert result.instance.offer.market == "on_demand"
    props = arm.put_bodies[-1]["properties"]
    assert "priority" not in props
    assert "billingProfile" not in props


def test_custom_data_is_base64(arm: ArmFake, harness: Harness) -> None:
    script = "#!/bin/sh\necho hello fleet\n"
    provider = make_provider(arm, custom_data=script, ssh_public_key="ssh-ed25519 AAAA test")
    assert provider.launch(make_request(), NOW).error is None
    os_profile = arm.put_bodies[-1]["properties"]["osProfile"]
    assert base64.b64decode(os_profile["customData"]).decode() == script
    keys = os_profile["linuxConfiguration"]["ssh"]["publicKeys"]
    assert keys[0]["keyData"] == "ssh-ed25519 AAAA test"


def test_relaunch_leaves_one_vm_and_puts_once(azure: AzureProvider, arm: ArmFake) -> None:
    request = make_request()
    first = azure.launch(request, NOW).instance
    again = azure.launch(request, NOW + 5).instance
    assert first is not None
    assert again is not None
    assert first.id == again.id == vm_name(request.token)
    assert len(arm.vms) == 1
    assert len(arm.calls("PUT")) == 1


def test_a_short_429_burst_is_retried_by_the_sdk(azure: AzureProvider, arm: ArmFake) -> None:
    arm.throttle_next = 3
    request = make_request()
    result = azure.launch(request, NOW)
    assert result.error is None, result.error
    assert len(arm.vms) == 1


def test_a_long_429_burst_is_throttled_data_and_creates_nothing(
    azure: AzureProvider, arm: ArmFake
) -> None:
    arm.throttle_next = 50
    request = make_request()
    result = azure.launch(request, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.THROTTLED
    arm.throttle_next = 0
    assert azure.launch(request, NOW).instance is not None
    assert azure.launch(request, NOW).instance is not None
    assert len(arm.vms) == 1
    arm.throttle_next = 50
    listed = azure.list_instances(NOW)
    assert isinstance(listed, ProviderError)
    assert listed.kind is ErrorKind.THROTTLED


@pytest.mark.parametrize(
    ("code", "status", "message", "kind"),
    [
        ("SkuNotAvailable", 409, "The requested VM size is not available", ErrorKind.CAPACITY),
        ("ZonalAllocationFailed", 409, "no capacity", ErrorKind.CAPACITY),
        ("OverconstrainedAllocationRequest", 409, "no", ErrorKind.CAPACITY),
        ("QuotaExceeded", 409, "vCPU quota", ErrorKind.QUOTA),
        (
            "OperationNotAllowed",
            409,
            "exceeds approved Total Regional Cores quota",
            ErrorKind.QUOTA,
        ),
        (
            "InvalidParameter",
            400,
            "The value Standard_X of vmSize is invalid",
            ErrorKind.UNSUPPORTED,
        ),
        ("AuthorizationFailed", 403, "client does not have authorization", ErrorKind.AUTH),
        ("BadRequest", 400, "something else", ErrorKind.OTHER),
    ],
)
def test_put_errors_are_classified(
    azure: AzureProvider, arm: ArmFake, code: str, status: int, message: str, kind: ErrorKind
) -> None:
    arm.fail_put(code, status, message)
    request = make_request()
    result = azure.launch(request, NOW)
    assert result.instance is None
    assert result.error is not None
    assert result.error.kind is kind
    assert code in result.error.message
    assert "fake" not in result.error.message.split(":", 1)[0]
    assert arm.vms == {}


def test_async_allocation_failure_is_capacity_and_cleans_up(
    azure: AzureProvider, arm: ArmFake
) -> None:
    arm.fail_operation("AllocationFailed", "Allocation failed")
    request = make_request()
    result = azure.launch(request, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.CAPACITY
    assert arm.vms == {}
    assert azure.launch(request, NOW).instance is not None


def test_wrong_region_or_cloud_is_unsupported(azure: AzureProvider, arm: ArmFake) -> None:
    request = make_request()
    other = dataclasses.replace(
        request, offer=OfferRef("azure", "westeurope", "Standard_D2s_v5", "spot")
    )
    result = azure.launch(other, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.UNSUPPORTED
    assert arm.requests == []


def test_list_pages_and_ignores_foreign_vms(azure: AzureProvider, arm: ArmFake) -> None:
    arm.page_size = 2
    launched = set()
    for _ in range(3):
        instance = azure.launch(make_request(), NOW).instance
        assert instance is not None
        launched.add(instance.id)
    arm.vms["other"] = {"name": "other", "location": "eastus", "tags": {"fleet": "someone-else"}}
    arm.vms["untagged"] = {"name": "untagged", "location": "eastus", "properties": {}}
    listed = azure.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    assert {i.id for i in listed} == launched
    assert all(i.launched_at != NOW for i in listed)  # from timeCreated
    assert all((i.usd_per_hour, i.devices) == (0.05, 1) for i in listed)


def test_bad_credentials_are_auth(arm: ArmFake) -> None:
    class Broken:
        def get_token(self, *scopes, **kwargs):  # noqa: ARG002 - TokenCredential signature
            raise ClientAuthenticationError("no credentials")

    provider = AzureProvider(
        "sub", "rg", "eastus", credential=Broken(), base_url=arm.base_url, subnet_id="x"
    )
    listed = provider.list_instances(NOW)
    assert isinstance(listed, ProviderError)
    assert listed.kind is ErrorKind.AUTH


# -- price refresh plumbing -------------------------------------------------------------


def _item(sku: str, price: float, **extra: str) -> dict[str, object]:
    return {
        "currencyCode": "USD",
        "retailPrice": price,
        "unitPrice": price,
        "armRegionName": "eastus",
        "armSkuName": sku,
        "serviceName": "Virtual Machines",
        "productName": f"Virtual Machines {sku} Series",
        "skuName": sku.removeprefix("Standard_").replace("_", " "),
        "meterName": sku.removeprefix("Standard_").replace("_", " "),
        "type": "Consumption",
        "unitOfMeasure": "1 Hour",
        "effectiveStartDate": "2026-01-01T00:00:00Z",
    } | extra


def test_prices_of_picks_linux_consumption_meters() -> None:
    sku = "Standard_NC24ads_A100_v4"
    items = [
        _item(sku, 3.5),
        _item(sku, 0.5, skuName="NC24ads A100 v4 Spot", meterName="NC24ads A100 v4 Spot"),
        _item(sku, 0.7, skuName="NC24ads A100 v4 Low Priority"),
        _item(sku, 9.9, productName="Virtual Machines NC Series Windows"),
        _item(sku, 1.0, type="Reservation"),
        _item(sku, 3.0, effectiveStartDate="2025-01-01T00:00:00Z"),
    ]
    assert prices_of(items) == (3.5, 0.5)
    assert prices_of([]) == (None, None)


def test_refresh_azure_follows_pages_and_writes_a_new_catalog(arm: ArmFake, tmp_path: Path) -> None:
    sku = "Standard_NC24ads_A100_v4"
    arm.prices_page_size = 1
    arm.prices = [
        _item(sku, 4.0),
        _item(sku, 9.9, productName="Virtual Machines NC Series Windows"),
        _item(sku, 0.6, skuName="NC24ads A100 v4 Spot", meterName="NC24ads A100 v4 Spot"),
        _item("Standard_NV36ads_A10_v5", 2.5),
        _item(sku, 0.1, armRegionName="westus"),
    ]
    seen: list[tuple[int, int]] = []
    out = tmp_path / "catalog"
    with requests.Session() as session:
        updated = refresh_azure(
            DATA_DIR,
            out,
            today="2026-11-23",
            base_url=f"{arm.base_url}/api/retail/prices",
            session=session,
            verify=arm.ca_path,
            progress=lambda done, total: seen.append((done, total)),
        )
    assert updated == 2
    azure_rows = sum(1 for o in load_catalog(DATA_DIR).offers if o.cloud == "azure")
    assert seen[-1] == (azure_rows, azure_rows)
    assert len([p for m, p in arm.requests if p == "/api/retail/prices"]) > azure_rows
    catalog = load_catalog(out)
    assert catalog.version == "2026-11-23.azure-refresh"
    by_key = {o.key: o for o in catalog.offers}
    a100 = by_key[f"azure/eastus/{sku}"]
    assert (a100.on_demand_usd_per_hour, a100.spot_usd_per_hour) == (4.0, 0.6)
    assert (a100.price_date, a100.source) == ("2026-11-23", "Azure Retail Prices API 2026-11-23")
    a10 = by_key["azure/eastus/Standard_NV36ads_A10_v5"]
    assert (a10.on_demand_usd_per_hour, a10.spot_usd_per_hour) == (2.5, None)
    old = {o.key: o for o in load_catalog(DATA_DIR).offers}
    untouched = by_key["azure/eastus/Standard_NC48ads_A100_v4"]
    assert untouched == old[untouched.key]
    assert len(catalog.offers) == len(old)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["price_date"] == "2026-11-23"

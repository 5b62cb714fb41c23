"""GcpProvider against the local GCE REST fake: the shared contract, then GCP specifics.

The contract tests are imported from ``tests/contract/test_provider_contract.py`` and run
here with ``harness``/``provider`` fixtures built by ``gcp_env``.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from google.cloud import billing_v1

from fleet.autoscaler.model import ErrorKind, InstanceState, OfferRef, ProviderError
from fleet.catalog import DATA_DIR, load_catalog
from fleet.pricing.gcp import refresh_gcp
from fleet.providers.base import LaunchRequest, Provider
from fleet.providers.gcp import error_kind, instance_name, label_value, request_id
from tests.contract.conftest import Harness, make_request
from tests.contract.harness_gcp import GCP_OFFER, anonymous, gcp_env, gcp_provider
from tests.contract.test_provider_contract import (  # noqa: F401 - collected here, on gcp
    test_a_new_provider_object_finds_earlier_instances,
    test_errors_are_data,
    test_instances_carry_the_fleet_tags,
    test_launch_returns_a_new_instance_for_the_request,
    test_list_eventually_shows_the_instance_running,
    test_relaunch_with_the_same_token_creates_nothing,
    test_terminate_removes_the_instance_and_repeats_harmlessly,
)
from tests.fakes.gce_server import GceFake

pytestmark = pytest.mark.integration
NOW = 1_000.0


@pytest.fixture
def gcp(tmp_path: Path) -> Iterator[tuple[GceFake, Harness]]:
    with gcp_env(tmp_path) as env:
        yield env


@pytest.fixture
def harness(gcp: tuple[GceFake, Harness]) -> Harness:
    return gcp[1]


@pytest.fixture
def provider(harness: Harness) -> Provider:
    return harness.provider


@pytest.fixture
def fake(gcp: tuple[GceFake, Harness]) -> GceFake:
    return gcp[0]


def gpu_request(market: str = "on_demand", token: str | None = None) -> LaunchRequest:
    base = make_request(token, accelerator="nvidia-l4", pool="l4-gcp")
    return LaunchRequest(
        pool=base.pool,
        accelerator=base.accelerator,
        offer=OfferRef(GCP_OFFER.cloud, GCP_OFFER.region, GCP_OFFER.instance_type, market),
        token=base.token,
        devices=1,
        usd_per_hour=0.4,
        env={"FLEET_NAMESPACE": "ns"},
    )


def test_spot_launch_asks_for_spot_and_lists_as_spot(fake: GceFake, provider: Provider) -> None:
    """A spot offer inserts provisioningModel SPOT (deleted on preemption); list reads it back."""
    request = gpu_request("spot")
    result = provider.launch(request, NOW)
    assert result.error is None
    [body] = fake.inserts
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert body["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert body["machineType"] == "zones/us-central1-a/machineTypes/g2-standard-12"
    assert "guestAccelerators" not in body  # g2 has its L4 built in
    assert body["labels"]["fleet-token"] == label_value(request.token, always_hash=True)
    meta = fake.metadata(instance_name(request.token))
    assert meta["startup-script"].startswith("#!/bin/sh")
    assert json.loads(meta["fleet-env"]) == {"FLEET_NAMESPACE": "ns"}
    listed = provider.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    [seen] = listed
    assert seen.offer == request.offer
    assert (seen.usd_per_hour, seen.devices, seen.state) == (0.4, 1, InstanceState.RUNNING)


def test_on_demand_launch_is_standard(fake: GceFake, provider: Provider) -> None:
    """An on-demand offer leaves the provisioning model standard."""
    assert provider.launch(gpu_request(), NOW).error is None
    assert "provisioningModel" not in fake.inserts[0]["scheduling"]


def test_relaunch_with_a_lost_answer_reuses_the_request_id(
    fake: GceFake, provider: Provider
) -> None:
    """An insert applied but answered 503 is retried with the same requestId: one instance."""
    fake.lose_insert_responses = 1
    request = gpu_request()
    result = provider.launch(request, NOW)
    assert result.error is None
    assert result.instance is not None
    again = provider.launch(request, NOW + 1)
    assert again.instance is not None
    assert again.instance.id == result.instance.id
    assert [b["requestId"] for b in fake.inserts] == [request_id(request.token)] * 2
    assert len(fake.instances) == 1


def test_a_429_burst_is_retried_and_creates_one_instance(fake: GceFake, provider: Provider) -> None:
    """A short burst of 429s is retried by the library's Retry; one instance results."""
    fake.throttle_next = 3
    result = provider.launch(gpu_request(), NOW)
    assert result.error is None
    assert sum(c.status == 429 for c in fake.calls) == 3
    assert len(fake.instances) == 1


def test_persistent_throttling_is_reported_throttled(fake: GceFake) -> None:
    """429s past the retry budget come back as THROTTLED data and create nothing."""
    provider = gcp_provider(fake, retry_timeout_s=0.5)
    fake.throttle_next = 10_000
    request = gpu_request()
    result = provider.launch(request, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.THROTTLED
    listed = provider.list_instances(NOW)
    assert isinstance(listed, ProviderError)
    assert listed.kind is ErrorKind.THROTTLED
    fake.throttle_next = 0
    assert fake.instances == {}


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", 503, ErrorKind.CAPACITY),
        ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", 503, ErrorKind.CAPACITY),
        ("QUOTA_EXCEEDED", 403, ErrorKind.QUOTA),
        ("UNSUPPORTED_OPERATION", 400, ErrorKind.UNSUPPORTED),
        ("SOMETHING_ELSE", 500, ErrorKind.OTHER),
    ],
)
def test_operation_errors_are_data(
    fake: GceFake, provider: Provider, code: str, status: int, kind: ErrorKind
) -> None:
    """An insert operation that ends in an error is data of the mapped kind; no instance."""
    fake.insert_errors.append((code, f"{code} happened", status))
    request = gpu_request()
    result = provider.launch(request, NOW)
    assert result.instance is None
    assert result.error is not None
    assert result.error.kind is kind
    assert (result.error.pool, result.error.offer) == (request.pool, request.offer)
    assert code in result.error.message
    assert fake.instances == {}


def test_pending_operations_are_polled_on_the_fake(fake: GceFake, provider: Provider) -> None:
    """An insert whose operation starts RUNNING is waited for through the zone operations API."""
    fake.pending_operations = True
    fake.running_after_get = True
    assert provider.launch(gpu_request(), NOW).error is None
    assert any("/operations/" in c.path for c in fake.calls)
    listed = provider.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    assert [i.state for i in listed] == [InstanceState.PENDING]
    listed = provider.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    assert [i.state for i in listed] == [InstanceState.RUNNING]


def test_tpu_offers_are_unsupported(fake: GceFake, provider: Provider) -> None:
    """TPU VMs are not Compute Engine instances: UNSUPPORTED without an API call."""
    base = gpu_request()
    request = LaunchRequest(
        base.pool, "google-tpu-v5e", OfferRef("gcp", "us-central1", "tpu-v5litepod-1", "spot"),
        base.token, 1, 0.2,
    )  # fmt: skip
    result = provider.launch(request, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.UNSUPPORTED
    assert fake.calls == []


def test_list_leaves_out_other_fleets(fake: GceFake, provider: Provider) -> None:
    """Only instances labelled with this fleet's name are listed."""
    other = gcp_provider(fake)
    other.fleet_name = "other-fleet"
    assert other.launch(gpu_request(), NOW).error is None
    listed = provider.list_instances(NOW)
    assert listed == []
    assert len(fake.instances) == 1


def _api_error(name: str, message: str, **kwargs: object) -> Exception:
    cls: type[Exception] = getattr(gexc, name)
    return cls(message, **kwargs)


def test_error_kind_of_http_errors() -> None:
    """401/403 are AUTH, 429 and rateLimitExceeded THROTTLED, a missing machine type UNSUPPORTED."""
    assert error_kind(_api_error("Unauthorized", "no")) is ErrorKind.AUTH
    assert error_kind(_api_error("Forbidden", "no")) is ErrorKind.AUTH
    assert error_kind(_api_error("TooManyRequests", "slow")) is ErrorKind.THROTTLED
    limited = _api_error("Forbidden", "x", errors=[{"reason": "rateLimitExceeded"}])
    assert error_kind(limited) is ErrorKind.THROTTLED
    missing = _api_error("NotFound", "The resource 'zones/z/machineTypes/x9' was not found")
    assert error_kind(missing) is ErrorKind.UNSUPPORTED


def _sku(description: str, usage: str, nanos: int, units: int = 0) -> dict[str, object]:
    return {
        "name": f"services/6F81-5844-456A/skus/{abs(hash(description + usage)) % 10**6}",
        "skuId": "0000-0000-0000",
        "description": description,
        "category": {"resourceFamily": "Compute", "resourceGroup": "GPU", "usageType": usage},
        "serviceRegions": ["us-central1"],
        "pricingInfo": [
            {
                "pricingExpression": {
                    "usageUnit": "h",
                    "tieredRates": [
                        {
                            "startUsageAmount": 0,
                            "unitPrice": {
                                "currencyCode": "USD",
                                "units": str(units),
                                "nanos": nanos,
                            },
                        }
                    ],
                }
            }
        ],
    }


def test_price_refresh_plumbing(fake: GceFake, tmp_path: Path) -> None:
    """refresh_gcp reads SKUs over REST and rewrites the g2 rows it can price fully."""
    fake.skus = [
        _sku("Nvidia L4 GPU running in Americas", "OnDemand", 0, units=1),
        _sku("Spot Preemptible Nvidia L4 GPU running in Americas", "Preemptible", 500_000_000),
        _sku("G2 Instance Core running in Americas", "OnDemand", 100_000_000),
        _sku("Spot Preemptible G2 Instance Core running in Americas", "Preemptible", 10_000_000),
        _sku("G2 Instance Ram running in Americas", "OnDemand", 10_000_000),
        _sku("Spot Preemptible G2 Instance Ram running in Americas", "Preemptible", 1_000_000),
        _sku("Commitment v1: G2 Cpu in Americas for 1 Year", "Commit1Yr", 1),
    ]
    client = billing_v1.CloudCatalogClient(
        transport="rest",
        client_options={"api_endpoint": fake.base_url},
        credentials=anonymous(),
    )
    source = tmp_path / "in"
    shutil.copytree(DATA_DIR, source)
    before = (source / "offers.csv").read_text()
    out = tmp_path / "out"
    seen: list[tuple[int, int]] = []
    updated = refresh_gcp(
        source,
        out,
        today="2030-01-02",
        billing_client=client,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert updated == 2  # g2-standard-12 and g2-standard-16
    assert (source / "offers.csv").read_text() == before
    assert any(c.path == "/v1/services/6F81-5844-456A/skus" for c in fake.calls)
    catalog = load_catalog(out)
    assert catalog.version == "2030-01-02.gcp-refresh"
    g2 = {o.instance_type: o for o in catalog.offers if o.instance_type.startswith("g2-")}
    assert g2["g2-standard-12"].on_demand_usd_per_hour == pytest.approx(1 + 12 * 0.1 + 48 * 0.01)
    assert g2["g2-standard-12"].spot_usd_per_hour == pytest.approx(0.5 + 12 * 0.01 + 48 * 0.001)
    assert g2["g2-standard-12"].source == "GCP Cloud Billing Catalog 2030-01-02"
    assert g2["g2-standard-12"].price_date == "2030-01-02"
    with (out / "offers.csv").open() as fh:
        untouched = [r for r in csv.DictReader(fh) if r["instance_type"] == "a2-highgpu-1g"]
    assert untouched[0]["price_date"] != "2030-01-02"
    assert seen
    assert seen[-1][0] == seen[-1][1]

"""``AwsProvider`` and ``refresh_aws`` against a real moto server (and botocore's Stubber).

The shared contract tests run here on the AWS harness until it joins the parametrized
``harness`` fixture of ``tests/contract``; then come what only AWS shows: spot market
options, error codes as data, the token check that closes moto's ClientToken gap, and
the price refresh writing a catalog the autoscaler reads.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints
import pytest
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import ReadTimeoutError  # type: ignore[import-untyped]
from botocore.stub import Stubber  # type: ignore[import-untyped]

from fleet.autoscaler.config import PoolConfig, pool_offers
from fleet.autoscaler.model import ErrorKind, OfferRef, ProviderError
from fleet.catalog import DATA_DIR, Market, load_catalog
from fleet.pricing.aws import (
    ON_DEMAND_SOURCE,
    SPOT_SOURCE,
    PriceRefreshError,
    on_demand_from_products,
    refresh_aws,
)
from fleet.providers.aws import AwsProvider, client_token, error_kind
from fleet.providers.base import TOKEN_TAG, LaunchRequest
from tests.contract import test_provider_contract as contract
from tests.contract.conftest import Harness
from tests.contract.harness_aws import (
    AWS_OFFER,
    REGION,
    aws_harness,
    client,
    make_provider,
    moto_server,
)

pytestmark = pytest.mark.integration
NOW = 1_000.0
TODAY = "2030-01-02"
SPOT = dataclasses.replace(AWS_OFFER, market="spot")


@pytest.fixture(scope="module", params=[aws_harness], ids=["aws"])
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """One moto server for the module; always stopped."""
    factory: Callable[[Path], Any] = request.param
    with factory(tmp_path_factory.mktemp("moto")) as h:
        yield h


@pytest.fixture
def provider(harness: Harness) -> AwsProvider:
    assert isinstance(harness.provider, AwsProvider)
    return harness.provider


@pytest.fixture
def url(harness: Harness) -> str:
    return harness.env["AWS_ENDPOINT_URL"]


def req(offer: OfferRef = AWS_OFFER, token: str | None = None, **kwargs: Any) -> LaunchRequest:
    return LaunchRequest(
        pool="cpu-pool",
        accelerator="cpu",
        offer=offer,
        token=token or f"tok-{uuid.uuid4().hex[:12]}",
        devices=1,
        usd_per_hour=0.17,
        **kwargs,
    )


def with_token(url: str, token: str) -> list[dict[str, Any]]:
    answer = client("ec2", url).describe_instances(
        Filters=[{"Name": f"tag:{TOKEN_TAG}", "Values": [token]}]
    )
    return [i for r in answer["Reservations"] for i in r["Instances"]]


def stubbed() -> tuple[AwsProvider, Stubber]:
    ec2 = boto3.client(
        "ec2",
        region_name=REGION,
        aws_access_key_id="AKIAABCDEFGHIJKLMNOP",
        aws_secret_access_key="stubbed-secret-never-shown",  # noqa: S106
    )
    return AwsProvider(REGION, image_id="ami-12345678", client=ec2), Stubber(ec2)


RUN_ANSWER = {
    "Instances": [
        {
            "InstanceId": "i-0123456789abcdef0",
            "InstanceType": "c6i.xlarge",
            "State": {"Code": 0, "Name": "pending"},
        }
    ]
}


# -- the shared contract on the AWS harness -------------------------------------------

CONTRACT = [
    contract.test_launch_returns_a_new_instance_for_the_request,
    contract.test_relaunch_with_the_same_token_creates_nothing,
    contract.test_list_eventually_shows_the_instance_running,
    contract.test_terminate_removes_the_instance_and_repeats_harmlessly,
    contract.test_errors_are_data,
    contract.test_a_new_provider_object_finds_earlier_instances,
    contract.test_instances_carry_the_fleet_tags,
]


@pytest.mark.parametrize("check", CONTRACT, ids=[c.__name__ for c in CONTRACT])
def test_contract(check: Callable[..., None], harness: Harness, provider: AwsProvider) -> None:
    """Each contract test of ``tests/contract`` holds on AWS (moto)."""
    if "harness" in check.__code__.co_varnames[: check.__code__.co_argcount]:
        check(harness, provider)
    else:
        check(provider)


# -- AWS specifics on moto ---------------------------------------------------------------


def test_spot_launch_sets_market_options(provider: AwsProvider, url: str) -> None:
    """A spot offer launches a spot instance (InstanceLifecycle) reported in the spot market."""
    result = provider.launch(req(SPOT), NOW)
    assert result.error is None
    assert result.instance is not None
    assert result.instance.offer == SPOT
    [raw] = with_token(url, result.instance.token)
    assert raw["InstanceLifecycle"] == "spot"
    listed = provider.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    [seen] = [i for i in listed if i.id == result.instance.id]
    assert seen.offer == SPOT
    assert (seen.usd_per_hour, seen.devices, seen.pool) == (0.17, 1, "cpu-pool")


def test_retry_after_a_lost_answer_leaves_one_instance(harness: Harness, url: str) -> None:
    """RunInstances succeeds but its answer is lost; the retry with the same token finds it."""
    aws = make_provider(url, harness.env["AWS_IMAGE_ID"])
    lost = {"once": True}

    def lose_answer(**_: Any) -> None:
        if lost.pop("once", False):
            raise ReadTimeoutError(endpoint_url=url)

    aws._ec2.meta.events.register("after-call.ec2.RunInstances", lose_answer)
    request = req()
    first = aws.launch(request, NOW)
    assert first.error is not None
    assert first.error.kind is ErrorKind.OTHER
    assert len(with_token(url, request.token)) == 1  # it did launch
    again = aws.launch(request, NOW + 1)
    third = aws.launch(request, NOW + 2)
    assert again.instance is not None
    assert third.instance is not None
    assert again.instance.id == third.instance.id
    assert [i["InstanceId"] for i in with_token(url, request.token)] == [again.instance.id]


def test_instances_of_a_crashed_autoscaler_are_listed(harness: Harness, url: str) -> None:
    """What one provider object launched, a new one (after a crash) lists by tag alone."""
    image = harness.env["AWS_IMAGE_ID"]
    request = req()
    launched = make_provider(url, image).launch(request, NOW).instance
    assert launched is not None
    listed = harness.list_until(
        lambda ls: launched.id in {i.id for i in ls}, make_provider(url, image)
    )
    [seen] = [i for i in listed if i.id == launched.id]
    assert (seen.pool, seen.token, seen.offer) == (request.pool, request.token, AWS_OFFER)
    other_fleet = make_provider(url, image, fleet_name="other")
    others = other_fleet.list_instances(NOW)
    assert not isinstance(others, ProviderError)
    assert launched.id not in {i.id for i in others}


def test_requests_the_provider_cannot_list_are_refused(provider: AwsProvider) -> None:
    """Another region, or another fleet's name, would leak an instance: refused as data."""
    other_region = provider.launch(req(dataclasses.replace(AWS_OFFER, region="eu-west-1")), NOW)
    assert other_region.error is not None
    assert other_region.error.kind is ErrorKind.UNSUPPORTED
    other_fleet = provider.launch(req(fleet_name="other"), NOW)
    assert other_fleet.error is not None
    assert other_fleet.instance is None


# -- error codes as data (botocore Stubber: the SDK's own fake) ---------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("InsufficientInstanceCapacity", ErrorKind.CAPACITY),
        ("VcpuLimitExceeded", ErrorKind.QUOTA),
        ("Unsupported", ErrorKind.UNSUPPORTED),
        ("UnauthorizedOperation", ErrorKind.AUTH),
        ("InternalError", ErrorKind.OTHER),
    ],
)
def test_launch_errors_are_data(code: str, kind: ErrorKind) -> None:
    """An EC2 error code becomes a ProviderError of its kind; nothing is launched."""
    aws, stub = stubbed()
    stub.add_response("describe_instances", {"Reservations": []})
    stub.add_client_error(
        "run_instances",
        service_error_code=code,
        service_message="key AKIAABCDEFGHIJKLMNOP said no",
        http_status_code=400,
    )
    with stub:
        result = aws.launch(req(), NOW)
    stub.assert_no_pending_responses()
    assert result.instance is None
    assert result.error is not None
    assert result.error.kind is kind
    assert (result.error.pool, result.error.offer, result.error.at) == ("cpu-pool", AWS_OFFER, NOW)
    assert code in result.error.message
    assert "AKIAABCDEFGHIJKLMNOP" not in result.error.message
    assert "stubbed-secret" not in result.error.message


def test_throttled_launches_retried_with_the_token_make_one_instance() -> None:
    """RequestLimitExceeded twice, then success: each try checks the token first; one RunInstances succeeds."""
    aws, stub = stubbed()
    request = req()
    for _ in range(2):
        stub.add_response("describe_instances", {"Reservations": []})
        stub.add_client_error("run_instances", service_error_code="RequestLimitExceeded")
    stub.add_response("describe_instances", {"Reservations": []})
    stub.add_response("run_instances", RUN_ANSWER)
    raw = {**RUN_ANSWER["Instances"][0], "Tags": [{"Key": TOKEN_TAG, "Value": request.token}]}
    stub.add_response("describe_instances", {"Reservations": [{"Instances": [raw]}]})
    with stub:
        results = [aws.launch(request, NOW + attempt) for attempt in range(4)]
    stub.assert_no_pending_responses()
    assert [r.error.kind for r in results[:2] if r.error] == [ErrorKind.THROTTLED] * 2
    assert [r.instance.id for r in results[2:] if r.instance] == ["i-0123456789abcdef0"] * 2


def test_terminate_and_list_errors() -> None:
    """Terminating an unknown id is None; other terminate and list errors are data."""
    aws, stub = stubbed()
    stub.add_client_error("terminate_instances", service_error_code="InvalidInstanceID.NotFound")
    stub.add_client_error("terminate_instances", service_error_code="UnauthorizedOperation")
    stub.add_client_error("describe_instances", service_error_code="Throttling")
    with stub:
        assert aws.terminate("i-gone", NOW) is None
        denied = aws.terminate("i-0123456789abcdef0", NOW)
        listed = aws.list_instances(NOW)
    assert denied is not None
    assert denied.kind is ErrorKind.AUTH
    assert isinstance(listed, ProviderError)
    assert listed.kind is ErrorKind.THROTTLED


def test_unreachable_endpoint_is_other() -> None:
    """No server at the endpoint: an OTHER error naming it, never an exception."""
    ec2 = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    result = AwsProvider(REGION, image_id="ami-1", client=ec2).launch(req(), NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.OTHER


def test_error_kinds_and_client_tokens() -> None:
    """The code table, and ClientTokens that fit EC2's 64 characters."""
    assert error_kind("InsufficientHostCapacity") is ErrorKind.CAPACITY
    assert error_kind("SpotMaxPriceTooLow") is ErrorKind.CAPACITY
    assert error_kind("MaxSpotInstanceCountExceeded") is ErrorKind.QUOTA
    assert error_kind("InvalidInstanceType.NotFound") is ErrorKind.UNSUPPORTED
    assert error_kind("InvalidParameterValue", "Invalid instance type 'x'") is ErrorKind.UNSUPPORTED
    assert error_kind("InvalidParameterValue", "bad subnet") is ErrorKind.OTHER
    assert error_kind("AuthFailure") is ErrorKind.AUTH
    assert client_token("short") == "short"
    long = "t" * 100
    assert len(client_token(long)) == 64
    assert client_token(long) == client_token(long) != client_token(long + "x")


# -- price refresh -----------------------------------------------------------------------


def _rows(directory: Path) -> dict[str, dict[str, str]]:
    with (directory / "offers.csv").open(newline="") as fh:
        return {f"{r['cloud']}/{r['region']}/{r['instance_type']}": r for r in csv.DictReader(fh)}


def test_price_refresh_writes_a_new_catalog_version(url: str, tmp_path: Path) -> None:
    """Spot prices from moto land in a new catalog that load_catalog and pool_offers read."""
    out = tmp_path / "catalog"
    seen: list[tuple[int, int]] = []
    updated = refresh_aws(
        DATA_DIR,
        out,
        region=REGION,
        endpoint_url=url,
        pricing_endpoint_url=url,  # moto has no Pricing API: on-demand stays as shipped
        progress=lambda done, total: seen.append((done, total)),
        today=TODAY,
        ec2_client=client("ec2", url),
    )
    before, after = load_catalog(DATA_DIR), load_catalog(out)
    assert after.version == f"{TODAY}.aws-refresh" != before.version
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == 1
    old, new = _rows(DATA_DIR), _rows(out)
    changed = [k for k in new if new[k] != old[k]]
    assert updated == len(changed) > 0
    for key in changed:
        assert new[key]["price_date"] == TODAY
        assert new[key]["source"].startswith(f"{SPOT_SOURCE} {TODAY}")
        assert new[key]["on_demand_usd_per_hour"] == old[key]["on_demand_usd_per_hour"]
        assert key.startswith(f"aws/{REGION}/")
    assert seen
    assert seen[-1][0] == seen[-1][1]
    cpu = PoolConfig(
        name="cpu", provider="aws", accelerator="cpu", region=REGION, instance_types=("c6i.xlarge",)
    )
    priced = {p.market: p.usd_per_hour for p in pool_offers(cpu, after)}
    offer = next(o for o in after.offers if o.key == f"aws/{REGION}/c6i.xlarge")
    assert priced == {Market.SPOT: offer.spot_usd_per_hour, Market.ON_DEMAND: 0.17}


def test_price_refresh_reads_the_pricing_api(tmp_path: Path) -> None:
    """On-demand prices come from GetProducts' OnDemand terms (stubbed, moto lacks it)."""
    ec2 = client("ec2", "http://unused.invalid")
    pricing = client("pricing", "http://unused.invalid")
    product = {
        "product": {"attributes": {"instanceType": "c6i.xlarge"}},
        "terms": {
            "OnDemand": {
                "X.Y": {
                    "priceDimensions": {
                        "X.Y.Z": {"unit": "Hrs", "pricePerUnit": {"USD": "0.1900000000"}}
                    }
                }
            }
        },
    }
    types = sorted({o.instance_type for o in load_catalog(DATA_DIR).offers if o.cloud == "aws"})
    with Stubber(ec2) as ec2_stub, Stubber(pricing) as pricing_stub:
        ec2_stub.add_response("describe_spot_price_history", {"SpotPriceHistory": []})
        for t in types:
            pricing_stub.add_response(
                "get_products", {"PriceList": [json.dumps(product)] if t == "c6i.xlarge" else []}
            )
        updated = refresh_aws(
            DATA_DIR,
            tmp_path / "out",
            region=REGION,
            today=TODAY,
            ec2_client=ec2,
            pricing_client=pricing,
        )
        pricing_stub.assert_no_pending_responses()
    assert updated == 1
    row = _rows(tmp_path / "out")[f"aws/{REGION}/c6i.xlarge"]
    assert row["on_demand_usd_per_hour"] == "0.19"
    assert (
        row["source"]
        == f"{ON_DEMAND_SOURCE} {TODAY}; spot price kept from catalog snapshot 001367d (undated)"
    )
    assert on_demand_from_products([]) is None


def test_price_refresh_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    with pytest.raises(PriceRefreshError):
        refresh_aws(DATA_DIR, DATA_DIR, region=REGION, today=TODAY)


def test_cli_catalog_refresh_writes_a_new_version_the_planner_reads(tmp_path: Path) -> None:
    """`fleet catalog refresh --cloud aws` against moto writes a catalog FLEET_CATALOG_DIR can use."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from fleet.catalog import load_catalog  # noqa: PLC0415

    out = tmp_path / "refreshed"
    with moto_server(tmp_path / "moto.log") as url:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        done = subprocess.run(
            [sys.executable, "-m", "fleet", "catalog", "refresh", "--cloud", "aws", "--endpoint-url", url, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "offers updated" in done.stdout
    refreshed = load_catalog(out)
    assert refreshed.version.endswith(".aws-refresh")

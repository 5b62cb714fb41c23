"""Refresh the AWS prices of a catalog into a new catalog version (the only networked step).

``refresh_aws`` reads a catalog directory, asks EC2 and the Pricing API for the current
prices of the AWS offers of one region, and writes a complete new catalog directory
(``manifest.json`` with ``catalog_version = "<today>.aws-refresh"`` and the same
``schema_version``, ``accelerators.json`` copied, ``offers.csv`` with updated rows) that
``fleet.catalog.load_catalog`` reads without any network. The input is never modified.

* **Spot** comes from EC2 ``DescribeSpotPriceHistory`` (``Linux/UNIX``, start time now,
  so each zone's price in effect now): for each instance type the latest price of each
  availability zone, then the **maximum over zones** (the planner may land in any zone;
  the highest keeps budgets safe).
* **On-demand** comes from the Pricing API (``pricing`` in us-east-1, ``GetProducts``
  with instanceType, location, operatingSystem Linux, tenancy Shared, preInstalledSw NA,
  capacitystatus Used): the OnDemand term's hourly USD price (the highest if several
  products match). The Pricing API is optional: when it cannot be reached or answers
  an error (moto does not implement it: its server answers 500), the first failure
  stops further Pricing calls and every on-demand price is **left as shipped**.
* A row is updated when a source returned a price for it (even an unchanged number: its
  date says when the price was confirmed): its ``price_date`` becomes ``today`` and its
  ``source`` names the API and date (``AWS EC2 DescribeSpotPriceHistory <today>``,
  ``AWS Pricing API <today>``), noting a price of the other market kept from before.

Clients come from ``fleet.providers.aws.make_client`` (the default credential chain);
errors from the spot API raise ``PriceRefreshError`` with a credential-free message.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet.catalog.apis import carry_api_offers
from fleet.providers.aws import AWS_ERRORS, describe_error, make_client

SPOT_SOURCE = "AWS EC2 DescribeSpotPriceHistory"
ON_DEMAND_SOURCE = "AWS Pricing API"
PRICING_REGION = "us-east-1"  # the Pricing API's endpoint region
_BATCH = 50
# Pricing API "location" of each region; others are filtered by "regionCode".
LOCATIONS = {
    "us-east-1": "US East (N. Virginia)",
    "us-east-2": "US East (Ohio)",
    "us-west-1": "US West (N. California)",
    "us-west-2": "US West (Oregon)",
    "ca-central-1": "Canada (Central)",
    "eu-west-1": "EU (Ireland)",
    "eu-west-2": "EU (London)",
    "eu-west-3": "EU (Paris)",
    "eu-central-1": "EU (Frankfurt)",
    "eu-north-1": "EU (Stockholm)",
    "ap-northeast-1": "Asia Pacific (Tokyo)",
    "ap-northeast-2": "Asia Pacific (Seoul)",
    "ap-southeast-1": "Asia Pacific (Singapore)",
    "ap-southeast-2": "Asia Pacific (Sydney)",
    "ap-south-1": "Asia Pacific (Mumbai)",
    "sa-east-1": "South America (Sao Paulo)",
}


class PriceRefreshError(RuntimeError):
    """The catalog could not be refreshed (a file problem or the EC2 spot API failed)."""


def refresh_aws(
    catalog_dir_in: Path,
    catalog_dir_out: Path,
    *,
    region: str,
    endpoint_url: str | None = None,
    pricing_endpoint_url: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    today: str,
    ec2_client: Any = None,  # noqa: ANN401 - an injected boto3 client (tests)
    pricing_client: Any = None,  # noqa: ANN401 - same
) -> int:
    """Write ``catalog_dir_out``: the catalog of ``catalog_dir_in`` with fresh AWS prices.

    Args:
        catalog_dir_in: the catalog to start from (left untouched).
        catalog_dir_out: where the new version goes (created; must differ from the input).
        region: the AWS region whose offers are refreshed; other rows are copied as is.
        endpoint_url: another EC2 endpoint (moto).
        pricing_endpoint_url: another Pricing API endpoint.
        progress: called with (offers done, offers to do) as on-demand prices are fetched.
        today: the ISO date written as ``price_date`` and into the catalog version.
        ec2_client: a ready boto3 EC2 client instead of one built from the above.
        pricing_client: a ready boto3 Pricing client instead of one built from the above.

    Returns:
        The number of offers (rows) whose price was refreshed.

    Raises:
        PriceRefreshError: the input catalog cannot be read, the output equals the input,
            or DescribeSpotPriceHistory failed.

    """
    if catalog_dir_in.resolve() == catalog_dir_out.resolve():
        raise PriceRefreshError("the refreshed catalog must go to a new directory")
    try:
        manifest = json.loads((catalog_dir_in / "manifest.json").read_text(encoding="utf-8"))
        with (catalog_dir_in / manifest["offers"]).open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, KeyError, ValueError) as exc:
        raise PriceRefreshError(f"cannot read catalog at {catalog_dir_in}: {exc}") from exc
    ours = [r for r in rows if r["cloud"] == "aws" and r["region"] == region]
    types = sorted({r["instance_type"] for r in ours})

    ec2 = (
        ec2_client
        if ec2_client is not None
        else make_client("ec2", region, endpoint_url=endpoint_url)
    )
    try:
        spot = spot_prices(ec2, types)
    except AWS_ERRORS as exc:
        raise PriceRefreshError(f"DescribeSpotPriceHistory: {describe_error(exc)[1]}") from exc
    pricing = pricing_client
    if pricing is None:
        pricing = make_client(
            "pricing", PRICING_REGION, endpoint_url=pricing_endpoint_url, max_attempts=2
        )
    on_demand = _on_demand_prices(pricing, region, types, progress)

    updated = sum(_update(row, spot, on_demand, today) for row in ours)
    catalog_dir_out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        catalog_dir_in / manifest["accelerators"], catalog_dir_out / manifest["accelerators"]
    )
    carry_api_offers(manifest, catalog_dir_in, catalog_dir_out)
    with (catalog_dir_out / manifest["offers"]).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    new_manifest = {
        **manifest,
        "catalog_version": f"{today}.aws-refresh",
        "refreshed_from": str(manifest.get("catalog_version", "")),
    }
    (catalog_dir_out / "manifest.json").write_text(
        json.dumps(new_manifest, indent=2) + "\n", encoding="utf-8"
    )
    return updated


def spot_prices(ec2: Any, instance_types: Iterable[str]) -> dict[str, float]:  # noqa: ANN401
    """Current Linux spot price per instance type: latest per zone, maximum over zones.

    Types without any history are left out. AWS errors propagate (``AWS_ERRORS``).
    """
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    types = list(instance_types)
    now = datetime.now(UTC)
    paginator = ec2.get_paginator("describe_spot_price_history")
    for start in range(0, len(types), _BATCH):
        pages = paginator.paginate(
            InstanceTypes=types[start : start + _BATCH],
            ProductDescriptions=["Linux/UNIX"],
            StartTime=now,
            EndTime=now,
        )
        for page in pages:
            for item in page.get("SpotPriceHistory", []):
                key = (item["InstanceType"], item.get("AvailabilityZone", ""))
                stamp = item["Timestamp"]
                price = float(item["SpotPrice"])
                if key not in latest or stamp > latest[key][0]:
                    latest[key] = (stamp, price)
    out: dict[str, float] = {}
    for (instance_type, _zone), (_stamp, price) in latest.items():
        out[instance_type] = max(price, out.get(instance_type, 0.0))
    return out


def on_demand_from_products(price_list: Iterable[str | dict[str, Any]]) -> float | None:
    """The hourly USD price of a GetProducts ``PriceList`` (the highest positive one), or None."""
    prices: list[float] = []
    for item in price_list:
        product = json.loads(item) if isinstance(item, str) else item
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if usd is not None and float(usd) > 0:
                    prices.append(float(usd))
    return max(prices) if prices else None


def _on_demand_prices(
    pricing: Any,  # noqa: ANN401 - a boto3 client
    region: str,
    instance_types: list[str],
    progress: Callable[[int, int], None] | None,
) -> dict[str, float]:
    """On-demand prices by type; empty (all left as shipped) once the Pricing API fails."""
    where = (
        {"Type": "TERM_MATCH", "Field": "location", "Value": LOCATIONS[region]}
        if region in LOCATIONS
        else {"Type": "TERM_MATCH", "Field": "regionCode", "Value": region}
    )
    out: dict[str, float] = {}
    for done, instance_type in enumerate(instance_types, start=1):
        filters = [
            {"Type": "TERM_MATCH", "Field": "instanceType", "Value": instance_type},
            where,
            {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"},
            {"Type": "TERM_MATCH", "Field": "tenancy", "Value": "Shared"},
            {"Type": "TERM_MATCH", "Field": "preInstalledSw", "Value": "NA"},
            {"Type": "TERM_MATCH", "Field": "capacitystatus", "Value": "Used"},
        ]
        try:
            answer = pricing.get_products(ServiceCode="AmazonEC2", Filters=filters)
        except AWS_ERRORS:
            # Unreachable or unimplemented (moto): every on-demand price stays as shipped.
            if progress is not None:
                progress(len(instance_types), len(instance_types))
            return {}
        price = on_demand_from_products(answer.get("PriceList", []))
        if price is not None:
            out[instance_type] = price
        if progress is not None:
            progress(done, len(instance_types))
    return out


def _price_text(price: float) -> str:
    return f"{price:.6f}".rstrip("0").rstrip(".") or "0"


def _update(
    row: dict[str, str], spot: dict[str, float], on_demand: dict[str, float], today: str
) -> bool:
    """Write fresh prices into ``row``; whether it had any."""
    instance_type = row["instance_type"]
    sources = []
    if instance_type in spot:
        row["spot_usd_per_hour"] = _price_text(spot[instance_type])
        sources.append(f"{SPOT_SOURCE} {today}")
    if instance_type in on_demand:
        row["on_demand_usd_per_hour"] = _price_text(on_demand[instance_type])
        sources.append(f"{ON_DEMAND_SOURCE} {today}")
    if not sources:
        return False
    if instance_type not in on_demand and row["on_demand_usd_per_hour"].strip():
        sources.append(f"on-demand price kept from {row['price_date'] or 'the previous catalog'}")
    if instance_type not in spot and row["spot_usd_per_hour"].strip():
        sources.append(f"spot price kept from {row['price_date'] or 'the previous catalog'}")
    row["price_date"] = today
    row["source"] = "; ".join(sources)
    return True

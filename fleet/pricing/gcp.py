"""Refresh GCP GPU offer prices from the Cloud Billing Catalog into a new catalog version.

Contract of ``refresh_gcp``:

* Reads the Compute Engine SKUs (``services/6F81-5844-456A``) once through
  ``google.cloud.billing_v1.CloudCatalogClient.list_skus`` (or the ``billing_client``
  given: tests pass one on REST aimed at a local fake).
* A GCP GPU offer's price is rebuilt from three components, each the first tiered rate
  (``units + nanos / 1e9``) of a SKU whose ``service_regions`` holds the offer's region:
  ``accelerator_count x GPU`` + ``vcpus x core`` + ``memory_gb x RAM``, where the SKUs are
  found by the description fragments in ``MACHINE_FAMILIES`` for the machine family
  (``usage_type`` ``OnDemand`` for the on-demand price, ``Preemptible`` for spot;
  commitment, reservation and DWS SKUs are skipped). A price is updated only when all
  three components match; otherwise the row keeps its old price (no partial update of a
  total that would mix sources). TPU offers are priced by another service (Cloud TPU)
  and are left as they are.
* Writes ``catalog_dir_out`` with the same three files: ``accelerators.json`` copied,
  ``offers.csv`` with changed rows carrying ``price_date=today`` and source
  ``GCP Cloud Billing Catalog <today>``, ``manifest.json`` with catalog version
  ``<today>.gcp-refresh``. The input directory is never modified.
* Returns how many rows changed. ``progress(done, total)`` is called per GCP offer.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.catalog.apis import carry_api_offers

COMPUTE_SERVICE = "services/6F81-5844-456A"
ON_DEMAND, PREEMPTIBLE = "OnDemand", "Preemptible"
# machine type prefix -> (GPU SKU description fragment, core/RAM SKU family fragment)
MACHINE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("a2-highgpu-", "Nvidia Tesla A100 GPU", "A2 Instance"),
    ("a2-megagpu-", "Nvidia Tesla A100 GPU", "A2 Instance"),
    ("a2-ultragpu-", "Nvidia Tesla A100 80GB GPU", "A2 Instance"),
    ("a3-highgpu-", "Nvidia H100 80GB GPU", "A3 Instance"),
    ("a3-megagpu-", "Nvidia H100 80GB Plus GPU", "A3Plus Instance"),
    ("g2-", "Nvidia L4 GPU", "G2 Instance"),
)
_SKIP = ("commit", "reserv", "dws", "calendar", "flex")


@dataclass(frozen=True, slots=True)
class _Rate:
    description: str
    usage_type: str
    regions: frozenset[str]
    usd: float


def _first_rate(sku: Any) -> float | None:  # noqa: ANN401 - a billing_v1.Sku (optional SDK)
    """``units + nanos/1e9`` of the first tiered rate of the SKU's first pricing info."""
    for info in sku.pricing_info:
        for tier in info.pricing_expression.tiered_rates:
            price = tier.unit_price
            return float(price.units) + float(price.nanos) / 1e9
    return None


def _rates(skus: Iterable[Any]) -> list[_Rate]:
    out = []
    for sku in skus:
        usd = _first_rate(sku)
        if usd is None or any(word in sku.description.lower() for word in _SKIP):
            continue
        out.append(
            _Rate(sku.description, sku.category.usage_type, frozenset(sku.service_regions), usd)
        )
    return out


def _find(rates: list[_Rate], fragment: str, region: str, usage: str) -> float | None:
    """The rate whose description contains ``fragment`` (not a longer variant of it)."""
    matches = [
        r
        for r in rates
        if r.usage_type == usage
        and region in r.regions
        and fragment in r.description
        and not _longer_variant(r.description, fragment)
    ]
    return min((r.usd for r in matches), default=None)


def _longer_variant(description: str, fragment: str) -> bool:
    """'Nvidia H100 80GB GPU' must not take 'Nvidia H100 80GB Plus GPU' (nor A100 80GB)."""
    return any(
        fragment != other and fragment.replace(" GPU", "") in other and other in description
        for _, other, _ in MACHINE_FAMILIES
    )


def _price(rates: list[_Rate], row: dict[str, str], usage: str) -> float | None:
    family = next((f for f in MACHINE_FAMILIES if row["instance_type"].startswith(f[0])), None)
    if family is None or not row.get("vcpus") or not row.get("memory_gb"):
        return None
    _, gpu_fragment, vm_fragment = family
    region = row["region"]
    gpu = _find(rates, gpu_fragment, region, usage)
    core = _find(rates, f"{vm_fragment} Core", region, usage)
    ram = _find(rates, f"{vm_fragment} Ram", region, usage)
    if gpu is None or core is None or ram is None:
        return None
    total = (
        int(row["accelerator_count"]) * gpu
        + float(row["vcpus"]) * core
        + float(row["memory_gb"]) * ram
    )
    return round(total, 5)


def _same(old: str, new: float) -> bool:
    return bool(old.strip()) and abs(float(old) - new) < 1e-9  # noqa: PLR2004 - float equality


def refresh_gcp(
    catalog_dir_in: Path,
    catalog_dir_out: Path,
    *,
    today: str,
    billing_client: Any = None,  # noqa: ANN401 - an injected CloudCatalogClient (tests)
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a new catalog version with GCP GPU prices from the Cloud Billing Catalog.

    See the module docstring for the matching rules. ``billing_client`` defaults to
    ``billing_v1.CloudCatalogClient()`` (standard credentials chain).

    Returns:
        The number of offer rows whose price changed.

    """
    if billing_client is None:
        from google.cloud import billing_v1  # noqa: PLC0415 - optional SDK

        billing_client = billing_v1.CloudCatalogClient()
    rates = _rates(billing_client.list_skus(parent=COMPUTE_SERVICE))
    manifest = json.loads((catalog_dir_in / "manifest.json").read_text())
    with (catalog_dir_in / manifest["offers"]).open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or ())
        rows = list(reader)
    gcp_rows = [row for row in rows if row["cloud"] == "gcp"]
    updated = 0
    for done, row in enumerate(gcp_rows, start=1):
        changed = False
        for column, usage in (
            ("on_demand_usd_per_hour", ON_DEMAND),
            ("spot_usd_per_hour", PREEMPTIBLE),
        ):
            price = _price(rates, row, usage)
            if price is not None and not _same(row[column], price):
                row[column] = f"{price:g}"
                changed = True
        if changed:
            row["price_date"] = today
            row["source"] = f"GCP Cloud Billing Catalog {today}"
            updated += 1
        if progress is not None:
            progress(done, len(gcp_rows))
    catalog_dir_out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        catalog_dir_in / manifest["accelerators"], catalog_dir_out / manifest["accelerators"]
    )
    carry_api_offers(manifest, catalog_dir_in, catalog_dir_out)
    with (catalog_dir_out / manifest["offers"]).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    manifest["catalog_version"] = f"{today}.gcp-refresh"
    (catalog_dir_out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return updated

"""Refresh Azure offer prices from the public Azure Retail Prices API into a new catalog.

Contract:

* Reads the catalog in ``catalog_dir_in`` (``manifest.json``, its accelerators file and
  ``offers.csv``) and writes a complete catalog to ``catalog_dir_out`` (which may be the
  same directory); nothing else on disk changes. Reading the catalog later never touches
  the network: this is the offline fetcher ``fleet.catalog`` speaks of.
* For every ``azure`` row it asks the API (anonymous, ``requests``) for
  ``serviceName eq 'Virtual Machines' and armRegionName eq '<region>' and armSkuName eq
  '<size>'``, following ``NextPageLink``. Of the items it keeps pay-as-you-go Linux meters
  (``type`` ``Consumption``, ``productName`` without ``Windows``, ``skuName``/``meterName``
  without ``Low Priority``); one with ``Spot`` in ``skuName`` or ``meterName`` is the spot
  price, the others on-demand; when several match, the latest ``effectiveStartDate`` wins.
* A row the API prices (either market) is updated: both price columns take the API's
  values (a market it does not price becomes empty, rather than keeping an older figure
  under the new date), ``price_date`` becomes ``today`` and ``source`` ``"Azure Retail
  Prices API <today>"``. Rows it does not price, and other clouds' rows, are unchanged.
* The manifest gets ``catalog_version`` ``"<today>.azure-refresh"``, ``price_date`` and
  ``source``; the return value is the number of rows updated.
* HTTP errors raise ``requests.HTTPError``; nothing is written unless every query worked.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests

from fleet.catalog.apis import carry_api_offers

RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
TIMEOUT_S = 30.0
MAX_PAGES = 100


def _query(region: str, size: str) -> str:
    return (
        f"serviceName eq 'Virtual Machines' and armRegionName eq '{region}'"
        f" and armSkuName eq '{size}'"
    )


def _items(
    session: Any,  # noqa: ANN401 - a requests.Session or anything with its get()
    base_url: str,
    region: str,
    size: str,
    verify: str | bool,  # noqa: FBT001 - mirrors requests' own verify argument
) -> list[dict[str, Any]]:
    """Every item of one filtered query, following ``NextPageLink``."""
    out: list[dict[str, Any]] = []
    url: str | None = base_url
    params: dict[str, str] | None = {"$filter": _query(region, size)}
    for _ in range(MAX_PAGES):
        if url is None:
            break
        response = session.get(url, params=params, timeout=TIMEOUT_S, verify=verify)
        response.raise_for_status()
        page = response.json()
        out.extend(page.get("Items") or [])
        url, params = page.get("NextPageLink") or None, None
    return out


def prices_of(items: Iterable[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(on-demand, spot) USD/hour from Retail Prices API items (see the module)."""
    best: dict[bool, tuple[str, float]] = {}
    for item in items:
        sku, meter = str(item.get("skuName", "")), str(item.get("meterName", ""))
        if item.get("type") != "Consumption" or "Windows" in str(item.get("productName", "")):
            continue
        if "Low Priority" in sku or "Low Priority" in meter:
            continue
        spot = "Spot" in sku or "Spot" in meter
        start = str(item.get("effectiveStartDate", ""))
        price = float(item.get("retailPrice", item.get("unitPrice", 0.0)))
        if spot not in best or start > best[spot][0]:
            best[spot] = (start, price)
    on_demand = best[False][1] if False in best else None
    spot_price = best[True][1] if True in best else None
    return on_demand, spot_price


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    Path(tmp).replace(path)


def refresh_azure(
    catalog_dir_in: Path,
    catalog_dir_out: Path,
    *,
    today: str,
    base_url: str = RETAIL_PRICES_URL,
    session: Any = None,  # noqa: ANN401 - a requests.Session (tests pass their own)
    verify: str | bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a catalog with Azure prices from the Retail Prices API; rows updated.

    Args:
        catalog_dir_in: the catalog to start from.
        catalog_dir_out: where the new version goes (created if missing).
        today: the price date, ``YYYY-MM-DD``.
        base_url: the API endpoint (tests point it at a fake).
        session: a ``requests.Session``; one is made (and closed) if None.
        verify: ``requests``' TLS verification (a CA bundle path in tests).
        progress: called with (rows done, rows to do) after each Azure row.

    Raises:
        requests.HTTPError: the API answered an error; nothing was written.

    """
    manifest = json.loads((catalog_dir_in / "manifest.json").read_text())
    with (catalog_dir_in / manifest["offers"]).open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    azure = [row for row in rows if row["cloud"] == "azure"]
    own = session is None
    http = requests.Session() if own else session
    source = f"Azure Retail Prices API {today}"
    updated = 0
    try:
        for done, row in enumerate(azure, start=1):
            items = _items(http, base_url, row["region"], row["instance_type"], verify)
            on_demand, spot = prices_of(items)
            if on_demand is not None or spot is not None:
                row["on_demand_usd_per_hour"] = _fmt(on_demand)
                row["spot_usd_per_hour"] = _fmt(spot)
                row["price_date"] = today
                row["source"] = source
                updated += 1
            if progress is not None:
                progress(done, len(azure))
    finally:
        if own:
            http.close()
    catalog_dir_out.mkdir(parents=True, exist_ok=True)
    accelerators_in = catalog_dir_in / manifest["accelerators"]
    accelerators_out = catalog_dir_out / manifest["accelerators"]
    if accelerators_in.resolve() != accelerators_out.resolve():
        shutil.copyfile(accelerators_in, accelerators_out)
    carry_api_offers(manifest, catalog_dir_in, catalog_dir_out)
    with tempfile.SpooledTemporaryFile(mode="w+", newline="") as buf:
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        buf.seek(0)
        _write(catalog_dir_out / manifest["offers"], buf.read())
    manifest |= {
        "catalog_version": f"{today}.azure-refresh",
        "price_date": today,
        "source": source,
    }
    _write(catalog_dir_out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return updated

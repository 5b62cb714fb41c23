"""The catalog: accelerator families and priced offers, read from versioned data files.

Reading never touches the network. The shipped files live in ``fleet/catalog/data``;
a directory with the same three files (``manifest.json``, ``accelerators.json``,
``offers.csv``) can replace them through ``FLEET_CATALOG_DIR`` or ``load_catalog(path)``,
which is how a refreshed price list (written by an offline fetcher) is used. A manifest
may also name an ``api_offers`` file: token-priced inference APIs (``fleet.catalog.apis``),
loaded into ``Catalog.apis``.

API offers are listed and looked up wherever the catalog is, but placement routes work
to them only when ``Catalog.route_apis`` is True: a config with ``[[api_pools]]``
(``catalog_for_pools``) or ``FLEET_API_POOLS=1`` turns it on, so a fleet that runs no API
worker never sends work to a queue nobody consumes.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from fleet.catalog.apis import ApiOffer, load_api_offers

SCHEMA_VERSION = 1
DATA_DIR = Path(__file__).parent / "data"


class Market(StrEnum):
    """How an offer is bought."""

    ON_DEMAND = "on_demand"
    SPOT = "spot"


@dataclass(frozen=True, slots=True)
class Family:
    """One accelerator family: what a single device of it holds and how fast it is.

    For ``cpu`` (``per_vcpu``) bandwidth and TFLOPS are per vCPU and memory comes from
    the offer's RAM.
    """

    name: str
    vendor: str
    display: str
    memory_gb: float
    memory_bandwidth_gbps: float
    bf16_tflops: float
    runtimes: frozenset[str]
    dtypes: frozenset[str]
    kinds: frozenset[str]
    decode_efficiency: float
    batch_gain: float
    saturation_params_b: float
    cold_start_s: float
    source: str
    per_vcpu: bool = False
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Offer:
    """One instance type in one region, with the prices it is sold at (USD per hour)."""

    cloud: str
    region: str
    instance_type: str
    accelerator: str
    accelerator_count: int
    accelerator_memory_gb: float
    vcpus: int | None
    memory_gb: float | None
    on_demand_usd_per_hour: float | None
    spot_usd_per_hour: float | None
    price_date: str
    source: str
    notes: str = ""

    @property
    def key(self) -> str:
        """A stable identifier: ``cloud/region/instance_type``."""
        return f"{self.cloud}/{self.region}/{self.instance_type}"

    def price(self, market: Market) -> float | None:
        """The hourly price in ``market``, or None where the source gave none."""
        if market is Market.SPOT:
            return self.spot_usd_per_hour
        return self.on_demand_usd_per_hour

    def markets(self) -> tuple[Market, ...]:
        """The markets this offer has a known price in."""
        return tuple(m for m in Market if self.price(m) is not None)


@dataclass(frozen=True, slots=True)
class Catalog:
    """Families and offers of one catalog version."""

    version: str
    families: dict[str, Family]
    offers: tuple[Offer, ...]
    offers_by_family: dict[str, tuple[Offer, ...]] = field(default_factory=dict)
    # Memo for pure functions of (catalog, spec shape), e.g. placement analysis.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # Token-priced API offers (fleet.catalog.apis); placement uses them iff route_apis.
    apis: tuple[ApiOffer, ...] = ()
    route_apis: bool = False

    def family(self, name: str) -> Family:
        """The family called ``name``; KeyError names the valid ones."""
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(
                f"unknown accelerator {name!r}; known: {sorted(self.families)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Canonical accelerator names, sorted."""
        return tuple(sorted(self.families))


class CatalogError(ValueError):
    """A catalog file is missing, of another schema version, or malformed."""


def _opt_float(value: str) -> float | None:
    value = value.strip()
    return float(value) if value else None


def _family(raw: dict[str, Any]) -> Family:
    return Family(
        name=raw["name"],
        vendor=raw["vendor"],
        display=raw["display"],
        memory_gb=float(raw["memory_gb"]),
        memory_bandwidth_gbps=float(raw["memory_bandwidth_gbps"]),
        bf16_tflops=float(raw["bf16_tflops"]),
        runtimes=frozenset(raw["runtimes"]),
        dtypes=frozenset(raw["dtypes"]),
        kinds=frozenset(raw["kinds"]),
        decode_efficiency=float(raw["decode_efficiency"]),
        batch_gain=float(raw["batch_gain"]),
        saturation_params_b=float(raw["saturation_params_b"]),
        cold_start_s=float(raw["cold_start_s"]),
        source=raw["source"],
        per_vcpu=bool(raw.get("per_vcpu", False)),
        aliases=tuple(raw.get("aliases", ())),
    )


def _offer(row: dict[str, str], families: dict[str, Family], line: int) -> Offer:
    acc = row["accelerator"]
    if acc not in families:
        raise CatalogError(f"offers.csv line {line}: unknown accelerator {acc!r}")
    vcpus = row["vcpus"].strip()
    return Offer(
        cloud=row["cloud"],
        region=row["region"],
        instance_type=row["instance_type"],
        accelerator=acc,
        accelerator_count=int(row["accelerator_count"]),
        accelerator_memory_gb=float(row["accelerator_memory_gb"]),
        vcpus=int(float(vcpus)) if vcpus else None,
        memory_gb=_opt_float(row["memory_gb"]),
        on_demand_usd_per_hour=_opt_float(row["on_demand_usd_per_hour"]),
        spot_usd_per_hour=_opt_float(row["spot_usd_per_hour"]),
        price_date=row["price_date"],
        source=row["source"],
        notes=row.get("notes", "") or "",
    )


def load_catalog(directory: Path | None = None) -> Catalog:
    """Read a catalog directory (default: ``FLEET_CATALOG_DIR`` or the shipped data).

    Raises:
        CatalogError: a file is missing, malformed, or of another schema version.

    """
    directory = directory or Path(os.environ.get("FLEET_CATALOG_DIR") or DATA_DIR)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise CatalogError(
                f"{directory}/manifest.json: schema_version {manifest.get('schema_version')!r},"
                f" this fleet reads {SCHEMA_VERSION}"
            )
        raw = json.loads((directory / manifest["accelerators"]).read_text())
        families = {f["name"]: _family(f) for f in raw["families"]}
        with (directory / manifest["offers"]).open(newline="") as fh:
            offers = tuple(
                _offer(row, families, i) for i, row in enumerate(csv.DictReader(fh), start=2)
            )
        apis = (
            load_api_offers(directory / manifest["api_offers"]) if "api_offers" in manifest else ()
        )
    except (OSError, KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, CatalogError):
            raise
        raise CatalogError(f"cannot read catalog at {directory}: {exc}") from exc
    by_family = {name: tuple(o for o in offers if o.accelerator == name) for name in families}
    route = os.environ.get("FLEET_API_POOLS", "").strip().lower() in {"1", "true", "yes"}
    return Catalog(
        manifest["catalog_version"], families, offers, by_family, apis=apis, route_apis=route
    )


@cache
def default_catalog() -> Catalog:
    """The catalog in use by this process, loaded once."""
    return load_catalog()


def accelerator_names() -> tuple[str, ...]:
    """Canonical accelerator names of the default catalog."""
    return default_catalog().names()

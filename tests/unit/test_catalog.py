"""The shipped catalog: every family, sourced and dated offers that match the reference data."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from fleet.catalog import (
    DATA_DIR,
    SCHEMA_VERSION,
    Catalog,
    CatalogError,
    Market,
    default_catalog,
    load_catalog,
)

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = (
    "nvidia-h100",
    "nvidia-h200",
    "nvidia-a100-40gb",
    "nvidia-a100-80gb",
    "nvidia-l40s",
    "nvidia-l4",
    "nvidia-a10g",
    "nvidia-t4",
    "amd-mi300x",
    "aws-inferentia2",
    "aws-trainium1",
    "aws-trainium2",
    "google-tpu-v5e",
    "google-tpu-v5p",
    "google-tpu-v6e",
    "cpu",
)
# The reference lists no price at all for these (preview / capacity blocks / not found).
UNPRICED = {
    ("aws", "us-east-1", "p5e.48xlarge"),
    ("aws", "us-east-1", "trn2.48xlarge"),
    ("azure", "eastus", "Standard_ND96isr_MI300X_v5"),
}
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def reference_csv(name: str) -> Path | None:
    """``shared/reference/<name>`` beside or inside the checkout, or None when absent."""
    for base in (ROOT, *ROOT.parents):
        candidate = base / "shared" / "reference" / name
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def reference_offers():
    """Rows of offers-researched.csv keyed by (cloud, region, instance type); skip when absent."""
    path = reference_csv("offers-researched.csv")
    if path is None:
        pytest.skip("shared/reference/offers-researched.csv is not beside this checkout")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # The reference annotates some instance types, e.g. "tpu-v5litepod-1 (v5e)".
    return {
        (r["cloud"], r["region"], re.sub(r"\s*\(.*\)$", "", r["instance_type"])): r for r in rows
    }


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The shipped catalog, read fresh from the package data."""
    return load_catalog(DATA_DIR)


def price(text: str) -> float | None:
    """A reference price cell as a float, None when blank."""
    return float(text) if text.strip() else None


# ----------------------------------------------------------------------------- contents


def test_shipped_catalog_loads_offline(catalog, monkeypatch):
    """The shipped catalog loads from package data with sockets disabled."""

    def no_network(*args, **kwargs):
        raise AssertionError("the catalog must not touch the network")

    monkeypatch.setattr("socket.socket.connect", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    fresh = load_catalog(DATA_DIR)
    assert fresh.version == catalog.version
    assert len(fresh.offers) == len(catalog.offers)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_named_in_the_issue_exists(catalog, name):
    """Each accelerator family the issue names is in the catalog, with a source."""
    family = catalog.family(name)
    assert family.name == name
    assert family.source.strip()
    assert family.kinds
    assert family.dtypes
    assert family.runtimes


def test_catalog_has_exactly_the_sixteen_families(catalog):
    """The catalog's names are exactly the sixteen families, sorted."""
    assert set(catalog.names()) == set(FAMILIES)
    assert list(catalog.names()) == sorted(FAMILIES)


def test_unknown_family_error_lists_the_known_names(catalog):
    """Catalog.family on an unknown name raises KeyError listing the valid names."""
    with pytest.raises(KeyError, match="nvidia-h100"):
        catalog.family("nvidia-b200")


def test_every_offer_has_a_source(catalog):
    """Every offer names where its figures came from."""
    assert all(o.source.strip() for o in catalog.offers)


def test_every_priced_offer_has_a_price_date(catalog):
    """Every offer with a price says when: an ISO date, or a snapshot marked undated."""
    for offer in catalog.offers:
        if offer.markets():
            assert ISO_DATE.match(offer.price_date) or "undated" in offer.price_date, offer.key


def test_only_the_reference_unpriced_rows_lack_a_price(catalog):
    """An offer has no known price only where the reference found none."""
    unpriced = {(o.cloud, o.region, o.instance_type) for o in catalog.offers if not o.markets()}
    assert unpriced == UNPRICED


def test_unpriced_rows_match_the_reference(reference_offers):
    """The hard-coded unpriced rows are the reference rows with neither price."""
    blank = {
        key
        for key, row in reference_offers.items()
        if not row["on_demand_usd_per_hour"].strip() and not row["spot_usd_per_hour"].strip()
    }
    assert blank == UNPRICED


def test_offers_cover_three_clouds(catalog):
    """Offers come from aws, gcp and azure."""
    assert {o.cloud for o in catalog.offers} == {"aws", "gcp", "azure"}


def test_offers_are_sane(catalog):
    """Offer keys are unique; counts, memory and prices are positive where given."""
    keys = [o.key for o in catalog.offers]
    assert len(keys) == len(set(keys))
    for o in catalog.offers:
        assert o.accelerator_count >= 1, o.key
        assert o.accelerator_memory_gb > 0, o.key
        for market in Market:
            p = o.price(market)
            assert p is None or p > 0, o.key


def test_offers_by_family_partitions_the_offers(catalog):
    """offers_by_family has every family and each offer under its own accelerator."""
    assert set(catalog.offers_by_family) == set(catalog.families)
    flat = [o for offers in catalog.offers_by_family.values() for o in offers]
    assert sorted(o.key for o in flat) == sorted(o.key for o in catalog.offers)
    for name, offers in catalog.offers_by_family.items():
        assert all(o.accelerator == name for o in offers)


def test_gpu_offers_hold_the_family_memory(catalog):
    """Apart from cpu (host RAM), an offer's memory per device is its family's figure."""
    for o in catalog.offers:
        family = catalog.families[o.accelerator]
        if not family.per_vcpu:
            assert o.accelerator_memory_gb == family.memory_gb, o.key


def test_every_reference_offer_is_in_the_catalog(catalog, reference_offers):
    """Each of the reference's offers is in offers.csv; the only extras are cpu offers."""
    ours = {(o.cloud, o.region, o.instance_type): o for o in catalog.offers}
    assert set(reference_offers) <= set(ours)
    extras = {ours[k].accelerator for k in set(ours) - set(reference_offers)}
    assert extras <= {"cpu"}


def test_catalog_prices_equal_the_reference(catalog, reference_offers):
    """Each offer's on-demand and spot price equals the reference figure for that row."""
    mismatches = []
    for o in catalog.offers:
        row = reference_offers.get((o.cloud, o.region, o.instance_type))
        if row is None:
            continue
        want = (price(row["on_demand_usd_per_hour"]), price(row["spot_usd_per_hour"]))
        got = (o.on_demand_usd_per_hour, o.spot_usd_per_hour)
        if got != want:
            mismatches.append((o.key, got, want))
    assert mismatches == []


def test_catalog_counts_match_the_reference(catalog, reference_offers):
    """Accelerator counts equal the reference's (its Azure ND H100 v5 row already says 8)."""
    for o in catalog.offers:
        row = reference_offers.get((o.cloud, o.region, o.instance_type))
        if row is not None:
            assert o.accelerator_count == int(row["accelerator_count"]), o.key


def test_price_dates_match_the_reference(catalog, reference_offers):
    """Each offer keeps the reference row's price date."""
    for o in catalog.offers:
        row = reference_offers.get((o.cloud, o.region, o.instance_type))
        if row is not None:
            assert o.price_date == row["price_date"], o.key


def test_default_catalog_is_the_shipped_one():
    """default_catalog() (no FLEET_CATALOG_DIR at import) equals the shipped data's version."""
    assert default_catalog().names() == load_catalog(DATA_DIR).names()


# ----------------------------------------------------------------------------- bad catalogs


@pytest.fixture
def copied(tmp_path) -> Path:
    """A writable copy of the shipped catalog directory."""
    target = tmp_path / "catalog"
    shutil.copytree(DATA_DIR, target)
    return target


def rewrite_json(path: Path, **changes) -> None:
    """Update top-level keys of a JSON file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_copied_catalog_loads(copied):
    """A verbatim copy of the shipped data loads like the original."""
    assert load_catalog(copied).offers == load_catalog(DATA_DIR).offers


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_wrong_schema_version_is_refused(copied, version):
    """A manifest of another schema version raises CatalogError naming schema_version."""
    rewrite_json(copied / "manifest.json", schema_version=version)
    with pytest.raises(CatalogError, match="schema_version"):
        load_catalog(copied)


@pytest.mark.parametrize("missing", ["manifest.json", "accelerators.json", "offers.csv"])
def test_missing_file_is_refused(copied, missing):
    """A catalog directory without one of its files raises CatalogError naming the file."""
    (copied / missing).unlink()
    with pytest.raises(CatalogError, match=re.escape(missing)):
        load_catalog(copied)


def test_missing_directory_is_refused(tmp_path):
    """A catalog directory that does not exist raises CatalogError naming the path."""
    with pytest.raises(CatalogError, match="nowhere"):
        load_catalog(tmp_path / "nowhere")


def test_offer_with_unknown_accelerator_is_refused(copied):
    """An offers.csv row naming an unknown accelerator raises CatalogError with its line."""
    path = copied / "offers.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = lines[3].replace("nvidia-h200", "nvidia-b200")
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CatalogError, match=r"line 4.*nvidia-b200"):
        load_catalog(copied)


@pytest.mark.parametrize(
    ("field", "bad"), [("on_demand_usd_per_hour", "cheap"), ("accelerator_count", "eight")]
)
def test_malformed_number_is_refused(copied, field, bad):
    """A non-numeric price or count raises CatalogError, not a bare ValueError."""
    path = copied / "offers.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fieldnames = reader.fieldnames
        rows = list(reader)
    rows[0][field] = bad
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CatalogError, match=bad):
        load_catalog(copied)


def test_malformed_json_is_refused(copied):
    """A truncated accelerators.json raises CatalogError."""
    (copied / "accelerators.json").write_text('{"families": [', encoding="utf-8")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(copied)


def test_fleet_catalog_dir_is_honoured(copied, monkeypatch):
    """load_catalog() reads FLEET_CATALOG_DIR when set: a changed price shows up."""
    path = copied / "offers.csv"
    text = path.read_text(encoding="utf-8")
    assert ",p5.48xlarge,nvidia-h100,8,80,192,2048.0,55.04," in text
    path.write_text(text.replace(",55.04,", ",12.34,"), encoding="utf-8")
    rewrite_json(copied / "manifest.json", catalog_version="test-refresh")
    monkeypatch.setenv("FLEET_CATALOG_DIR", str(copied))
    refreshed = load_catalog()
    assert refreshed.version == "test-refresh"
    [p5] = [o for o in refreshed.offers if o.instance_type == "p5.48xlarge"]
    assert p5.on_demand_usd_per_hour == 12.34
    monkeypatch.delenv("FLEET_CATALOG_DIR")
    [shipped] = [o for o in load_catalog().offers if o.instance_type == "p5.48xlarge"]
    assert shipped.on_demand_usd_per_hour == 55.04


def test_explicit_directory_beats_the_environment(copied, monkeypatch, tmp_path):
    """load_catalog(path) reads path even when FLEET_CATALOG_DIR points elsewhere."""
    monkeypatch.setenv("FLEET_CATALOG_DIR", str(tmp_path / "nowhere"))
    assert load_catalog(copied).names() == tuple(sorted(FAMILIES))

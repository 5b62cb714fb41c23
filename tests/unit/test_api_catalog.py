"""Token-priced API pools in the catalog: the shipped rows, model matching, loading, config."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.autoscaler.config import ConfigError, catalog_for_pools, parse_config
from fleet.catalog import DATA_DIR, CatalogError, default_catalog, load_catalog
from fleet.catalog.apis import (
    ApiOffer,
    api_key_env,
    api_offers,
    base_url_env,
    carry_api_offers,
    find_api_offer,
    jurisdiction,
    model_key,
    offers_for_model,
    provider_of,
    resolved_base_url,
)
from fleet.cli import main
from fleet.queues import all_queue_names, api_queue_name, parse_queue
from fleet.spec import TaskKind

ROOT = Path(__file__).resolve().parents[2]
CATALOG = default_catalog()
PROVIDERS = {"cerebras", "groq", "sambanova", "fireworks"}


def reference_rows() -> list[dict[str, str]]:
    """Rows of shared/reference/throughput-researched.csv; skip when it is not beside the checkout."""
    for base in (ROOT, *ROOT.parents):
        path = base / "shared" / "reference" / "throughput-researched.csv"
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
    pytest.skip("shared/reference/throughput-researched.csv is not beside this checkout")
    return []


def offer(**changes) -> ApiOffer:
    """A plain offer for arithmetic tests."""
    base = {
        "provider": "p",
        "model": "llama-3.1-8b-instruct",
        "api_model": "m",
        "base_url": "http://x/v1",
        "usd_per_m_input": 0.5,
        "usd_per_m_output": 2.0,
        "tokens_per_s": 100.0,
        "ttft_s": 0.5,
        "requests_per_min": 60,
        "tokens_per_min": 10_000,
        "context_tokens": 8192,
        "residency": "us",
        "external": True,
        "price_date": "",
        "source": "test",
    }
    return ApiOffer(**(base | changes))


# ------------------------------------------------------------------------- shipped data


def test_shipped_api_offers_cover_the_four_providers_on_llama_3_1():
    """Cerebras, Groq, SambaNova and Fireworks each offer Llama 3.1 8B and 70B."""
    assert {o.provider for o in api_offers(CATALOG)} == PROVIDERS
    for provider in PROVIDERS:
        for model in ("llama-3.1-8b-instruct", "llama-3.1-70b-instruct"):
            assert find_api_offer(CATALOG, provider, model) is not None, (provider, model)


def test_every_api_offer_is_sourced_and_says_what_is_assumed():
    """Each row names its tokens/s source and flags recalled prices and assumed limits."""
    for o in CATALOG.apis:
        assert o.source.startswith("https://"), o.key
        assert "recalled" in o.source, o.key
        assert "ASSUMPTIONS" in o.notes, o.key
        assert o.external
        assert o.residency == "us"
        assert o.base_url.startswith("https://")


def test_api_speeds_match_the_reference():
    """Every offer's tokens/s per stream is a figure the reference lists for that provider and model."""
    rows = reference_rows()
    setups = {"cerebras": "Cerebras", "groq": "GroqCloud", "sambanova": "SambaNova", "fireworks": "Fireworks"}  # fmt: skip
    for o in CATALOG.apis:
        figures = {
            float(r["tokens_per_s_per_stream"])
            for r in rows
            if setups[o.provider] in r["setup"]
            and model_key(r["model"]) == model_key(o.model)
            and r["tokens_per_s_per_stream"]
        }
        assert o.tokens_per_s in figures, (o.key, figures)


def test_stated_list_prices():
    """The list prices the brief names (USD per million tokens, input/output)."""
    prices = {
        ("groq", "llama-3.1-8b"): (0.05, 0.08),
        ("cerebras", "llama-3.1-8b"): (0.10, 0.10),
        ("cerebras", "llama-3.1-70b"): (0.60, 0.60),
        ("sambanova", "llama-3.1-8b"): (0.10, 0.20),
        ("sambanova", "llama-3.1-70b"): (0.60, 1.20),
        ("sambanova", "llama-3.1-405b"): (5.0, 10.0),
        ("fireworks", "llama-3.1-8b"): (0.20, 0.20),
        ("fireworks", "llama-3.1-70b"): (0.90, 0.90),
        ("fireworks", "llama-3.1-405b"): (3.0, 3.0),
    }
    for (provider, model), (usd_in, usd_out) in prices.items():
        o = find_api_offer(CATALOG, provider, model)
        assert o is not None
        assert (o.usd_per_m_input, o.usd_per_m_output) == (usd_in, usd_out)


def test_each_provider_has_a_parseable_inference_queue():
    """Queue inference.api-<provider> is in all_queue_names and parses back to api-<provider>."""
    names = all_queue_names(CATALOG, "ns.")
    for provider in PROVIDERS:
        queue = api_queue_name(provider, "ns.")
        assert queue == f"ns.inference.api-{provider}"
        assert queue in names
        ref = parse_queue(queue, "ns.")
        assert ref is not None
        assert (ref.kind, ref.accelerator, ref.devices) == (
            TaskKind.INFERENCE,
            f"api-{provider}",
            1,
        )
        assert provider_of(ref.accelerator) == provider
    assert provider_of("nvidia-l4") is None


# ------------------------------------------------------------------------ model matching


@pytest.mark.parametrize(
    "name",
    [
        "llama-3.1-8b-instruct",
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "Meta-Llama-3.1-8B-Instruct",
        "llama3.1-8b",
        "accounts/fireworks/models/llama-v3p1-8b-instruct",
        "Llama 3.1 8B Instruct",
    ],
)
def test_model_names_match_on_the_canonical_key(name):
    """Org prefixes, meta-, -instruct, case, spaces and provider spellings all name one model."""
    assert model_key(name) == "llama-3.1-8b"
    assert {o.provider for o in offers_for_model(CATALOG, name)} == PROVIDERS


@pytest.mark.parametrize("name", ["llama-3.1-70b", "llama-3-8b", "llama-3.1-8b-base", "mistral-7b"])
def test_other_models_do_not_match_8b(name):
    """A different size, version or variant is another model."""
    assert model_key(name) != "llama-3.1-8b"


def test_provider_ids_and_aliases_match():
    """An offer answers to its api_model and its aliases as well as its model."""
    o = offer(api_model="llama-3.1-8b-instant", aliases=("fast-eight",))
    assert o.serves("llama-3.1-8b-instant")
    assert o.serves("Fast_Eight")
    assert not o.serves("llama-3.1-70b")


# ------------------------------------------------------------------------ arithmetic


def test_cost_is_tokens_at_their_per_million_prices():
    """1,000 in at $0.5/M plus 500 out at $2/M is $0.0015."""
    assert offer().cost_usd(1000, 500) == pytest.approx(0.0015)
    assert offer().cost_usd(0, 0) == 0


def test_latency_is_first_token_plus_output_at_stream_speed():
    """0.5 s to the first token, then 200 tokens at 100 tokens/s: 2.5 s."""
    assert offer().latency_s(4000, 200) == pytest.approx(2.5)


def test_context_limit_counts_input_and_output():
    """8,192 tokens fit; one more does not."""
    assert offer().fits_context(8000, 192)
    assert not offer().fits_context(8000, 193)


def test_credentials_and_base_url_come_from_the_environment():
    """FLEET_API_KEY_<PROVIDER> and FLEET_API_BASE_URL_<PROVIDER>, upper-case with - as _."""
    assert api_key_env("my-vllm") == "FLEET_API_KEY_MY_VLLM"
    assert base_url_env("groq") == "FLEET_API_BASE_URL_GROQ"
    groq = find_api_offer(CATALOG, "groq", "llama-3.1-8b")
    assert groq is not None
    assert resolved_base_url(groq, {}) == "https://api.groq.com/openai/v1"
    local = {"FLEET_API_BASE_URL_GROQ": "http://127.0.0.1:9/v1"}
    assert resolved_base_url(groq, local) == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("cloud", "region", "where"),
    [
        ("aws", "us-east-1", "us"),
        ("gcp", "us-central1", "us"),
        ("azure", "eastus", "us"),
        ("aws", "eu-west-1", "eu"),
        ("gcp", "europe-west4", "eu"),
        ("azure", "westeurope", "eu"),
        ("gcp", "asia-east1", "ap"),
        ("aws", "ap-northeast-1", "ap"),
        ("azure", "australiaeast", "australiaeast"),
    ],
)
def test_cloud_region_jurisdiction(cloud, region, where):
    """Cloud offers match requirements.residency through their region's jurisdiction."""
    assert jurisdiction(cloud, region) == where


# --------------------------------------------------------------------------- loading


@pytest.fixture
def copied(tmp_path) -> Path:
    """A writable copy of the shipped catalog directory."""
    target = tmp_path / "catalog"
    shutil.copytree(DATA_DIR, target)
    return target


def edit_api_rows(path: Path, edit) -> None:
    """Rewrite api_offers.csv with ``edit(rows)`` applied."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames
        rows = list(reader)
    edit(rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_manifest_names_the_api_offers_and_the_version_moved():
    """The manifest lists api_offers.csv; a copy loads the same offers."""
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    assert manifest["api_offers"] == "api_offers.csv"
    assert CATALOG.version == manifest["catalog_version"]
    assert load_catalog(DATA_DIR).apis == CATALOG.apis


def test_a_catalog_without_api_offers_still_loads(copied):
    """An older catalog directory (no api_offers key) loads with no API offers."""
    manifest = json.loads((copied / "manifest.json").read_text())
    del manifest["api_offers"]
    (copied / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_catalog(copied)
    assert loaded.apis == ()
    assert loaded.offers == CATALOG.offers


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("usd_per_m_input", "cheap", "usd_per_m_input must be a number"),
        ("tokens_per_s", "0", "tokens_per_s must be > 0"),
        ("provider", "Groq Cloud", "provider 'Groq Cloud'"),
        ("external", "maybe", "external must be true or false"),
        ("base_url", "", "base_url is empty"),
    ],
)
def test_malformed_api_rows_are_refused_naming_line_and_field(copied, field, bad, message):
    """A bad row raises CatalogError with the file, line and field."""

    def edit(rows):
        rows[1][field] = bad

    edit_api_rows(copied / "api_offers.csv", edit)
    with pytest.raises(CatalogError, match=rf"api_offers.csv line 3: {message}"):
        load_catalog(copied)


def test_a_provider_listing_a_model_twice_is_refused(copied):
    """Two rows of one provider for one model (by canonical key) are a CatalogError."""
    edit_api_rows(copied / "api_offers.csv", lambda rows: rows.append(dict(rows[0])))
    with pytest.raises(CatalogError, match="listed twice"):
        load_catalog(copied)


def test_price_refreshers_carry_the_api_offers(copied, tmp_path):
    """carry_api_offers copies the manifest's api_offers file to a refreshed directory."""
    out = tmp_path / "refreshed"
    shutil.copytree(copied, out, ignore=shutil.ignore_patterns("api_offers.csv"))
    manifest = json.loads((copied / "manifest.json").read_text())
    carry_api_offers(manifest, copied, out)
    carry_api_offers(manifest, out, out)  # same directory: a no-op, not an error
    assert load_catalog(out).apis == CATALOG.apis


def test_api_pools_are_not_routed_unless_enabled(copied, monkeypatch):
    """The shipped catalog lists API offers but routes to them only with FLEET_API_POOLS=1."""
    assert not load_catalog(copied).route_apis
    monkeypatch.setenv("FLEET_API_POOLS", "1")
    assert load_catalog(copied).route_apis


# ---------------------------------------------------------------------------- config

LOCAL_L4 = """
[[pools]]
name = "local-l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
"""


def test_config_api_pool_uses_catalog_rows_with_the_accounts_limits():
    """[[api_pools]] provider=groq keeps the catalog's prices, applies its own rate limits."""
    cfg = parse_config(
        LOCAL_L4
        + """
[[api_pools]]
provider = "groq"
models = ["llama-3.1-8b"]
requests_per_min = 1000
tokens_per_min = 500000
max_concurrency = 8
""",
        env={},
    )
    cat = catalog_for_pools(CATALOG, cfg)
    assert cat.route_apis
    [groq] = cat.apis
    assert (groq.provider, groq.model) == ("groq", "llama-3.1-8b-instruct")
    assert (groq.requests_per_min, groq.tokens_per_min) == (1000, 500_000)
    assert groq.usd_per_m_input == 0.05
    assert {o.accelerator for o in cat.offers} == {"nvidia-l4"}


def test_config_declares_a_self_hosted_endpoint():
    """A self-hosted vLLM: external false, residency self, its own base URL and model."""
    cfg = parse_config(
        """
[[api_pools]]
provider = "vllm-local"
base_url = "http://127.0.0.1:8000/v1/"
external = false
residency = "self"
[[api_pools.offers]]
model = "llama-3.1-8b-instruct"
api_model = "meta-llama/Llama-3.1-8B-Instruct"
tokens_per_s = 90
context_tokens = 32768
""",
        env={},
    )
    cat = catalog_for_pools(CATALOG, cfg)
    [vllm] = cat.apis
    assert vllm.accelerator == "api-vllm-local"
    assert (vllm.external, vllm.residency, vllm.base_url) == (
        False,
        "self",
        "http://127.0.0.1:8000/v1",
    )
    assert vllm.cost_usd(1000, 1000) == 0
    assert find_api_offer(cat, "vllm-local", "meta-llama/Llama-3.1-8B-Instruct") == vllm


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[api_pools]]\nprovider = "nobody"\n', "provider 'nobody' is not in the catalog"),
        ('[[api_pools]]\nprovider = "groq"\nmodels = ["gpt-9"]\n', "no groq offer matches"),
        (
            '[[api_pools]]\nprovider = "x"\n[[api_pools.offers]]\nmodel = "m"\ntokens_per_s = 1\n',
            "base_url",
        ),
        (
            '[[api_pools]]\nprovider = "groq"\n[[api_pools]]\nprovider = "groq"\n',
            "duplicate providers",
        ),
        (
            '[[api_pools]]\nprovider = "groq"\nmin_concurrency = 9\nmax_concurrency = 2\n',
            "min_concurrency 9 > max_concurrency 2",
        ),
    ],
)
def test_bad_api_pool_config_is_refused_naming_the_key(text, message):
    """An unknown provider, model, missing base URL, duplicate or bad bounds is a ConfigError."""
    with pytest.raises(ConfigError, match=message):
        parse_config(text, env={})


def test_a_config_without_api_pools_routes_to_none():
    """catalog_for_pools keeps no API offer when the config declares no API pool."""
    cat = catalog_for_pools(CATALOG, parse_config(LOCAL_L4, env={}))
    assert (cat.apis, cat.route_apis) == ((), False)


# ------------------------------------------------------------------------------- CLI


def test_fleet_catalog_lists_api_pools():
    """`fleet catalog` prints the API pools table; --json carries api_offers with accelerators."""
    runner = CliRunner()
    table = runner.invoke(main, ["catalog"], env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    assert "API pools" in table.output
    assert "api-sambanova" in table.output
    as_json = runner.invoke(main, ["catalog", "--json"])
    data = json.loads(as_json.output)
    assert {o["accelerator"] for o in data["api_offers"]} == {f"api-{p}" for p in PROVIDERS}
    assert data["api_offers"][0]["usd_per_m_input"] > 0

"""Token-priced inference APIs as pools: the offers, how they are read, and model matching.

An ``ApiOffer`` is one model served by one OpenAI-compatible endpoint (Cerebras, Groq,
SambaNova, Fireworks, ..., or a self-hosted vLLM), priced per million input and output
tokens, with a per-stream speed, a time to first token, rate limits and a context limit.
The shipped offers are in ``data/api_offers.csv`` (named by the manifest's ``api_offers``
key); a self-hosted endpoint is declared in the autoscaler config (``[[api_pools]]``).

Each provider is one pool: its queue is ``inference.api-<provider>`` and its
"accelerator" name ``api-<provider>`` (``ApiOffer.accelerator``). Credentials come from
``FLEET_API_KEY_<PROVIDER>`` and the base URL may be overridden with
``FLEET_API_BASE_URL_<PROVIDER>`` (``<PROVIDER>`` upper-case, ``-`` as ``_``); the key is
never part of an offer, a log line or a message.

Model names match on a canonical key (``model_key``): the organisation prefix, a leading
``meta-``, an ``-instruct`` suffix, case, ``_`` and spaces are ignored, ``llama3.1`` reads
as ``llama-3.1`` and ``v3p1`` as ``3.1``. So ``meta-llama/Llama-3.1-8B-Instruct``,
``Meta-Llama-3.1-8B-Instruct``, ``llama-3.1-8b-instruct``, ``llama-3.1-8b`` and
``llama3.1-8b`` are one model. An offer also matches its ``api_model`` and any of its
``aliases`` (``;``-separated in the CSV).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fleet.catalog imports this module: no runtime import back
    from fleet.catalog import Catalog

API_PREFIX = "api-"
PROVIDER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
API_FIELDS = (
    "provider",
    "model",
    "api_model",
    "base_url",
    "usd_per_m_input",
    "usd_per_m_output",
    "tokens_per_s",
    "ttft_s",
    "requests_per_min",
    "tokens_per_min",
    "context_tokens",
    "residency",
    "external",
    "price_date",
    "source",
    "notes",
    "aliases",
)


@dataclass(frozen=True, slots=True)
class ApiOffer:
    """One model on one token-priced, OpenAI-compatible endpoint.

    Prices are USD per million tokens; ``tokens_per_s`` is the output speed of one
    stream and ``ttft_s`` the time to the first token; ``requests_per_min`` and
    ``tokens_per_min`` the account's rate limits (input plus output tokens);
    ``residency`` where the data goes (``us``, ``eu``, ...; ``self`` for a self-hosted
    endpoint, which has ``external`` False).
    """

    provider: str
    model: str
    api_model: str
    base_url: str
    usd_per_m_input: float
    usd_per_m_output: float
    tokens_per_s: float
    ttft_s: float
    requests_per_min: int
    tokens_per_min: int
    context_tokens: int
    residency: str
    external: bool
    price_date: str
    source: str
    notes: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def accelerator(self) -> str:
        """The pool's accelerator name, ``api-<provider>`` (its queues use it)."""
        return f"{API_PREFIX}{self.provider}"

    @property
    def key(self) -> str:
        """A stable identifier: ``provider/model``."""
        return f"{self.provider}/{self.model}"

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        """What one call costs: input and output tokens at their per-million prices."""
        return (tokens_in * self.usd_per_m_input + tokens_out * self.usd_per_m_output) / 1e6

    def latency_s(self, tokens_in: int, tokens_out: int) -> float:  # noqa: ARG002
        """Expected duration of one call: time to first token plus output at stream speed.

        ``tokens_in`` is accepted for symmetry with ``cost_usd``; the providers' prefill is
        fast enough that ``ttft_s`` covers it for prompts within the context limit.
        """
        return self.ttft_s + tokens_out / self.tokens_per_s

    def fits_context(self, tokens_in: int, tokens_out: int) -> bool:
        """Whether prompt and output together fit the model's context window."""
        return tokens_in + tokens_out <= self.context_tokens

    def serves(self, model: str) -> bool:
        """Whether ``model`` names this offer's model (see ``model_key``)."""
        wanted = model_key(model)
        return wanted in self.model_keys()

    def model_keys(self) -> frozenset[str]:
        """Every canonical key this offer answers to."""
        return frozenset(model_key(n) for n in (self.model, self.api_model, *self.aliases))


_VERSION_P = re.compile(r"v(\d+)p(\d+)")
_GLUED = re.compile(r"^([a-z]+)(\d)")


def model_key(name: str) -> str:
    """The canonical key of a model name, for matching (see the module docstring).

    ``model_key("meta-llama/Llama-3.1-8B-Instruct") == model_key("llama3.1-8b")``.
    """
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = re.sub(r"[\s_]+", "-", key)
    key = _VERSION_P.sub(r"\1.\2", key)
    key = key.removeprefix("meta-")
    key = _GLUED.sub(r"\1-\2", key)
    return key.removesuffix("-instruct")


def provider_env(provider: str) -> str:
    """The ``<PROVIDER>`` part of the provider's environment variables."""
    return provider.upper().replace("-", "_")


def api_key_env(provider: str) -> str:
    """The variable holding the provider's API key: ``FLEET_API_KEY_<PROVIDER>``."""
    return f"FLEET_API_KEY_{provider_env(provider)}"


def base_url_env(provider: str) -> str:
    """The variable overriding the provider's base URL: ``FLEET_API_BASE_URL_<PROVIDER>``."""
    return f"FLEET_API_BASE_URL_{provider_env(provider)}"


def resolved_base_url(offer: ApiOffer, env: Mapping[str, str]) -> str:
    """The base URL to call: the env override when set, else the offer's."""
    return env.get(base_url_env(offer.provider)) or offer.base_url


def provider_of(accelerator: str) -> str | None:
    """``groq`` for ``api-groq``; None for an accelerator that is not an API pool."""
    if accelerator.startswith(API_PREFIX):
        return accelerator[len(API_PREFIX) :]
    return None


class ApiOfferError(ValueError):
    """An API offer row is malformed; the message names the file, line and field."""


def _positive(row: Mapping[str, str], name: str, where: str, *, zero_ok: bool = False) -> float:
    try:
        value = float(row[name])
    except (KeyError, TypeError, ValueError):
        raise ApiOfferError(f"{where}: {name} must be a number, got {row.get(name)!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ApiOfferError(f"{where}: {name} must be {'>= 0' if zero_ok else '> 0'}")
    return value


def _bool(value: str, where: str) -> bool:
    text = value.strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise ApiOfferError(f"{where}: external must be true or false, got {value!r}")


def api_offer_from_row(row: Mapping[str, str], where: str = "api offer") -> ApiOffer:
    """Build and validate one offer from CSV-like strings.

    Raises:
        ApiOfferError: a field is missing or out of range, naming it.

    """
    provider = (row.get("provider") or "").strip()
    if not PROVIDER_RE.match(provider):
        raise ApiOfferError(f"{where}: provider {provider!r} must match {PROVIDER_RE.pattern}")
    for name in ("model", "api_model", "base_url", "residency"):
        if not (row.get(name) or "").strip():
            raise ApiOfferError(f"{where}: {name} is empty")
    aliases = tuple(a.strip() for a in (row.get("aliases") or "").split(";") if a.strip())
    return ApiOffer(
        provider=provider,
        model=row["model"].strip(),
        api_model=row["api_model"].strip(),
        base_url=row["base_url"].strip().rstrip("/"),
        usd_per_m_input=_positive(row, "usd_per_m_input", where, zero_ok=True),
        usd_per_m_output=_positive(row, "usd_per_m_output", where, zero_ok=True),
        tokens_per_s=_positive(row, "tokens_per_s", where),
        ttft_s=_positive(row, "ttft_s", where, zero_ok=True),
        requests_per_min=int(_positive(row, "requests_per_min", where)),
        tokens_per_min=int(_positive(row, "tokens_per_min", where)),
        context_tokens=int(_positive(row, "context_tokens", where)),
        residency=row["residency"].strip().lower(),
        external=_bool(row.get("external") or "true", where),
        price_date=(row.get("price_date") or "").strip(),
        source=(row.get("source") or "").strip(),
        notes=(row.get("notes") or "").strip(),
        aliases=aliases,
    )


def load_api_offers(path: Path) -> tuple[ApiOffer, ...]:
    """Read an ``api_offers.csv``.

    Raises:
        ApiOfferError: a malformed row, or one provider offering one model twice.
        OSError: the file cannot be read.

    """
    offers: list[ApiOffer] = []
    seen: set[tuple[str, str]] = set()
    with path.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            offer = api_offer_from_row(row, f"{path.name} line {line}")
            ident = (offer.provider, model_key(offer.model))
            if ident in seen:
                raise ApiOfferError(f"{path.name} line {line}: {offer.key} listed twice")
            seen.add(ident)
            offers.append(offer)
    return tuple(offers)


def api_offers(catalog: Catalog) -> tuple[ApiOffer, ...]:
    """Every API offer the catalog knows (``Catalog.apis``)."""
    return catalog.apis


def find_api_offer(catalog: Catalog, provider: str, model: str) -> ApiOffer | None:
    """The offer of ``model`` (any matching name, see ``model_key``) on ``provider``, or None."""
    wanted = model_key(model)
    for offer in catalog.apis:
        if offer.provider == provider and wanted in offer.model_keys():
            return offer
    return None


def offers_for_model(catalog: Catalog, model: str) -> tuple[ApiOffer, ...]:
    """Every API offer serving ``model``, in catalog order."""
    wanted = model_key(model)
    return tuple(o for o in catalog.apis if wanted in o.model_keys())


def api_providers(catalog: Catalog) -> tuple[str, ...]:
    """The providers with at least one offer, sorted."""
    return tuple(sorted({o.provider for o in catalog.apis}))


def carry_api_offers(manifest: Mapping[str, object], source_dir: Path, target_dir: Path) -> None:
    """Copy the manifest's ``api_offers`` file unchanged (price refreshers use this).

    The cloud price refreshers rewrite ``offers.csv`` only; a refreshed catalog must still
    carry the API offers its manifest names. No-op when the manifest names none or both
    directories are the same.
    """
    name = manifest.get("api_offers")
    if not isinstance(name, str):
        return
    source, target = source_dir / name, target_dir / name
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)


_AZURE_EU = ("europe", "uk", "france", "germany", "switzerland", "norway", "sweden", "poland", "italy", "spain")  # fmt: skip


def jurisdiction(cloud: str, region: str) -> str:
    """Where a cloud region's data lives, in the vocabulary of ``ApiOffer.residency``.

    ``us`` for AWS/GCP ``us-*`` and Azure ``*us*`` regions, ``eu`` for AWS ``eu-*``, GCP
    ``europe-*`` and Azure's European regions, ``ca``, ``sa``, ``ap``/``asia``, ``me``,
    ``af`` by prefix; otherwise the region name itself (so a residency list can name it).
    """
    name = region.strip().lower()
    if cloud == "azure":
        if "us" in name and not name.startswith("australia"):
            return "us"
        if any(word in name for word in _AZURE_EU):
            return "eu"
        return name
    prefix = name.split("-", 1)[0]
    return {"us": "us", "eu": "eu", "europe": "eu", "asia": "ap", "ap": "ap"}.get(
        prefix, prefix or name
    )


def routing_apis(catalog: Catalog, apis: tuple[ApiOffer, ...] | None = None) -> Catalog:
    """A copy of ``catalog`` whose placement routes to ``apis`` (default: its own).

    The copy gets a fresh placement memo, so decisions cached without API pools never
    leak into it.
    """
    return dataclasses.replace(
        catalog, apis=catalog.apis if apis is None else apis, route_apis=True, memo={}
    )

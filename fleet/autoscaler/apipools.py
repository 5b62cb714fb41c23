"""API pools in the autoscaler config: ``[[api_pools]]``, one per provider.

An API pool is scaled by worker concurrency within its rate limits, never by instances.
It either uses the catalog's offers of a provider (``provider = "groq"``, optionally
``models`` to restrict them and the account's own ``requests_per_min`` /
``tokens_per_min``), or declares its offers, which is how a self-hosted OpenAI-compatible
endpoint (vLLM on your own box) joins the fleet::

    [[api_pools]]
    provider = "vllm-local"
    base_url = "http://10.0.0.5:8000/v1"
    external = false            # never leaves your infrastructure
    residency = "self"
    max_concurrency = 32
    [[api_pools.offers]]
    model = "llama-3.1-8b-instruct"
    api_model = "meta-llama/Llama-3.1-8B-Instruct"
    tokens_per_s = 90
    usd_per_m_input = 0.0
    usd_per_m_output = 0.0

``api_pool_offers`` turns a pool into the ``ApiOffer`` rows placement and the planner use.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet.catalog import Catalog
from fleet.catalog.apis import PROVIDER_RE, ApiOffer, model_key

_STRICT = ConfigDict(frozen=True, extra="forbid")
DECLARED_REQUESTS_PER_MIN = 600  # a declared endpoint without limits: generous defaults
DECLARED_TOKENS_PER_MIN = 1_000_000


class ApiModelConfig(BaseModel):
    """One model a declared endpoint serves (prices may be 0 for your own hardware)."""

    model_config = _STRICT

    model: Annotated[str, Field(min_length=1, max_length=200)]
    api_model: str | None = None
    usd_per_m_input: Annotated[float, Field(ge=0)] = 0.0
    usd_per_m_output: Annotated[float, Field(ge=0)] = 0.0
    tokens_per_s: Annotated[float, Field(gt=0)]
    ttft_s: Annotated[float, Field(ge=0)] = 0.2
    context_tokens: Annotated[int, Field(gt=0)] = 8192
    aliases: tuple[str, ...] = ()


class ApiPoolConfig(BaseModel):
    """One provider's pool: its offers, rate limits and worker concurrency bounds."""

    model_config = _STRICT

    provider: Annotated[str, Field(pattern=PROVIDER_RE.pattern)]
    models: tuple[str, ...] = Field(default=(), description="catalog offers to use; empty: all")
    offers: tuple[ApiModelConfig, ...] = ()
    base_url: str | None = None
    external: bool = True
    residency: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")] | None = None
    requests_per_min: Annotated[int, Field(gt=0)] | None = None
    tokens_per_min: Annotated[int, Field(gt=0)] | None = None
    min_concurrency: Annotated[int, Field(ge=0, le=10_000)] = 0
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 16
    drain_target_s: Annotated[float, Field(gt=0)] = 60.0
    overflow_pool: str | None = Field(
        default=None,
        description="instance pool whose capacity takes the backlog beyond the rate limit",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ApiPoolConfig:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(
                f"min_concurrency {self.min_concurrency} > max_concurrency {self.max_concurrency}"
            )
        if self.offers and not self.base_url:
            raise ValueError("base_url: declared offers need the endpoint's base URL")
        return self

    @property
    def accelerator(self) -> str:
        """The pool's accelerator name, ``api-<provider>``."""
        return f"api-{self.provider}"


def api_pool_offers(pool: ApiPoolConfig, catalog: Catalog) -> tuple[ApiOffer, ...]:
    """The offers of ``pool``, catalog rows first, then its declared offers.

    Catalog rows are its provider's (restricted to ``models``), with the pool's base URL,
    rate limits and residency applied where it sets them.
    """
    wanted = {model_key(m) for m in pool.models}
    out: list[ApiOffer] = []
    for o in catalog.apis:
        if o.provider != pool.provider or (wanted and not wanted & o.model_keys()):
            continue
        out.append(
            ApiOffer(
                provider=o.provider,
                model=o.model,
                api_model=o.api_model,
                base_url=pool.base_url or o.base_url,
                usd_per_m_input=o.usd_per_m_input,
                usd_per_m_output=o.usd_per_m_output,
                tokens_per_s=o.tokens_per_s,
                ttft_s=o.ttft_s,
                requests_per_min=pool.requests_per_min or o.requests_per_min,
                tokens_per_min=pool.tokens_per_min or o.tokens_per_min,
                context_tokens=o.context_tokens,
                residency=pool.residency or o.residency,
                external=o.external and pool.external,
                price_date=o.price_date,
                source=o.source,
                notes=o.notes,
                aliases=o.aliases,
            )
        )
    residency = pool.residency or ("us" if pool.external else "self")
    out += [
        ApiOffer(
            provider=pool.provider,
            model=m.model,
            api_model=m.api_model or m.model,
            base_url=(pool.base_url or "").rstrip("/"),
            usd_per_m_input=m.usd_per_m_input,
            usd_per_m_output=m.usd_per_m_output,
            tokens_per_s=m.tokens_per_s,
            ttft_s=m.ttft_s,
            requests_per_min=pool.requests_per_min or DECLARED_REQUESTS_PER_MIN,
            tokens_per_min=pool.tokens_per_min or DECLARED_TOKENS_PER_MIN,
            context_tokens=m.context_tokens,
            residency=residency,
            external=pool.external,
            price_date="",
            source="declared in the autoscaler config",
            aliases=m.aliases,
        )
        for m in pool.offers
    ]
    return tuple(out)


def api_pool_problem(pool: ApiPoolConfig, catalog: Catalog) -> str | None:
    """Why the pool has no usable offer (unknown provider, no matching model), or None."""
    if api_pool_offers(pool, catalog):
        return None
    known = sorted({o.provider for o in catalog.apis})
    if pool.provider not in known:
        return (
            f"provider {pool.provider!r} is not in the catalog ({', '.join(known)});"
            " declare its [[api_pools.offers]] with a base_url"
        )
    return f"no {pool.provider} offer matches models {list(pool.models)}"

"""Autoscaler configuration: one TOML file, validated by pydantic, errors that name the key.

A pool is a set of interchangeable instances behind one accelerator's queues: which
provider buys them, which offers it may use (region, instance types, markets in order
of preference: spot first falls back to on-demand), how many (min, max), what it may
spend, and how it scales (drain target, idle time before scale-in, cooldowns, how long a
capacity error keeps an offer out). ``local`` pools start real ``fleet worker``
processes that emulate the accelerator; ``price_as`` names the cloud offer whose price
and device count they stand in for. ``FLEET_BROKER_URL`` overrides ``fleet.broker_url``.
``[[api_pools]]`` (``fleet.autoscaler.apipools``) adds token-priced API pools, scaled by
worker concurrency; declaring any turns on placement to API pools for this fleet.

A pool may declare the registry ``models`` its workers hold and the ``engine`` that runs
them (default: ``reference`` without models, else the first engine every model allows that
runs on the pool's chip). A pool without models serves the plain queues (reference
workers); a pool with models serves only those models' queues (``...@<model>``), of the
kinds the model serves and the engine runs (``PoolConfig.serving``, what ``fleet worker``
consumes). Every model must be in the config's registry and allow the engine, the engine
must run on the pool's accelerator (``fleet.modelfit.ENGINE_RUNTIMES``), and a vLLM pool
holds one model; errors name the key (``pools[2].models[0]: ...``).
"""

from __future__ import annotations

import os
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleet.autoscaler.apipools import ApiPoolConfig, api_pool_offers, api_pool_problem
from fleet.catalog import Catalog, Family, Market, Offer, default_catalog
from fleet.modelfit import (
    ENGINE_KINDS,
    ONE_MODEL_ENGINES,
    default_engine,
    engine_runs_on,
    models_load_s,
)
from fleet.models.registry import (
    DEFAULT_LOAD_GBPS,
    ModelConfigError,
    ModelEntry,
    ModelRegistry,
    builtin_entries,
)
from fleet.spec import TaskKind, closest_accelerators

_STRICT = ConfigDict(frozen=True, extra="forbid")
ProviderName = Literal["aws", "gcp", "azure", "local", "fake"]
EngineName = Literal["transformers", "vllm", "reference"]
CLOUD_OF: dict[str, str | None] = {
    "aws": "aws",
    "gcp": "gcp",
    "azure": "azure",
    "local": None,
    "fake": None,
}


class PoolConfig(BaseModel):
    """One pool of instances serving one accelerator's queues."""

    model_config = _STRICT

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    provider: ProviderName
    accelerator: str
    region: str | None = None
    instance_types: tuple[str, ...] = ()
    markets: tuple[Literal["spot", "on_demand"], ...] = ("spot", "on_demand")
    min_instances: Annotated[int, Field(ge=0, le=10_000)] = 0
    max_instances: Annotated[int, Field(ge=0, le=10_000)] = 10
    budget_usd_per_hour: Annotated[float, Field(gt=0)] | None = None
    drain_target_s: Annotated[float, Field(gt=0)] = 300.0
    idle_before_scale_in_s: Annotated[float, Field(ge=0)] = 300.0
    scale_out_cooldown_s: Annotated[float, Field(ge=0)] = 30.0
    scale_in_cooldown_s: Annotated[float, Field(ge=0)] = 120.0
    capacity_backoff_s: Annotated[float, Field(ge=0)] = 900.0
    price_as: str | None = Field(
        default=None, description="local/fake pools: cloud/region/instance_type"
    )
    devices: Annotated[int, Field(ge=1, le=64)] | None = None
    models: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = ()
    engine: EngineName | None = None

    @field_validator("accelerator")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in default_catalog().families:
            close = closest_accelerators(value)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown accelerator {value!r}{hint}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PoolConfig:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances {self.min_instances} > max_instances {self.max_instances}"
            )
        if not self.markets:
            raise ValueError("markets: at least one of spot, on_demand")
        if CLOUD_OF[self.provider] is None and self.price_as is None:
            raise ValueError(
                f"price_as: a {self.provider} pool needs the cloud offer it stands in for"
            )
        if len(set(self.models)) < len(self.models):
            raise ValueError(f"models: listed twice in {list(self.models)}")
        if self.engine not in (None, "reference") and not self.models:
            raise ValueError(
                f"engine: a {self.engine} pool serves only the models it holds; name them in models"
            )
        return self

    @property
    def cloud(self) -> str | None:
        """The cloud whose offers this pool buys (None for local and fake pools)."""
        return CLOUD_OF[self.provider]

    def model_entries(self, registry: ModelRegistry) -> tuple[ModelEntry, ...]:
        """The registry entries of ``models`` (aliases resolved), in order.

        Raises:
            KeyError: a model is not in ``registry`` (a validated config never has one).

        """
        return tuple(registry.get(name) for name in self.models)

    def resolved_engine(self, registry: ModelRegistry) -> str:
        """``engine``, or the default: the first engine every model allows that runs here."""
        if self.engine is not None:
            return self.engine
        return default_engine(self.model_entries(registry), _family(self.accelerator))

    def serves_plain(self) -> bool:
        """Whether the pool serves the plain queues (a pool without models does)."""
        return not self.models

    def serving(self, registry: ModelRegistry) -> dict[str | None, frozenset[TaskKind]]:
        """The queues the pool's workers consume: ``{model (None: the plain queues): kinds}``.

        No models: the plain queues of every kind. With models: each model's queues of the
        kinds it serves and the engine runs (``ENGINE_KINDS``), as ``fleet worker`` derives
        them; the family's own kinds are checked where demand is matched to pools.
        """
        if not self.models:
            return {None: frozenset(TaskKind)}
        runs = ENGINE_KINDS[self.resolved_engine(registry)]
        return {e.name: e.kinds & runs for e in self.model_entries(registry)}

    def model_names(self, registry: ModelRegistry) -> frozenset[str]:
        """Canonical names of the models whose queues the pool serves."""
        return frozenset(e.name for e in self.model_entries(registry))

    def load_s(self, registry: ModelRegistry) -> float:
        """Seconds a new instance spends reading its models (at the registry's bandwidth)."""
        return models_load_s(self.model_entries(registry), registry.load_gbps)

    def worker_env(self, registry: ModelRegistry) -> dict[str, str]:
        """``FLEET_ENGINE`` and ``FLEET_MODELS`` for the pool's workers (empty: a plain pool).

        ``fleet worker`` reads them as the defaults of ``--engine`` and ``--model``; the
        local provider turns them into those flags, cloud bootstraps write them into the
        worker's environment file.
        """
        if not self.models and self.engine in (None, "reference"):
            return {}
        names = ",".join(e.name for e in self.model_entries(registry))
        return {"FLEET_ENGINE": self.resolved_engine(registry), "FLEET_MODELS": names}


def _family(accelerator: str) -> Family | None:
    return default_catalog().families.get(accelerator)


def pool_model_problems(pools: tuple[PoolConfig, ...], registry: ModelRegistry) -> list[str]:
    """What is wrong with the pools' models and engines, each naming its key.

    A model not in ``registry`` (``pools[2].models[0]: no model 'x' in the registry (known:
    ...)``); an engine a model does not allow, or one that does not run on the pool's
    accelerator (``pools[2].engine: ...``).
    """
    problems: list[str] = []
    known = ", ".join(registry.names()) or "none"
    for i, pool in enumerate(pools):
        entries: list[ModelEntry] = []
        for j, name in enumerate(pool.models):
            entry = registry.find(name)
            if entry is None:
                problems.append(
                    f"pools[{i}].models[{j}]: no model {name!r} in the registry (known: {known})"
                )
            else:
                entries.append(entry)
        if len(entries) < len(pool.models):
            continue
        family = _family(pool.accelerator)
        engine = pool.engine or default_engine(entries, family)
        how = "" if pool.engine is not None else " (the default)"
        refused = [e for e in entries if engine not in e.engines]
        if refused and pool.engine is None:
            allowed = "; ".join(f"{e.name}: {', '.join(e.engines)}" for e in entries)
            problems.append(f"pools[{i}].models: the models share no engine ({allowed})")
        elif refused:
            first = refused[0]
            problems.append(
                f"pools[{i}].engine: {engine} is not allowed for {first.name}"
                f" (allowed: {', '.join(first.engines)})"
            )
        elif family is not None and not engine_runs_on(engine, family.runtimes):
            problems.append(
                f"pools[{i}].engine: {engine}{how} does not run on {pool.accelerator}"
                f" (runtime {', '.join(sorted(family.runtimes))})"
            )
        elif engine in ONE_MODEL_ENGINES and len(entries) > 1:
            problems.append(
                f"pools[{i}].models: a {engine} pool holds one model per worker,"
                f" not {len(entries)}; give each model a pool"
            )
    return problems


class FleetConfig(BaseModel):
    """Settings for the whole fleet."""

    model_config = _STRICT

    broker_url: str | None = None
    namespace: str = ""
    budget_usd_per_hour: Annotated[float, Field(gt=0)] | None = None
    loop_interval_s: Annotated[float, Field(gt=0)] = 5.0
    max_launches_per_loop: Annotated[int, Field(ge=1, le=1000)] = 10
    lock_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    launch_grace_s: Annotated[float, Field(gt=0)] = 600.0
    local_state_dir: str = ".fleet/local-instances"


class AwsSettings(BaseModel):
    """How the AWS provider launches: region, AMI, network, the worker's instance profile."""

    model_config = _STRICT

    region: str
    image_id: str
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    instance_profile: str | None = None
    endpoint_url: str | None = None  # tests: a moto server


class GcpSettings(BaseModel):
    """How the GCP provider launches: project, zone, image, the worker's service account."""

    model_config = _STRICT

    project: str
    zone: str
    image: str = "projects/debian-cloud/global/images/family/debian-12"
    network: str = "global/networks/default"
    service_account: str | None = None


class AzureSettings(BaseModel):
    """How the Azure provider launches: subscription, resource group, location, subnet."""

    model_config = _STRICT

    subscription_id: str
    resource_group: str
    location: str
    subnet_id: str = ""


class ProviderSettings(BaseModel):
    """Cloud provider settings; a cloud without settings is skipped when acting."""

    model_config = _STRICT

    aws: AwsSettings | None = None
    gcp: GcpSettings | None = None
    azure: AzureSettings | None = None


class AutoscalerConfig(BaseModel):
    """The whole file."""

    model_config = _STRICT

    fleet: FleetConfig = FleetConfig()
    providers: ProviderSettings = ProviderSettings()
    pools: tuple[PoolConfig, ...] = ()
    api_pools: tuple[ApiPoolConfig, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    model_load_gbps: Annotated[float, Field(gt=0, le=10_000)] = DEFAULT_LOAD_GBPS

    @property
    def registry(self) -> ModelRegistry:
        """The built-in models plus this file's ``[[models]]`` (``fleet.models.registry``)."""
        return ModelRegistry((*builtin_entries(), *self.models), self.model_load_gbps)

    @model_validator(mode="after")
    def _unique(self) -> AutoscalerConfig:
        counts = Counter(p.name for p in self.pools)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            raise ValueError(f"pools: duplicate names {dupes}")
        providers = Counter(p.provider for p in self.api_pools)
        dupes = sorted(n for n, c in providers.items() if c > 1)
        if dupes:
            raise ValueError(f"api_pools: duplicate providers {dupes}")
        models = Counter(m.name for m in self.models)
        dupes = sorted(n for n, c in models.items() if c > 1)
        if dupes:
            raise ValueError(f"models: duplicate names {dupes}")
        try:
            registry = self.registry
        except ModelConfigError as exc:
            raise ValueError(str(exc)) from None
        problems = pool_model_problems(self.pools, registry)
        if problems:
            raise ValueError("; ".join(problems))
        names = {p.name for p in self.pools}
        for i, api in enumerate(self.api_pools):
            if api.overflow_pool is not None and api.overflow_pool not in names:
                raise ValueError(
                    f"api_pools[{i}].overflow_pool: no pool {api.overflow_pool!r}"
                    f" (pools: {', '.join(sorted(names))})"
                )
        return self

    @property
    def fleet_tag(self) -> str:
        """The value of the ``fleet`` tag on every instance this config launches."""
        return self.fleet.namespace.rstrip(".") or "fleet"

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name``; KeyError lists the known ones."""
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool {name!r}; pools: {', '.join(p.name for p in self.pools)}")


class ConfigError(ValueError):
    """The file is unreadable, not TOML, or invalid; the message names each key at fault."""


def parse_config(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> AutoscalerConfig:
    """Validate TOML text; ``FLEET_BROKER_URL`` in ``env`` overrides ``fleet.broker_url``.

    Raises:
        ConfigError: not TOML, or a key is invalid (``pools[1].max_instances: ...``).

    """
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if env.get("FLEET_BROKER_URL"):
        raw.setdefault("fleet", {})["broker_url"] = env["FLEET_BROKER_URL"]
    try:
        config = AutoscalerConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            parts = [str(p) for p in err["loc"]]
            key = ""
            for part in parts:
                key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
            msg = err["msg"].removeprefix("Value error, ")
            # A check across sections (the after-validator) names its own keys.
            lines.append(f"{key}: {msg}" if key else msg)
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None
    problems = [
        f"pools[{i}]: {why}"
        for i, p in enumerate(config.pools)
        if (why := _offer_problem(p, default_catalog()))
    ]
    problems += [
        f"api_pools[{i}]: {why}"
        for i, p in enumerate(config.api_pools)
        if (why := api_pool_problem(p, default_catalog()))
    ]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> AutoscalerConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: unreadable or invalid.

    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse_config(text, str(path), env)


@dataclass(frozen=True, slots=True)
class PricedOffer:
    """An offer a pool may buy, in one market, at its hourly price."""

    offer: Offer
    market: Market
    usd_per_hour: float


def pool_offers(pool: PoolConfig, catalog: Catalog) -> list[PricedOffer]:
    """Offers a pool may buy, priced, in the pool's market preference order.

    Cloud pools: the catalog's offers of the pool's accelerator in its cloud, region and
    instance types. Local and fake pools: the ``price_as`` offer (the cloud instance they
    stand in for).
    """
    if pool.price_as is not None and pool.cloud is None:
        candidates = [
            o for o in catalog.offers if f"{o.cloud}/{o.region}/{o.instance_type}" == pool.price_as
        ]
    else:
        candidates = [
            o
            for o in catalog.offers_by_family.get(pool.accelerator, ())
            if o.cloud == pool.cloud
            and (pool.region is None or o.region == pool.region)
            and (not pool.instance_types or o.instance_type in pool.instance_types)
        ]
    out = []
    for market_name in pool.markets:
        market = Market(market_name)
        for o in candidates:
            price = o.price(market)
            if price is not None:
                out.append(PricedOffer(o, market, price))
    return out


def _offer_problem(pool: PoolConfig, catalog: Catalog) -> str | None:
    if pool.price_as is not None and pool.cloud is None:
        match = [
            o for o in catalog.offers if f"{o.cloud}/{o.region}/{o.instance_type}" == pool.price_as
        ]
        if not match:
            return f"price_as: no offer {pool.price_as!r} in the catalog"
        if match[0].accelerator != pool.accelerator:
            return (
                f"price_as: {pool.price_as} carries {match[0].accelerator}, not {pool.accelerator}"
            )
    if not pool_offers(pool, catalog):
        return f"no priced {pool.accelerator} offer matches provider {pool.provider}, region {pool.region}, instance_types {list(pool.instance_types)}, markets {list(pool.markets)}"
    return None


def catalog_for_pools(catalog: Catalog, config: AutoscalerConfig) -> Catalog:
    """The catalog reduced to the offers the config's pools can buy.

    Placement on this catalog only chooses accelerators the fleet has capacity for (the
    simulator does this; ``Fleet(config=...)`` and ``FLEET_CONFIG`` do it for clients).
    Its API offers are those of the config's ``[[api_pools]]`` (declared self-hosted
    endpoints included, pool overrides applied), and it routes to them iff there are any.
    """
    keep = {
        (p.offer.cloud, p.offer.region, p.offer.instance_type)
        for pool in config.pools
        for p in pool_offers(pool, catalog)
    }
    offers = tuple(o for o in catalog.offers if (o.cloud, o.region, o.instance_type) in keep)
    by_family = {
        name: tuple(o for o in offers if o.accelerator == name) for name in catalog.families
    }
    apis = tuple(o for pool in config.api_pools for o in api_pool_offers(pool, catalog))
    return Catalog(
        catalog.version, catalog.families, offers, by_family, apis=apis, route_apis=bool(apis)
    )


def pools_serving(
    config: AutoscalerConfig, model: str | None, kind: TaskKind | None = None
) -> tuple[PoolConfig, ...]:
    """The pools that serve ``model``'s queues (None: the plain queues) of ``kind`` (None: any)."""
    registry = config.registry
    out = []
    for p in config.pools:
        kinds = p.serving(registry).get(model)
        if kinds and (kind is None or kind in kinds):
            out.append(p)
    return tuple(out)


def catalog_for_model(
    catalog: Catalog, config: AutoscalerConfig, model: str | None, kind: TaskKind | None = None
) -> Catalog:
    """``catalog_for_pools`` over the pools that serve ``model``'s ``kind`` work (``pools_serving``).

    Placement of work for registry model ``model`` (None: work for the plain queues) on this
    catalog only chooses accelerators where a pool of the fleet serves it, so the work never
    waits on a queue no pool can serve. API offers are kept as ``catalog_for_pools`` keeps
    them.
    """
    serving = config.model_copy(update={"pools": pools_serving(config, model, kind)})
    return catalog_for_pools(catalog, serving)

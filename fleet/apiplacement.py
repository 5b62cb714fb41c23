"""Placement on token-priced API pools, pure: which API offers can take a task, at what cost.

``fleet.placement`` compares these with hourly-priced chips in one cost model; this module
holds the API side so that one stays small. An API offer (``fleet.catalog.apis``) can take
a task when all of these hold (otherwise the rejection says which failed, naming it):

* the catalog routes to APIs (``Catalog.route_apis``; see ``fleet.catalog``);
* the task is ``inference``: API pools serve interactive generation only. ``batch`` work is
  long and token-heavy, where self-hosted chips or a provider's own batch API (another
  price) are the better fit, and ``embedding``/training kinds are not what these serve;
* the provider serves the model: names match on ``fleet.catalog.apis.model_key``, so
  ``meta-llama/Llama-3.1-8B-Instruct`` and ``llama-3.1-8b`` are one model. The spec's
  ``dtype`` is not checked: a provider serves its own precision (see each offer's notes);
* ``tokens_in + tokens_out`` fit the model's ``context_tokens``;
* one call fits the rate limit at all (``tokens_in + tokens_out <= tokens_per_min``);
* requirements: ``external_apis`` False refuses every external API (a self-hosted
  endpoint is still fine); ``residency`` must list the offer's residency; an API pool is
  in no cloud, runtime or device class, so ``clouds``, ``runtimes`` and
  ``min_accelerator_memory_gb`` (hardware constraints) keep a task off all API pools;
  ``accelerators``/``exclude`` take ``api-<provider>`` names.

Per call: cost is ``ApiOffer.cost_usd`` (tokens at list price), duration
``ApiOffer.latency_s`` (time to first token plus output at stream speed), and the pool
capacity one call uses (``busy_s``) is the larger of ``60 / requests_per_min`` and
``60 x tokens / tokens_per_min``: a backlog of ``depth`` calls waits ``depth x busy_s``
for the rate limit (``api_wait_s``). An API pool has no instance to boot and no idle
cost; a queue with no consumer waits ``API_WORKER_START_S`` for a light CPU worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.catalog import Catalog
from fleet.catalog.apis import ApiOffer, model_key
from fleet.spec import TaskKind, TaskSpec

API_KINDS = frozenset({TaskKind.INFERENCE})
API_WORKER_START_S = 5.0  # start of an API worker: a CPU process, no accelerator to boot


@dataclass(frozen=True, slots=True)
class ApiEstimate:
    """One API offer that can take the task: its cost, duration and rate-limit share."""

    offer: ApiOffer
    service_s: float
    busy_s: float
    cost_usd: float


def rate_limited_s(offer: ApiOffer, tokens: int) -> float:
    """Seconds of the pool's rate limit one call of ``tokens`` (in plus out) uses."""
    return max(60.0 / offer.requests_per_min, 60.0 * tokens / offer.tokens_per_min)


def api_wait_s(busy_s: float, depth: int, consumers: int) -> float:
    """Expected wait behind ``depth`` queued calls, each using ``busy_s`` of the rate limit.

    An API worker's concurrency is sized by the autoscaler to the rate limit, so the limit,
    not the number of workers, bounds the drain rate; no consumer adds a worker start.
    """
    wait = depth * busy_s
    return wait if consumers > 0 else API_WORKER_START_S + wait


def _requirement_rejection(spec: TaskSpec, offer: ApiOffer) -> str | None:
    req = spec.requirements
    checks = (
        (
            bool(req.accelerators) and offer.accelerator not in req.accelerators,
            f"not in requirements.accelerators ({', '.join(req.accelerators)})",
        ),
        (offer.accelerator in req.exclude, "excluded by requirements.exclude"),
        (
            offer.external and not req.external_apis,
            "external API, and requirements.external_apis is false",
        ),
        (
            bool(req.residency) and offer.residency not in req.residency,
            f"data goes to {offer.residency!r}, not in requirements.residency ({', '.join(req.residency)})",
        ),
        (
            bool(req.clouds),
            f"an API pool is in no cloud of requirements.clouds ({', '.join(req.clouds)})",
        ),
        (bool(req.runtimes), "requirements.runtimes apply to self-hosted chips, not API pools"),
        (
            req.min_accelerator_memory_gb is not None,
            "requirements.min_accelerator_memory_gb applies to self-hosted chips, not API pools",
        ),
    )
    return next((why for failed, why in checks if failed), None)


def _offer_rejection(spec: TaskSpec, offer: ApiOffer) -> str | None:
    tokens = spec.tokens_in + spec.tokens_out
    if not offer.fits_context(spec.tokens_in, spec.tokens_out):
        return (
            f"{tokens:,} tokens in + out exceed {offer.model}'s context of"
            f" {offer.context_tokens:,} on {offer.provider}"
        )
    if tokens > offer.tokens_per_min:
        return f"{tokens:,} tokens in one call exceed the rate limit of {offer.tokens_per_min:,} tokens/min"
    return _requirement_rejection(spec, offer)


def api_candidates(
    spec: TaskSpec, catalog: Catalog
) -> tuple[tuple[ApiEstimate, ...], tuple[tuple[str, str], ...]]:
    """API offers that can take ``spec``, and ``(accelerator, reason)`` for each pool that cannot.

    One estimate per provider at most (the offer serving the spec's model). Nothing at all
    when the catalog does not route to APIs: then API pools are not part of the decision.
    """
    if not catalog.route_apis or not catalog.apis:
        return (), ()
    providers = sorted({o.provider for o in catalog.apis})
    if spec.kind not in API_KINDS:
        kind_note = f"API pools serve inference only, not {spec.kind}"
        return (), tuple((f"api-{p}", kind_note) for p in providers)
    wanted = model_key(spec.model.name)
    found: list[ApiEstimate] = []
    rejected: list[tuple[str, str]] = []
    for provider in providers:
        offers = [o for o in catalog.apis if o.provider == provider]
        match = next((o for o in offers if wanted in o.model_keys()), None)
        if match is None:
            served = ", ".join(sorted(o.model for o in offers))
            rejected.append(
                (f"api-{provider}", f"does not serve model {spec.model.name!r} (serves {served})")
            )
            continue
        why = _offer_rejection(spec, match)
        if why is not None:
            rejected.append((match.accelerator, why))
            continue
        found.append(
            ApiEstimate(
                offer=match,
                service_s=match.latency_s(spec.tokens_in, spec.tokens_out),
                busy_s=rate_limited_s(match, spec.tokens_in + spec.tokens_out),
                cost_usd=match.cost_usd(spec.tokens_in, spec.tokens_out),
            )
        )
    return tuple(found), tuple(rejected)


def is_api_accelerator(catalog: Catalog, name: str) -> bool:
    """Whether ``name`` is an API pool of the catalog (``api-<provider>``)."""
    return any(o.accelerator == name for o in catalog.apis)

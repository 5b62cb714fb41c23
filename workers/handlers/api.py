"""API handler: forward an ``inference`` task to its provider's OpenAI-compatible endpoint.

Runs on an API worker (``fleet worker --api <provider>``, accelerator ``api-<provider>``).
The catalog's offer for the spec's model on that provider gives the provider's model id,
the base URL (``FLEET_API_BASE_URL_<PROVIDER>`` overrides it), the prices and the rate
limits; the key comes from ``FLEET_API_KEY_<PROVIDER>`` and is never logged or returned.

Output: ``text``, ``tokens_in`` / ``tokens_out`` and ``usage`` as the endpoint reported
them (``usage_reported`` False when it reported none and the counts are estimates),
``actual_cost_usd`` from the offer's per-token prices, ``provider``, ``api_model``,
``finish_reason``, ``attempts`` and ``rate_wait_s`` (time spent waiting for the shared
rate limit), and ``emulated`` True when the endpoint is fleet's emulated server.

Rate limits are shared through Redis (``fleet.ratelimit``): ``FLEET_RATELIMIT_URL``, or
the broker when it is Redis; with neither, each process keeps its own buckets (logged).
Tuning (environment): ``FLEET_API_MAX_ATTEMPTS`` (5), ``FLEET_API_BACKOFF_S`` (0.5),
``FLEET_API_BACKOFF_CAP_S`` (30), ``FLEET_API_RATE_WAIT_S`` (300, the longest wait for a
grant), ``FLEET_API_TIMEOUT_S`` (120, per read), ``FLEET_API_BURST_FRACTION`` (0.25).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from fleet.catalog import default_catalog
from fleet.catalog.apis import api_key_env, find_api_offer, provider_of, resolved_base_url
from fleet.obs.logs import get_logger
from fleet.ratelimit import (
    DEFAULT_BURST_FRACTION,
    Limits,
    MemoryBucket,
    RateLimiter,
    RateLimitError,
    RedisBucket,
    bucket_key,
    check_fits,
)
from fleet.settings import Settings
from fleet.tls import redis_client
from workers.apiclient import (
    ChatRequest,
    Completion,
    Endpoint,
    RetryPolicy,
    build_request,
    call_endpoint,
    estimate_tokens,
)
from workers.handlers import HandlerError

if TYPE_CHECKING:
    from pydantic import JsonValue

    from fleet.catalog.apis import ApiOffer
    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

log = get_logger("fleet.api")
_limiters: dict[str, RateLimiter] = {}
_limiters_lock = threading.Lock()


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    return float(raw) if raw else default


def retry_policy(env: Mapping[str, str]) -> RetryPolicy:
    """The retry policy configured by the environment."""
    return RetryPolicy(
        max_attempts=int(_env_float(env, "FLEET_API_MAX_ATTEMPTS", 5)),
        base_s=_env_float(env, "FLEET_API_BACKOFF_S", 0.5),
        cap_s=_env_float(env, "FLEET_API_BACKOFF_CAP_S", 30.0),
    )


def endpoint_for(offer: ApiOffer, env: Mapping[str, str]) -> Endpoint:
    """Where to send ``offer``'s requests, with the key from the environment."""
    return Endpoint(
        provider=offer.provider,
        base_url=resolved_base_url(offer, env),
        api_model=offer.api_model,
        api_key=env.get(api_key_env(offer.provider)) or None,
    )


def limiter_for(offer: ApiOffer, api_key: str | None, env: Mapping[str, str]) -> RateLimiter:
    """The rate limiter of ``offer``'s account and model, one per process (thread-safe)."""
    settings = Settings.from_env(env)
    prefix = bucket_key(f"{offer.provider}:{offer.api_model}", api_key, settings.namespace)
    with _limiters_lock:
        limiter = _limiters.get(prefix)
        if limiter is None:
            fraction = _env_float(env, "FLEET_API_BURST_FRACTION", DEFAULT_BURST_FRACTION)
            limits = Limits.per_minute(offer.requests_per_min, offer.tokens_per_min, fraction)
            url = env.get("FLEET_RATELIMIT_URL") or (
                settings.broker_url if settings.is_redis else None
            )
            if url:
                client = redis_client(url, settings.tls)  # verifies rediss:// like the broker
                bucket: RedisBucket | MemoryBucket = RedisBucket(client, prefix, limits)
            else:
                log.warning(
                    "api.ratelimit.local",
                    provider=offer.provider,
                    note="no Redis: limits are per process",
                )
                bucket = MemoryBucket(limits)
            limiter = _limiters[prefix] = RateLimiter(bucket, limits)
        return limiter


def handle(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Forward ``spec`` to the endpoint of the worker's provider (see the module docstring).

    Raises:
        HandlerError: not inference, a model the provider does not serve, or bad input.
        workers.apiclient.ApiCallError: the endpoint refused or kept failing.
        fleet.ratelimit.RateLimitError: no rate-limit grant in time.

    """
    provider = provider_of(ctx.accelerator)
    if provider is None:
        raise HandlerError(f"accelerator: {ctx.accelerator} is not an API pool")
    if spec.kind.value != "inference":
        raise HandlerError(f"kind: API pools run inference only, not {spec.kind.value}")
    offer = find_api_offer(default_catalog(), provider, spec.model.name)
    if offer is None:
        raise HandlerError(f"model.name: {spec.model.name!r} is not served by {provider}")
    env = os.environ
    request = build_request(spec, offer)
    endpoint = endpoint_for(offer, env)
    limiter = limiter_for(offer, endpoint.api_key, env)
    estimate = estimate_tokens(spec, request)
    try:
        check_fits(limiter.limits, 1, estimate)
    except RateLimitError as exc:  # permanent: this request can never be granted
        raise HandlerError(f"tokens_in: {exc}") from None
    done = asyncio.run(_call(endpoint, request, estimate, limiter, env))
    cost = offer.cost_usd(done.tokens_in, done.tokens_out)
    log.info(
        "api.completed",
        provider=provider,
        api_model=offer.api_model,
        prompt_n=done.tokens_in,  # not "tokens_*": log fields named like secrets are masked
        completion_n=done.tokens_out,
        attempts=done.attempts,
        rate_wait_s=round(done.rate_wait_s, 3),
        actual_cost_usd=cost,
    )
    return {
        "engine": f"api:{provider}",
        "provider": provider,
        "api_model": offer.api_model,
        "text": done.text,
        "tokens_in": done.tokens_in,
        "tokens_out": done.tokens_out,
        "usage": {"prompt_tokens": done.tokens_in, "completion_tokens": done.tokens_out},
        "usage_reported": done.usage_reported,
        "actual_cost_usd": cost,
        "finish_reason": done.finish_reason,
        "attempts": done.attempts,
        "rate_wait_s": done.rate_wait_s,
        "emulated": done.emulated or ctx.emulated,
    }


async def _call(
    endpoint: Endpoint,
    request: ChatRequest,
    estimate: int,
    limiter: RateLimiter,
    env: Mapping[str, str],
) -> Completion:
    timeout = httpx.Timeout(_env_float(env, "FLEET_API_TIMEOUT_S", 120.0), connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await call_endpoint(
            client,
            endpoint,
            request,
            estimate,
            limiter,
            retry_policy(env),
            rate_wait_timeout_s=_env_float(env, "FLEET_API_RATE_WAIT_S", 300.0),
        )

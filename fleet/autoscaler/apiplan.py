"""API pools in the plan, pure: worker concurrency within rate limits, and what overflows.

Token-priced API pools (``[[api_pools]]``) have no instances to buy. For the backlog
``N`` (ready + unacked) of ``inference.api-<provider>``:

* **rate** ``R`` (calls/s) is the pool's rate limit for a typical call: the smallest over
  its offers of ``requests_per_min / 60`` and ``tokens_per_min / 60 / tokens`` with
  ``tokens = TYPICAL_TOKENS_IN + TYPICAL_TOKENS_OUT`` (queues do not say which model a
  message is for, so the tightest limit is assumed);
* **latency** ``L`` is the slowest offer's ``latency_s`` for that typical call;
* **absorbed** = ``min(N, floor(R x drain_target_s))`` tasks drain within the pool's drain
  target; the rest is **overflow**;
* **desired concurrency** = ``ceil(min(N / drain_target_s, R) x L)`` streams (Little's law:
  arrival rate x time in service), at least 1 with work, clamped to
  ``[min_concurrency, max_concurrency]``; more streams than the rate limit keeps busy
  would only earn 429s;
* **self-hosted capacity**: absorbed work never triggers an instance launch. Overflow is
  added as demand (``DEFAULT_SERVICE_S[inference]`` per task) for the accelerator of
  the pool's ``overflow_pool`` when it names one (the planner's rule 2 then gives it to
  that accelerator's cheapest pools), so self-hosted capacity starts booting while
  placement (which sees the API queue's wait grow) sends new work to chips; without an
  ``overflow_pool`` it is only reported.

API queues with work and no ``[[api_pools]]`` entry are unsatisfiable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fleet.autoscaler.apipools import ApiPoolConfig, api_pool_offers
from fleet.autoscaler.config import AutoscalerConfig
from fleet.autoscaler.demand import DEFAULT_SERVICE_S, QueueDemand
from fleet.autoscaler.model import ApiPoolDecision, Unsatisfiable, WorkerObservation
from fleet.catalog import Catalog
from fleet.catalog.apis import provider_of
from fleet.queues import api_queue_name
from fleet.spec import TaskKind

TYPICAL_TOKENS_IN = 1000
TYPICAL_TOKENS_OUT = 300


def split_api_demands(
    demands: Iterable[QueueDemand],
) -> tuple[list[QueueDemand], dict[str, QueueDemand]]:
    """``(instance demands, {provider: API queue demand})``."""
    chips: list[QueueDemand] = []
    apis: dict[str, QueueDemand] = {}
    for d in demands:
        provider = provider_of(d.accelerator)
        if provider is None:
            chips.append(d)
        else:
            apis[provider] = d
    return chips, apis


def _rate_and_latency(pool: ApiPoolConfig, catalog: Catalog) -> tuple[float, float]:
    offers = api_pool_offers(pool, catalog)
    tokens = TYPICAL_TOKENS_IN + TYPICAL_TOKENS_OUT
    rate = min(
        (min(o.requests_per_min / 60.0, o.tokens_per_min / 60.0 / tokens) for o in offers),
        default=0.0,
    )
    latency = max((o.latency_s(TYPICAL_TOKENS_IN, TYPICAL_TOKENS_OUT) for o in offers), default=1.0)
    return rate, latency


def decide_api_pool(
    pool: ApiPoolConfig,
    demand: QueueDemand | None,
    catalog: Catalog,
    current: int,
    namespace: str,
    overflow_accelerator: str | None = None,
) -> tuple[ApiPoolDecision, QueueDemand | None]:
    """The decision for one API pool, and the overflow demand for its ``overflow_pool``.

    ``overflow_accelerator`` is the overflow pool's accelerator (None: no overflow pool).
    """
    queue = api_queue_name(pool.provider, namespace)
    tasks = demand.tasks if demand is not None else 0
    rate, latency = _rate_and_latency(pool, catalog)
    drain = pool.drain_target_s
    absorbed = min(tasks, math.floor(rate * drain + 1e-9))
    overflow = tasks - absorbed
    wanted = min(tasks / drain, rate) * latency
    floor = max(1, pool.min_concurrency) if tasks else pool.min_concurrency
    desired = min(pool.max_concurrency, max(floor, math.ceil(wanted - 1e-9)))
    reasons = [
        (
            f"{tasks} tasks; rate limit {rate * 60:,.4g} calls/min, {latency:.3g} s per call:"
            f" {current} -> {desired} concurrent calls"
        )
    ]
    if tasks and math.ceil(wanted - 1e-9) > pool.max_concurrency:
        reasons.append(f"capped at max_concurrency {pool.max_concurrency}")
    extra: QueueDemand | None = None
    if overflow:
        if pool.overflow_pool is not None and overflow_accelerator is not None:
            reasons.append(
                f"{overflow} tasks beyond what the rate limit drains in {drain:g} s:"
                f" demand for {overflow_accelerator} capacity (overflow_pool {pool.overflow_pool})"
            )
            extra = QueueDemand(
                name=f"{queue} (overflow)",
                kind=TaskKind.INFERENCE,
                accelerator=overflow_accelerator,
                devices=1,
                tasks=overflow,
                ready=overflow,
                service_s=DEFAULT_SERVICE_S[TaskKind.INFERENCE],
            )
        else:
            reasons.append(
                f"{overflow} tasks beyond what the rate limit drains in {drain:g} s"
                " (no overflow_pool: placement moves new work elsewhere as the wait grows)"
            )
    elif tasks:
        reasons.append(f"all {tasks} tasks within the rate limit: no instance needed")
    decision = ApiPoolDecision(
        provider=pool.provider,
        queue=queue,
        tasks=tasks,
        current_concurrency=current,
        desired_concurrency=desired,
        calls_per_min_limit=rate * 60,
        absorbed=absorbed,
        overflow=overflow,
        overflow_pool=pool.overflow_pool,
        reasons=tuple(reasons),
    )
    return decision, extra


def plan_api_pools(
    demands: dict[str, QueueDemand],
    config: AutoscalerConfig,
    catalog: Catalog,
    workers: Iterable[WorkerObservation],
) -> tuple[tuple[ApiPoolDecision, ...], list[QueueDemand], list[Unsatisfiable]]:
    """Decisions for every configured API pool, overflow demand, and unserved API queues.

    Returns ``(decisions sorted by provider, overflow demand on the overflow pools'
    accelerators, Unsatisfiable for API queues with work but no [[api_pools]] entry)``.
    """
    current: dict[str, int] = {}
    for w in workers:
        provider = provider_of(w.accelerator)
        if provider is not None:
            current[provider] = current.get(provider, 0) + w.concurrency
    accelerator_of = {p.name: p.accelerator for p in config.pools}
    decisions: list[ApiPoolDecision] = []
    overflow: list[QueueDemand] = []
    for pool in sorted(config.api_pools, key=lambda p: p.provider):
        decision, extra = decide_api_pool(
            pool,
            demands.get(pool.provider),
            catalog,
            current.get(pool.provider, 0),
            config.fleet.namespace,
            accelerator_of.get(pool.overflow_pool or ""),
        )
        decisions.append(decision)
        if extra is not None:
            overflow.append(extra)
    configured = {p.provider for p in config.api_pools}
    unserved = [
        Unsatisfiable(d.name, d.ready, f"no [[api_pools]] entry for provider {provider!r}")
        for provider, d in sorted(demands.items())
        if provider not in configured
    ]
    return tuple(decisions), overflow, unserved

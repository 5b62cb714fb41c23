"""Planner benchmark: ``plan()`` time for 100, 1,000 and 10,000 pools against 500 queues.

Pools cycle over the catalog's priced offers, alternating cloud pools (the offer's cloud,
region and instance type) and local pools (``price_as`` the offer); one pool in ten
already runs an instance. Queues cycle over kinds x accelerators x device tiers, so some
demand spills across pools and some is unsatisfiable, as in a real fleet. Each size is
timed as the median of 5 runs after one warm-up. Target: well under 100 ms at 1,000
pools, and time per pool roughly flat as the fleet grows (linear scaling).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from fleet.autoscaler.config import AutoscalerConfig, FleetConfig, PoolConfig
from fleet.autoscaler.model import Instance, InstanceState, OfferRef, QueueObservation, Snapshot
from fleet.autoscaler.planner import plan
from fleet.catalog import Catalog, Market, default_catalog
from fleet.queues import DEVICE_TIERS, queue_name
from fleet.spec import TaskKind

SIZES = (100, 1_000, 10_000)
QUEUES = 500
ROUNDS = 5
TARGET_MS_AT_1000 = 100.0
NOW = 1_000_000.0


def _config(n: int, catalog: Catalog) -> AutoscalerConfig:
    offers = [o for o in catalog.offers if o.markets()]
    pools = []
    for i in range(n):
        o = offers[i % len(offers)]
        local = i % 2 == 1
        pools.append(
            PoolConfig(
                name=f"p{i:05d}",
                provider="local" if local else o.cloud,
                accelerator=o.accelerator,
                region=None if local else o.region,
                instance_types=() if local else (o.instance_type,),
                price_as=o.key if local else None,
                max_instances=4,
                budget_usd_per_hour=200.0,
                drain_target_s=120.0,
            )
        )
    # model_construct: the benchmark times plan(), not config validation.
    return AutoscalerConfig.model_construct(
        fleet=FleetConfig(budget_usd_per_hour=1e6, max_launches_per_loop=1000), pools=tuple(pools)
    )


def _snapshot(config: AutoscalerConfig, catalog: Catalog) -> Snapshot:
    names = [
        queue_name(kind, fam.name, tier)
        for fam in sorted(catalog.families.values(), key=lambda f: f.name)
        if catalog.offers_by_family.get(fam.name)
        for kind in TaskKind
        if kind.value in fam.kinds
        for tier in DEVICE_TIERS
    ]
    picked = sorted({names[(i * 7) % len(names)] for i in range(len(names))})[:QUEUES]
    queues = {
        q: QueueObservation(q, ready=(i * 37) % 400, unacked=i % 5) for i, q in enumerate(picked)
    }
    instances = []
    for i, pool in enumerate(config.pools[::10]):
        price_as = pool.price_as or f"{pool.cloud}/{pool.region}/{pool.instance_types[0]}"
        cloud, region, itype = price_as.split("/")
        ref = OfferRef(cloud, region, itype, Market.ON_DEMAND.value)
        instances.append(
            Instance(f"i-{i}", pool.name, ref, InstanceState.RUNNING, NOW - 3600, f"t{i}", 1.0)
        )
    return Snapshot(taken_at=NOW, queues=queues, instances=tuple(instances))


def run() -> dict[str, Any]:
    """Time ``plan()`` at each size; the dict reports whether the 1,000-pool target is met."""
    catalog = default_catalog()
    ms: list[float] = []
    for n in SIZES:
        config = _config(n, catalog)
        snapshot = _snapshot(config, catalog)
        plan(snapshot, config, catalog, NOW)  # warm-up
        times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            plan(snapshot, config, catalog, NOW)
            times.append((time.perf_counter() - start) * 1000)
        ms.append(round(statistics.median(times), 2))
    at_1000 = ms[SIZES.index(1_000)]
    return {
        "pools": list(SIZES),
        "ms": ms,
        "queues": QUEUES,
        "target_ms_at_1000": TARGET_MS_AT_1000,
        "met": at_1000 < TARGET_MS_AT_1000,
        "per_pool_us": [round(t * 1000 / n, 1) for t, n in zip(ms, SIZES, strict=True)],
    }


if __name__ == "__main__":
    result = run()
    print(f"plan() with {result['queues']} queues (median of {ROUNDS})")
    print(f"{'pools':>8} {'ms':>10} {'us/pool':>9}")
    for n, t, per in zip(result["pools"], result["ms"], result["per_pool_us"], strict=True):
        print(f"{n:>8} {t:>10.2f} {per:>9.1f}")
    verdict = "met" if result["met"] else "NOT met"
    print(f"target < {result['target_ms_at_1000']:.0f} ms at 1,000 pools: {verdict}")

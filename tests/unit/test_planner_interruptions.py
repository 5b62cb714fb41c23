"""Spot interruptions in the planner: an interrupted offer is avoided for the back-off, like a capacity error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fleet.autoscaler.model import Interruption, Snapshot
from fleet.autoscaler.observe import map_interruptions
from fleet.autoscaler.planner import plan
from fleet.autoscaler.snapshot_io import snapshot_from_dict
from fleet.registry import InterruptionRecord
from tests.unit.test_planner import (
    CATALOG,
    G2_OD,
    G2_SPOT,
    GCP_L4,
    L4,
    L4_OD,
    LOCAL_L4,
    NOW,
    config,
    inst,
    ref,
    snap,
    with_,
)

G2_16_SPOT = "gcp/us-central1/g2-standard-16/spot"


def interrupted(key: str = G2_SPOT, at: float = NOW - 60, pool: str = "gcp-l4") -> Interruption:
    """An interruption of an instance of offer ``key`` seen at ``at``."""
    return Interruption("vm-1", ref(key), at, pool, "l4-abc@vm-1")


def with_interruptions(s: Snapshot, *items: Interruption) -> Snapshot:
    return replace(s, interruptions=tuple(items))


@pytest.mark.parametrize(
    ("name", "pools", "interruptions", "expected"),
    [
        ("no interruption: spot first", [GCP_L4], [], [G2_SPOT] * 2),
        ("interrupted spot offer: on-demand instead", [GCP_L4], [interrupted()], [G2_OD] * 2),
        (
            "back-off over: spot again",
            [GCP_L4],
            [interrupted(at=NOW - 900)],  # GCP_L4's capacity_backoff_s
            [G2_SPOT] * 2,
        ),
        (
            "an interruption seen by another pool still counts (same offer)",
            [GCP_L4],
            [interrupted(pool="other-pool")],
            [G2_OD] * 2,
        ),
        (
            "an interruption whose instance is gone (no pool) still counts",
            [GCP_L4],
            [interrupted(pool="")],
            [G2_OD] * 2,
        ),
        (
            "another offer's interruption changes nothing",
            [GCP_L4],
            [interrupted(L4_OD)],
            [G2_SPOT] * 2,
        ),
    ],
)
def test_interrupted_offers_are_avoided(
    name: str, pools: list[dict], interruptions: list[Interruption], expected: list[str]
) -> None:
    """The replacement launches prefer an offer that was not just interrupted."""
    s = with_interruptions(snap({L4: 6}), *interruptions)
    got = plan(s, config(*pools), CATALOG, NOW)
    assert sorted(x.offer.key for x in got.launches) == sorted(expected), name


def test_the_other_spot_type_is_preferred_to_on_demand() -> None:
    """With two spot instance types, losing one moves launches to the other spot type, not on-demand."""
    pool = with_(GCP_L4, instance_types=("g2-standard-12", "g2-standard-16"))
    s = with_interruptions(snap({L4: 6}), interrupted())
    got = plan(s, config(pool), CATALOG, NOW)
    assert {x.offer.key for x in got.launches} == {G2_16_SPOT}


def test_interruption_does_not_terminate_or_grow_past_max() -> None:
    """An interruption only steers offers: the pool size still follows demand and max_instances."""
    pool = with_(GCP_L4, max_instances=2)
    running = inst("vm-1", pool="gcp-l4", offer=G2_SPOT, price=0.85)
    s = with_interruptions(snap({L4: 400}, instances=[running]), interrupted())
    got = plan(s, config(pool), CATALOG, NOW)
    assert [x.offer.key for x in got.launches] == [G2_OD]
    assert got.terminations == ()


def test_plan_is_deterministic_with_interruptions() -> None:
    """Same snapshot, same plan."""
    s = with_interruptions(snap({L4: 6}), interrupted(), interrupted(L4_OD, at=NOW - 1))
    cfg = config(GCP_L4, LOCAL_L4)
    assert plan(s, cfg, CATALOG, NOW) == plan(s, cfg, CATALOG, NOW)


# --- observe's mapping from worker records to offers (pure part)


def record(
    instance_id: str | None, offer: str | None = None, at: float = NOW
) -> InterruptionRecord:
    return InterruptionRecord(
        hostname="w@h",
        cloud="gcp",
        action="preempt",
        at=at,
        deadline=at + 30,
        instance_id=instance_id,
        offer=offer,
    )


def test_records_map_to_the_listed_instance_first() -> None:
    """The provider's listing names the offer and pool; the worker's own FLEET_OFFER is the fallback."""
    listed = inst("vm-1", pool="gcp-l4", offer=G2_SPOT)
    got = map_interruptions(
        [
            record("vm-1", offer="aws/us-east-1/wrong/spot"),
            record("vm-gone", offer=G2_16_SPOT, at=NOW + 1),
            record("vm-unknown"),  # neither listed nor carrying an offer: nothing to avoid
            record(None, offer="not/an/offer"),
        ],
        [listed],
    )
    assert got == (
        Interruption("vm-1", ref(G2_SPOT), NOW, "gcp-l4", "w@h"),
        Interruption("vm-gone", ref(G2_16_SPOT), NOW + 1, "", "w@h"),
    )


def test_interruptions_survive_a_snapshot_file() -> None:
    """``fleet plan --snapshot`` reads interruptions back, so the offline plan is the same."""
    s = with_interruptions(snap({L4: 6}), interrupted())
    again = snapshot_from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert plan(again, config(GCP_L4), CATALOG, NOW) == plan(s, config(GCP_L4), CATALOG, NOW)

"""The KEDA-like homogeneous baseline's pure rules (fleet.sim.keda), on hand-made numbers."""

from __future__ import annotations

import pytest

from fleet.autoscaler.config import parse_config
from fleet.catalog import default_catalog
from fleet.sim.keda import (
    concurrency,
    desired_replicas,
    homogeneous_offer,
    scale_in_floor,
    target_per_instance,
)
from fleet.spec import TaskSpec, parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
POOLS = """
[[pools]]
name = "l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
[[pools]]
name = "h100"
provider = "local"
accelerator = "nvidia-h100"
price_as = "aws/us-east-1/p5.48xlarge"
markets = ["on_demand"]
"""
CONFIG = parse_config(POOLS, env={})


def chat(params_b: float, dtype: str = "bf16") -> TaskSpec:
    """A chat request on a model of ``params_b`` billion parameters."""
    return parse_spec({
        "kind": "inference",
        "model": {"name": f"m{params_b}", "params_b": params_b, "dtype": dtype},
        "tokens_in": 500,
        "tokens_out": 100,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("queue", "target", "maximum", "want"),
    [
        (0, 10, 100, 0),
        (1, 10, 100, 1),
        (10, 10, 100, 1),
        (11, 10, 100, 2),
        (5_000, 10, 100, 100),  # maxReplicaCount caps it
        (7, 1, 100, 7),
    ],
)
def test_desired_replicas_is_kedas_queue_length_rule(
    queue: int, target: int, maximum: int, want: int
) -> None:
    """ceil(queue length / target), at most the maximum."""
    assert desired_replicas(queue, target, maximum) == want


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ([], 1),
        ([0.3], 1),  # never below one task per instance
        ([43.9], 43),  # rounded down: KEDA takes an integer target
        ([40.0, 40.0, 40.0], 40),
        ([60.0] * 5 + [6.0], 24),  # shares 5 x 1/60 + 1/6 = 1/4 over 6 tasks: 1/24 each
        ([3.0, 3.0 / 2.0], 2),  # 2 / (1/3 + 2/3) exactly, not 1.999...
    ],
)
def test_target_per_instance_is_one_instance_of_the_average_share(
    values: list[float], want: int
) -> None:
    """The target is devices over the mean share: the harmonic mean, rounded down."""
    assert target_per_instance(values) == want


@pytest.mark.parametrize(
    ("recent", "now", "want"),
    [
        ([], 0.0, 0),
        ([(0.0, 3), (30.0, 1)], 30.0, 3),  # a 3 within the window holds three instances
        ([(0.0, 3), (300.0, 1)], 300.0, 3),  # exactly the cooldown ago still counts
        ([(0.0, 3), (330.0, 1)], 330.0, 1),  # more than the cooldown ago: released
        ([(0.0, 2), (330.0, 0)], 330.0, 0),  # to zero after the cooldown
    ],
)
def test_scale_in_waits_for_the_cooldown(
    recent: list[tuple[float, int]], now: float, want: int
) -> None:
    """Scale-in goes to the largest desired count polled in the last 300 s."""
    assert scale_in_floor(recent, now, 300.0) == want


def test_the_cheapest_offer_that_holds_every_task_is_chosen() -> None:
    """8B chats fit one L4, the cheapest; a 70B task in the trace moves it to the H100 box."""
    small = homogeneous_offer([chat(8)] * 3, CONFIG, CATALOG)
    assert small is not None
    assert small.priced.offer.instance_type == "g6.xlarge"
    assert (small.holds, small.tasks) == (3, 3)
    mixed = homogeneous_offer([chat(8), chat(70)], CONFIG, CATALOG)
    assert mixed is not None
    assert mixed.priced.offer.instance_type == "p5.48xlarge"
    assert (mixed.holds, mixed.tasks) == (2, 2)


def test_when_no_offer_holds_everything_the_one_holding_most_is_chosen() -> None:
    """405B bf16 (972 GB) fits neither; the H100 box holds the two others."""
    pick = homogeneous_offer([chat(8), chat(70), chat(405)], CONFIG, CATALOG)
    assert pick is not None
    assert pick.priced.offer.instance_type == "p5.48xlarge"
    assert (pick.holds, pick.tasks) == (2, 3)


def test_no_pools_no_offer() -> None:
    """A config without pools buys nothing."""
    assert homogeneous_offer([chat(8)], parse_config("", env={}), CATALOG) is None


def test_concurrency_is_devices_over_each_tasks_share() -> None:
    """One stream occupies busy_s / service_s of a device: an 8-device box runs 8x the streams."""
    spec = chat(8)
    [offer] = [o for o in CATALOG.offers if o.instance_type == "p5.48xlarge"]
    family = CATALOG.family("nvidia-h100")
    est = estimate(spec, family, 1)
    want = 8 * est.service_s / est.busy_s
    assert concurrency(spec, offer, family) == pytest.approx(want)
    assert concurrency(chat(405), offer, family) is None

# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Placement reads like a specification: memory fit, filters, budget, deadline, loads, policy."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.catalog import Market, default_catalog
from fleet.compat import memory_needed_gb
from fleet.placement import NoPlacementError, Placement, Policy, QueueLoad, place
from fleet.queues import all_queue_names, queue_name, queues_for_worker
from fleet.spec import DType, Runtime, TaskKind, parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
FAMILIES = frozenset(CATALOG.names())
OFFERS = {(o.cloud, o.region, o.instance_type): o for o in CATALOG.offers}
QUEUES = all_queue_names(CATALOG)
TRAINING_KINDS = {"training", "fine_tune"}
CLOUD_FILTERS = [(), ("aws",), ("gcp",), ("azure",), ("aws", "gcp")]
MARKET_FILTERS = [(), ("spot",), ("on_demand",)]


def make_spec(kind="inference", params_b=8.0, dtype="bf16", **extra):
    """A valid spec; training kinds get a token count unless one is given."""
    data = {"kind": kind, "model": {"name": "m", "params_b": params_b, "dtype": dtype}}
    if kind in TRAINING_KINDS:
        data["tokens_in"] = 1000
    return parse_spec(data | extra)


def chosen_offer(p: Placement):
    """The catalog offer a placement's estimate is based on."""
    return OFFERS[p.offer.cloud, p.offer.region, p.offer.instance_type]


def attempt(spec, **kwargs) -> Placement | NoPlacementError:
    """``place(spec, CATALOG, **kwargs)``, returning the NoPlacementError instead of raising it."""
    try:
        return place(spec, CATALOG, **kwargs)
    except NoPlacementError as exc:
        return exc


def reasons_by_family(rejected) -> dict[str, str]:
    """``{accelerator: reason}``, checking each family appears once."""
    names = [r.accelerator for r in rejected]
    assert len(names) == len(set(names)), names
    return {r.accelerator: r.reason for r in rejected}


CHAT_8B = {"tokens_in": 400, "tokens_out": 40, "slo": {"deadline_s": 30}}


# ------------------------------------------------------------------------------ memory fit


@pytest.mark.parametrize("clouds", CLOUD_FILTERS)
@pytest.mark.parametrize("markets", MARKET_FILTERS)
@pytest.mark.parametrize("policy", [Policy.COST, Policy.FASTEST])
def test_405b_fp8_never_lands_on_an_offer_smaller_than_486_gb(clouds, markets, policy):
    """405B fp8 (486 GB) only lands on an offer whose count x memory holds 486 GB."""
    spec = make_spec(
        "inference",
        405,
        "fp8",
        tokens_in=2000,
        tokens_out=300,
        requirements={"clouds": clouds, "markets": markets},
    )
    p = attempt(spec, policy=policy)
    if isinstance(p, NoPlacementError):
        assert {r.accelerator for r in p.rejected} == FAMILIES
        return
    offer = chosen_offer(p)
    assert p.memory_needed_gb == pytest.approx(486)
    assert offer.accelerator_count * offer.accelerator_memory_gb >= 486
    assert p.devices * offer.accelerator_memory_gb >= 486


def test_405b_bf16_lands_on_h200_x8_and_never_h100():
    """405B bf16 (972 GB) goes to nvidia-h200 x8; H100 (8 x 80 = 640 GB) is refused for memory."""
    spec = make_spec("inference", 405, "bf16", tokens_in=2000, tokens_out=300)
    p = place(spec, CATALOG)
    assert (p.accelerator, p.devices, p.queue) == ("nvidia-h200", 8, "inference.nvidia-h200.x8")
    reason = reasons_by_family(p.rejected)["nvidia-h100"]
    assert "972.0 GB" in reason
    assert "8 x 80 = 640 GB" in reason


@pytest.mark.parametrize("policy", [Policy.COST, Policy.FASTEST])
def test_405b_bf16_never_on_h100_whatever_the_policy(policy):
    """No policy or filter puts 405B bf16 on nvidia-h100."""
    for clouds in CLOUD_FILTERS:
        spec = make_spec("inference", 405, "bf16", tokens_out=100, requirements={"clouds": clouds})
        p = attempt(spec, policy=policy)
        if isinstance(p, NoPlacementError):
            h100 = reasons_by_family(p.rejected)["nvidia-h100"]
            assert "972.0 GB" in h100 or h100 == "no offer in the allowed clouds or markets"
            continue
        assert p.accelerator == "nvidia-h200"


def test_405b_bf16_pinned_to_h100_is_refused_for_memory():
    """Pinning 405B bf16 to nvidia-h100 raises NoPlacementError naming the memory gap."""
    spec = make_spec("inference", 405, "bf16", requirements={"accelerators": ["nvidia-h100"]})
    with pytest.raises(NoPlacementError) as info:
        place(spec, CATALOG)
    assert "640 GB" in reasons_by_family(info.value.rejected)["nvidia-h100"]


@pytest.mark.parametrize("clouds", CLOUD_FILTERS)
@pytest.mark.parametrize("markets", MARKET_FILTERS)
def test_tiny_fp32_embedding_never_goes_to_h100_or_h200(clouds, markets):
    """A 0.1B fp32 embedding is never routed (at lowest cost) to nvidia-h100 or nvidia-h200."""
    spec = make_spec(
        "embedding",
        0.1,
        "fp32",
        tokens_in=3000,
        requirements={"clouds": clouds, "markets": markets},
    )
    p = place(spec, CATALOG)
    assert p.accelerator not in {"nvidia-h100", "nvidia-h200"}
    assert p.devices == 1


# ------------------------------------------------------------------------------ requirements


@pytest.mark.parametrize(
    "family",
    [
        "nvidia-h100",
        "nvidia-h200",
        "nvidia-l4",
        "nvidia-a10g",
        "nvidia-a100-80gb",
        "aws-inferentia2",
        "google-tpu-v5e",
        "cpu",
    ],
)
def test_requirements_accelerators_pins(family):
    """requirements.accelerators with one family places on that family."""
    spec = make_spec("inference", 1, requirements={"accelerators": [family]}, tokens_out=10)
    p = place(spec, CATALOG)
    assert p.accelerator == family
    assert reasons_by_family(p.rejected) == dict.fromkeys(
        FAMILIES - {family}, f"not in requirements.accelerators ({family})"
    )


def test_requirements_accelerators_chooses_among_the_allowed():
    """With several allowed families the choice is one of them."""
    allowed = ["nvidia-l4", "nvidia-a10g", "nvidia-l40s"]
    p = place(make_spec(requirements={"accelerators": allowed}, **CHAT_8B), CATALOG)
    assert p.accelerator in allowed


def test_exclude_removes_a_family():
    """Excluding the family placement would choose makes it choose another."""
    spec = make_spec(**CHAT_8B)
    first = place(spec, CATALOG).accelerator
    again = place(make_spec(requirements={"exclude": [first]}, **CHAT_8B), CATALOG)
    assert again.accelerator != first
    assert reasons_by_family(again.rejected)[first] == "excluded by requirements.exclude"


@pytest.mark.parametrize("clouds", CLOUD_FILTERS[1:])
@pytest.mark.parametrize("markets", MARKET_FILTERS)
def test_cloud_and_market_filters(clouds, markets):
    """The chosen offer is in an allowed cloud and market and is priced there."""
    spec = make_spec(requirements={"clouds": clouds, "markets": markets}, **CHAT_8B)
    p = place(spec, CATALOG)
    assert p.offer.cloud in clouds
    if markets:
        assert p.offer.market.value in markets
    assert chosen_offer(p).price(p.offer.market) == p.offer.usd_per_hour


def test_family_without_offers_in_the_allowed_clouds_says_so():
    """A family sold only elsewhere is refused for having no offer in the allowed clouds."""
    p = place(make_spec(requirements={"clouds": ["azure"]}, **CHAT_8B), CATALOG)
    reasons = reasons_by_family(p.rejected)
    for family in ("aws-inferentia2", "google-tpu-v6e", "nvidia-l4"):
        assert reasons[family] == "no offer in the allowed clouds or markets"


def test_aws_spot_only_has_no_gpu_prices():
    """AWS GPU offers have no spot price, so AWS+spot leaves only the cpu offers."""
    spec = make_spec(requirements={"clouds": ["aws"], "markets": ["spot"]}, **CHAT_8B)
    p = place(spec, CATALOG)
    assert (p.accelerator, p.offer.market) == ("cpu", Market.SPOT)


def test_min_accelerator_memory_filters_offers():
    """min_accelerator_memory_gb keeps small-device families out."""
    spec = make_spec(requirements={"min_accelerator_memory_gb": 90}, **CHAT_8B)
    p = place(spec, CATALOG)
    assert chosen_offer(p).accelerator_memory_gb >= 90
    assert "min_accelerator_memory_gb" in reasons_by_family(p.rejected)["nvidia-l4"]


def test_unpriced_family_is_refused_for_price():
    """Families whose only offers have no price are refused with that reason."""
    p = place(make_spec(**CHAT_8B), CATALOG)
    reasons = reasons_by_family(p.rejected)
    for family in ("amd-mi300x", "aws-trainium2"):
        assert reasons[family] == "no priced offer in the catalog"


# ------------------------------------------------------------------------ budget and deadline


def test_budget_too_small_raises_mentioning_budget():
    """A budget below every estimate raises NoPlacementError whose reasons mention the budget."""
    spec = make_spec("fine_tune", 8, tokens_in=2_000_000, budget={"max_usd": 1e-6})
    with pytest.raises(NoPlacementError, match="budget") as info:
        place(spec, CATALOG)
    reasons = reasons_by_family(info.value.rejected)
    assert set(reasons) == FAMILIES
    assert "over budget.max_usd $1e-06" in reasons["nvidia-h100"]


def test_budget_is_respected():
    """The chosen estimate is within budget; families over it are refused for it."""
    budget = 0.05
    spec = make_spec("fine_tune", 8, tokens_in=2_000_000, budget={"max_usd": budget})
    p = place(spec, CATALOG)
    assert p.estimated_cost_usd <= budget
    over = [r for r in p.rejected if "budget" in r.reason]
    assert over


def test_impossible_deadline_raises_mentioning_deadline():
    """A deadline no family can run within raises NoPlacementError; reasons mention the deadline."""
    spec = make_spec(
        "inference", 405, "bf16", tokens_in=2000, tokens_out=100_000, slo={"deadline_s": 1}
    )
    with pytest.raises(NoPlacementError, match="deadline") as info:
        place(spec, CATALOG)
    assert "misses deadline" in reasons_by_family(info.value.rejected)["nvidia-h200"]


def test_tpot_goal_rejects_a_family_too_slow_even_at_batch_1():
    """A chip whose single stream misses slo.tpot_ms is rejected, naming both numbers."""
    spec = make_spec("inference", 6.74, "fp16", tokens_in=100, tokens_out=200, slo={"tpot_ms": 40})
    est = estimate(spec, CATALOG.family("nvidia-l4"), 1)
    assert est.batch == 1
    assert est.tpot_s > 0.040  # 13.5 GB of weights over 300 GB/s x decode_efficiency
    p = place(spec, CATALOG)
    why = reasons_by_family(p.rejected)["nvidia-l4"]
    assert why == f"misses slo.tpot_ms: {est.tpot_s * 1000:.3g} ms per token > 40 ms"
    assert p.accelerator != "nvidia-l4"
    assert estimate(spec, CATALOG.family(p.accelerator), p.devices).tpot_s <= 0.040


def test_tpot_goal_nobody_meets_raises_mentioning_tpot():
    """When no family decodes fast enough, the error lists the tpot misses."""
    spec = make_spec("inference", 70, "bf16", tokens_in=100, tokens_out=100, slo={"tpot_ms": 0.5})
    with pytest.raises(NoPlacementError) as info:
        place(spec, CATALOG)
    reasons = reasons_by_family(info.value.rejected)
    assert "misses slo.tpot_ms" in reasons["nvidia-h200"]


def test_deadline_is_met_by_the_choice():
    """With no loads, the chosen family's run time is within the deadline."""
    spec = make_spec(
        "inference", 70, "bf16", tokens_in=2000, tokens_out=2000, slo={"deadline_s": 60}
    )
    p = place(spec, CATALOG)
    assert p.estimated_wait_s + p.estimated_duration_s <= 60
    assert not p.deadline_at_risk


def test_deadline_changes_the_choice():
    """A tight deadline moves a long generation off the cheapest (slow) family."""
    data = {"tokens_in": 2000, "tokens_out": 20_000}
    relaxed = place(make_spec("inference", 8, **data), CATALOG)
    deadline = relaxed.estimated_duration_s / 2
    tight = place(make_spec("inference", 8, slo={"deadline_s": deadline}, **data), CATALOG)
    assert tight.accelerator != relaxed.accelerator
    assert tight.estimated_duration_s <= deadline
    assert tight.estimated_cost_usd >= relaxed.estimated_cost_usd
    # The relaxed choice either misses the deadline even at batch 1, or meets it with a
    # smaller batch that then costs more than the chosen family.
    why = reasons_by_family(tight.rejected)[relaxed.accelerator]
    assert "misses deadline" in why or why.startswith("costlier")


# ---------------------------------------------------------------------------------- loads


def test_deep_queue_moves_a_deadline_bound_task():
    """A deep queue with one consumer on the usual choice makes a deadline-bound task go elsewhere."""
    spec = make_spec(**CHAT_8B)
    idle = place(spec, CATALOG, loads={})
    loads = {idle.queue: QueueLoad(depth=10_000, consumers=1)}
    busy = place(spec, CATALOG, loads=loads)
    assert busy.accelerator != idle.accelerator
    assert busy.estimated_wait_s + busy.estimated_duration_s <= 30
    assert "misses deadline: wait" in reasons_by_family(busy.rejected)[idle.accelerator]


def test_unknown_loads_count_as_no_wait():
    """loads=None and an empty mapping both mean no wait."""
    spec = make_spec(**CHAT_8B)
    assert place(spec, CATALOG, loads=None).estimated_wait_s == 0
    assert place(spec, CATALOG, loads={}).estimated_wait_s == 0


@pytest.mark.parametrize(
    ("depth", "consumers", "expected"),
    [
        pytest.param(0, 0, "cold", id="empty-no-consumer-cold-start"),
        pytest.param(3, 0, "cold+3", id="backlog-no-consumer"),
        pytest.param(10, 2, "10/2", id="backlog-two-consumers"),
        pytest.param(0, 4, "zero", id="idle-consumers"),
    ],
)
def test_expected_wait_from_queue_load(depth, consumers, expected):
    """Wait is depth x device time / consumers (a batching server overlaps streams), plus the cold start when nothing consumes."""
    spec = make_spec(**{k: v for k, v in CHAT_8B.items() if k != "slo"})
    p = place(spec, CATALOG, loads={q: QueueLoad(depth, consumers) for q in QUEUES})
    if consumers:  # every queue equally warm: the choice is the unloaded one
        assert p.accelerator == place(spec, CATALOG).accelerator
    family = CATALOG.family(p.accelerator)
    cold = family.cold_start_s
    offer = next(o for o in CATALOG.offers if o.instance_type == p.offer.instance_type)
    run = estimate(spec, family, p.devices, offer.vcpus).busy_s
    want = {"cold": cold, "cold+3": cold + 3 * run, "10/2": 10 * run / 2, "zero": 0.0}[expected]
    assert p.estimated_wait_s == pytest.approx(want)


def test_waking_a_cold_queue_is_paid_for_in_the_ranking():
    """A cold queue costs its boot (price x cold start, shared by the waiting tasks) when ranked.

    The unloaded choice, made cold while every other queue stays warm, loses one short call
    to a warm family; with a thousand tasks waiting, each is charged a thousandth of the boot.
    ``estimated_cost_usd`` stays the task's own share.
    """
    spec = make_spec(**{k: v for k, v in CHAT_8B.items() if k != "slo"})
    base = place(spec, CATALOG)
    warm = {q: QueueLoad(0, 1) for q in QUEUES}
    cold_base = place(spec, CATALOG, loads={**warm, base.queue: QueueLoad(0, 0)})
    boot = base.offer.usd_per_hour * CATALOG.family(base.accelerator).cold_start_s / 3600
    assert cold_base.accelerator != base.accelerator  # one short call does not pay for a boot
    assert cold_base.cold_start_cost_usd == 0
    assert cold_base.estimated_cost_usd <= base.estimated_cost_usd + boot
    assert "to boot a cold instance" in reasons_by_family(cold_base.rejected)[base.accelerator]
    # A thousand tasks waiting share one boot: each is charged a thousandth of it.
    shared = place(spec, CATALOG, loads={**warm, base.queue: QueueLoad(999, 0)})
    why = reasons_by_family(shared.rejected)[base.accelerator]
    assert f"+ ${boot / 1000:.6g} to boot a cold instance" in why


def test_loads_are_read_by_namespaced_queue_name():
    """With a namespace, the queue and the loads it reads carry the prefix."""
    spec = make_spec(**{k: v for k, v in CHAT_8B.items() if k != "slo"})
    p = place(spec, CATALOG, namespace="staging.")
    assert p.queue.startswith("staging.")
    cold = {f"staging.{q}": QueueLoad(0, 0) for q in QUEUES}
    loaded = place(spec, CATALOG, loads=cold, namespace="staging.")
    assert loaded.estimated_wait_s == CATALOG.family(loaded.accelerator).cold_start_s
    unprefixed = {q: QueueLoad(0, 0) for q in QUEUES}
    ignored = place(spec, CATALOG, loads=unprefixed, namespace="staging.")
    assert ignored.estimated_wait_s == 0


def test_cold_fleet_still_places_deadline_work_flagged_at_risk():
    """When every queue is cold but the work fits the deadline, wake the cheapest family, at risk.

    Choosing each task's earliest finish instead would wake a different family per task
    size; every cold deadline-bound task now goes to the same, cheapest one.
    """
    spec = make_spec(**CHAT_8B)
    cold = {q: QueueLoad(0, 0) for q in QUEUES}
    p = place(spec, CATALOG, loads=cold)
    assert p.deadline_at_risk
    assert "deadline at risk" in p.reasons[0]
    assert "woke the cheapest" in p.reasons[0]
    assert p.estimated_duration_s <= 30
    assert p.estimated_wait_s == CATALOG.family(p.accelerator).cold_start_s
    assert {r.accelerator for r in p.rejected} == FAMILIES - {p.accelerator}


def test_a_busy_warm_queue_at_risk_takes_the_earliest_finish():
    """When a warm queue is only busy (no boot), the at-risk choice is the earliest finish."""
    spec = make_spec(**CHAT_8B)
    loads = {q: QueueLoad(0, 0) for q in QUEUES} | {"inference.nvidia-h100": QueueLoad(10_000, 1)}
    p = place(spec, CATALOG, loads=loads)
    assert p.deadline_at_risk
    assert "earliest expected finish" in p.reasons[0]


# --------------------------------------------------------------------------------- policies


def finish(p: Placement) -> float:
    """Expected wait plus run."""
    return p.estimated_wait_s + p.estimated_duration_s


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param(None, id="no-loads"),
        pytest.param({"inference.nvidia-h200": QueueLoad(50, 1)}, id="h200-busy"),
        pytest.param({"inference.nvidia-h200": QueueLoad(0, 0)}, id="h200-cold"),
    ],
)
def test_fastest_picks_the_lowest_wait_plus_run(loads):
    """Policy fastest chooses the family with the earliest expected finish."""
    spec = make_spec(tokens_in=400, tokens_out=400)
    fastest = place(spec, CATALOG, loads=loads, policy=Policy.FASTEST)
    for family in FAMILIES - {fastest.accelerator}:
        try:
            other = place(spec, CATALOG, loads=loads, policy=Policy.PINNED, pin=family)
        except NoPlacementError:
            continue
        assert finish(fastest) <= finish(other), family


def test_cost_picks_the_lowest_cost():
    """Policy cost chooses the family with the lowest estimated cost."""
    spec = make_spec(tokens_in=400, tokens_out=400)
    cheapest = place(spec, CATALOG)
    for family in FAMILIES - {cheapest.accelerator}:
        try:
            other = place(spec, CATALOG, policy=Policy.PINNED, pin=family)
        except NoPlacementError:
            continue
        assert cheapest.estimated_cost_usd <= other.estimated_cost_usd, family


def test_pinned_honours_pin():
    """Policy pinned places on ``pin``; the other candidates are refused as not pinned."""
    spec = make_spec(**CHAT_8B)
    p = place(spec, CATALOG, policy=Policy.PINNED, pin="nvidia-l4")
    assert p.accelerator == "nvidia-l4"
    assert p.policy is Policy.PINNED
    reasons = reasons_by_family(p.rejected)
    assert reasons["nvidia-h100"] == "not the pinned accelerator nvidia-l4"


def test_pinned_defaults_to_the_first_required_accelerator():
    """Without pin, the pinned policy uses the first of requirements.accelerators."""
    spec = make_spec(requirements={"accelerators": ["nvidia-a10g", "nvidia-l4"]}, **CHAT_8B)
    assert place(spec, CATALOG, policy=Policy.PINNED).accelerator == "nvidia-a10g"


def test_pinned_without_an_accelerator_raises_value_error():
    """Policy pinned with neither pin nor requirements.accelerators raises ValueError."""
    with pytest.raises(ValueError, match="pinned needs an accelerator"):
        place(make_spec(**CHAT_8B), CATALOG, policy=Policy.PINNED)


def test_pinned_to_an_unknown_accelerator_raises_key_error():
    """Pinning to a name that is not in the catalog raises KeyError naming the known ones."""
    with pytest.raises(KeyError, match="nvidia-h100"):
        place(make_spec(**CHAT_8B), CATALOG, policy=Policy.PINNED, pin="nvidia-b200")


def test_pinned_to_a_family_that_cannot_fit_raises():
    """Pinning to a family too small for the model raises NoPlacementError."""
    spec = make_spec("inference", 405, "bf16")
    with pytest.raises(NoPlacementError):
        place(spec, CATALOG, policy=Policy.PINNED, pin="nvidia-l4")


# ---------------------------------------------------------------------------------- output


def test_to_dict_has_the_documented_shape():
    """to_dict carries queue, accelerator, offer, estimates and rejected reasons, JSON-ready."""
    d = place(make_spec(**CHAT_8B), CATALOG).to_dict()
    assert {
        "queue",
        "accelerator",
        "offer",
        "estimated_cost_usd",
        "estimated_duration_s",
        "rejected",
    } <= set(d)
    assert {"cloud", "region", "instance_type", "market"} <= set(d["offer"])
    assert d["offer"]["market"] in {"on_demand", "spot"}
    assert all(set(r) == {"accelerator", "reason"} for r in d["rejected"])
    assert {r["accelerator"] for r in d["rejected"]} | {d["accelerator"]} == FAMILIES
    assert json.loads(json.dumps(d)) == d


def test_placement_reasons_explain_the_choice():
    """A placement's reasons name the memory need, the offer and the expected times."""
    p = place(make_spec("inference", 405, "bf16", tokens_out=10), CATALOG)
    text = " | ".join(p.reasons)
    assert "972.0 GB" in text
    assert p.offer.instance_type in text
    assert "expected wait" in text


def test_repeated_shape_gives_the_same_answer():
    """Routing the same shape twice (cached) and with other inputs gives the same decision."""
    a = place(make_spec(**CHAT_8B, input={"prompt": "one"}), CATALOG)
    b = place(make_spec(**CHAT_8B, input={"prompt": "two"}, priority=9), CATALOG)
    assert a == b


# ------------------------------------------------------------------------------- invariants


@st.composite
def specs(draw):
    """Random valid specs, biased to shapes placement can discriminate between."""
    kind = draw(st.sampled_from(TaskKind))
    params = draw(
        st.sampled_from([0.02, 0.1, 1, 3, 8, 13, 34, 70, 180, 405, 1000])
        | st.floats(min_value=0.01, max_value=100)
    )
    data = {
        "kind": kind.value,
        "model": {"name": "m", "params_b": params, "dtype": draw(st.sampled_from(DType)).value},
        "tokens_in": draw(st.integers(1 if kind.value in TRAINING_KINDS else 0, 10**7)),
    }
    if kind in (TaskKind.INFERENCE, TaskKind.BATCH, TaskKind.FINE_TUNE):
        data["tokens_out"] = draw(st.integers(0, 10**5))
    if kind.value in TRAINING_KINDS:
        data["training_method"] = draw(st.sampled_from([None, "full", "lora"]))
    names = sorted(FAMILIES)

    def sometimes(strategy):
        """Usually no constraint, sometimes a drawn one."""
        return draw(
            st.sampled_from([False, False, True]).flatmap(
                lambda on: strategy if on else st.just([])
            )
        )

    allowed = sometimes(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=4))
    data["requirements"] = {
        "accelerators": allowed,
        "exclude": sometimes(
            st.lists(st.sampled_from([n for n in names if n not in allowed]), max_size=3)
        ),
        "runtimes": sometimes(st.lists(st.sampled_from(Runtime), unique=True, max_size=3)),
        "clouds": sometimes(st.lists(st.sampled_from(["aws", "gcp", "azure"]), unique=True)),
        "markets": sometimes(st.lists(st.sampled_from(["on_demand", "spot"]), unique=True)),
        "min_accelerator_memory_gb": draw(st.sampled_from([None, None, None, 24, 48, 80, 100])),
    }
    data["slo"] = {
        "deadline_s": draw(st.none() | st.none() | st.floats(min_value=0.01, max_value=1e6))
    }
    data["budget"] = {
        "max_usd": draw(st.none() | st.none() | st.floats(min_value=1e-6, max_value=1e4))
    }
    return parse_spec(data)


loads_strategy = st.none() | st.dictionaries(
    st.sampled_from(QUEUES),
    st.builds(QueueLoad, st.integers(0, 200), st.integers(0, 8)),
    max_size=16,
)


@given(
    spec=specs(),
    loads=loads_strategy,
    policy=st.sampled_from([Policy.COST, Policy.FASTEST]),
)
def test_every_decision_accounts_for_every_family(spec, loads, policy):
    """Each family is chosen or rejected exactly once; the choice fits, is affordable, and queues right."""
    p = attempt(spec, loads=loads, policy=policy)
    if isinstance(p, NoPlacementError):
        assert set(reasons_by_family(p.rejected)) == FAMILIES
        assert all(r.reason for r in p.rejected)
        return
    reasons = reasons_by_family(p.rejected)
    assert p.accelerator not in reasons
    assert set(reasons) | {p.accelerator} == FAMILIES
    assert all(reasons.values())

    offer = chosen_offer(p)
    need = memory_needed_gb(spec)
    assert offer.accelerator == p.accelerator
    assert p.memory_needed_gb == pytest.approx(need)
    assert 1 <= p.devices <= offer.accelerator_count
    assert p.devices * offer.accelerator_memory_gb >= need
    assert offer.price(p.offer.market) == p.offer.usd_per_hour
    assert p.offer.accelerator_count == offer.accelerator_count

    req = spec.requirements
    assert not req.accelerators or p.accelerator in req.accelerators
    assert p.accelerator not in req.exclude
    assert not req.clouds or p.offer.cloud in req.clouds
    assert not req.markets or p.offer.market.value in req.markets
    if spec.budget.max_usd is not None:
        assert p.estimated_cost_usd <= spec.budget.max_usd
    deadline = spec.slo.deadline_s
    if deadline is not None:
        assert p.estimated_duration_s <= deadline
        if not p.deadline_at_risk:
            assert p.estimated_wait_s + p.estimated_duration_s <= deadline
    assert p.estimated_cost_usd >= 0
    assert p.estimated_wait_s >= 0

    assert p.queue == queue_name(spec.kind, p.accelerator, p.devices)
    assert p.queue in QUEUES
    family = CATALOG.family(p.accelerator)
    assert p.queue in queues_for_worker(family, offer.accelerator_count)

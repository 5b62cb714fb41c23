"""Placement across hourly-priced chips and token-priced API pools, as a table of decisions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.apiplacement import API_WORKER_START_S, rate_limited_s
from fleet.catalog import default_catalog
from fleet.catalog.apis import ApiOffer, find_api_offer, routing_apis
from fleet.placement import NoPlacementError, Placement, Policy, QueueLoad, place
from fleet.queues import all_queue_names
from fleet.spec import parse_spec

BASE = default_catalog()
SELF_HOSTED = ApiOffer(
    provider="vllm-local",
    model="llama-3.1-8b-instruct",
    api_model="meta-llama/Llama-3.1-8B-Instruct",
    base_url="http://127.0.0.1:8000/v1",
    usd_per_m_input=0.0,
    usd_per_m_output=0.0,
    tokens_per_s=60.0,
    ttft_s=0.5,
    requests_per_min=600,
    tokens_per_min=1_000_000,
    context_tokens=32768,
    residency="self",
    external=False,
    price_date="",
    source="test",
)
ROUTED = routing_apis(BASE)
WITH_SELF_HOSTED = routing_apis(BASE, (*BASE.apis, SELF_HOSTED))
QUEUES = all_queue_names(ROUTED)
CHIP_QUEUES = [q for q in QUEUES if ".api-" not in q]
API_QUEUES = [q for q in all_queue_names(WITH_SELF_HOSTED) if ".api-" in q]
MODEL_8B = {"name": "meta-llama/Llama-3.1-8B-Instruct", "params_b": 8}


def spec(**extra):
    """An 8B inference spec with ``extra`` fields."""
    return parse_spec({"kind": "inference", "model": MODEL_8B} | extra)


def loads(*, chips: QueueLoad, apis: QueueLoad) -> dict[str, QueueLoad]:
    """The same load on every chip queue, and another on every API queue."""
    return dict.fromkeys(CHIP_QUEUES, chips) | dict.fromkeys(API_QUEUES, apis)


COLD_CHIPS = loads(chips=QueueLoad(0, 0), apis=QueueLoad(0, 1))
WARM_CHIPS = loads(chips=QueueLoad(0, 1), apis=QueueLoad(0, 1))


def reasons(p: Placement) -> dict[str, str]:
    """Rejection reason by accelerator."""
    return {r.accelerator: r.reason for r in p.rejected}


# ---------------------------------------------------------------------- the two stories


def test_short_call_with_a_tight_deadline_goes_to_a_fast_api_rather_than_waking_a_gpu():
    """8B, 500 in / 100 out, 5 s deadline, every GPU queue cold: a fast API pool takes it."""
    p = place(spec(tokens_in=500, tokens_out=100, slo={"deadline_s": 5}), ROUTED, COLD_CHIPS)
    assert p.api is not None
    assert p.queue == f"inference.{p.accelerator}"
    assert p.accelerator == f"api-{p.api.provider}"
    assert not p.deadline_at_risk
    assert p.estimated_duration_s <= 5
    assert p.estimated_cost_usd == pytest.approx(p.api.cost_usd(500, 100))
    assert "misses deadline" in reasons(p)["nvidia-l4"]
    assert p.reasons[1].startswith(f"api: {p.api.provider} serves llama-3.1-8b-instruct")


def test_short_call_without_deadline_still_avoids_paying_for_a_gpu_to_boot():
    """No deadline, cold GPUs: the boot cost of any GPU is more than the API call."""
    p = place(spec(tokens_in=500, tokens_out=100), ROUTED, COLD_CHIPS)
    assert p.api is not None
    assert p.cold_start_cost_usd == 0
    why = reasons(p)
    gpu = [acc for acc in why if acc.startswith("nvidia-") and "costlier" in why[acc]]
    assert gpu
    assert all("to boot a cold instance" in why[acc] for acc in gpu)


def test_long_generation_with_warm_gpus_goes_to_self_hosted_capacity():
    """8B, 500 in / 4,000 out, loose deadline, warm GPU queues: a chip is cheaper per token.

    (At 2,000 in / 20,000 out an 80 GB chip holds only 19 such KV caches, and the cheapest
    API is cheaper: the throughput model limits a server's batch by its KV cache.)
    """
    s = spec(tokens_in=500, tokens_out=4000, slo={"deadline_s": 3600})
    p = place(s, ROUTED, WARM_CHIPS)
    assert p.api is None
    assert not p.accelerator.startswith("api-")
    cheapest_api = min(o.cost_usd(500, 4000) for o in ROUTED.apis if o.serves("llama-3.1-8b"))
    assert p.estimated_cost_usd < cheapest_api
    why = reasons(p)
    assert "costlier" in why["api-groq"]
    assert "costlier" in why["api-cerebras"]


def test_the_same_long_generation_on_cold_gpus_with_a_deadline_goes_to_an_api():
    """Cold GPUs and a 60 s deadline leave only the fast APIs for the long generation."""
    s = spec(tokens_in=2000, tokens_out=20_000, slo={"deadline_s": 60})
    p = place(s, ROUTED, COLD_CHIPS)
    assert p.api is not None
    assert p.estimated_duration_s <= 60


# --------------------------------------------------------------------- never external


SPECS = st.fixed_dictionaries(
    {
        "tokens_in": st.integers(0, 50_000),
        "tokens_out": st.integers(0, 50_000),
        "model": st.sampled_from(
            [
                MODEL_8B,
                {"name": "llama-3.1-70b-instruct", "params_b": 70},
                {"name": "Meta-Llama-3.1-405B-Instruct", "params_b": 405, "dtype": "fp8"},
            ]
        ),
        "slo": st.sampled_from([{}, {"deadline_s": 2}, {"deadline_s": 30}, {"deadline_s": 3600}]),
        "policy": st.sampled_from([Policy.COST, Policy.FASTEST]),
        "cold": st.booleans(),
    }
)


@settings(max_examples=150, deadline=None)
@given(SPECS)
def test_external_apis_false_never_goes_to_an_external_api(drawn):
    """Whatever the spec, loads or policy, external_apis=false lands on a chip or a self-hosted endpoint."""
    s = parse_spec(
        {
            "kind": "inference",
            "model": drawn["model"],
            "tokens_in": drawn["tokens_in"],
            "tokens_out": drawn["tokens_out"],
            "slo": drawn["slo"],
            "requirements": {"external_apis": False},
        }
    )
    try:
        p = place(s, WITH_SELF_HOSTED, COLD_CHIPS if drawn["cold"] else WARM_CHIPS, drawn["policy"])
    except NoPlacementError as exc:
        rejected = {r.accelerator: r.reason for r in exc.rejected}
    else:
        assert p.api is None or not p.api.external
        rejected = reasons(p)
    for o in WITH_SELF_HOSTED.apis:
        if o.external and o.accelerator in rejected and o.serves(s.model.name):
            assert rejected[o.accelerator]  # every external pool says why it was not chosen


def test_external_apis_false_may_use_a_self_hosted_endpoint():
    """The self-hosted vLLM stays allowed, and wins a tight deadline over cold GPUs."""
    s = spec(
        tokens_in=200, tokens_out=50, slo={"deadline_s": 5}, requirements={"external_apis": False}
    )
    p = place(s, WITH_SELF_HOSTED, COLD_CHIPS)
    assert p.accelerator == "api-vllm-local"
    assert p.api == SELF_HOSTED
    assert "self-hosted, data in self" in p.reasons[1]
    assert reasons(p)["api-groq"] == "external API, and requirements.external_apis is false"


# ------------------------------------------------------------------------------ residency


def test_residency_eu_refuses_us_apis_and_us_regions():
    """Every API and every cloud offer here is in the US: residency eu places nowhere, saying why."""
    s = spec(tokens_in=100, tokens_out=10, requirements={"residency": ["eu"]})
    with pytest.raises(NoPlacementError) as info:
        place(s, ROUTED)
    why = {r.accelerator: r.reason for r in info.value.rejected}
    assert why["api-groq"] == "data goes to 'us', not in requirements.residency (eu)"
    assert why["nvidia-l4"] == "no offer in the allowed clouds or markets or residency"


def test_residency_us_keeps_both_kinds():
    """Residency us admits the US APIs and the US cloud regions."""
    s = spec(
        tokens_in=500, tokens_out=100, slo={"deadline_s": 5}, requirements={"residency": ["us"]}
    )
    assert place(s, ROUTED, COLD_CHIPS).api is not None
    assert (
        place(spec(tokens_in=500, tokens_out=100, requirements={"residency": ["us"]}), ROUTED).api
        is None
    )


def test_residency_self_means_own_infrastructure_only():
    """Residency self: instances the fleet runs and self-hosted endpoints, never a provider."""
    s = spec(
        tokens_in=200, tokens_out=50, slo={"deadline_s": 5}, requirements={"residency": ["self"]}
    )
    p = place(s, WITH_SELF_HOSTED, COLD_CHIPS)
    assert p.accelerator == "api-vllm-local"
    warm = place(
        spec(tokens_in=200, tokens_out=50, requirements={"residency": ["self"]}),
        WITH_SELF_HOSTED,
        WARM_CHIPS,
    )
    assert warm.api is None or not warm.api.external


# ------------------------------------------------------------------------- availability


def test_a_model_the_apis_do_not_serve_is_rejected_naming_it():
    """mistral-7b is on no API: each pool's rejection names the model."""
    s = parse_spec(
        {"kind": "inference", "model": {"name": "mistral-7b", "params_b": 7}, "tokens_out": 10}
    )
    p = place(s, ROUTED)
    assert p.api is None
    for provider in ("cerebras", "groq", "sambanova", "fireworks"):
        assert reasons(p)[f"api-{provider}"].startswith(
            "does not serve model 'mistral-7b' (serves "
        )


def test_context_limit_rejects_the_small_window():
    """10,000 tokens exceed Cerebras's 8,192 context; Groq's 131,072 holds them."""
    s = spec(tokens_in=9000, tokens_out=1000, slo={"deadline_s": 30})
    p = place(s, ROUTED, COLD_CHIPS)
    assert (
        "exceed llama-3.1-8b-instruct's context of 8,192 on cerebras" in reasons(p)["api-cerebras"]
    )
    assert p.api is not None
    assert p.api.context_tokens >= 10_000


@pytest.mark.parametrize("kind", ["batch", "embedding"])
def test_api_pools_serve_inference_only(kind):
    """Batch and embedding work never goes to an API pool."""
    s = parse_spec({"kind": kind, "model": MODEL_8B, "tokens_in": 100})
    p = place(s, ROUTED, COLD_CHIPS)
    assert p.api is None
    assert reasons(p)["api-groq"] == f"API pools serve inference only, not {kind}"


@pytest.mark.parametrize(
    ("requirements", "fragment"),
    [
        ({"clouds": ["aws"]}, "no cloud of requirements.clouds"),
        ({"runtimes": ["cuda"]}, "runtimes apply to self-hosted chips"),
        ({"exclude": ["api-groq"]}, "excluded by requirements.exclude"),
        ({"accelerators": ["nvidia-l4"]}, "not in requirements.accelerators"),
    ],
)
def test_hardware_requirements_keep_work_off_api_pools(requirements, fragment):
    """Cloud, runtime and accelerator constraints are honoured by API pools too."""
    s = spec(tokens_in=500, tokens_out=100, requirements=requirements)
    p = place(s, ROUTED, COLD_CHIPS)
    assert p.api is None or p.accelerator != "api-groq"
    assert fragment in reasons(p)["api-groq"]


# ---------------------------------------------------------------------- budget and load


def test_budget_below_the_api_cost_refuses_it():
    """405B judge on cold GPUs with a 5 s deadline, budget under every API's price: refused, saying why."""
    s = parse_spec(
        {
            "kind": "inference",
            "model": {"name": "llama-3.1-405b-instruct", "params_b": 405, "dtype": "fp8"},
            "tokens_in": 2000,
            "tokens_out": 300,
            "slo": {"deadline_s": 5},
            "budget": {"max_usd": 0.001},
        }
    )
    with pytest.raises(NoPlacementError) as info:
        place(s, ROUTED, COLD_CHIPS)
    why = {r.accelerator: r.reason for r in info.value.rejected}
    assert "over budget.max_usd $0.001" in why["api-fireworks"]


def test_api_backlog_waits_for_the_rate_limit():
    """A backlog of 100 calls on the chosen pool waits 100 x its rate-limit share and moves work on."""
    s = spec(tokens_in=500, tokens_out=100, slo={"deadline_s": 10})
    first = place(s, ROUTED, COLD_CHIPS)
    assert first.api is not None
    busy = dict(COLD_CHIPS) | {first.queue: QueueLoad(100, 1)}
    second = place(s, ROUTED, busy)
    assert second.accelerator != first.accelerator
    share = rate_limited_s(first.api, 600)
    assert f"wait {100 * share:,.1f} s" in reasons(second)[first.accelerator]


def test_an_api_queue_without_a_worker_waits_for_one_to_start():
    """No consumer on the API queue adds the start of a light CPU worker, no boot cost."""
    s = spec(
        tokens_in=500,
        tokens_out=100,
        slo={"deadline_s": 10},
        requirements={"accelerators": ["api-groq"]},
    )
    p = place(s, ROUTED, {"inference.api-groq": QueueLoad(0, 0)})
    assert p.estimated_wait_s == API_WORKER_START_S
    assert p.cold_start_cost_usd == 0


# -------------------------------------------------------------------- shape and routing


def test_api_placement_json_keeps_the_existing_fields():
    """to_dict is JSON with the old keys (offer, estimated_cost_usd, ...) plus api."""
    p = place(spec(tokens_in=500, tokens_out=100, slo={"deadline_s": 5}), ROUTED, COLD_CHIPS)
    data = json.loads(json.dumps(p.to_dict()))
    assert {"queue", "accelerator", "devices", "offer", "estimated_cost_usd", "estimated_duration_s",
            "estimated_wait_s", "memory_needed_gb", "policy", "reasons", "deadline_at_risk",
            "rejected"} <= set(data)  # fmt: skip
    assert data["offer"]["cloud"] == "api"
    assert data["offer"]["usd_per_hour"] == 0
    assert data["api"]["provider"] == p.api.provider
    assert data["api"]["usd_per_m_output"] == p.api.usd_per_m_output
    chip = place(spec(tokens_in=500, tokens_out=100), ROUTED, WARM_CHIPS).to_dict()
    assert chip["api"] is None


def test_pinned_to_an_api_pool():
    """Policy pinned takes api-<provider> names."""
    p = place(
        spec(tokens_in=500, tokens_out=100), ROUTED, policy=Policy.PINNED, pin="api-sambanova"
    )
    assert p.accelerator == "api-sambanova"
    groq = find_api_offer(ROUTED, "groq", "llama-3.1-8b")
    assert groq is not None
    assert "not the pinned accelerator api-sambanova" in reasons(p)["api-groq"]


def test_without_routing_the_api_pools_take_no_part():
    """The shipped catalog lists API offers but does not route to them: no API choice, no API rejection."""
    p = place(spec(tokens_in=500, tokens_out=100, slo={"deadline_s": 5}), BASE, COLD_CHIPS)
    assert p.api is None
    assert not any(r.accelerator.startswith("api-") for r in p.rejected)

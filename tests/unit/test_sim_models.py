# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""The simulator with registry models: model queues, warm before cold, load time in the boot."""

from __future__ import annotations

import pytest

from fleet.autoscaler.config import AutoscalerConfig, parse_config
from fleet.catalog import default_catalog
from fleet.sim.engine import Simulation, simulate
from fleet.sim.trace import TraceEvent
from fleet.spec import TaskSpec, parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
TINY = {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"}
TIMERS = """
markets = ["on_demand"]
max_instances = 1
scale_out_cooldown_s = 0
scale_in_cooldown_s = 0
idle_before_scale_in_s = 60
"""
# 8B bf16 = 16 GB at 0.4 GB/s: a 40 s load on top of the L4's 120 s cold start.
BIG_MODEL = """
model_load_gbps = 0.4
[[models]]
name = "big-llm"
task = "generation"
params_b = 8
max_context = 8192
engines = ["vllm", "reference"]
source = { path = "/models/big-llm" }
"""


def l4_pool(models: str = '["tiny-llama"]', min_instances: int = 0, engine: str = "") -> str:
    """A local L4 pool holding ``models`` (a TOML array), of ``engine`` (default: the default)."""
    return f"""
[[pools]]
name = "l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
min_instances = {min_instances}
models = {models}
{f'engine = "{engine}"' if engine else ""}
{TIMERS}"""


CPU_TINY = f"""
[[pools]]
name = "cpu"
provider = "local"
accelerator = "cpu"
price_as = "aws/us-east-1/c6i.xlarge"
models = ["tiny-llama"]
{TIMERS}"""


def cfg(*parts: str, loop_s: int = 5) -> AutoscalerConfig:
    """A config from TOML parts (top-level keys first), the loop every ``loop_s`` seconds."""
    return parse_config("".join(parts) + f"\n[fleet]\nloop_interval_s = {loop_s}\n", env={})


def chat(model: dict | None = None, **extra: object) -> TaskSpec:
    """A short generation request."""
    data = {"kind": "inference", "model": model or TINY, "tokens_in": 20, "tokens_out": 10}
    return parse_spec(data | extra)


@pytest.mark.parametrize(
    ("config", "queue"),
    [
        # the L4 pool keeps one instance holding tiny-llama: warm with room, its idle part is
        # paid already, so it is chosen over a cold cpu (min_instances keeps the run going
        # to the 6 h horizon: a slower loop keeps it short)
        (cfg(l4_pool(min_instances=1), CPU_TINY, loop_s=60), "inference.nvidia-l4@tiny-llama"),
        # both cold: the cheaper boot wins
        (cfg(l4_pool(min_instances=0), CPU_TINY), "inference.cpu@tiny-llama"),
        # a warm L4 of reference workers does not hold the model: still the cold cpu
        (cfg(l4_pool("[]", min_instances=1), CPU_TINY, loop_s=60), "inference.cpu@tiny-llama"),
    ],
)
def test_a_warm_model_queue_is_preferred_over_a_cold_one(config, queue):
    """A task at t=300 s goes to the model queue whose pool already holds the model."""
    result = simulate([TraceEvent(300.0, chat())], config, CATALOG, "fleet")
    assert result.placements == {0: queue}
    assert result.completed == 1
    if queue.startswith("inference.nvidia-l4"):
        assert result.p50_latency_s < 1.0  # no boot: the instance is up and holds the model


@pytest.mark.parametrize("boot_s", [None, 2.0])
def test_a_cold_pools_boot_includes_the_model_load_time(boot_s):
    """Latency of the first task is the boot (family cold start or ``boot_s``) + load + run."""
    config = cfg(BIG_MODEL, l4_pool('["big-llm"]'))
    spec = chat({"name": "big-llm", "params_b": 8.0}, tokens_in=100, tokens_out=50)
    load = config.registry.get("big-llm").load_s(config.model_load_gbps)
    assert load == pytest.approx(40.0)
    assert config.pools[0].load_s(config.registry) == pytest.approx(load)
    family = CATALOG.family("nvidia-l4")
    run = estimate(spec, family, 1).service_s
    boot = family.cold_start_s if boot_s is None else boot_s
    options = {} if boot_s is None else {"boot_s": boot_s}
    result = simulate([TraceEvent(0.0, spec)], config, CATALOG, "fleet", **options)
    assert result.placements == {0: "inference.nvidia-l4@big-llm"}
    assert result.p50_latency_s == pytest.approx(boot + load + run)


def test_the_load_is_paid_for_like_the_boot():
    """The same task on a pool whose model loads 40 s longer costs 40 s more of the instance."""
    spec = chat({"name": "big-llm", "params_b": 8.0}, tokens_in=100, tokens_out=50)
    slow = simulate(
        [TraceEvent(0.0, spec)], cfg(BIG_MODEL, l4_pool('["big-llm"]')), CATALOG, "fleet"
    )
    fast_model = BIG_MODEL.replace("model_load_gbps = 0.4", "model_load_gbps = 10000")
    fast = simulate(
        [TraceEvent(0.0, spec)], cfg(fast_model, l4_pool('["big-llm"]')), CATALOG, "fleet"
    )
    price = 0.8048  # g6.xlarge on-demand
    # scale-in happens on the 5 s tick grid, so the 40 s (a multiple of 5) shifts it exactly
    assert slow.total_cost_usd - fast.total_cost_usd == pytest.approx(price * 40 / 3600, abs=1e-9)


@pytest.mark.parametrize(
    ("config", "spec", "outcome"),
    [
        # an unregistered model keeps the plain queue, served by reference pools
        (cfg(l4_pool("[]")), chat({"name": "m", "params_b": 8.0}), "inference.nvidia-l4"),
        # a registry model no pool holds cannot run anywhere
        (cfg(l4_pool("[]")), chat(), "no pool holds model tiny-llama"),
        # plain work with only model pools
        (
            cfg(l4_pool()),
            chat({"name": "m", "params_b": 8.0}),
            "no reference pool serves the plain queues (every pool holds models only)",
        ),
        # a vLLM pool holds the model but does not train it
        (
            cfg(l4_pool(engine="vllm")),
            parse_spec({"kind": "fine_tune", "model": TINY, "tokens_in": 1000}),
            "no pool runs fine_tune work for model tiny-llama",
        ),
        # longer than the model's context: refused at placement
        (
            cfg(l4_pool()),
            chat(tokens_in=2000),
            "tokens_in + tokens_out = 2,010 > max_context 1,024 of tiny-llama",
        ),
    ],
)
def test_work_goes_where_a_pool_holds_its_model_or_is_rejected_saying_why(config, spec, outcome):
    """Placed on the queue a pool serves, or rejected with the reason (never left waiting)."""
    sim = Simulation([TraceEvent(0.0, spec)], config, CATALOG, "fleet")
    result = sim.run()
    if outcome.startswith("inference."):
        assert result.placements == {0: outcome}
        assert result.completed == 1
        return
    assert result.rejected == 1
    assert result.placements == {}
    assert sim.tasks[0].rejected == outcome


def test_cheapest_policy_places_on_model_queues_too():
    """The ``cheapest`` baseline uses the same queues, so model pools serve it."""
    result = simulate([TraceEvent(0.0, chat())], cfg(l4_pool(), CPU_TINY), CATALOG, "cheapest")
    assert result.completed == 1
    assert result.placements[0].endswith("@tiny-llama")


def test_result_accelerators_leave_the_model_out():
    """``to_dict()["accelerators"]`` names families, not ``nvidia-l4@tiny-llama``."""
    result = simulate([TraceEvent(0.0, chat())], cfg(l4_pool()), CATALOG, "fleet")
    assert result.to_dict()["accelerators"] == ["nvidia-l4"]

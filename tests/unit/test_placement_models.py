# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Model-aware placement reads like a specification: model queues, warmth, load time, fit."""

from __future__ import annotations

import json

import pytest

from fleet.catalog import default_catalog
from fleet.modelfit import (
    ENGINE_KINDS,
    ENGINE_RUNTIMES,
    context_problem,
    default_engine,
    engine_problem,
    served_entry,
)
from fleet.models.registry import (
    ENGINE_NAMES,
    ModelEntry,
    ModelRegistry,
    WeightsSource,
    builtin_entries,
)
from fleet.placement import ContextError, NoPlacementError, QueueLoad, place
from fleet.queues import all_queue_names, parse_queue, queue_name
from fleet.spec import TaskKind, TaskSpec, parse_spec
from fleet.throughput import estimate

CATALOG = default_catalog()
BUILTIN = ModelRegistry(builtin_entries())
# An 8B bf16 model (16 GB) at 2 GB/s: an 8 s load, large enough to see in every number.
BIG = ModelEntry(
    name="big-llm",
    task="generation",
    params_b=8.0,
    max_context=8192,
    engines=("transformers",),
    source=WeightsSource(path="/models/big-llm"),
)
WITH_BIG = ModelRegistry((*builtin_entries(), BIG), load_gbps=2.0)
TINY = {"name": "tiny-llama", "params_b": 0.00316, "dtype": "fp32"}
MINILM = {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"}


def spec(kind: str = "inference", model: dict | None = None, **extra: object) -> TaskSpec:
    """A small valid spec (training kinds get a token count)."""
    data: dict = {"kind": kind, "model": model or TINY}
    if kind in ("training", "fine_tune"):
        data["tokens_in"] = 1000
    elif kind in ("inference", "batch"):
        data |= {"tokens_in": 20, "tokens_out": 10}
    return parse_spec(data | extra)


def cold_loads(registry: ModelRegistry, **warm: int) -> dict[str, QueueLoad]:
    """Every queue empty and unserved, except ``warm`` (queue name -> consumers)."""
    loads = {q: QueueLoad(0, 0) for q in all_queue_names(CATALOG, models=registry)}
    for name, consumers in warm.items():
        loads[name] = QueueLoad(0, consumers)
    return loads


# ------------------------------------------------------------------------ which queue


@pytest.mark.parametrize(
    ("kind", "model", "expected"),
    [
        ("inference", TINY, "tiny-llama"),
        ("fine_tune", TINY, "tiny-llama"),
        ("training", TINY, "tiny-llama"),
        ("embedding", MINILM, "all-minilm-l6-v2"),
        # aliases are normalised like the API catalog's names
        (
            "embedding",
            {**MINILM, "name": "sentence-transformers/all-MiniLM-L6-v2"},
            "all-minilm-l6-v2",
        ),
        ("embedding", {**MINILM, "name": "minilm"}, "all-minilm-l6-v2"),
        # a kind the entry does not serve keeps the plain queue
        ("batch", TINY, None),
        ("inference", MINILM, None),
        ("embedding", TINY, None),
        # an unregistered model keeps the plain queue (reference workers)
        ("inference", {"name": "llama-3.1-8b", "params_b": 8.0}, None),
    ],
)
def test_registered_model_and_kind_choose_the_model_queue(kind, model, expected):
    """A task the registry serves for its kind goes to ``...@<entry name>``; others stay plain."""
    s = spec(kind, model)
    p = place(s, CATALOG, models=BUILTIN)
    ref = parse_queue(p.queue)
    assert ref is not None
    assert ref.model == expected
    assert p.model == expected
    assert p.queue == queue_name(s.kind, p.accelerator, p.devices, "", expected)


def test_without_a_registry_every_task_keeps_the_plain_queue():
    """``models=None`` is today's placement: the same decision, on the plain queue."""
    s = spec()
    plain = place(s, CATALOG)
    assert parse_queue(plain.queue).model is None
    assert plain.model is None
    with_registry = place(s, CATALOG, models=BUILTIN)
    assert with_registry.queue == f"{plain.queue}@tiny-llama"


def test_the_namespace_prefixes_the_model_queue():
    """Namespaced fleets get ``<ns><kind>.<acc>@<model>``."""
    p = place(spec(), CATALOG, namespace="staging.", models=BUILTIN)
    assert p.queue.startswith("staging.inference.")
    assert parse_queue(p.queue, "staging.").model == "tiny-llama"


# ------------------------------------------------------------------------ warm and cold


def test_a_warm_model_queue_is_preferred_over_a_cold_one():
    """All cold: the cheapest family; one model queue with a consumer: that one, called warm."""
    s = spec()
    cold = place(s, CATALOG, cold_loads(BUILTIN), models=BUILTIN)
    assert cold.accelerator != "nvidia-l4"
    assert cold.cold_start_cost_usd > 0
    warm_queue = "inference.nvidia-l4@tiny-llama"
    warm = place(s, CATALOG, cold_loads(BUILTIN, **{warm_queue: 2}), models=BUILTIN)
    assert warm.queue == warm_queue
    assert warm.cold_start_cost_usd == 0
    assert warm.cold_start_s == 0
    assert "warm: 2 worker(s) hold tiny-llama" in warm.reasons
    costlier = {r.accelerator: r.reason for r in warm.rejected}[cold.accelerator]
    assert "to boot a cold instance" in costlier


def test_a_warm_plain_queue_does_not_make_the_model_queue_warm():
    """Reference workers on ``inference.nvidia-l4`` do not hold the model: still cold."""
    s = spec()
    all_cold = place(s, CATALOG, cold_loads(BUILTIN), models=BUILTIN)
    plain_warm = place(
        s, CATALOG, cold_loads(BUILTIN, **{"inference.nvidia-l4": 3}), models=BUILTIN
    )
    assert plain_warm.queue == all_cold.queue


@pytest.mark.parametrize("depth", [0, 3])
def test_a_cold_model_queue_adds_the_load_time_to_wait_and_boot_cost(depth):
    """Cold start plus weights / bandwidth, in the wait and in the boot the queue's tasks share."""
    s = spec(
        model={"name": "big-llm", "params_b": 8.0}, requirements={"accelerators": ["nvidia-l4"]}
    )
    family = CATALOG.family("nvidia-l4")
    load = BIG.load_s(WITH_BIG.load_gbps)
    assert load == pytest.approx(16.0 / 2.0)
    loads = cold_loads(WITH_BIG)
    plain_queue = "inference.nvidia-l4"
    model_queue = f"{plain_queue}@big-llm"
    loads[plain_queue] = loads[model_queue] = QueueLoad(depth, 0)
    without = place(s, CATALOG, loads)  # the same task on the plain queue, no registry
    p = place(s, CATALOG, loads, models=WITH_BIG)
    assert p.queue == model_queue
    assert without.queue == plain_queue
    offer = next(
        o
        for o in CATALOG.offers
        if (o.cloud, o.region, o.instance_type)
        == (p.offer.cloud, p.offer.region, p.offer.instance_type)
    )
    busy = estimate(s, family, p.devices, offer.vcpus).busy_s
    assert p.estimated_wait_s == pytest.approx(family.cold_start_s + load + depth * busy)
    assert p.estimated_wait_s == pytest.approx(without.estimated_wait_s + load)
    price = p.offer.usd_per_hour
    assert p.cold_start_cost_usd == pytest.approx(
        price * (family.cold_start_s + load) / 3600 / (depth + 1)
    )
    assert p.cold_start_cost_usd - without.cold_start_cost_usd == pytest.approx(
        price * load / 3600 / (depth + 1)
    )
    assert p.cold_start_s == pytest.approx(family.cold_start_s + load)
    assert p.model_load_s == pytest.approx(load)
    assert "cold: boot 120 s + load big-llm 8 s" in p.reasons


def test_the_cold_reason_shows_a_small_models_load():
    """tiny-llama's 12.6 MB at 1 GB/s shows as 0.01 s."""
    s = spec(requirements={"accelerators": ["nvidia-l4"]})
    p = place(s, CATALOG, cold_loads(BUILTIN), models=BUILTIN)
    assert "cold: boot 120 s + load tiny-llama 0.01 s" in p.reasons
    assert p.model_load_s == pytest.approx(BUILTIN.get("tiny-llama").load_s(BUILTIN.load_gbps))


def test_unknown_loads_count_as_warm_and_say_so():
    """No loads (``fleet route``): no wait, no boot, and the reason says the load is unknown."""
    p = place(spec(), CATALOG, models=BUILTIN)
    assert p.estimated_wait_s == 0
    assert p.cold_start_s == p.model_load_s == p.cold_start_cost_usd == 0
    assert "model tiny-llama: queue load unknown, counted warm" in p.reasons


# ----------------------------------------------------------------------------- context


@pytest.mark.parametrize(
    ("kind", "tokens", "problem"),
    [
        ("inference", (1000, 24), None),  # exactly the context
        (
            "inference",
            (1000, 25),
            "tokens_in + tokens_out = 1,025 > max_context 1,024 of tiny-llama",
        ),
        (
            "inference",
            (4000, 1000),
            "tokens_in + tokens_out = 5,000 > max_context 1,024 of tiny-llama",
        ),
        ("fine_tune", (100_000, 0), None),  # tokens_in is the data set, not one sequence
        ("training", (100_000, 0), None),
        ("batch", (4000, 1000), None),  # the registry does not serve batch: plain queue
    ],
)
def test_context_problem_names_both_numbers(kind, tokens, problem):
    """Inference on a registry model longer than its context is refused, naming both numbers."""
    tokens_in, tokens_out = tokens
    s = spec(kind, tokens_in=tokens_in, tokens_out=tokens_out)
    assert context_problem(s, BUILTIN) == problem
    if problem is None:
        place(s, CATALOG, models=BUILTIN)
        return
    with pytest.raises(ContextError) as caught:
        place(s, CATALOG, models=BUILTIN)
    assert str(caught.value) == problem
    assert caught.value.rejected == ()
    assert isinstance(caught.value, NoPlacementError)  # callers that catch it keep working


def test_an_embedding_batch_is_not_held_to_the_context():
    """Embedding ``tokens_in`` counts every text: 5,000 tokens of MiniLM (context 256) is fine."""
    s = spec("embedding", MINILM, tokens_in=5000)
    assert context_problem(s, BUILTIN) is None
    assert place(s, CATALOG, models=BUILTIN).model == "all-minilm-l6-v2"


def test_context_is_not_checked_without_a_registry_or_for_unregistered_models():
    """No registry, or a model it does not know: nothing to check."""
    long = {"tokens_in": 4000, "tokens_out": 1000}
    assert context_problem(spec(**long), None) is None
    other = spec(model={"name": "llama-3.1-8b", "params_b": 8.0}, **long)
    assert context_problem(other, BUILTIN) is None
    assert served_entry(other, BUILTIN) is None


# ----------------------------------------------------------------------- engine runtimes


def only(*engines: str) -> ModelRegistry:
    """The built-ins plus ``big-llm`` allowed only on ``engines``."""
    return ModelRegistry((*builtin_entries(), BIG.model_copy(update={"engines": engines})))


@pytest.mark.parametrize(
    "engines", [("transformers",), ("vllm",), ("reference",), ("transformers", "vllm")]
)
@pytest.mark.parametrize("family", sorted(CATALOG.names()))
def test_a_family_no_allowed_engine_runs_on_is_rejected(engines, family):
    """Families whose runtimes no allowed engine serves are rejected with the reason; others fit."""
    registry = only(*engines)
    served = {r.value for e in engines for r in ENGINE_RUNTIMES[e]}
    runs = bool(served & CATALOG.family(family).runtimes)
    s = spec(
        model={"name": "big-llm", "params_b": 8.0},
        requirements={"accelerators": [family]},
    )
    try:
        place(s, CATALOG)
    except NoPlacementError:
        return  # no offer holds it anyway: nothing for the engine check to decide
    try:
        p = place(s, CATALOG, models=registry)
    except NoPlacementError as exc:
        why = {r.accelerator: r.reason for r in exc.rejected}[family]
        assert not runs
        assert f"runtime {', '.join(sorted(CATALOG.family(family).runtimes))}:" in why
        assert "no engine allowed for big-llm runs on it" in why
        return
    assert runs
    assert p.accelerator == family


def test_a_transformers_only_model_never_lands_on_a_tpu_or_inferentia():
    """The engine rejection names the runtime and the engines allowed."""
    registry = only("transformers")
    s = spec(model={"name": "big-llm", "params_b": 8.0})
    p = place(s, CATALOG, models=registry)
    reasons = {r.accelerator: r.reason for r in p.rejected}
    for family in ("google-tpu-v5e", "aws-inferentia2", "aws-trainium1"):
        assert "no engine allowed for big-llm runs on it" in reasons[family]
        assert "allowed: transformers on cpu, cuda, rocm" in reasons[family]
    assert engine_problem(BIG, CATALOG.family("nvidia-h100")) is None
    assert engine_problem(BIG, CATALOG.family("google-tpu-v5e")) == (
        "runtime xla: no engine allowed for big-llm runs on it"
        " (allowed: transformers on cpu, cuda, rocm)"
    )


@pytest.mark.parametrize(
    ("engines", "family", "expected"),
    [
        (("transformers", "vllm"), None, "transformers"),
        (("transformers", "vllm"), "google-tpu-v5e", "vllm"),  # the first that runs there
        (("vllm", "transformers"), "nvidia-l4", "vllm"),
        (("transformers",), "google-tpu-v5e", "transformers"),  # none runs: validation says so
    ],
)
def test_default_engine_is_the_first_allowed_that_runs_there(engines, family, expected):
    """The default engine follows the entry's order, skipping engines the chip cannot run."""
    entry = BIG.model_copy(update={"engines": engines})
    fam = CATALOG.family(family) if family else None
    assert default_engine([entry], fam) == expected
    assert default_engine([], fam) == "reference"


def test_engine_data_matches_the_engines_themselves():
    """``ENGINE_RUNTIMES`` and ``ENGINE_KINDS`` say what each engine class declares."""
    from workers.engines import engine_class  # noqa: PLC0415 - loads no engine library

    for name in ENGINE_NAMES:
        engine = engine_class(name)
        assert ENGINE_RUNTIMES[name] == engine.runtimes, name
        assert ENGINE_KINDS[name] == engine.kinds, name


# ------------------------------------------------------------------------------ output


def test_to_dict_carries_the_model_and_the_cold_start_numbers():
    """``fleet route --json`` shows the model, the boot counted and its load part, JSON-ready."""
    s = spec(requirements={"accelerators": ["nvidia-l4"]})
    d = place(s, CATALOG, cold_loads(BUILTIN), models=BUILTIN).to_dict()
    assert d["model"] == "tiny-llama"
    assert d["queue"] == "inference.nvidia-l4@tiny-llama"
    assert d["cold_start_s"] == pytest.approx(
        CATALOG.family("nvidia-l4").cold_start_s + d["model_load_s"]
    )
    assert json.loads(json.dumps(d)) == d
    plain = place(s, CATALOG).to_dict()
    assert plain["model"] is None
    assert plain["model_load_s"] == 0


def test_kinds_of_the_registry_match_the_queues_listed():
    """Every model queue placement can choose is one ``all_queue_names`` lists (so loads see it)."""
    names = set(all_queue_names(CATALOG, models=BUILTIN))
    for kind in (TaskKind.INFERENCE, TaskKind.FINE_TUNE):
        p = place(spec(kind.value), CATALOG, models=BUILTIN)
        assert p.queue in names
    p = place(spec("embedding", MINILM), CATALOG, models=BUILTIN)
    assert p.queue in names

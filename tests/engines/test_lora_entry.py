"""A registry entry of format lora (an adapter on a base model) served by a worker's Serving.

Real engine, real adapter: a LoRA fine-tune of tiny-llama writes an adapter; a registry entry
names it with ``base = "tiny-llama"``; holding the entry loads the base, and its requests run
on the base with the adapter applied, giving the same tokens as the adapter passed directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.models import tinyllama
from fleet.models.registry import ModelConfigError, ModelRegistry, builtin_registry, parse_models
from fleet.spec import TaskKind, TaskSpec
from workers import serving
from workers.engines.base import EngineRequest
from workers.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.engine
PROMPT = "A machine waits in a quiet room"


def spec(kind: str, data: dict[str, object], **extra: object) -> TaskSpec:
    return TaskSpec.model_validate(
        {"kind": kind, "model": {"name": "tiny-llama", "params_b": 0.00316}, "input": data, **extra}
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[serving.Serving, Path]:
    root = tmp_path_factory.mktemp("lora-entry")
    weights = tinyllama.build(root / "tiny-llama")
    base = builtin_registry().get("tiny-llama")
    engine = TransformersEngine(device="cpu")
    engine.load(base, weights)
    tuned = engine.run(
        EngineRequest(
            spec=spec("fine_tune", {"rank": 8, "steps": 20, "seed": 3}, tokens_in=1000),
            model=base,
            weights=weights,
            task_id="tune-1",
            artifact_dir=root / "artifacts",
        )
    )
    adapter = Path(str(tuned.output["artifact"]))
    lora = parse_models(
        [{"name": "tiny-lora", "task": "generation", "params_b": 0.00316, "dtype": "fp32",
          "max_context": 1024, "format": "lora", "base": "tiny-llama",
          "source": {"path": str(adapter)}}]
    )[0]  # fmt: skip
    registry = ModelRegistry([base, lora])
    state = serving.Serving(TransformersEngine(device="cpu"), registry, root / "cache")
    state.weights["tiny-llama"] = weights  # built above: no second build into the cache
    return state, adapter


def test_a_lora_entry_holds_its_base_and_serves_the_adapter(setup) -> None:
    """Holding tiny-lora loads tiny-llama; its requests equal the adapter given directly."""
    state, adapter = setup
    entry = state.registry.get("tiny-lora")
    assert entry.kinds == frozenset({TaskKind.INFERENCE})
    state.hold(entry)
    assert set(state.held) == {"tiny-llama", "tiny-lora"}
    task = spec("inference", {"prompt": PROMPT}, tokens_out=12)
    via_entry = state.engine.run(state.request_for(entry, task, "t-1"))
    base = state.registry.get("tiny-llama")
    direct = state.engine.run(
        state.request_for(base, spec("inference", {"prompt": PROMPT, "adapter": str(adapter)},
                                     tokens_out=12), "t-2")
    )  # fmt: skip
    plain = state.engine.run(state.request_for(base, task, "t-3"))
    assert via_entry.output["token_ids"] == direct.output["token_ids"]
    assert via_entry.output["token_ids"] != plain.output["token_ids"]


def test_a_lora_entry_on_vllm_is_refused_naming_the_key() -> None:
    """The config refuses a registry adapter on vLLM (not wired yet), naming the key."""
    with pytest.raises(ModelConfigError, match=r"models\[0\]"):
        parse_models(
            [{"name": "l", "task": "generation", "params_b": 1, "max_context": 8,
              "format": "lora", "base": "tiny-llama", "engines": ["vllm"],
              "source": {"path": "/x"}}]
        )  # fmt: skip

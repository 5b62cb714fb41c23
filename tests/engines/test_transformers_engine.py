"""The transformers engine on real models (MiniLM, tiny-llama): no mocks of any engine library."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.models import tinyllama
from fleet.models.registry import builtin_registry
from fleet.models.weights import resolve
from fleet.spec import Runtime, TaskKind, TaskSpec
from workers.engines.base import EngineError, EngineRequest
from workers.engines.hf_train import blocks
from workers.engines.transformers_engine import TorchBuild, TransformersEngine, device_reason
from workers.handlers import HandlerError

pytestmark = pytest.mark.engine

REGISTRY = builtin_registry()
TINY = REGISTRY.get("tiny-llama")
MINILM = REGISTRY.get("all-minilm-l6-v2")
PROMPT = "A machine waits in a quiet room"
PAIR = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The stock market fell sharply on Monday."


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tinyllama.build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    return resolve(MINILM, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def engine(tiny, minilm):
    eng = TransformersEngine(device="cpu")
    eng.load(TINY, tiny)
    eng.load(MINILM, minilm)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def direct_lm(tiny):
    """tiny-llama loaded by transformers directly, apart from the engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - torch loads at use

    model = AutoModelForCausalLM.from_pretrained(str(tiny), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)


def direct_greedy(model, tok, prompt: str, n: int) -> list[int]:
    import torch  # noqa: PLC0415 - torch loads at use

    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def request(kind, inp, *, model=TINY, weights=None, task_id="t-1", artifact_dir=None, **spec):
    task = TaskSpec(
        kind=kind, model={"name": model.name, "params_b": model.params_b}, input=inp, **spec
    )
    return EngineRequest(
        spec=task, model=model, weights=weights or Path("/nonexistent"), task_id=task_id,
        artifact_dir=artifact_dir,
    )  # fmt: skip


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# --- availability, without torch ---------------------------------------------------------


def test_parent_side_checks_import_no_engine_library():
    """Importing the engine and calling unavailable()/version() loads no torch or transformers."""
    code = (
        "import sys\n"
        "from fleet.spec import Runtime\n"
        "from workers.engines.transformers_engine import TransformersEngine as E\n"
        "assert E.unavailable(Runtime.CPU) is None, E.unavailable(Runtime.CPU)\n"
        "E.unavailable(Runtime.CUDA); E.unavailable(Runtime.ROCM); E.version()\n"
        "heavy = {'torch', 'transformers', 'sentence_transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


CPU_BUILD = TorchBuild(cuda=None, hip=None)
CUDA_BUILD = TorchBuild(cuda="12.8", hip=None)
ROCM_BUILD = TorchBuild(cuda=None, hip="6.4")


@pytest.mark.parametrize(
    ("runtime", "build", "nodes", "reason"),
    [
        (Runtime.CPU, CPU_BUILD, [], None),
        (Runtime.CUDA, CPU_BUILD, ["nvidia0"], "not a CUDA build"),
        (Runtime.CUDA, CUDA_BUILD, ["null", "nvidiactl"], "no cuda device"),
        (Runtime.CUDA, CUDA_BUILD, ["nvidiactl", "nvidia3"], None),
        (Runtime.CUDA, None, ["nvidia0"], None),
        (Runtime.ROCM, CUDA_BUILD, ["kfd"], "not a ROCm build"),
        (Runtime.ROCM, ROCM_BUILD, ["dri"], "no rocm device"),
        (Runtime.ROCM, ROCM_BUILD, ["kfd", "dri"], None),
    ],
)
def test_device_reason(runtime, build, nodes, reason):
    """A device runtime needs a torch built for it and its device node in /dev."""
    got = device_reason(runtime, build, nodes)
    assert got is None if reason is None else reason in (got or "")


def test_unavailable_and_version_here():
    """The CPU serves here; runtimes the engine does not serve are named; version names torch."""
    assert TransformersEngine.unavailable(Runtime.CPU) is None
    assert "neuron" in (TransformersEngine.unavailable(Runtime.NEURON) or "")
    assert TransformersEngine.version().startswith("transformers 5.")
    assert "torch 2." in TransformersEngine.version()


# --- embeddings ---------------------------------------------------------------------------


def test_minilm_unit_vectors_match_sentence_transformers(engine, minilm):
    """384-dimensional unit vectors whose cosines equal sentence-transformers' own (1e-5)."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - torch loads at use

    out = engine.run(request("embedding", {"texts": [*PAIR, UNRELATED]}, model=MINILM))
    vectors = out.output["embeddings"]
    assert out.output["dim"] == 384
    assert [len(v) for v in vectors] == [384] * 3
    assert all(abs(math.hypot(*v) - 1.0) < 1e-5 for v in vectors)
    direct = SentenceTransformer(str(minilm), device="cpu").encode(list(PAIR))
    assert cosine(vectors[0], vectors[1]) == pytest.approx(cosine(*direct.tolist()), abs=1e-5)
    assert cosine(vectors[0], vectors[2]) < cosine(vectors[0], vectors[1]) - 0.3


def test_embedding_tokens_are_the_tokenizers(engine):
    """tokens_in is the word pieces read, specials included, each text cut at 256."""
    st = engine._models[MINILM.name].model
    long_text = "queue " * 400
    out = engine.run(request("embedding", {"texts": [PAIR[0], long_text]}, model=MINILM))
    assert out.tokens_in == len(st.tokenizer(PAIR[0])["input_ids"]) + 256
    assert out.tokens_out == 0
    assert out.tokens_per_s > 0
    assert (out.tpot_ms, out.slo_tpot_met) == (None, None)  # embeddings: no generation timing


# --- generation ---------------------------------------------------------------------------


def test_greedy_is_deterministic_and_equals_generate(engine, direct_lm):
    """Greedy output twice is the same, and the same as model.generate(do_sample=False)."""
    model, tok = direct_lm
    first = engine.run(request("inference", {"prompt": PROMPT}, tokens_out=24))
    again = engine.run(request("inference", {"prompt": PROMPT}, tokens_out=24, task_id="other"))
    ids = first.output["token_ids"]
    assert ids == again.output["token_ids"]
    assert ids == direct_greedy(model, tok, PROMPT, 24)
    assert first.output["text"] == tok.decode(ids, skip_special_tokens=True)
    assert first.tokens_in == len(tok(PROMPT)["input_ids"])
    assert first.tokens_out == len(ids) == 24
    assert first.output["finish_reason"] == "length"
    assert first.ttft_s > 0
    assert first.tokens_per_s > 0
    assert first.ttft_s < first.run_s
    assert 0 < first.tpot_ms < math.inf
    assert first.slo_tpot_met is None  # no slo.tpot_ms: no verdict


@pytest.mark.parametrize(
    ("goal_ms", "met"),
    [(60_000, True), (0.001, False)],  # the spec's bounds: 0 < tpot_ms <= 60,000
    ids=["a goal any run keeps", "a goal no run keeps"],
)
def test_tpot_is_measured_and_judged_against_the_slo(engine, goal_ms, met):
    """tpot_ms is positive and finite; slo_tpot_met appears when slo.tpot_ms is set."""
    out = engine.run(
        request("inference", {"prompt": PROMPT}, tokens_out=16, slo={"tpot_ms": goal_ms})
    )
    assert out.tokens_out == 16
    assert 0 < out.tpot_ms < math.inf
    # decode time per token after the first, within the run
    assert out.tpot_ms * (out.tokens_out - 1) <= (out.run_s - out.ttft_s) * 1000
    assert out.slo_tpot_met is met


def test_sampling_is_seeded(engine):
    """A positive temperature samples: one seed gives one text, another seed another."""

    def sample(seed):
        inp = {"prompt": PROMPT, "temperature": 1.0, "seed": seed}
        return engine.run(request("inference", inp, tokens_out=16)).output

    a, b, c = sample(7), sample(7), sample(8)
    assert a["token_ids"] == b["token_ids"] != c["token_ids"]
    assert a["seed"] == 7


@pytest.mark.parametrize(("context", "tokens_out"), [(40, 100), (40, 5), (20, 32)])
def test_generation_never_exceeds_the_context(engine, direct_lm, context, tokens_out):
    """Prompt plus generated tokens never pass the model's max_context."""
    small = TINY.model_copy(update={"max_context": context})
    out = engine.run(request("inference", {"prompt": PROMPT}, model=small, tokens_out=tokens_out))
    room = context - out.tokens_in
    assert out.tokens_in == len(direct_lm[1](PROMPT)["input_ids"])
    assert out.tokens_out <= min(tokens_out, room)
    if out.output["finish_reason"] == "length":
        assert out.tokens_out == min(tokens_out, room)


def test_prompt_that_fills_the_context_is_refused(engine):
    """A prompt with no room left to generate is the input's fault, both numbers named."""
    small = TINY.model_copy(update={"max_context": 4})
    with pytest.raises(HandlerError, match=r"^input\.prompt: \d+ tokens .* context of 4"):
        engine.run(request("inference", {"prompt": PROMPT}, model=small, tokens_out=8))


# --- LoRA fine-tuning and serving the adapter ----------------------------------------------


@pytest.fixture(scope="module")
def lora(engine, tiny, tmp_path_factory):
    """Base output, then a LoRA fine-tune on the serving engine, then base output again."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    base = request("inference", {"prompt": PROMPT}, tokens_out=16)
    before = engine.run(base).output
    tune = request(
        "fine_tune", {"rank": 8, "steps": 20}, weights=tiny, task_id="lora-1",
        artifact_dir=artifacts, tokens_in=1000,
    )  # fmt: skip
    trained = engine.run(tune)
    after = engine.run(base).output
    return {"before": before, "trained": trained, "after": after}


def test_lora_fine_tune_lowers_the_loss(lora):
    """The loss falls; the curve has the first loss, one every 5 steps, and the last."""
    out = lora["trained"].output
    assert out["method"] == "lora"
    assert out["loss_last"] < out["loss_first"]
    assert out["loss_curve"][0] == out["loss_first"]
    assert out["loss_curve"][-1] == out["loss_last"]
    assert len(out["loss_curve"]) == 1 + 20 // 5
    # rank 8 on q_proj (256 -> 256) and v_proj (256 -> 2 kv heads x 64) in 4 layers
    assert out["trainable_params"] == 4 * 8 * ((256 + 256) + (256 + 128))
    assert lora["trained"].tokens_in == 20 * 8 * 64


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # peft 0.21
def test_lora_adapter_reloads_with_peft_and_serves(engine, lora, tiny, direct_lm):
    """The adapter dir loads in peft; input.adapter serves it deterministically, as peft does."""
    from peft import PeftModel  # noqa: PLC0415 - torch loads at use
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - torch loads at use

    adapter = Path(lora["trained"].output["artifact"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in adapter.iterdir()
    }
    inp = {"prompt": PROMPT, "adapter": str(adapter)}
    served = engine.run(request("inference", inp, tokens_out=16)).output
    again = engine.run(request("inference", inp, tokens_out=16)).output
    assert served["token_ids"] == again["token_ids"]
    assert served["token_ids"] != lora["before"]["token_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny), local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert served["token_ids"] == direct_greedy(peft_model, direct_lm[1], PROMPT, 16)


def test_adapter_of_another_base_model_is_refused(engine, lora, tmp_path):
    """An adapter whose fleet manifest names another base is refused, naming input.adapter."""
    other = tmp_path / "other"
    shutil.copytree(lora["trained"].output["artifact"], other)
    manifest = json.loads((other / "fleet-training.json").read_text())
    (other / "fleet-training.json").write_text(json.dumps({**manifest, "base_model": "llama-8b"}))
    with pytest.raises(HandlerError, match=r"^input\.adapter: .* trained on llama-8b"):
        engine.run(request("inference", {"prompt": PROMPT, "adapter": str(other)}))


def test_training_leaves_the_served_base_unchanged(lora, direct_lm):
    """Base output after fine-tuning (and serving an adapter) is what it was, and transformers'."""
    assert lora["after"]["token_ids"] == lora["before"]["token_ids"]
    assert lora["after"]["token_ids"] == direct_greedy(*direct_lm, PROMPT, 16)


@pytest.mark.parametrize(
    ("lists", "eos", "block", "expected"),
    [
        ([[1, 2, 3], [4, 5]], 0, 4, [[1, 2, 3, 0]]),  # remainder [4, 5, 0] dropped
        ([[1, 2], [3]], 0, 8, [[1, 2, 0, 3, 0]]),  # less than a block: one short block
        ([[1, 2, 3, 4]], None, 2, [[1, 2], [3, 4]]),
        ([[7]], None, 4, []),  # one token predicts nothing
    ],
)
def test_training_blocks(lists, eos, block, expected):
    """Texts are joined with end-of-sequence tokens and cut into equal blocks."""
    assert blocks(lists, eos, block) == expected


# --- full training ----------------------------------------------------------------------


def test_full_training_loads_on_demand_and_writes_a_checkpoint_that_reloads(tiny, tmp_path):
    """A training task loads its model itself; the safetensors checkpoint reloads and generates."""
    from safetensors.torch import load_file  # noqa: PLC0415 - torch loads at use
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - torch loads at use

    eng = TransformersEngine()
    assert not eng.ready(TINY.name)
    task = request(
        "training", {"steps": 10, "seed": 3}, weights=tiny, task_id="full-1",
        artifact_dir=tmp_path, tokens_in=1000,
    )  # fmt: skip
    out = eng.run(task)
    assert eng.ready(TINY.name)
    ckpt = Path(out.output["artifact"])
    assert ckpt == tmp_path / "full-1"
    assert out.output["format"] == "safetensors"
    assert out.output["loss_last"] < out.output["loss_first"]
    assert out.output["trainable_params"] == 3_164_416
    manifest = json.loads((ckpt / "fleet-training.json").read_text())
    assert manifest["base_model"] == "tiny-llama"
    assert manifest["loss_curve"] == out.output["loss_curve"]
    trained = load_file(str(ckpt / "model.safetensors"))
    original = load_file(str(tiny / "model.safetensors"))
    assert trained.keys() == original.keys()
    assert any(not trained[k].equal(original[k]) for k in trained)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    assert len(direct_greedy(model, tok, PROMPT, 8)) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["full-1"]  # no temporary dir left behind
    eng.stop()
    assert not eng.ready(TINY.name)


def test_loss_that_does_not_fall_is_refused_naming_lr(engine, tiny, tmp_path):
    """A diverging run is an error naming input.lr, and writes no checkpoint."""
    task = request(
        "training", {"lr": 1.0, "steps": 2}, weights=tiny, artifact_dir=tmp_path, tokens_in=10
    )
    with pytest.raises(HandlerError, match=r"^input\.lr: training did not lower the loss"):
        engine.run(task)
    assert list(tmp_path.iterdir()) == []


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model", "inp", "field"),
    [
        ("embedding", MINILM, {"texts": "not a list"}, "input.texts"),
        ("embedding", MINILM, {"texts": ["a"], "colour": 1}, "input.colour"),
        ("embedding", MINILM, {"texts": ["a"], "dim": 128}, "input.dim"),
        ("inference", TINY, {"prompt": 3}, "input.prompt"),
        ("inference", TINY, {"prompt": "x", "temperature": -1}, "input.temperature"),
        ("inference", TINY, {"prompt": "x", "top_k": 5}, "input.top_k"),
        ("inference", TINY, {"prompt": "x", "adapter": "/no/such/adapter"}, "input.adapter"),
        ("inference", TINY, {"prompt": "x", "adapter": "."}, "input.adapter"),  # no config
        ("training", TINY, {"lr": 5}, "input.lr"),
        ("training", TINY, {"rank": 4}, "input.rank"),  # rank is LoRA's
        ("fine_tune", TINY, {"rank": 0}, "input.rank"),
        ("fine_tune", TINY, {"texts": [1]}, "input.texts[0]"),
        ("fine_tune", TINY, {"target_modules": "q_proj"}, "input.target_modules"),
        ("fine_tune", TINY, {"target_modules": ["nope"]}, "input.target_modules"),
    ],
)
def test_bad_input_names_the_field(engine, tiny, tmp_path, kind, model, inp, field):
    """Bad input raises HandlerError whose message starts with the field at fault."""
    training = kind in {"training", "fine_tune"}
    task = request(
        kind, inp, model=model, weights=tiny, artifact_dir=tmp_path,
        tokens_in=10 if training else 0,
    )  # fmt: skip
    with pytest.raises(HandlerError) as err:
        engine.run(task)
    assert str(err.value).startswith(f"{field}:")


def test_inference_for_a_model_not_loaded_is_an_engine_error(tiny):
    """Only training loads on demand: inference on an unloaded model is retried elsewhere."""
    eng = TransformersEngine()
    with pytest.raises(EngineError, match="tiny-llama is not loaded"):
        eng.run(request(TaskKind.INFERENCE, {"prompt": "x"}, weights=tiny))
    assert not eng.ready(TINY.name)

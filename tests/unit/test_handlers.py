"""Handlers do real work, deterministically, and fail only with HandlerError on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.spec import SpecError, TaskKind, parse_spec
from workers.handlers import HandlerContext, HandlerError, generation, run_handler
from workers.handlers.generation import tokenize
from workers.handlers.training import base_params, make_dataset

MODEL = "tiny-test-model"
ROOT = Path(__file__).resolve().parents[2]
NO_ARTIFACTS = Path("/dev/null/artifacts")  # a test that writes must pass its own tmp_path
TRAINING_KINDS = {"training", "fine_tune"}


def make_spec(kind, input_=None, **extra):
    data = {"kind": kind, "model": {"name": extra.pop("model", MODEL), "params_b": 0.1}}
    if input_ is not None:
        data["input"] = input_
    if kind in TRAINING_KINDS:
        data["tokens_in"] = 1000
    return parse_spec(data | extra)


@pytest.fixture
def ctx(tmp_path):
    return HandlerContext("task-1", "nvidia-l4", emulated=True, artifact_dir=tmp_path / "art")


def run(kind, input_=None, ctx=None, **extra):
    context = ctx or HandlerContext("task-1", "nvidia-l4", emulated=True, artifact_dir=NO_ARTIFACTS)
    return run_handler(make_spec(kind, input_, **extra), context)


def embed(texts, **extra):
    return np.asarray(run("embedding", {"texts": texts}, **extra)["embeddings"])


# Import cost


NOOP_CODE = """
from pathlib import Path
from fleet.spec import parse_spec
from workers.handlers import HandlerContext, run_handler
spec = parse_spec({"kind": "batch", "model": {"name": "m", "params_b": 1}, "input": {"op": "noop"}})
run_handler(spec, HandlerContext("t", "cpu", True, Path(".")))
"""


@pytest.mark.parametrize("code", ["import workers.handlers", NOOP_CODE], ids=["import", "noop"])
def test_numpy_stays_unloaded(code):
    """Importing the package and running a noop batch never load numpy."""
    check = f"{code}\nimport sys\nassert 'numpy' not in sys.modules, 'numpy was imported'"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT)


# Common result fields


@pytest.mark.parametrize(
    ("kind", "input_", "engine"),
    [
        ("embedding", {"text": "hello"}, "cpu-reference:hashing-embedding-v1"),
        ("inference", {"prompt": "a queue"}, "cpu-reference:trigram-lm-v1"),
        ("training", {"steps": 20}, "cpu-reference:mlp-adam-v1"),
        ("fine_tune", {"steps": 20}, "cpu-reference:mlp-lora-adam-v1"),
        ("batch", {"op": "embed", "texts": ["x"]}, "cpu-reference:hashing-embedding-v1"),
        ("batch", {"op": "echo", "payload": 1}, "cpu-reference:echo-v1"),
        ("batch", {"op": "noop"}, "cpu-reference:noop-v1"),
    ],
)
def test_result_has_common_fields(kind, input_, engine, ctx):
    """Every result names kind, model, engine, emulation and token counts, and is JSON."""
    out = run(kind, input_, ctx)
    assert out["kind"] == kind
    assert out["model"] == MODEL
    assert out["engine"] == engine
    assert out["emulated"] is True
    assert isinstance(out["tokens_in"], int)
    assert isinstance(out["tokens_out"], int)
    assert json.loads(json.dumps(out)) == out


# Embedding


def test_embedding_is_deterministic():
    """The same model and texts give the same vectors, whatever the task."""
    texts = ["GPUs multiply matrices.", "Queues hold messages."]
    first = run("embedding", {"texts": texts})
    ctx2 = HandlerContext("other-task", "amd-mi300x", emulated=False, artifact_dir=NO_ARTIFACTS)
    second = run("embedding", {"texts": texts}, ctx2)
    assert first["embeddings"] == second["embeddings"]


def test_embedding_space_depends_on_model():
    """Different models embed the same text differently."""
    assert not np.allclose(embed(["same text"]), embed(["same text"], model="other-model"))


def test_embedding_similarity_ordering():
    """Similar texts are closer (cosine) than unrelated ones."""
    vecs = embed(
        [
            "the cloud machine reads tasks from the queue",
            "cloud machines read their tasks from a queue",
            "my grandmother bakes apple pie on sunday",
        ]
    )
    sims = vecs @ vecs.T
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert sims[1, 0] > sims[1, 2] + 0.3


@pytest.mark.parametrize(("dim", "expected"), [(None, 384), (8, 8), (100, 100), (4096, 4096)])
def test_embedding_dims_and_norms(dim, expected):
    """Vectors have the requested dimension (default 384) and unit length."""
    input_ = {"texts": ["one text", "and another, longer text"]}
    if dim is not None:
        input_["dim"] = dim
    out = run("embedding", input_)
    vecs = np.asarray(out["embeddings"])
    assert out["dim"] == expected
    assert vecs.shape == (2, expected)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert out["tokens_in"] == 6


@pytest.mark.parametrize(("texts", "rows"), [([], 0), ([""], 1), (["...", "!"], 2)])
def test_embedding_of_nothing(texts, rows):
    """No texts give no vectors; a text without words gives the zero vector."""
    vecs = embed(texts)
    assert len(vecs) == rows
    assert not vecs.any()


def test_embedding_single_text_form():
    """``{"text": s}`` embeds like ``{"texts": [s]}``."""
    single = run("embedding", {"text": "a single text"})["embeddings"]
    assert single == run("embedding", {"texts": ["a single text"]})["embeddings"]


def test_non_ascii_is_embedded():
    """Non-ASCII words and model names embed like any other."""
    vecs = embed(["naïve café 東京", "Ünïcödé wörds"], model="modèle-東京")
    assert vecs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


# Generation


def generate(seed=None, tokens_out=20, prompt="The machine", **input_extra):
    input_ = {"prompt": prompt, **input_extra}
    if seed is not None:
        input_["seed"] = seed
    return run("inference", input_, tokens_out=tokens_out)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_generation_is_deterministic_per_seed(seed):
    """The same seed gives the same text."""
    assert generate(seed)["text"] == generate(seed)["text"]


def test_generation_differs_across_seeds():
    """Different seeds give different texts."""
    texts = {generate(seed, tokens_out=40)["text"] for seed in range(5)}
    assert len(texts) > 1


def test_generation_default_seed_is_the_task():
    """Without a seed, the task id seeds the sampler."""
    other = HandlerContext("task-2", "nvidia-l4", emulated=True, artifact_dir=NO_ARTIFACTS)
    first = run("inference", {"prompt": "A"}, tokens_out=60)
    assert first == run("inference", {"prompt": "A"}, tokens_out=60)
    assert first["text"] != run("inference", {"prompt": "A"}, other, tokens_out=60)["text"]


def test_generation_seeds_from_any_task_id():
    """A task id with a lone surrogate still seeds the sampler."""
    odd = HandlerContext("task-\ud800", "nvidia-l4", emulated=True, artifact_dir=NO_ARTIFACTS)
    assert run("inference", {"prompt": "The"}, odd)["tokens_out"] == 32


@pytest.mark.parametrize(("tokens_out", "expected"), [(0, 32), (1, 1), (50, 50), (5000, 2048)])
def test_generation_length(tokens_out, expected):
    """``tokens_out`` sets the length: 32 by default, at most 2048."""
    out = generate(7, tokens_out=tokens_out)
    assert out["tokens_out"] == expected
    assert out["tokens_in"] == 2
    assert out["text"]


def test_generation_greedy_ignores_seed():
    """At temperature 0 the sampler is greedy: every seed gives the same text."""
    texts = {generate(seed, temperature=0)["text"] for seed in range(3)}
    assert len(texts) == 1


def corpus_followers(a, b):
    tokens = tokenize((Path(generation.__file__).parent / "corpus.txt").read_text("utf-8"))
    return Counter(
        c for x, y, c in zip(tokens, tokens[1:], tokens[2:], strict=False) if (x, y) == (a, b)
    )


@pytest.mark.parametrize("seed", range(5))
def test_generation_follows_corpus_trigrams(seed):
    """After a seen context comes a token the corpus has there; greedy takes the commonest."""
    followers = corpus_followers("a", "queue")
    assert len(followers) > 1
    sampled = generate(seed, tokens_out=3, prompt="Say a queue", temperature=1.0)["text"]
    assert tokenize(sampled)[0] in followers
    greedy = generate(seed, tokens_out=3, prompt="Say a queue", temperature=0)["text"]
    assert tokenize(greedy)[0] == followers.most_common(1)[0][0]


# Training


@pytest.mark.parametrize(
    ("kind", "method", "expected"),
    [
        ("training", None, "full"),
        ("training", "lora", "lora"),
        ("fine_tune", None, "lora"),
        ("fine_tune", "full", "full"),
    ],
)
def test_training_lowers_loss_and_checkpoints(kind, method, expected, ctx):
    """Loss falls, the curve is logged every 10 steps and the checkpoint loads."""
    extra = {"training_method": method} if method else {}
    out = run(kind, {"steps": 95, "seed": 3}, ctx, **extra)
    assert out["method"] == expected
    assert out["steps"] == 95
    assert out["loss_last"] < out["loss_first"]
    assert len(out["loss_curve"]) == 11  # steps 0, 10, ..., 90 and 95
    assert out["loss_curve"][0] == out["loss_first"]
    assert out["loss_curve"][-1] == out["loss_last"]
    assert 0.0 <= out["accuracy"] <= 1.0
    path = Path(out["checkpoint"])
    assert path == ctx.artifact_dir / "task-1.npz"
    with np.load(path) as ckpt:
        np.testing.assert_allclose(ckpt["loss_curve"], out["loss_curve"], rtol=1e-5)
        keys = set(ckpt.files)
    lora_keys = {"base_w1", "base_b1", "base_w2", "base_b2", "lora_a", "lora_b", "lora_scale"}
    full_keys = {"w1", "b1", "w2", "b2"}
    assert keys == (lora_keys if expected == "lora" else full_keys) | {"loss_curve"}
    assert [p.name for p in ctx.artifact_dir.iterdir()] == ["task-1.npz"]  # no temp file left


def test_lora_leaves_base_weights_unchanged(ctx):
    """LoRA trains only the adapter: the base in the checkpoint equals the untouched base."""
    out = run("fine_tune", {"steps": 50, "hidden": 16, "rank": 2}, ctx)
    before = base_params(MODEL, 16)
    with np.load(out["checkpoint"]) as ckpt:
        for name, value in before.items():
            np.testing.assert_array_equal(ckpt[f"base_{name}"], value)
        assert ckpt["lora_a"].shape == (16, 2)
        assert ckpt["lora_b"].shape == (2, 16)
        assert np.abs(ckpt["lora_b"]).max() > 0  # B starts at zero: it was trained
    assert out["trainable_params"] == 16 * 2 + 2 * 16


def test_lora_checkpoint_reproduces_the_model(ctx):
    """Base plus adapter from the checkpoint classify the data as reported."""
    out = run("fine_tune", {"steps": 60, "seed": 5}, ctx)
    x, y = make_dataset(5)
    with np.load(out["checkpoint"]) as c:
        w1 = c["base_w1"] + c["lora_scale"] * c["lora_a"] @ c["lora_b"]
        logits = np.tanh(x @ w1 + c["base_b1"]) @ c["base_w2"] + c["base_b2"]
    assert np.mean(np.argmax(logits, axis=1) == y) == pytest.approx(out["accuracy"], abs=1e-5)
    assert out["accuracy"] > 0.5  # four classes: chance is 0.25


def test_full_training_changes_every_weight(ctx):
    """Full training moves every weight away from the base."""
    out = run("training", {"steps": 30, "hidden": 8}, ctx)
    with np.load(out["checkpoint"]) as ckpt:
        for name, value in base_params(MODEL, 8).items():
            assert not np.array_equal(ckpt[name], value), name


def test_training_is_deterministic(tmp_path):
    """The same seed trains to the same loss curve."""
    curves = [
        run("training", {"steps": 40, "seed": 9}, HandlerContext(f"t{i}", "x", True, tmp_path))[
            "loss_curve"
        ]
        for i in range(2)
    ]
    assert curves[0] == curves[1]


# Batch


def test_batch_echo_returns_payload():
    """Echo returns its payload unchanged."""
    payload = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    assert run("batch", {"op": "echo", "payload": payload})["payload"] == payload


def test_batch_noop_has_no_outputs():
    """Noop returns only the common fields."""
    out = run("batch", {"op": "noop"})
    assert set(out) == {"kind", "model", "engine", "emulated", "tokens_in", "tokens_out"}


def test_batch_embed_matches_embedding():
    """Batch embed gives the embedding kind's vectors."""
    texts = ["alpha beta", "gamma"]
    batch = run("batch", {"op": "embed", "texts": texts, "dim": 32})
    assert batch["embeddings"] == run("embedding", {"texts": texts, "dim": 32})["embeddings"]


# Errors


@pytest.mark.parametrize(
    ("kind", "input_", "field"),
    [
        ("embedding", None, "input:"),
        ("embedding", [1, 2], "input:"),
        ("embedding", {}, "input.texts:"),
        ("embedding", {"texts": "abc"}, "input.texts:"),
        ("embedding", {"texts": ["a", 3]}, "input.texts[1]:"),
        ("embedding", {"texts": ["a"] * 10_001}, "input.texts:"),
        ("embedding", {"texts": ["a" * 100_001]}, "input.texts[0]:"),
        ("embedding", {"text": None}, "input.text:"),
        ("embedding", {"text": "a", "texts": ["b"]}, "input.text:"),
        ("embedding", {"texts": ["a"], "dim": 7}, "input.dim:"),
        ("embedding", {"texts": ["a"], "dim": 4097}, "input.dim:"),
        ("embedding", {"texts": ["a"], "dim": 32.0}, "input.dim:"),
        ("embedding", {"texts": ["a"], "dim": True}, "input.dim:"),
        ("embedding", {"texts": ["a"], "dims": 8}, "input.dims:"),
        ("inference", {}, "input.prompt:"),
        ("inference", {"prompt": 5}, "input.prompt:"),
        ("inference", {"prompt": "a" * 100_001}, "input.prompt:"),
        ("inference", {"prompt": "a", "seed": -1}, "input.seed:"),
        ("inference", {"prompt": "a", "temperature": "hot"}, "input.temperature:"),
        ("inference", {"prompt": "a", "temperature": 5.5}, "input.temperature:"),
        ("training", {"steps": 0}, "input.steps:"),
        ("training", {"steps": 5001}, "input.steps:"),
        ("training", {"hidden": 1}, "input.hidden:"),
        ("training", {"lr": 0}, "input.lr:"),
        ("training", {"rank": 4}, "input.rank:"),  # full training has no adapter
        ("fine_tune", {"rank": 0}, "input.rank:"),
        ("fine_tune", {"hidden": 4, "rank": 5}, "input.rank:"),
        ("fine_tune", "steps", "input:"),
        ("batch", None, "input.op:"),
        ("batch", {}, "input.op:"),
        ("batch", {"op": "fly"}, "input.op:"),
        ("batch", {"op": 3}, "input.op:"),
        ("batch", {"op": "echo"}, "input.payload:"),
        ("batch", {"op": "noop", "x": 1}, "input.x:"),
        ("batch", {"op": "embed", "texts": [1]}, "input.texts[0]:"),
    ],
)
def test_bad_input_raises_handler_error(kind, input_, field, ctx):
    """Bad input raises HandlerError whose message starts with the field at fault."""
    with pytest.raises(HandlerError) as exc:
        run(kind, input_, ctx)
    assert str(exc.value).startswith(field)


def test_unknown_batch_op_lists_valid_ops():
    """An unknown op names input.op and every valid op."""
    with pytest.raises(HandlerError, match=r"input\.op: expected one of echo, embed, noop"):
        run("batch", {"op": "fly"})


@pytest.mark.parametrize(
    ("kind", "input_"), [("embedding", {"text": "a"}), ("training", {"steps": 10})]
)
def test_input_uri_is_refused(kind, input_):
    """Only inline input is accepted."""
    spec = make_spec(kind, input_uri="s3://bucket/key")
    with pytest.raises(HandlerError, match=r"^input_uri:"):
        run_handler(spec, HandlerContext("t", "x", True, NO_ARTIFACTS))


@pytest.mark.parametrize("task_id", ["../escape", "a/b", "", ".hidden"])
def test_unsafe_task_id_cannot_name_a_checkpoint(task_id, tmp_path):
    """A task id that is not a plain file name is refused before anything is written."""
    with pytest.raises(HandlerError, match=r"^task_id:"):
        run("training", {"steps": 10}, HandlerContext(task_id, "x", True, tmp_path / "art"))
    assert not (tmp_path / "art").exists()


# Property: arbitrary JSON never escapes as anything but HandlerError

any_text = st.text(max_size=20)  # no lone surrogates: parse_spec rejects them before handlers
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
INPUT_KEYS = {
    "embedding": ["texts", "text", "dim"],
    "inference": ["prompt", "seed", "temperature"],
    "training": ["steps", "hidden", "lr", "seed"],
    "fine_tune": ["steps", "hidden", "lr", "seed", "rank"],
    "batch:embed": ["texts", "text", "dim"],
    "batch:echo": ["payload"],
    "batch:noop": [],
}
plausible = {  # values near the valid range, so that valid inputs are drawn too
    "texts": st.lists(any_text, max_size=4),
    "text": any_text,
    "dim": st.integers(0, 5000),
    "prompt": any_text,
    "seed": st.integers(-1, 2**64),
    "temperature": st.floats(-1.0, 6.0),
    "steps": st.integers(0, 40),
    "hidden": st.integers(0, 300),
    "lr": st.floats(0.0, 2.0),
    "rank": st.integers(0, 20),
    "payload": json_values,
}


def objects_for(key):
    kind, _, op = key.partition(":")
    required = {"op": st.just(op)} if op else {}
    optional = {name: plausible[name] | json_values for name in INPUT_KEYS[key]}
    return st.fixed_dictionaries(required, optional=optional).map(lambda d: (kind, d))


def any_input(kind):
    junk = st.none() | json_values | st.dictionaries(st.sampled_from(list(plausible)), json_values)
    return junk.map(lambda d: (kind, d))


objects = st.sampled_from(list(INPUT_KEYS)).flatmap(objects_for)
cases = (
    objects
    | objects.map(lambda case: (case[0], case[1] | {"extra": 1}))
    | st.sampled_from([k.value for k in TaskKind]).flatmap(any_input)
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=cases)
def test_arbitrary_input_returns_dict_or_handler_error(case, tmp_path):
    """Any JSON input yields a JSON-serialisable dict or a HandlerError, nothing else."""
    kind, input_ = case
    try:
        spec = make_spec(kind, input_)
    except SpecError:
        return  # refused at the edge (e.g. an integer past 2**64): never reaches a handler
    try:
        out: object = run_handler(spec, HandlerContext("prop", "x", True, tmp_path))
    except HandlerError as exc:
        out = exc
    if isinstance(out, HandlerError):
        assert str(out).startswith(("input", "task_id"))
    else:
        assert isinstance(out, dict)
        json.dumps(out)

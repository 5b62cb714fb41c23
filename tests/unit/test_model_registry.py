"""The model registry (``fleet.models.registry``): names, validation, sizes, weights lookup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet.models.registry import (
    DEFAULT_LOAD_GBPS,
    ModelConfigError,
    builtin_registry,
    registry_from_config,
    registry_from_file,
)
from fleet.models.weights import WeightsError, resolve
from fleet.spec import TaskKind

SHA = "ab" * 32


def entry(**over: Any) -> dict[str, Any]:
    """A valid ``[[models]]`` table, with ``over`` replacing fields."""
    return {
        "name": "m1",
        "task": "generation",
        "params_b": 7,
        "dtype": "bf16",
        "max_context": 4096,
        "source": {"path": "/weights/m1"},
        **over,
    }


@pytest.mark.parametrize(
    "name", ["sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2", "minilm", "MiniLM"]
)
def test_every_alias_of_minilm_finds_one_entry(name: str) -> None:
    """Names and aliases are matched normalised (case, org prefix)."""
    found = builtin_registry().find(name)
    assert found is not None
    assert found.name == "all-minilm-l6-v2"


def test_find_misses_quietly_and_get_names_the_known_models() -> None:
    """``find`` returns None; ``get`` raises KeyError listing the known names."""
    registry = builtin_registry()
    assert registry.find("gpt-17") is None
    with pytest.raises(KeyError, match=r"gpt-17.*known: all-minilm-l6-v2, tiny-llama"):
        registry.get("gpt-17")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([entry(source={})], r"^models\[0\]\.source: give one of path"),
        ([entry(source={"path": "/w", "build": "tiny-llama"})], r"^models\[0\]\.source: path: not with build"),
        ([entry(source={"uri": "s3://b/k", "sha256": SHA, "package": "p"})], r"^models\[0\]\.source: give one weights source, not uri and package"),
        ([entry(source={"uri": "s3://b/k.tgz"})], r"^models\[0\]\.source: sha256: "),
        ([entry(source={"uri": "http://b/k", "sha256": SHA})], r"^models\[0\]\.source\.uri: "),
        ([entry(source={"uri": "s3://b/k", "sha256": "XYZ"})], r"^models\[0\]\.source\.sha256: "),
        ([entry(format="lora")], r"^models\[0\]: base: a lora adapter names its base model"),
        ([entry(format="lora", base="nowhere")], r"^models\.m1\.base: no model 'nowhere'"),
        ([entry(format="gguf")], r"^models\[0\]: engines: transformers cannot load gguf"),
        ([entry(name="Bad Name")], r"^models\[0\]\.name: "),
        ([entry(engines=["tensorrt"])], r"^models\[0\]\.engines\.0: "),
        ([entry(engine_args={"trt": {"x": 1}})], r"^models\[0\]: engine_args\.trt: unknown engine"),
        ([entry(), entry(name="m2", params_b=1, aliases=["m1"])], r"^models: 'm1' of 'm2' is also a name of 'm1'"),
        ([entry(aliases=["minilm"])], r"^models: 'minilm' of 'm1' is also a name of 'all-minilm-l6-v2'"),
        ([entry(name="ok"), entry(name="ok2", params_b=-1)], r"^models\[1\]\.params_b: "),
    ],
    ids=[
        "no source", "path and build", "two sources", "uri without sha256", "bad scheme",
        "bad sha256", "lora without base", "base not in registry", "gguf with transformers",
        "bad name", "unknown engine", "unknown engine_args key", "alias claimed twice",
        "alias of a built-in", "index of the bad entry",
    ],
)  # fmt: skip
def test_every_invalid_entry_names_its_key(models: list[dict[str, Any]], expected: str) -> None:
    """Each ``ModelConfigError`` starts with the key at fault (``models[i].field``)."""
    with pytest.raises(ModelConfigError, match=expected):
        registry_from_config(models)


def test_a_config_entry_replaces_the_builtin_of_the_same_name() -> None:
    """A ``[[models]]`` table named like a built-in replaces it; the others stay."""
    registry = registry_from_config([entry(name="tiny-llama", params_b=0.5, max_context=77)])
    assert registry.names() == ("all-minilm-l6-v2", "tiny-llama")
    assert registry.get("tiny-llama").max_context == 77
    assert registry.get("tiny-llama").source.kind == "path"


def test_config_entries_are_added_after_the_builtins() -> None:
    """New names extend the registry."""
    registry = registry_from_config([entry(aliases=["org/M1-Chat"])], load_gbps=4.0)
    assert registry.names() == ("all-minilm-l6-v2", "tiny-llama", "m1")
    assert registry.get("ORG/m1-chat").name == "m1"
    assert registry.load_gbps == 4.0


@pytest.mark.parametrize(
    ("params_b", "dtype", "gb"),
    [(7, "bf16", 14.0), (7, "fp32", 28.0), (70, "fp8", 70.0), (0.5, "fp16", 1.0)],
)
def test_weights_gb_is_parameters_times_bytes_per_parameter(params_b, dtype, gb) -> None:
    """``weights_gb`` sizes the weights from ``params_b`` and ``dtype``."""
    model = registry_from_config([entry(params_b=params_b, dtype=dtype)]).get("m1")
    assert model.weights_gb == pytest.approx(gb)


def test_load_s_is_weights_over_bandwidth() -> None:
    """``load_s`` reads the weights at ``load_gbps`` (default 1 GB/s)."""
    model = registry_from_config([entry(params_b=7, dtype="bf16")]).get("m1")
    assert model.load_s() == pytest.approx(14.0 / DEFAULT_LOAD_GBPS)
    assert model.load_s(2.0) == pytest.approx(7.0)


@pytest.mark.parametrize(
    ("name", "kind", "served_by"),
    [
        ("minilm", TaskKind.EMBEDDING, "all-minilm-l6-v2"),
        ("minilm", TaskKind.INFERENCE, None),
        ("tiny-llama", TaskKind.INFERENCE, "tiny-llama"),
        ("tiny-llama", TaskKind.TRAINING, "tiny-llama"),
        ("tiny-llama", TaskKind.FINE_TUNE, "tiny-llama"),
        ("tiny-llama", TaskKind.EMBEDDING, None),
        ("gpt-17", TaskKind.INFERENCE, None),
    ],
)
def test_serving_matches_the_model_and_its_task_kinds(name, kind, served_by) -> None:
    """``serving`` gives the entry only when it serves that kind of work."""
    found = builtin_registry().serving(name, kind)
    assert (found.name if found else None) == served_by


def _hf_cache(root: Path, repo: str, commit: str, ref: str = "main") -> Path:
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (base / "refs").mkdir()
    (base / "refs" / ref).write_text(commit + "\n")
    return snapshot


def test_hf_cache_resolves_a_ref_to_its_snapshot(tmp_path: Path) -> None:
    """A ``revision`` ref is read from ``refs/`` and names the snapshot directory."""
    snapshot = _hf_cache(tmp_path / "hub", "org/name", "0123abcd")
    source = {"hf_cache": str(tmp_path / "hub"), "repo": "org/name", "revision": "main"}
    model = registry_from_config([entry(source=source)]).get("m1")
    assert resolve(model, tmp_path / "cache") == snapshot


def test_hf_cache_resolves_a_commit_directly(tmp_path: Path) -> None:
    """A revision that is no ref is taken as the commit."""
    snapshot = _hf_cache(tmp_path / "hub", "org/name", "feedbeef")
    source = {"hf_cache": str(tmp_path / "hub"), "repo": "org/name", "revision": "feedbeef"}
    model = registry_from_config([entry(source=source)]).get("m1")
    assert resolve(model, tmp_path / "cache") == snapshot


def test_hf_cache_without_the_snapshot_names_the_missing_path(tmp_path: Path) -> None:
    """A missing snapshot raises WeightsError naming the model and the path."""
    source = {"hf_cache": str(tmp_path / "hub"), "repo": "org/name"}
    model = registry_from_config([entry(source=source)]).get("m1")
    with pytest.raises(WeightsError, match=r"model m1: weights not found at .*models--org--name"):
        resolve(model, tmp_path / "cache")


def test_registry_from_file_without_a_path_is_the_builtins() -> None:
    """No config: the built-in models only."""
    assert registry_from_file(None).names() == builtin_registry().names()


def test_registry_from_file_reads_models_and_load_bandwidth(tmp_path: Path) -> None:
    """``[[models]]`` and ``model_load_gbps`` come from the file."""
    path = tmp_path / "fleet.toml"
    path.write_text(
        'model_load_gbps = 2.5\n[[models]]\nname = "m1"\ntask = "embedding"\nparams_b = 0.1\n'
        'max_context = 512\nsource = { path = "/w" }\n'
    )
    registry = registry_from_file(str(path))
    assert registry.get("m1").kinds == frozenset({TaskKind.EMBEDDING})
    assert registry.load_gbps == 2.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, r"fleet\.toml: No such file"),
        ("models = [", r"fleet\.toml: not valid TOML"),
        ('models = "tiny-llama"', r"fleet\.toml: models: expected an array of tables"),
        ("model_load_gbps = 0", r"fleet\.toml: model_load_gbps: expected a positive number"),
        ("[[models]]\nname = 'x'\n", r"models\[0\]\.task: "),
    ],
    ids=["missing file", "bad TOML", "models not a list", "bad bandwidth", "bad entry"],
)
def test_registry_from_file_errors_name_the_file_or_key(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    """Every failure is a ModelConfigError naming the file or the key."""
    path = tmp_path / "fleet.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ModelConfigError, match=expected):
        registry_from_file(str(path))


# -- `fleet config check` validates [[models]] too ----------------------------------------

GOOD_MODEL = """
model_load_gbps = 2.5
[[models]]
name = "m1"
task = "generation"
params_b = 7
max_context = 4096
source = { path = "/weights/m1" }
"""


def _config_check(tmp_path: Path, text: str) -> Any:
    from click.testing import CliRunner  # noqa: PLC0415

    from fleet.cli import main  # noqa: PLC0415

    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["config", "check", str(path)], env={"FLEET_BROKER_URL": ""})


def test_config_check_passes_a_good_models_table(tmp_path: Path) -> None:
    """A valid ``[[models]]`` entry (and ``model_load_gbps``) passes ``fleet config check``."""
    result = _config_check(tmp_path, GOOD_MODEL)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD_MODEL.replace('{ path = "/weights/m1" }', "{}"), "models[0].source: give one of"),
        (GOOD_MODEL.replace("/weights/m1", '/w", build = "tiny-llama'), "models[0].source: path: not with build"),
        (GOOD_MODEL + 'format = "lora"\n', "models[0]: base: a lora adapter names its base"),
        (GOOD_MODEL + 'aliases = ["minilm"]\n', "'minilm' of 'm1' is also a name of 'all-minilm-l6-v2'"),
        (GOOD_MODEL + GOOD_MODEL.replace("model_load_gbps = 2.5", ""), "models: duplicate names ['m1']"),
        (GOOD_MODEL.replace("2.5", "0"), "model_load_gbps: "),
    ],
    ids=["no source", "two sources", "lora without base", "alias of a built-in", "duplicate", "bandwidth"],
)  # fmt: skip
def test_config_check_names_the_bad_models_key(tmp_path: Path, text: str, key: str) -> None:
    """A bad ``[[models]]`` entry makes ``fleet config check`` exit 2 naming the key."""
    result = _config_check(tmp_path, text)
    assert result.exit_code == 2
    assert key in " ".join(result.output.split()), result.output


def test_config_check_prints_the_name_pattern_intact(tmp_path: Path) -> None:
    """A bad model name shows the pattern it must match, brackets and all."""
    result = _config_check(tmp_path, GOOD_MODEL.replace('"m1"', '"Bad Name"'))
    assert result.exit_code == 2
    assert "models[0].name: String should match pattern '^[a-z0-9][a-z0-9._-]{0,63}$'" in (
        " ".join(result.output.split())
    )

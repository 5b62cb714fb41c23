"""Pure parts of fetching and verifying weights: URIs, archive members, the check chosen."""

from __future__ import annotations

import importlib.util
import io
import struct
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from fleet.cli_models import format_params
from fleet.models.fetch import ObjectRef, extract_safely, fetch_once, parse_uri, unsafe_member
from fleet.models.registry import ModelEntry, registry_from_config
from fleet.models.verify import choose_check, gguf_header, locate
from fleet.models.weights import WeightsError

SHA = "ab" * 32


def model(**over: Any) -> ModelEntry:
    table = {
        "name": "m1",
        "task": "generation",
        "params_b": 1,
        "max_context": 1024,
        "source": {"uri": "s3://bucket/m1.tgz", "sha256": SHA},
        **over,
    }
    return registry_from_config([table]).get("m1")


@pytest.mark.parametrize(
    ("uri", "ref"),
    [
        ("s3://b/k.tgz", ObjectRef("s3", "b", "k.tgz")),
        ("gs://bucket/dir/model.gguf", ObjectRef("gs", "bucket", "dir/model.gguf")),
        ("az://container/a/b.tar", ObjectRef("az", "container", "a/b.tar")),
    ],
)
def test_parse_uri_splits_scheme_bucket_and_key(uri: str, ref: ObjectRef) -> None:
    """The three schemes round-trip through ``ObjectRef.uri``."""
    assert parse_uri(uri) == ref
    assert ref.uri == uri


@pytest.mark.parametrize("uri", ["http://b/k", "s3://b", "s3:///k", "b/k"])
def test_parse_uri_refuses_other_forms(uri: str) -> None:
    """Not one of the schemes, or no bucket or key: ValueError."""
    with pytest.raises(ValueError, match="not an object-store uri"):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("key", "archive", "filename"),
    [
        ("m.tar", True, "m.tar"),
        ("m.tar.gz", True, "m.tar.gz"),
        ("x/M.TGZ", True, "M.TGZ"),
        ("x/model-q4.gguf", False, "model-q4.gguf"),
        ("x/model.safetensors", False, "model.safetensors"),
    ],
)
def test_archives_are_known_by_their_suffix(key: str, archive: bool, filename: str) -> None:
    """``.tar``, ``.tar.gz`` and ``.tgz`` are unpacked; anything else is kept as one file."""
    ref = ObjectRef("s3", "b", key)
    assert ref.is_archive is archive
    assert ref.filename == filename


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("info", "why"),
    [
        (member("model/config.json"), None),
        (member("model", tarfile.DIRTYPE), None),
        (member("./model.safetensors"), None),
        (member("model/latest", tarfile.SYMTYPE, "snapshot/model.safetensors"), None),
        (member("model/a/b", tarfile.SYMTYPE, "../c"), None),
        (member("model/copy", tarfile.LNKTYPE, "model/config.json"), None),
        (member("/etc/passwd"), "absolute path"),
        (member("C:/x"), "absolute path"),
        (member("../evil"), "climbs out"),
        (member("model/../../evil"), "climbs out"),
        (member("model/l", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
        (member("model/l", tarfile.SYMTYPE, "../../etc"), "outside the archive"),
        (member("l", tarfile.SYMTYPE, ".."), "outside the archive"),
        (member("h", tarfile.LNKTYPE, "../x"), "outside the archive"),
        (member("dev", tarfile.CHRTYPE), "not a regular file"),
        (member("fifo", tarfile.FIFOTYPE), "not a regular file"),
    ],
)
def test_unsafe_members_are_named(info: tarfile.TarInfo, why: str | None) -> None:
    """Members that could write outside the target are refused, with the reason."""
    found = unsafe_member(info)
    assert (found is None) if why is None else (found is not None and why in found)


def _tar(path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_safely_refuses_the_whole_archive_on_one_bad_member(tmp_path: Path) -> None:
    """Nothing is written when any member is unsafe, even the safe ones before it."""
    archive = _tar(tmp_path / "a.tgz", [(member("ok.txt"), b"ok"), (member("../evil"), b"x")])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(WeightsError, match=r"model m1: refusing archive member '\.\./evil'"):
        extract_safely(archive, dest, "m1")
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_extract_safely_unpacks_a_safe_archive(tmp_path: Path) -> None:
    """Files land under ``dest`` with their contents."""
    archive = _tar(tmp_path / "a.tgz", [(member("m/config.json"), b"{}")])
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_safely(archive, dest, "m1")
    assert (dest / "m" / "config.json").read_bytes() == b"{}"


def test_a_non_archive_is_not_unpacked(tmp_path: Path) -> None:
    """A file that is not a tar is a WeightsError naming the model."""
    junk = tmp_path / "a.tgz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(WeightsError, match="model m1: cannot unpack"):
        extract_safely(junk, tmp_path, "m1")


@pytest.mark.parametrize(
    ("scheme", "package"), [("gs", "google-cloud-storage"), ("az", "azure-storage-blob")]
)
def test_a_missing_sdk_says_which_package_to_install(
    tmp_path: Path, scheme: str, package: str
) -> None:
    """Without the cloud's SDK, fetching says ``pip install <package>`` and writes nothing."""
    module = {"gs": "google.cloud.storage", "az": "azure.storage.blob"}[scheme]
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        pytest.skip(f"{module} is installed here")
    entry = model(source={"uri": f"{scheme}://bucket/m1.tgz", "sha256": SHA})
    with pytest.raises(WeightsError, match=f"model m1: .*pip install {package}"):
        fetch_once(entry, tmp_path)
    assert not (tmp_path / SHA).exists()


def test_locate_says_an_unfetched_uri_is_not_fetched_yet(tmp_path: Path) -> None:
    """``locate`` reads the cache only: no path, and where it would be fetched."""
    where = locate(model(), tmp_path)
    assert where.path is None
    assert f"not fetched yet: fetched into {tmp_path / SHA}" in where.note
    assert list(tmp_path.iterdir()) == []


def test_locate_says_an_unbuilt_model_is_not_built_yet(tmp_path: Path) -> None:
    """A ``build`` source that is not in the cache is reported, not built."""
    where = locate(model(source={"build": "tiny-llama", "seed": 3}), tmp_path)
    assert where.path is None
    assert str(tmp_path / "tiny-llama-seed3") in where.note
    assert list(tmp_path.iterdir()) == []


def _missing(absent: set[str]):
    def missing(modules: Iterable[str]) -> str | None:
        return next((f"missing package {m}" for m in modules if m in absent), None)

    return missing


@pytest.mark.parametrize(
    ("over", "absent", "check", "passed"),
    [
        ({}, set(), "transformers", 0),
        ({"engines": ["vllm", "transformers"]}, set(), "transformers", 0),
        ({"engines": ["transformers", "reference"]}, {"torch"}, "reference", 1),
        ({"engines": ["transformers"]}, {"transformers"}, None, 1),
        ({"engines": ["vllm"], "format": "gguf"}, {"torch"}, "gguf", 0),
        ({"task": "embedding"}, {"sentence_transformers"}, None, 1),
        ({"format": "lora", "base": "tiny-llama"}, {"peft"}, None, 1),
        ({"format": "lora", "base": "tiny-llama"}, {"sentence_transformers"}, "transformers", 0),
    ],
)
def test_choose_check_takes_the_first_engine_whose_library_is_here(
    over: dict[str, Any], absent: set[str], check: str | None, passed: int
) -> None:
    """Engines are tried in the entry's order; each one passed over says why."""
    chosen, reasons = choose_check(model(**over), _missing(absent))
    assert chosen == check
    assert len(reasons) == passed
    assert all("missing package" in r for r in reasons)


def test_gguf_header_reads_version_and_counts(tmp_path: Path) -> None:
    """The header's magic, version, tensor and metadata counts."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 291, 24) + b"\0" * 8)
    assert gguf_header(path).startswith("gguf v3 header: 291 tensors, 24 metadata keys")
    path.write_bytes(b"GGML" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_header(path)


@pytest.mark.parametrize(
    ("params_b", "text"), [(0.0227, "22.7M"), (0.00316, "3.16M"), (7, "7B"), (70.6, "70.6B")]
)
def test_format_params(params_b: float, text: str) -> None:
    """Parameter counts print in M below a billion, else in B."""
    assert format_params(params_b) == text

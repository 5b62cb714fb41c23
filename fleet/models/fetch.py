"""Fetch an object-store weights source (``s3://``, ``gs://``, ``az://``) once into the cache.

``fetch_once(entry, cache)`` streams the object into ``cache/<sha256>/``, hashing as it
writes, and keeps it only if the digest is the entry's ``source.sha256``. A ``.tar``,
``.tar.gz`` or ``.tgz`` object is unpacked into ``cache/<sha256>/weights/`` (members that
are absolute, climb out with ``..``, link outside the tree or are devices are refused);
any other object is kept as one file under its own name (a ``.gguf``, say). A marker,
``fleet-fetch.json``, is written last: a later call that finds it returns at once, without
touching the network, and a directory without it is a crashed fetch, cleared and redone.

Nothing half-written is ever visible: the object lands in a temporary file and the archive
in a temporary directory beside the target, renamed into place after the check. Callers
serialise concurrent fetches of one object (``fleet.models.weights.resolve`` holds a file
lock around the call; this module takes none, as a second ``flock`` from the same process
would wait on the first).

Cloud SDKs load inside the readers only: boto3 (``fleet[aws]``; the endpoint comes from
``FLEET_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``), ``google-cloud-storage`` and
``azure-storage-blob`` (account from ``AZURE_STORAGE_CONNECTION_STRING`` or
``AZURE_STORAGE_ACCOUNT_URL``). Errors name the model, the URI and the provider's error
code, never a credential or a connection string.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from fleet.models.weights import WeightsError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from fleet.models.registry import ModelEntry

    Chunks = tuple[int | None, Iterator[bytes]]  # the object's size (if known) and its bytes
    Reader = Callable[[ModelEntry, "ObjectRef", Mapping[str, str]], Chunks]

MARKER = "fleet-fetch.json"
WEIGHTS_DIR = "weights"
CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One object: ``scheme`` ``s3``/``gs``/``az``, its bucket (or container) and key."""

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The URI as written in the registry."""
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def is_archive(self) -> bool:
        """Whether the object is a tar archive to unpack (by its name)."""
        return self.key.lower().endswith(ARCHIVE_SUFFIXES)

    @property
    def filename(self) -> str:
        """The name the object is kept under when it is not an archive."""
        return PurePosixPath(self.key).name or WEIGHTS_DIR


def parse_uri(uri: str) -> ObjectRef:
    """``s3://bucket/key`` (or ``gs://``, ``az://container/blob``) split into its parts.

    Raises:
        ValueError: not one of the three schemes, or no bucket or key.

    """
    scheme, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not sep or scheme not in READERS or not bucket or not key:
        raise ValueError(f"not an object-store uri (s3://, gs://, az://bucket/key): {uri!r}")
    return ObjectRef(scheme, bucket, key)


def cache_dir(entry: ModelEntry, cache: Path) -> Path:
    """Where ``entry``'s object is (or will be) kept: ``cache/<sha256>``."""
    return cache / (entry.source.sha256 or "")


def cached(entry: ModelEntry, cache: Path) -> Path | None:
    """The fetched weights of ``entry`` if a complete fetch is in ``cache``, else None.

    Reads the marker only: no network, nothing written.
    """
    root = cache_dir(entry, cache)
    try:
        marker = json.loads((root / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    path = root / str(marker.get("path", ""))
    return path if marker.get("sha256") == entry.source.sha256 and path.exists() else None


def fetch_once(entry: ModelEntry, cache: Path, env: Mapping[str, str] | None = None) -> Path:
    """The local weights of ``entry`` (a ``uri`` source), fetched into ``cache`` on first call.

    Args:
        entry: a registry entry whose ``source`` has ``uri`` and ``sha256``.
        cache: the model cache (``FLEET_MODEL_CACHE``); ``cache/<sha256>/`` is written.
        env: where endpoint and account settings are read (default ``os.environ``).

    Returns:
        ``cache/<sha256>/weights`` for an archive (or its only subdirectory, when the archive
        wraps the files in one top-level folder as ``tar czf x.tgz dir/`` does), else
        ``cache/<sha256>/<object name>``.

    Raises:
        WeightsError: the object cannot be read, its sha256 is not the expected one (the
            message names both digests), or the archive has an unsafe member. Nothing is
            left in ``cache/<sha256>/`` then.

    """
    src = entry.source
    if not src.uri or not src.sha256:
        raise WeightsError(f"model {entry.name}: not an object-store source ({src.describe()})")
    done = cached(entry, cache)
    if done is not None:
        return done
    ref = parse_uri(src.uri)
    root = cache_dir(entry, cache)
    if root.exists():
        shutil.rmtree(root)  # no marker: a crashed fetch; start over
    root.mkdir(parents=True)
    try:
        result = _download_and_place(entry, ref, root, os.environ if env is None else env)
        _write_json(root / MARKER, {
            "model": entry.name, "uri": ref.uri, "sha256": src.sha256,
            "path": str(result.relative_to(root)),
        })  # fmt: skip
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return result


def _download_and_place(
    entry: ModelEntry, ref: ObjectRef, root: Path, env: Mapping[str, str]
) -> Path:
    expected = entry.source.sha256
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=root)
    tmp = Path(tmp_name)
    with os.fdopen(fd, "wb") as out:
        size, chunks = READERS[ref.scheme](entry, ref, env)
        actual = _stream(chunks, size, out, f"{entry.name} {ref.uri}")
    if actual != expected:
        raise WeightsError(
            f"model {entry.name}: sha256 mismatch for {ref.uri}: expected {expected}, got {actual}"
        )
    if not ref.is_archive:
        target = root / ref.filename
        tmp.replace(target)
        return target
    work = Path(tempfile.mkdtemp(prefix=".weights-", dir=root))
    extract_safely(tmp, work, entry.name)
    tmp.unlink()
    target = root / WEIGHTS_DIR
    work.chmod(0o755)  # mkdtemp makes 0700; a cache is shared
    work.replace(target)
    inner = list(target.iterdir())
    return inner[0] if len(inner) == 1 and inner[0].is_dir() else target


def _stream(chunks: Iterator[bytes], size: int | None, out: IO[bytes], label: str) -> str:
    """Write ``chunks`` to ``out``; the hex sha256 of what was written.

    A progress bar goes to stderr when stderr is a terminal (never into logs or pipes).
    """
    digest = hashlib.sha256()
    with _progress(label, size) as advance:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
            advance(len(chunk))
    return digest.hexdigest()


@contextmanager
def _progress(label: str, size: int | None) -> Iterator[Callable[[int], None]]:
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console  # noqa: PLC0415 - only for a terminal
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn  # noqa: PLC0415

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"fetching {label}", total=size)
        yield lambda n: bar.advance(task, n)


def extract_safely(archive: Path, dest: Path, model: str) -> None:
    """Unpack the tar ``archive`` (any compression) into the existing directory ``dest``.

    Raises:
        WeightsError: a member is absolute, has a ``..`` component, is a link whose
            target leaves ``dest``, or is not a file, directory or link.

    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                why = unsafe_member(m)
                if why:
                    raise WeightsError(f"model {model}: refusing archive member {m.name!r}: {why}")
            # The "data" filter re-checks every member (and drops modes and owners).
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise WeightsError(f"model {model}: cannot unpack the archive: {exc}") from None


def unsafe_member(m: tarfile.TarInfo) -> str | None:
    """Why extracting ``m`` could write outside the target directory, or None."""
    name = PurePosixPath(m.name)
    if name.is_absolute() or m.name.startswith("\\") or m.name[1:2] == ":":
        return "absolute path"
    if ".." in name.parts:
        return "path climbs out with '..'"
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        return "not a regular file, directory or link"
    if m.issym() or m.islnk():
        link = PurePosixPath(m.linkname)
        if link.is_absolute():
            return f"link to an absolute path {m.linkname!r}"
        # A symlink is relative to its own directory, a hard link to the archive root.
        base = name.parent.parts if m.issym() else ()
        depth = 0
        for part in (*base, *link.parts):
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                return f"link {m.linkname!r} points outside the archive"
    return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- readers: (size or None, chunks) for one object; SDKs import here only -----------------


def _sdk(module: str, install: str, entry: ModelEntry, ref: ObjectRef) -> Any:  # noqa: ANN401 - an SDK module
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsError(
            f"model {entry.name}: fetching {ref.scheme}:// needs {install} (pip install {install})"
        ) from None


def _cannot(entry: ModelEntry, ref: ObjectRef, why: str) -> WeightsError:
    return WeightsError(f"model {entry.name}: cannot fetch {ref.uri}: {why}")


def _read_s3(entry: ModelEntry, ref: ObjectRef, env: Mapping[str, str]) -> Chunks:
    boto3 = _sdk("boto3", "'fleet[aws]'", entry, ref)
    exceptions = importlib.import_module("botocore.exceptions")
    endpoint = env.get("FLEET_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None
    try:
        body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=ref.bucket, Key=ref.key)
    except exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        raise _cannot(
            entry, ref, f"{error.get('Code', '?')} ({error.get('Message', '')})"
        ) from None
    except exceptions.BotoCoreError as exc:
        raise _cannot(entry, ref, type(exc).__name__) from None
    stream = body["Body"]

    def chunks() -> Iterator[bytes]:
        try:
            yield from stream.iter_chunks(CHUNK)
        except exceptions.BotoCoreError as exc:
            raise _cannot(entry, ref, type(exc).__name__) from None
        finally:
            stream.close()

    return body.get("ContentLength"), chunks()


def _read_gs(entry: ModelEntry, ref: ObjectRef, env: Mapping[str, str]) -> Chunks:
    storage = _sdk("google.cloud.storage", "google-cloud-storage", entry, ref)
    api_errors = importlib.import_module("google.api_core.exceptions")
    auth_errors = importlib.import_module("google.auth.exceptions")
    errors = (api_errors.GoogleAPIError, auth_errors.GoogleAuthError)
    try:
        client = storage.Client(project=env.get("GOOGLE_CLOUD_PROJECT") or None)
        blob = client.bucket(ref.bucket).blob(ref.key)
        blob.reload()
        reader = blob.open("rb", chunk_size=CHUNK)
    except errors as exc:
        raise _cannot(entry, ref, type(exc).__name__) from None

    def chunks() -> Iterator[bytes]:
        with reader:
            try:
                yield from iter(lambda: reader.read(CHUNK), b"")
            except errors as exc:
                raise _cannot(entry, ref, type(exc).__name__) from None

    return blob.size, chunks()


def _read_az(entry: ModelEntry, ref: ObjectRef, env: Mapping[str, str]) -> Chunks:
    blob_sdk = _sdk("azure.storage.blob", "azure-storage-blob", entry, ref)
    azure_errors = importlib.import_module("azure.core.exceptions")
    conn = env.get("AZURE_STORAGE_CONNECTION_STRING")
    account_url = env.get("AZURE_STORAGE_ACCOUNT_URL")
    try:
        if conn:
            service = blob_sdk.BlobServiceClient.from_connection_string(conn)
        elif account_url:
            identity = _sdk("azure.identity", "azure-identity", entry, ref)
            service = blob_sdk.BlobServiceClient(
                account_url, credential=identity.DefaultAzureCredential()
            )
        else:
            raise _cannot(
                entry, ref, "set AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_URL"
            )
        download = service.get_blob_client(ref.bucket, ref.key).download_blob()
    except (azure_errors.AzureError, ValueError) as exc:
        code = getattr(exc, "error_code", None)
        raise _cannot(entry, ref, f"{type(exc).__name__}{f' ({code})' if code else ''}") from None

    def chunks() -> Iterator[bytes]:
        try:
            yield from download.chunks()
        except azure_errors.AzureError as exc:
            raise _cannot(entry, ref, type(exc).__name__) from None

    return download.size, chunks()


READERS: dict[str, Reader] = {
    "s3": _read_s3,
    "gs": _read_gs,
    "az": _read_az,
}

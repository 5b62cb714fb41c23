"""The ``transformers`` engine: real models in-process with torch, on cpu, cuda or rocm.

* ``embedding``: a sentence-transformers model (``SentenceTransformer(weights)``), run by
  ``workers.engines.hf_serve.embed``: unit vectors, word pieces counted.
* ``inference``: ``AutoModelForCausalLM`` + ``AutoTokenizer`` (``local_files_only``), run by
  ``hf_serve.generate``: greedy at temperature 0 (the default), seeded sampling above it,
  measured time to first token. ``input.adapter`` names a LoRA adapter directory (one a
  ``fine_tune`` task wrote, holding ``adapter_config.json``): the base model plus that
  adapter (``peft.PeftModel.from_pretrained``) generate.
* ``training`` / ``fine_tune``: ``workers.engines.hf_train`` (a short causal-LM loop on a
  copy of the model, writing safetensors under ``artifact_dir/<task_id>/``). These kinds
  load their model on demand: a training run amortises the load.

Loading: the entry's dtype (fp32, bf16, fp16) and ``engine_args.transformers`` (keyword
arguments of ``from_pretrained``, or of ``SentenceTransformer``; ``model_kwargs`` merged)
apply; fleet owns ``device``, ``dtype`` and ``local_files_only``. The device is the
constructor's (``cuda:0`` also on ROCm, whose torch calls its devices cuda).

Process model: nothing heavy is imported at module import. The worker's parent imports
this class and calls ``unavailable`` before the prefork fork, so ``unavailable`` only looks
for the packages (``find_spec``), reads ``torch/version.py`` as text to learn whether the
installed torch is a CUDA or ROCm build, and looks for the device node (``/dev/nvidia0``
... or ``/dev/kfd``): it never initialises CUDA. ``load`` (in the child) asks torch.

One engine holds each model once (a dict by name); a served adapter holds its own copy of
the base weights (at most ``MAX_ADAPTERS``, least recently used dropped), so neither
training nor an adapter ever changes what the base model generates.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fleet.models.registry import ModelTask
from fleet.spec import DType, Runtime, TaskKind
from workers.engines import hf_serve, hf_train
from workers.engines.base import Engine, EngineError, EngineOutput, EngineRequest, reason_missing
from workers.engines.inputs import plan_generation
from workers.handlers import HandlerError, describe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydantic import JsonValue

    from fleet.models.registry import ModelEntry

# torch and transformers objects are typed loosely: their stubs would force casts on every call.
TorchModel = Any  # a torch.nn.Module: a transformers, peft or sentence-transformers model
TorchDType = Any  # a torch.dtype

PACKAGES = ("torch", "transformers", "sentence_transformers", "peft")
MAX_ADAPTERS = 4
TORCH_DTYPES: dict[DType, str] = {
    DType.FP32: "float32",
    DType.BF16: "bfloat16",
    DType.FP16: "float16",
}
# Keys of engine_args.transformers that fleet sets itself and a config may not override.
OWNED_ARGS = frozenset({"device", "dtype", "torch_dtype", "local_files_only"})
# runtime -> (device node pattern in /dev, the node named in a message)
_DEVICE_NODES: dict[Runtime, tuple[str, str]] = {
    Runtime.CUDA: (r"nvidia\d+", "/dev/nvidia0"),
    Runtime.ROCM: (r"kfd", "/dev/kfd"),
}
_BUILD_LINE = re.compile(r"^(cuda|hip)\s*(?::[^=]*)?=\s*'([^']+)'", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TorchBuild:
    """What the installed torch was built for, read from ``torch/version.py`` as text."""

    cuda: str | None
    hip: str | None


def torch_build() -> TorchBuild | None:
    """The installed torch's build (None when torch or its version file is missing).

    Reads the file; imports nothing (``find_spec`` on a top-level package runs no code).
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_file.read_text("utf-8")
    except OSError:
        return None
    found = dict(_BUILD_LINE.findall(text))
    return TorchBuild(cuda=found.get("cuda"), hip=found.get("hip"))


def device_reason(
    runtime: Runtime, build: TorchBuild | None, device_nodes: Sequence[str]
) -> str | None:
    """Why ``runtime`` has no usable device, or None. Pure: the observations are arguments.

    Args:
        runtime: the runtime asked for; only cuda and rocm need a device.
        build: the installed torch's build (``torch_build()``); None skips the build check.
        device_nodes: the names of the entries of ``/dev``.

    """
    if runtime is Runtime.CPU:
        return None
    if build is not None:
        if runtime is Runtime.CUDA and build.cuda is None:
            return "torch is not a CUDA build (install the CUDA wheel of torch)"
        if runtime is Runtime.ROCM and build.hip is None:
            return "torch is not a ROCm build (install the ROCm wheel of torch)"
    pattern, shown = _DEVICE_NODES[runtime]
    if not any(re.fullmatch(pattern, n) for n in device_nodes):
        return f"no {runtime} device ({shown} is missing)"
    return None


@dataclass(slots=True)
class _Loaded:
    """One loaded model: a SentenceTransformer, or a causal LM and its tokenizer."""

    entry: ModelEntry
    weights: Path
    model: TorchModel
    tokenizer: Any = None  # a transformers tokenizer (None for a SentenceTransformer)


class TransformersEngine(Engine):
    """Runs models in-process with torch; see the module docstring."""

    name: ClassVar[str] = "transformers"
    kinds: ClassVar[frozenset[TaskKind]] = frozenset(
        {TaskKind.EMBEDDING, TaskKind.INFERENCE, TaskKind.TRAINING, TaskKind.FINE_TUNE}
    )
    runtimes: ClassVar[frozenset[Runtime]] = frozenset({Runtime.CPU, Runtime.CUDA, Runtime.ROCM})
    loads_on_demand: ClassVar[frozenset[TaskKind]] = frozenset(
        {TaskKind.TRAINING, TaskKind.FINE_TUNE}
    )

    def __init__(self, device: str = "cpu") -> None:
        """Load models onto ``device`` (a torch device: ``cpu``, ``cuda:0``; ROCm is ``cuda``)."""
        self.device = device
        self._models: dict[str, _Loaded] = {}
        # (model name, adapter path@inode:mtime) -> base copy plus adapter, least recent first
        self._adapters: OrderedDict[tuple[str, str], TorchModel] = OrderedDict()

    @classmethod
    def unavailable(cls, runtime: Runtime) -> str | None:
        """Why this engine cannot run on ``runtime`` here, or None; never initialises CUDA."""
        if runtime not in cls.runtimes:
            return f"the transformers engine does not serve {runtime}"
        missing = reason_missing(*PACKAGES)
        if missing is not None:
            return missing
        try:
            nodes = [p.name for p in Path("/dev").iterdir()] if runtime is not Runtime.CPU else []
        except OSError:
            nodes = []
        return device_reason(runtime, torch_build(), nodes)

    @classmethod
    def version(cls) -> str:
        """``transformers 5.25.0 (torch 2.13.0+cpu, sentence-transformers 6.3.0, peft 0.21.2)``."""
        return _versions()

    def ready(self, model: str) -> bool:
        """True once ``model`` is loaded in this process."""
        return model in self._models

    def load(self, model: ModelEntry, weights: Path) -> None:
        """Load ``model`` from ``weights`` onto this engine's device; a no-op when loaded.

        Raises:
            EngineError: the weights do not load, the dtype or format is not one this engine
                loads, or the device is missing.

        """
        if model.name in self._models:
            return
        if model.format != "safetensors":
            raise EngineError(
                f"model {model.name}: the transformers engine loads safetensors, not {model.format}"
            )
        dtype_name = TORCH_DTYPES.get(model.dtype)
        if dtype_name is None:
            raise EngineError(
                f"model {model.name}: dtype {model.dtype} (the transformers engine loads fp32, bf16, fp16)"
            )
        args = dict(model.engine_args.get("transformers", {}))
        owned = sorted(OWNED_ARGS & set(args))
        if owned:
            raise EngineError(
                f"models.{model.name}.engine_args.transformers.{owned[0]}: set by fleet"
            )
        import torch  # noqa: PLC0415 - torch loads in the worker child only
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        # per-shard progress bars would flood the worker's log
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device {self.device}: torch sees no CUDA/ROCm device")
        dtype = getattr(torch, dtype_name)
        try:
            self._models[model.name] = (
                _load_embedder(model, weights, self.device, dtype, args)
                if model.task is ModelTask.EMBEDDING
                else _load_causal_lm(model, weights, self.device, dtype, args)
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"model {model.name}: cannot load {weights}: {exc}") from exc

    def run(self, request: EngineRequest) -> EngineOutput:
        """Run one embedding, inference, training or fine-tune task.

        Raises:
            workers.handlers.HandlerError: bad input, the field named.
            EngineError: the model is not loaded (and its kind does not load on demand),
                the device failed, or memory ran out.

        """
        spec = request.spec
        if spec.input_uri is not None:
            raise HandlerError("input_uri: the transformers engine takes inline input only")
        if spec.kind not in self.kinds or spec.kind not in request.model.kinds:
            raise HandlerError(f"kind: model {request.model.name} does not serve {spec.kind}")
        if spec.kind in self.loads_on_demand:
            self.load(request.model, request.weights)
        loaded = self._models.get(request.model.name)
        if loaded is None:
            held = ", ".join(self._models) or "none"
            raise EngineError(f"model {request.model.name} is not loaded here (holding: {held})")
        try:
            if spec.kind is TaskKind.EMBEDDING:
                return hf_serve.embed(loaded.model, request)
            if spec.kind is TaskKind.INFERENCE:
                plan = plan_generation(spec, request.task_id, adapters=True)
                model = (
                    loaded.model if plan.adapter is None else self._adapter(loaded, plan.adapter)
                )
                return hf_serve.generate(model, loaded.tokenizer, plan, request, self.device)
            return hf_train.train(loaded.model, loaded.tokenizer, request)
        except HandlerError:
            raise
        except RuntimeError as exc:  # torch's device errors and out-of-memory are RuntimeErrors
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"transformers: {spec.kind} on {self.device} failed: {exc}") from exc

    def stop(self) -> None:
        """Drop every model and adapter and return cached device memory; idempotent."""
        had = bool(self._models or self._adapters)
        self._models.clear()
        self._adapters.clear()
        if had:
            import gc  # noqa: PLC0415

            import torch  # noqa: PLC0415 - only when something was loaded

            gc.collect()
            if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
                torch.cuda.empty_cache()

    def _adapter(self, loaded: _Loaded, raw: JsonValue) -> TorchModel:
        """The base model plus the LoRA adapter at ``raw`` (cached by path)."""
        if not isinstance(raw, str) or not raw:
            raise HandlerError(
                f"input.adapter: expected the path of an adapter directory, got {describe(raw)}"
            )
        path = Path(raw).expanduser()
        if not path.is_dir() or not (path / "adapter_config.json").is_file():
            raise HandlerError(
                f"input.adapter: {raw} is not a directory holding adapter_config.json"
            )
        trained_on = _adapter_base(path)
        if trained_on is not None and trained_on != loaded.entry.name:
            raise HandlerError(
                f"input.adapter: {raw} was trained on {trained_on}, not {loaded.entry.name}"
            )
        # the directory's inode and mtime: a task run again renames a new directory into place
        stat = path.stat()
        key = (loaded.entry.name, f"{path.resolve()}@{stat.st_ino}:{stat.st_mtime_ns}")
        model = self._adapters.get(key)
        if model is not None:
            self._adapters.move_to_end(key)
            return model
        from peft import PeftModel  # noqa: PLC0415

        try:
            with hf_train.quiet_peft():
                base = copy.deepcopy(loaded.model)  # the adapter's own copy: the base stays as is
                model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise HandlerError(
                f"input.adapter: {raw} does not load on {loaded.entry.name}: {exc}"
            ) from exc
        model.eval()
        self._adapters[key] = model
        while len(self._adapters) > MAX_ADAPTERS:
            self._adapters.popitem(last=False)
        return model


@functools.cache
def _versions() -> str:
    """The engine libraries' versions, read once per process (metadata lookups are slow)."""

    def v(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    deps = ", ".join(f"{d} {v(d)}" for d in ("torch", "sentence-transformers", "peft"))
    return f"transformers {v('transformers')} ({deps})"


def _adapter_base(path: Path) -> str | None:
    """The base model a fleet-written adapter was trained on (its manifest), or None."""
    try:
        manifest = json.loads((path / hf_train.MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return None  # not written by fleet: peft checks the shapes when it loads
    base = manifest.get("base_model") if isinstance(manifest, dict) else None
    return base if isinstance(base, str) else None


def _load_embedder(
    entry: ModelEntry, weights: Path, device: str, dtype: TorchDType, args: dict[str, Any]
) -> _Loaded:
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    model_kwargs = dict(args.pop("model_kwargs", {}))
    model_kwargs["dtype"] = dtype
    st = SentenceTransformer(
        str(weights), device=device, local_files_only=True, model_kwargs=model_kwargs, **args
    )
    st.eval()
    return _Loaded(entry=entry, weights=weights, model=st)


def _load_causal_lm(
    entry: ModelEntry, weights: Path, device: str, dtype: TorchDType, args: dict[str, Any]
) -> _Loaded:
    import transformers  # noqa: PLC0415

    auto: Any = transformers.AutoModelForCausalLM  # its from_pretrained confuses mypy
    tok = transformers.AutoTokenizer.from_pretrained(str(weights), local_files_only=True)
    model = auto.from_pretrained(str(weights), local_files_only=True, dtype=dtype, **args)
    model.to(device)
    model.eval()
    return _Loaded(entry=entry, weights=weights, model=model, tokenizer=tok)

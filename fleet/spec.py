"""TaskSpec: the typed description of one piece of AI work, validated at the edge.

A spec is frozen and JSON round-trips exactly. Everything the router needs is in it;
anything invalid is rejected here, with a message naming the field, before a byte
reaches the broker.
"""

from __future__ import annotations

import difflib
import json
import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.catalog import accelerator_names

MAX_TOKENS = 10**13  # larger than any real training run (Llama 3: 1.5e13 is the order)


class TaskKind(StrEnum):
    """What the work is; each kind has its own queues and time limit."""

    INFERENCE = "inference"
    EMBEDDING = "embedding"
    TRAINING = "training"
    FINE_TUNE = "fine_tune"
    BATCH = "batch"


class DType(StrEnum):
    """Numeric format of the model's weights."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


class Runtime(StrEnum):
    """Software stacks an accelerator family runs."""

    CUDA = "cuda"
    ROCM = "rocm"
    NEURON = "neuron"
    XLA = "xla"
    CPU = "cpu"


BYTES_PER_PARAM: dict[DType, float] = {
    DType.FP32: 4.0,
    DType.BF16: 2.0,
    DType.FP16: 2.0,
    DType.FP8: 1.0,
    DType.INT8: 1.0,
    DType.INT4: 0.5,
}

# Strings are kept verbatim: a prompt's indentation and trailing newline are its content.
_STRICT = ConfigDict(frozen=True, extra="forbid")


class ModelRef(BaseModel):
    """The model a task runs: its name, size in billions of parameters, and dtype."""

    model_config = _STRICT

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
    params_b: Annotated[float, Field(gt=0, le=100_000, description="billions of parameters")]
    dtype: DType = DType.BF16


def closest_accelerators(name: str, n: int = 3) -> list[str]:
    """Canonical accelerator names close to ``name``.

    Names that contain ``name`` come first (all of them: ``nvidia-a100`` suggests both
    A100 variants), then up to ``n`` spelling neighbours.
    """
    wanted = name.strip().lower()
    names = accelerator_names()
    containing = [c for c in names if wanted and wanted in c]
    similar = difflib.get_close_matches(wanted, names, n=n, cutoff=0.4)
    return containing + [c for c in similar if c not in containing][: max(0, n - len(containing))]


def _check_accelerators(names: tuple[str, ...]) -> tuple[str, ...]:
    known = set(accelerator_names())
    for name in names:
        if name not in known:
            close = closest_accelerators(name)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown accelerator {name!r}{hint} (valid: {', '.join(sorted(known))})"
            )
    return names


class Requirements(BaseModel):
    """Hard constraints on where a task may run. Empty means no constraint."""

    model_config = _STRICT

    accelerators: tuple[str, ...] = Field(default=(), description="allowed families; empty: any")
    exclude: tuple[str, ...] = ()
    runtimes: tuple[Runtime, ...] = ()
    clouds: tuple[Literal["aws", "gcp", "azure"], ...] = ()
    markets: tuple[Literal["on_demand", "spot"], ...] = ()
    min_accelerator_memory_gb: Annotated[float, Field(gt=0, le=100_000)] | None = None

    _valid_accelerators = field_validator("accelerators", "exclude")(_check_accelerators)


class SLO(BaseModel):
    """Service goals. ``deadline_s`` counts from submission to the end of the task."""

    model_config = _STRICT

    deadline_s: Annotated[float, Field(gt=0, le=365 * 86400)] | None = None


class Budget(BaseModel):
    """Spending cap for one task, in US dollars."""

    model_config = _STRICT

    max_usd: Annotated[float, Field(gt=0, le=10**7)] | None = None


class TaskSpec(BaseModel):
    """One task.

    ``tokens_in`` is the prompt length for generation, the tokens to embed for
    ``embedding``, and the tokens trained on for ``training`` and ``fine_tune``.
    ``tokens_out`` is the tokens generated (inference, batch). ``priority`` runs 0
    (lowest) to 9 (most urgent). ``training_method`` applies to training and
    fine-tuning: ``full`` keeps optimizer state for every parameter, ``lora`` for a
    small adapter (the default for ``fine_tune``).
    """

    model_config = _STRICT

    kind: TaskKind
    model: ModelRef
    input: JsonValue | None = None
    input_uri: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    tokens_in: Annotated[int, Field(ge=0, le=MAX_TOKENS)] = 0
    tokens_out: Annotated[int, Field(ge=0, le=MAX_TOKENS)] = 0
    requirements: Requirements = Requirements()
    slo: SLO = SLO()
    budget: Budget = Budget()
    priority: Annotated[int, Field(ge=0, le=9)] = 0
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    training_method: Literal["full", "lora"] | None = None

    @field_validator("input")
    @classmethod
    def _finite(cls, value: JsonValue | None) -> JsonValue | None:
        if not _all_finite(value):
            raise ValueError("NaN and infinite numbers are not JSON")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.input is not None and self.input_uri is not None:
            raise ValueError("give input or input_uri, not both")
        if self.kind in (TaskKind.EMBEDDING, TaskKind.TRAINING) and self.tokens_out:
            raise ValueError(f"tokens_out: a {self.kind} task generates no tokens; leave it 0")
        if self.kind in (TaskKind.TRAINING, TaskKind.FINE_TUNE) and self.tokens_in == 0:
            raise ValueError(
                f"tokens_in: a {self.kind} task needs the number of tokens to train on"
            )
        if self.training_method is not None and self.kind not in (
            TaskKind.TRAINING,
            TaskKind.FINE_TUNE,
        ):
            raise ValueError(f"training_method: only for training and fine_tune, not {self.kind}")
        clash = set(self.requirements.accelerators) & set(self.requirements.exclude)
        if clash:
            raise ValueError(f"requirements: {sorted(clash)} both allowed and excluded")
        return self

    @property
    def method(self) -> Literal["full", "lora"]:
        """The effective training method (``full`` unless fine-tuning or told otherwise)."""
        if self.training_method is not None:
            return self.training_method
        return "lora" if self.kind is TaskKind.FINE_TUNE else "full"


def _all_finite(value: JsonValue | None) -> bool:
    stack: list[JsonValue | None] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class SpecError(ValueError):
    """A spec failed validation; ``errors`` lists ``(field, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        """Build from ``(field path, message)`` pairs."""
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in errors))


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def parse_spec(data: str | bytes | dict[str, Any]) -> TaskSpec:
    """Validate JSON text or a decoded object into a TaskSpec.

    Raises:
        SpecError: malformed JSON or any invalid field; the message names each field.

    """
    try:
        if isinstance(data, dict):
            return TaskSpec.model_validate(data)
        return TaskSpec.model_validate_json(data)
    except ValidationError as exc:
        raise SpecError(_errors(exc)) from None


def spec_json(spec: TaskSpec) -> str:
    """Canonical JSON for a spec (no defaults dropped, stable key order)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

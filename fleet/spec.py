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
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.catalog import accelerator_names, default_catalog

MAX_TOKENS = 10**13  # larger than any real training run (Llama 3: 1.5e13 is the order)
# Input integers beyond 64 bits are not portable JSON, and past 4,300 digits Python cannot
# even print them (so a spec holding one could be validated but never sent).
MAX_INPUT_INT = 2**64
MAX_INPUT_DEPTH = 64  # nesting of ``input``; deeper breaks JSON encoders' recursion limits
MAX_ERRORS_SHOWN = 20  # a SpecError lists at most this many fields, then a count
_MAX_LOC_CHARS = 200
_MAX_MSG_CHARS = 300

# Numbers are strict: ``true`` or ``"8"`` is not a parameter count (a float field still
# takes a JSON integer).
_Number = Annotated[float, Strict()]
_Count = Annotated[int, Strict()]


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
    params_b: Annotated[_Number, Field(gt=0, le=100_000, description="billions of parameters")]
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
    api_pools = {o.accelerator for o in default_catalog().apis}
    for name in names:
        if name not in known and name not in api_pools:
            close = closest_accelerators(name)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown accelerator {name!r}{hint} (valid: {', '.join(sorted(known))};"
                " or an API pool api-<provider>)"
            )
    return names


class Requirements(BaseModel):
    """Hard constraints on where a task may run. Empty means no constraint.

    ``accelerators`` and ``exclude`` also take API pools (``api-groq``).
    ``external_apis`` False keeps the task off every external (third-party) API pool;
    a self-hosted OpenAI-compatible endpoint is still allowed. ``residency`` lists the
    places the data may go (``us``, ``eu``, ``self``, ...; empty: anywhere): API offers
    match on their ``residency``, cloud offers on their region's jurisdiction
    (``fleet.catalog.apis.jurisdiction``).
    """

    model_config = _STRICT

    accelerators: tuple[str, ...] = Field(default=(), description="allowed families; empty: any")
    exclude: tuple[str, ...] = ()
    runtimes: tuple[Runtime, ...] = ()
    clouds: tuple[Literal["aws", "gcp", "azure"], ...] = ()
    markets: tuple[Literal["on_demand", "spot"], ...] = ()
    min_accelerator_memory_gb: Annotated[_Number, Field(gt=0, le=100_000)] | None = None
    external_apis: Annotated[bool, Strict()] = True
    residency: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")], ...] = ()

    _valid_accelerators = field_validator("accelerators", "exclude")(_check_accelerators)


class SLO(BaseModel):
    """Service goals.

    ``deadline_s`` counts from submission to the end of the task. ``tpot_ms`` is the time
    per output token a generation stream must keep (inference and batch only): placement
    and the planner size a server's batch so that each stream decodes at least that fast,
    the simulator counts a task that misses it as an SLO miss, and real engines report the
    time per output token they measured beside it.
    """

    model_config = _STRICT

    deadline_s: Annotated[_Number, Field(gt=0, le=365 * 86400)] | None = None
    tpot_ms: Annotated[_Number, Field(gt=0, le=60_000)] | None = None


class Budget(BaseModel):
    """Spending cap for one task, in US dollars."""

    model_config = _STRICT

    max_usd: Annotated[_Number, Field(gt=0, le=10**7)] | None = None


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
    tokens_in: Annotated[_Count, Field(ge=0, le=MAX_TOKENS)] = 0
    tokens_out: Annotated[_Count, Field(ge=0, le=MAX_TOKENS)] = 0
    requirements: Requirements = Requirements()
    slo: SLO = SLO()
    budget: Budget = Budget()
    priority: Annotated[_Count, Field(ge=0, le=9)] = 0
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    training_method: Literal["full", "lora"] | None = None
    sensitive: Annotated[bool, Strict()] = Field(
        default=False,
        description="the input is confidential: kept out of logs, task reprs and stored errors",
    )

    @field_validator("input")
    @classmethod
    def _finite(cls, value: JsonValue | None) -> JsonValue | None:
        problem = _json_problem(value)
        if problem:
            raise ValueError(problem)
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
        if self.slo.tpot_ms is not None and self.kind not in (TaskKind.INFERENCE, TaskKind.BATCH):
            raise ValueError(
                f"slo.tpot_ms: time per output token applies to inference and batch, not {self.kind}"
            )
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


def _json_problem(value: JsonValue | None) -> str | None:
    """Why ``value`` is not portable JSON (non-finite, huge integer, too deep), or None."""
    stack: list[tuple[JsonValue | None, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return "NaN and infinite numbers are not JSON"
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= MAX_INPUT_INT:
            return "integers must be smaller than 2**64 in magnitude"
        if isinstance(item, dict | list):
            if depth >= MAX_INPUT_DEPTH:
                return f"nested deeper than {MAX_INPUT_DEPTH} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


class SpecError(ValueError):
    """A spec failed validation; ``errors`` lists ``(field, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        """Build from ``(field path, message)`` pairs."""
        self.errors = errors
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in errors))


class SpecTooLargeError(SpecError):
    """A valid spec whose serialized size is over the configured cap (``FLEET_MAX_TASK_BYTES``)."""

    def __init__(self, size: int, limit: int) -> None:
        """Build from the spec's serialized size and the limit, both in bytes."""
        self.size = size
        self.limit = limit
        message = f"spec is {size:,} bytes serialized; the limit is {limit:,} bytes"
        super().__init__([("", f"{message} (FLEET_MAX_TASK_BYTES)")])


def spec_size(spec: TaskSpec) -> int:
    """Bytes of the spec's JSON serialization (the bulk of its message body)."""
    return len(TaskSpec.__pydantic_serializer__.to_json(spec))


def check_size(spec: TaskSpec, limit: int) -> None:
    """Refuse a spec over ``limit`` bytes serialized.

    Raises:
        SpecTooLargeError: naming the size and the limit.

    """
    size = spec_size(spec)
    if size > limit:
        raise SpecTooLargeError(size, limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` pairs, bounded: hostile input cannot make the error huge."""
    out = []
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = _clip(".".join(str(p) for p in err["loc"]), _MAX_LOC_CHARS)
        msg = _clip(err["msg"].removeprefix("Value error, "), _MAX_MSG_CHARS)
        out.append((loc, msg))
    if len(errors) > MAX_ERRORS_SHOWN:
        out.append(("", f"... and {len(errors) - MAX_ERRORS_SHOWN:,} more errors"))
    return out


def parse_spec(data: str | bytes | dict[str, Any]) -> TaskSpec:
    """Validate JSON text or a decoded object into a TaskSpec.

    Contract (fuzzed in ``tests/unit/test_fuzz_spec.py``): whatever ``data`` is, this
    returns a TaskSpec or raises SpecError, never another exception; the error names the
    field where there is one and stays short (at most ``MAX_ERRORS_SHOWN`` fields, each
    clipped) whatever the input's size.

    Raises:
        SpecError: malformed JSON, a value that is not an object, or any invalid field.

    """
    try:
        if isinstance(data, dict):
            return TaskSpec.model_validate(data)
        if isinstance(data, str | bytes | bytearray):
            return TaskSpec.model_validate_json(data)
    except ValidationError as exc:
        raise SpecError(_errors(exc)) from None
    except RecursionError:  # a Python object nested past the interpreter's limit
        raise SpecError([("", "nested too deeply")]) from None
    raise SpecError([("", f"a spec is a JSON object, not {type(data).__name__}")])


def spec_json(spec: TaskSpec) -> str:
    """Canonical JSON for a spec (no defaults dropped, stable key order)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

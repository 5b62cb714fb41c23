"""Fuzzing ``parse_spec``: whatever arrives, a TaskSpec or a short SpecError naming the field.

The contract under test (``fleet.spec.parse_spec``): any input (JSON values of any shape,
arbitrary bytes and text, malformed JSON, wrong types, huge, negative or non-finite numbers,
unknown fields, deep nesting, oversized payloads) yields a TaskSpec or raises SpecError,
never another exception; an error names the offending field where there is one and stays
bounded in size; and any spec it accepts can be serialized again (so it can be sent).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet.settings import DEFAULT_MAX_TASK_BYTES
from fleet.spec import (
    MAX_INPUT_DEPTH,
    SpecError,
    SpecTooLargeError,
    TaskSpec,
    check_size,
    parse_spec,
    spec_json,
    spec_size,
)
from tests.faults import FaultLedger

pytestmark = pytest.mark.fault

# hypothesis and a function-scoped fixture: the fixture holds no per-example state.
fuzz = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def inject(faults: FaultLedger) -> Callable[[str], None]:
    """``faults.inject`` once per fault class and test, however many examples hypothesis runs."""
    done: set[str] = set()

    def _inject(name: str) -> None:
        if name not in done:
            done.add(name)
            faults.inject(name)

    return _inject


VALID: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
    "input": {"prompt": "hello"},
    "tokens_in": 10,
    "tokens_out": 5,
    "requirements": {"accelerators": ["nvidia-l4"]},
    "slo": {"deadline_s": 60},
    "budget": {"max_usd": 1.0},
    "priority": 3,
}
ERROR_BOUND = 20 * 520 + 100  # MAX_ERRORS_SHOWN fields x (clipped field + message) + a count

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def outcome(data: Any) -> TaskSpec | SpecError:
    """parse_spec's result or its SpecError; any other exception fails the test."""
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        error = exc
    else:
        spec_json(spec)  # an accepted spec can always be serialized again
        return spec
    assert error.errors, "a SpecError lists at least one problem"
    assert len(str(error)) <= ERROR_BOUND, "errors stay short whatever the input"
    return error


def field_named(exc: TaskSpec | SpecError, field: str) -> bool:
    """True when ``exc`` is a SpecError naming ``field`` (or a field inside it)."""
    return isinstance(exc, SpecError) and any(
        f == field or f.startswith(f"{field}.") for f, _ in exc.errors
    )


def with_path(path: str, value: Any) -> dict[str, Any]:
    """VALID with the value at dotted ``path`` replaced."""
    data = json.loads(json.dumps(VALID))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


FIELDS = [
    "kind",
    "model",
    "model.name",
    "model.params_b",
    "model.dtype",
    "input",
    "input_uri",
    "tokens_in",
    "tokens_out",
    "requirements",
    "requirements.accelerators",
    "requirements.min_accelerator_memory_gb",
    "slo.deadline_s",
    "budget.max_usd",
    "priority",
    "idempotency_key",
    "training_method",
    "sensitive",
]
NUMERIC = [
    "model.params_b",
    "tokens_in",
    "tokens_out",
    "requirements.min_accelerator_memory_gb",
    "slo.deadline_s",
    "budget.max_usd",
    "priority",
]


@fuzz
@given(value=json_values)
def test_any_json_value_gives_a_spec_or_a_spec_error(
    inject: Callable[[str], None], value: Any
) -> None:
    """Any JSON value, as a Python object or as JSON text, gives a TaskSpec or a SpecError."""
    inject("malformed spec")
    outcome(value)
    try:
        text = json.dumps(value)  # NaN/Infinity come out as the non-standard tokens
    except ValueError:  # integers too long for Python to print
        return
    outcome(text)
    outcome(text.encode())


@fuzz
@given(raw=st.binary(max_size=200) | st.text(max_size=200))
@example(raw=b"\xff\xfe{")
@example(raw='{"kind": "inference", "model": {"name": "\ud800", "params_b": 1}}')
@example(raw='{"kind": "inference"')
@example(raw='{"kind": "inference", "model": {"name": "m", "params_b": NaN}}')
@example(raw="[" * 10_000)
def test_arbitrary_bytes_and_text_are_spec_errors(
    inject: Callable[[str], None], raw: bytes | str
) -> None:
    """Random bytes, lone surrogates, truncated JSON and NaN tokens are SpecErrors, not crashes."""
    inject("malformed spec")
    assert isinstance(outcome(raw), SpecError)


@fuzz
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_value_in_any_field_names_that_field(
    inject: Callable[[str], None],
    field: str,
    value: Any,
) -> None:
    """Replacing one field of a valid spec with anything: accepted, or an error naming it."""
    inject("wrong type")
    result = outcome(with_path(field, value))
    if isinstance(result, SpecError):
        # The model check may blame a neighbour (kind/tokens consistency); a type error never.
        assert field_named(result, field) or all(f == "" for f, _ in result.errors), result.errors


@fuzz
@given(
    field=st.sampled_from(NUMERIC),
    value=st.sampled_from(
        [10**30, -1, -(10**30), math.nan, math.inf, -math.inf, True, "8", [8], {"n": 8}, 10**5000]
    ),
)
def test_huge_negative_nan_and_mistyped_numbers_are_refused(
    inject: Callable[[str], None],
    field: str,
    value: Any,
) -> None:
    """Numbers out of range, non-finite, booleans and numeric strings are refused, naming the field."""
    inject("bad number")
    assert field_named(outcome(with_path(field, value)), field)


@fuzz
@given(
    where=st.sampled_from(["", "model", "requirements", "slo", "budget"]),
    name=st.text(min_size=1, max_size=20),
)
def test_unknown_fields_are_refused_by_name(
    inject: Callable[[str], None], where: str, name: str
) -> None:
    """An unknown field at any level is refused and named."""
    inject("unknown field")
    data = json.loads(json.dumps(VALID))
    node = data[where] if where else data
    if name in node:
        return
    node[name] = 1
    result = outcome(data)
    expected = f"{where}.{name}" if where else name
    assert isinstance(result, SpecError)
    assert any(f == expected or f.startswith(expected[:190]) for f, _ in result.errors)


@pytest.mark.parametrize("depth", [MAX_INPUT_DEPTH + 1, 1_000, 100_000])
def test_deeply_nested_input_is_refused(faults: FaultLedger, depth: int) -> None:
    """Input nested past the limit is refused, as an object and as JSON text, with a short error."""
    faults.inject("deep nesting")
    nested: Any = []
    for _ in range(depth):
        nested = [nested]
    assert field_named(outcome(with_path("input", nested)), "input")
    text = '{"kind": "inference", "model": {"name": "m", "params_b": 1}, "input": '
    assert isinstance(outcome(text + "[" * depth + "]" * depth + "}"), SpecError)


def test_input_nested_to_the_limit_is_accepted() -> None:
    """The depth cap is not tighter than documented: MAX_INPUT_DEPTH levels are fine."""
    nested: Any = "leaf"
    for _ in range(MAX_INPUT_DEPTH):
        nested = [nested]
    assert isinstance(outcome(with_path("input", nested)), TaskSpec)


@pytest.mark.parametrize("value", [2**64, -(2**64), 10**5000], ids=["2^64", "-2^64", "10^5000"])
def test_integers_beyond_64_bits_in_input_are_refused(faults: FaultLedger, value: int) -> None:
    """A huge integer in input would validate but never serialize: it is refused up front."""
    faults.inject("bad number")
    result = outcome(with_path("input", {"n": value}))
    assert field_named(result, "input")
    assert "2**64" in str(result)


def test_many_bad_fields_give_a_bounded_error(faults: FaultLedger) -> None:
    """Ten thousand unknown fields: the error lists twenty and counts the rest."""
    faults.inject("unknown field")
    data = {**VALID, **{f"x{i}": i for i in range(10_000)}}
    result = outcome(data)
    assert isinstance(result, SpecError)
    assert "more errors" in str(result)


def test_a_huge_unknown_accelerator_name_is_clipped(faults: FaultLedger) -> None:
    """A megabyte of accelerator name is not echoed back in full."""
    faults.inject("oversized payload")
    result = outcome(with_path("requirements.accelerators", ["x" * 1_000_000]))
    assert field_named(result, "requirements.accelerators")
    assert len(str(result)) < 1_000


@pytest.mark.parametrize("value", [None, 3, 2.5, [VALID], "null", b"[]", True])
def test_a_spec_that_is_not_an_object_is_refused(faults: FaultLedger, value: object) -> None:
    """Lists, numbers, null and other non-objects are SpecErrors that say what was expected."""
    faults.inject("malformed spec")
    result = outcome(value)
    assert isinstance(result, SpecError)
    assert "object" in str(result)


def test_oversized_spec_is_refused_naming_size_and_limit(faults: FaultLedger) -> None:
    """A valid spec over the cap fails check_size with its size and the limit in the message."""
    faults.inject("oversized payload")
    spec = parse_spec(with_path("input", {"prompt": "x" * DEFAULT_MAX_TASK_BYTES}))
    size = spec_size(spec)
    assert size > DEFAULT_MAX_TASK_BYTES
    with pytest.raises(SpecTooLargeError) as info:
        check_size(spec, DEFAULT_MAX_TASK_BYTES)
    assert f"{size:,}" in str(info.value)
    assert f"{DEFAULT_MAX_TASK_BYTES:,}" in str(info.value)
    assert isinstance(info.value, SpecError)  # callers that handle SpecError handle this


def test_spec_size_is_the_serialized_size_and_the_cap_is_inclusive() -> None:
    """spec_size matches the JSON's length; a spec exactly at the limit passes."""
    spec = parse_spec(VALID)
    size = spec_size(spec)
    assert size == len(spec.model_dump_json().encode())
    check_size(spec, size)
    with pytest.raises(SpecTooLargeError):
        check_size(spec, size - 1)


def test_sensitive_is_a_strict_boolean() -> None:
    """``sensitive`` defaults to False and takes only a JSON boolean."""
    assert parse_spec(VALID).sensitive is False
    assert parse_spec({**VALID, "sensitive": True}).sensitive is True
    for bad in ("true", 1, None):
        assert field_named(outcome({**VALID, "sensitive": bad}), "sensitive")

"""Task input shared by the real engines: one validation of a generation request (pure).

Input ``{"prompt": str, "seed"?: int, "temperature"?: 0-5}`` (and, where an engine serves
adapters, ``"adapter"``); temperature 0, the default, is greedy; ``seed`` defaults to the
CRC-32 of the task id; ``spec.tokens_out`` (default ``DEFAULT_TOKENS``) tokens are generated.
Bad input raises ``HandlerError`` naming the field, like the reference handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.handlers import (
    MAX_TEXT_CHARS,
    HandlerError,
    describe,
    get_float,
    get_int,
    input_object,
    stable_hash,
)

if TYPE_CHECKING:
    from pydantic import JsonValue

    from fleet.spec import TaskSpec

DEFAULT_TOKENS = 32
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**63 - 1
GENERATION_KEYS = ("prompt", "seed", "temperature")


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """An inference task's validated input (``adapter`` unchecked: the engine loads it)."""

    prompt: str
    temperature: float
    seed: int
    max_tokens: int
    adapter: JsonValue | None = None


def plan_generation(spec: TaskSpec, task_id: str, *, adapters: bool = False) -> GenerationPlan:
    """Validate an inference task's input; ``adapters`` allows ``input.adapter``.

    Raises:
        HandlerError: a field is missing, unknown, of the wrong type or out of bounds.

    """
    data = input_object(spec, (*GENERATION_KEYS, *(["adapter"] if adapters else [])))
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise HandlerError(f"input.prompt: expected a non-empty string, got {describe(prompt)}")
    if len(prompt) > MAX_TEXT_CHARS:
        raise HandlerError(
            f"input.prompt: at most {MAX_TEXT_CHARS:,} characters, got {len(prompt):,}"
        )
    return GenerationPlan(
        prompt=prompt,
        temperature=get_float(data, "temperature", 0.0, 0.0, MAX_TEMPERATURE),
        seed=get_int(data, "seed", stable_hash(task_id), 0, MAX_SEED),
        max_tokens=spec.tokens_out or DEFAULT_TOKENS,
        adapter=data.get("adapter"),
    )

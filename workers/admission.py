"""Who may run a delivery: the at-most-once guard's policy and its pure decision table.

``admit`` makes one store step (``ExecutionStore.try_claim``) and ``decide`` turns what it
saw into a ``Verdict`` (the table is in ``workers.once``'s docstring); ``OncePolicy`` holds
the knobs and ``backoff_s`` the retry schedule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.execution import ClaimOutcome, ExecutionStore, StatusRecord

__all__ = ["Admission", "OncePolicy", "Verdict", "admit", "backoff_s", "decide"]

BACKOFF_CAP_S = 900.0
DEFAULT_CLAIM_TTL_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class OncePolicy:
    """Knobs, from ``FLEET_CLAIM_TTL_S`` (60), ``FLEET_MAX_ATTEMPTS`` (3), ``FLEET_RETRY_BACKOFF_S`` (30)."""

    claim_ttl_s: float = DEFAULT_CLAIM_TTL_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OncePolicy:
        """Read the variables (``env`` defaults to ``os.environ``).

        Raises:
            ValueError: a value is not a positive number.

        """
        env = os.environ if env is None else env
        policy = cls(
            claim_ttl_s=float(env.get("FLEET_CLAIM_TTL_S") or DEFAULT_CLAIM_TTL_S),
            max_attempts=int(env.get("FLEET_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS),
            backoff_s=float(env.get("FLEET_RETRY_BACKOFF_S") or DEFAULT_BACKOFF_S),
        )
        if policy.claim_ttl_s <= 0 or policy.max_attempts < 1 or policy.backoff_s < 0:
            raise ValueError(f"invalid retry/claim settings: {policy}")
        return policy


def backoff_s(policy: OncePolicy, attempt: int) -> float:
    """Seconds before retrying after failed attempt number ``attempt`` (1-based)."""
    return float(min(BACKOFF_CAP_S, policy.backoff_s * 2 ** max(0, attempt - 1)))


class Verdict(StrEnum):
    """What a delivery does (see the module docstring)."""

    RUN = "run"
    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead-letter"
    ALREADY_DEAD = "already-dead"


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict and what goes with it.

    ``attempt``: this attempt's number (RUN) or the attempts made (DEAD_LETTER);
    ``result``: the recorded result (COMPLETED); ``wait_s``: when to look again
    (DUPLICATE); ``entry``: the dead-letter entry (ALREADY_DEAD); ``last_error``: the
    last recorded error (DEAD_LETTER).
    """

    verdict: Verdict
    attempt: int = 0
    result: dict[str, Any] | None = None
    wait_s: float = 0.0
    entry: dict[str, Any] | None = None
    last_error: str | None = None


def decide(seen: ClaimOutcome, *, ttl_s: float, max_attempts: int) -> Admission:
    """The verdict for what one admission step saw (pure; the table of the module docstring).

    * a recorded result: COMPLETED, with the result;
    * another live claim with ``left`` seconds to go: DUPLICATE, look again in ``left``
      (``ttl_s`` when the store could not say);
    * a dead-letter entry: ALREADY_DEAD, with the entry;
    * claimed, attempt ``n <= max_attempts``: RUN attempt ``n``;
    * claimed, attempt ``n > max_attempts``: DEAD_LETTER after ``n - 1`` attempts, with
      the last recorded error.
    """
    match seen.seen:
        case "done":
            return Admission(Verdict.COMPLETED, result=seen.result)
        case "held":
            wait = ttl_s if seen.claim_left_s is None else seen.claim_left_s
            return Admission(Verdict.DUPLICATE, wait_s=wait)
        case "dead":
            return Admission(Verdict.ALREADY_DEAD, entry=seen.entry)
        case "claimed" if seen.attempt > max_attempts:
            return Admission(
                Verdict.DEAD_LETTER, attempt=seen.attempt - 1, last_error=seen.last_error
            )
        case _:
            return Admission(Verdict.RUN, attempt=seen.attempt)


def admit(
    store: ExecutionStore,
    task_id: str,
    holder: str,
    *,
    ttl_s: float,
    max_attempts: int,
    started: StatusRecord | None = None,
) -> Admission:
    """Count this delivery of ``task_id`` and decide what it does, in one atomic store step.

    On RUN and DEAD_LETTER ``holder`` holds the claim (TTL ``ttl_s``) and one attempt was
    counted; on every other verdict it holds nothing. Because the step is atomic, a
    result recorded by ``finish`` (which records, then releases) is always seen by a
    delivery that wins the claim after that release. ``started`` (Celery's STARTED
    record) is written in the same step on RUN only.

    Raises:
        redis.RedisError: the store is unreachable (nothing was decided).

    """
    seen = store.try_claim(task_id, holder, ttl_s, max_attempts, started)
    return decide(seen, ttl_s=ttl_s, max_attempts=max_attempts)

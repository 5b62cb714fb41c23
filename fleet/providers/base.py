"""The provider contract: launch with an idempotency token, terminate, list by fleet tag.

Every provider (fake, local, aws, gcp, azure) keeps these promises, and the contract
suite in ``tests/contract`` holds each to them:

* **Idempotent by token.** ``launch`` with a token that already launched an instance
  returns that instance and creates nothing new, whether or not the first call's answer
  was received (a timed-out call retried with the same token leaves one instance).
* **Tagged.** Every instance carries the fleet tags (``fleet``, ``fleet-pool``,
  ``fleet-accelerator``, ``fleet-token``); ``list`` returns exactly the instances that
  carry our fleet tag, including ones whose pool is unknown to the current config
  (orphans the actuator cleans up).
* **Eventually consistent.** ``list`` may lag a launch or a termination by a while;
  callers re-check.
* **Errors are data.** A failed call returns a ``ProviderError`` with a kind from the
  shared taxonomy (capacity, quota, throttled, unsupported, auth, other); providers never
  raise through the planner. Throttling is retried inside the provider with the SDK's
  own retry mode before it is reported.
* **Terminate is idempotent.** Terminating an instance that is gone is not an error.
* **No secrets** in tags, user data, logs or error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fleet.autoscaler.model import Instance, OfferRef, ProviderError

FLEET_TAG = "fleet"
POOL_TAG = "fleet-pool"
ACCELERATOR_TAG = "fleet-accelerator"
TOKEN_TAG = "fleet-token"  # noqa: S105 - a tag name (the launch idempotency token), not a secret


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """What to start: one instance of ``offer`` for ``pool``, identified by ``token``.

    ``env`` is what the instance's worker needs beyond its secrets (queue namespace,
    accelerator, devices); the broker URL is fetched by the instance from the cloud's
    secret store, never passed here.
    """

    pool: str
    accelerator: str
    offer: OfferRef
    token: str
    devices: int
    usd_per_hour: float
    fleet_name: str = "fleet"
    env: Mapping[str, str] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        """The tags every launched instance carries."""
        return {
            FLEET_TAG: self.fleet_name,
            POOL_TAG: self.pool,
            ACCELERATOR_TAG: self.accelerator,
            TOKEN_TAG: self.token,
        }


@dataclass(frozen=True, slots=True)
class LaunchResult:
    """Either the instance (new, or the one this token already made) or an error."""

    instance: Instance | None = None
    error: ProviderError | None = None


class Provider(Protocol):
    """Buys and releases instances on one cloud (or locally). See the module contract."""

    name: str

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Start one instance, idempotently by ``request.token``."""
        ...

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """Stop an instance; None on success or if it is already gone."""
        ...

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every instance carrying our fleet tag."""
        ...

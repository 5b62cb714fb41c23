"""The contract harness for ``AzureProvider``, over the local HTTPS ARM fake.

``tags_of`` returns the fleet's own tags: the provider's bookkeeping tags
(``fleet-usd-per-hour``, ``fleet-devices``) are left out, so the contract's exact tag check
holds; ``tests/integration/test_azure_provider.py`` checks those separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessToken
from azure.mgmt.compute import ComputeManagementClient

from fleet.autoscaler.model import ErrorKind, OfferRef
from fleet.providers.azure import DEVICES_TAG, PRICE_TAG, AzureProvider
from fleet.providers.base import LaunchRequest
from tests.contract.conftest import Harness, make_request
from tests.fakes.arm_server import ArmFake, arm_server

AZURE_OFFER = OfferRef("azure", "eastus", "Standard_NC24ads_A100_v4", "spot")
SUBNET = (
    "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
)


class FakeCredential:
    """A TokenCredential that hands out a fixed token valid for a day."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:  # noqa: ARG002
        """The fixed token, whatever the scopes."""
        return AccessToken("fake", int((datetime.now(UTC) + timedelta(days=1)).timestamp()))


def make_client(fake: ArmFake) -> ComputeManagementClient:
    """A real SDK client on the fake: no LRO sleeps, near-zero retry backoff."""
    return ComputeManagementClient(
        credential=FakeCredential(),
        subscription_id="sub",
        base_url=fake.base_url,
        connection_verify=fake.ca_path,
        polling_interval=0,
        retry_backoff_factor=0.01,
    )


def make_provider(fake: ArmFake, **kwargs: Any) -> AzureProvider:
    """An ``AzureProvider`` in resource group ``rg``, eastus, on the fake."""
    return AzureProvider(
        "sub", "rg", "eastus", subnet_id=SUBNET, client=make_client(fake), **kwargs
    )


@contextlib.contextmanager
def azure_harness(tmp_path: Path, fake: ArmFake | None = None) -> Iterator[Harness]:
    """A contract harness on a fresh fake (or ``fake``), shut down on exit."""
    with contextlib.ExitStack() as stack:
        arm = fake if fake is not None else stack.enter_context(arm_server())

        def tags_of(instance_id: str) -> dict[str, str]:
            tags = arm.tags(instance_id)
            return {k: v for k, v in tags.items() if k not in {PRICE_TAG, DEVICES_TAG}}

        def failing() -> LaunchRequest:
            arm.fail_put("AllocationFailed", 409)
            return dataclasses.replace(make_request(), offer=AZURE_OFFER)

        yield Harness(
            kind="azure",
            provider=make_provider(arm),
            reopen=lambda: make_provider(arm),
            tags_of=tags_of,
            failing_request=failing,
            expected_error_kind=ErrorKind.CAPACITY,
            patience_s=5.0,
            state_dir=None,
            offer=AZURE_OFFER,
        )

"""The GCP provider's contract harness: ``GcpProvider`` on REST against the local GCE fake.

``gcp_env`` yields the fake and the harness together (for GCP-only tests that inject
faults); ``gcp_harness`` yields the harness alone, as the shared suite needs it. The
client's zone-operations client (which ``ExtendedOperation`` polls, and which the library
builds with the default endpoint) is replaced by one aimed at the fake too, so operations
that start RUNNING are polled there, never on the real API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from fleet.autoscaler.model import ErrorKind, OfferRef
from fleet.providers.base import ACCELERATOR_TAG, FLEET_TAG, POOL_TAG, TOKEN_TAG, LaunchRequest
from fleet.providers.gcp import GcpProvider
from tests.contract.conftest import Harness, make_request
from tests.fakes.gce_server import GceFake, gce_server

PROJECT = "fleet-test"
ZONE = "us-central1-a"
GCP_OFFER = OfferRef("gcp", ZONE, "g2-standard-12", "on_demand")


def anonymous() -> AnonymousCredentials:
    """Credentials that sign nothing (the fake checks none)."""
    return AnonymousCredentials()  # type: ignore[no-untyped-call] # google-auth lacks the annotation


def instances_client(fake: GceFake) -> compute_v1.InstancesClient:
    """An ``InstancesClient`` on REST with anonymous credentials, aimed at ``fake``."""
    options = {"api_endpoint": fake.base_url}
    client = compute_v1.InstancesClient(
        transport="rest", client_options=options, credentials=anonymous()
    )
    client._transport._extended_operations_services["zone_operations"] = (
        compute_v1.ZoneOperationsClient(
            transport="rest", client_options=options, credentials=anonymous()
        )
    )
    return client


def gcp_provider(
    fake: GceFake, *, operation_timeout_s: float = 10.0, retry_timeout_s: float = 3.0
) -> GcpProvider:
    """A provider on ``fake`` with short waits (tests), over the fake's shared state."""
    return GcpProvider(
        PROJECT,
        ZONE,
        client=instances_client(fake),
        startup_script="#!/bin/sh\necho fleet\n",
        operation_timeout_s=operation_timeout_s,
        retry_timeout_s=retry_timeout_s,
    )


@contextmanager
def gcp_env(tmp_path: Path) -> Iterator[tuple[GceFake, Harness]]:
    """The running fake and a harness over it; the server is shut down on exit.

    ``tmp_path`` is unused: the fake's state is in memory, shared by reopened providers.
    """
    with gce_server() as fake:

        def tags_of(instance_id: str) -> dict[str, str]:
            meta = fake.metadata(instance_id)
            return {k: meta[k] for k in (FLEET_TAG, POOL_TAG, ACCELERATOR_TAG, TOKEN_TAG)}

        def failing() -> LaunchRequest:
            fake.insert_errors.append(
                (
                    "ZONE_RESOURCE_POOL_EXHAUSTED",
                    f"The zone 'projects/{PROJECT}/zones/{ZONE}' does not have enough resources",
                    503,
                )
            )
            return make_request()

        yield (
            fake,
            Harness(
                kind="gcp",
                provider=gcp_provider(fake),
                reopen=lambda: gcp_provider(fake),
                tags_of=tags_of,
                failing_request=failing,
                expected_error_kind=ErrorKind.CAPACITY,
                patience_s=5.0,
                state_dir=None,
                offer=GCP_OFFER,
            ),
        )


@contextmanager
def gcp_harness(tmp_path: Path) -> Iterator[Harness]:
    """The harness the shared contract suite runs against (see ``gcp_env``)."""
    with gcp_env(tmp_path) as (_, harness):
        yield harness

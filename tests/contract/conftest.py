"""Fixtures: one harness per provider (fake, local) so one suite holds both to the contract.

The local provider's instances are real worker processes, so its harness needs a real
Redis (``tests.integration.brokers.redis_url``: the machine's, else a private
``redis-server``; a missing one fails under ``CI=true``) and always terminates every
instance in teardown.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.autoscaler.model import ErrorKind, Instance, OfferRef, ProviderError
from fleet.providers.base import LaunchRequest, Provider
from fleet.providers.fake import FakeProvider
from fleet.providers.local import LocalProvider
from tests.integration.brokers import redis_url

OFFER = OfferRef(cloud="aws", region="us-east-1", instance_type="c7i.large", market="spot")
# Never written by the local provider: the contract suite checks its state files for it.
SECRET_VALUE = "s3cret-value-never-on-disk"  # noqa: S105 - a canary, not a credential


def make_request(
    token: str | None = None, *, accelerator: str = "cpu", pool: str = "cpu-pool"
) -> LaunchRequest:
    """A launch request for one cpu instance with a fresh (or the given) token."""
    return LaunchRequest(
        pool=pool,
        accelerator=accelerator,
        offer=OFFER,
        token=token or f"tok-{uuid.uuid4().hex[:12]}",
        devices=1,
        usd_per_hour=0.05,
    )


@dataclass
class Harness:
    """A provider under test plus what the suite needs to check it from outside."""

    kind: str
    provider: Provider
    reopen: Callable[[], Provider]  # a new provider object over the same state
    tags_of: Callable[[str], dict[str, str]]  # the tags recorded for an instance
    failing_request: Callable[[], LaunchRequest]  # a launch that must fail, as data
    expected_error_kind: ErrorKind | None  # None: the provider may pick the kind
    patience_s: float  # how long ``list`` may lag
    env: dict[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    offer: OfferRef = OFFER  # what make_request asks for while this harness runs

    def list_until(
        self, predicate: Callable[[list[Instance]], bool], provider: Provider | None = None
    ) -> list[Instance]:
        """List until ``predicate`` holds (or patience runs out); the last listing."""
        p = provider or self.provider
        deadline = time.monotonic() + self.patience_s
        tries = 0
        while True:
            listed = p.list_instances(time.time())
            assert not isinstance(listed, ProviderError), listed
            tries += 1
            if predicate(listed) or (time.monotonic() > deadline and tries >= 3):
                return listed
            if self.kind != "fake":
                time.sleep(0.2)


@pytest.fixture(scope="session")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Env for local workers: a real Redis with an empty database, artifacts in tmp."""
    with redis_url() as url:
        yield {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path_factory.mktemp("artifacts")),
            "FLEET_TEST_SECRET": SECRET_VALUE,
        }


def _fake_harness() -> Harness:
    fake = FakeProvider()

    def failing() -> LaunchRequest:
        req = make_request()
        fake.fail_offers[req.offer.key] = ErrorKind.CAPACITY
        return req

    return Harness(
        kind="fake",
        provider=fake,
        reopen=lambda: fake,  # the fake's state is the object: "restart" keeps it
        tags_of=fake.tags,
        failing_request=failing,
        expected_error_kind=ErrorKind.CAPACITY,
        patience_s=0.0,
    )


def _local_harness(env: dict[str, str], state_dir: Path, log_dir: Path) -> Harness:
    local = LocalProvider(env, state_dir, log_dir, stop_timeout_s=30.0)

    def tags_of(instance_id: str) -> dict[str, str]:
        data = json.loads((state_dir / f"{instance_id}.json").read_text())
        return dict(data["tags"])

    return Harness(
        kind="local",
        provider=local,
        reopen=lambda: LocalProvider(env, state_dir, log_dir),
        tags_of=tags_of,
        failing_request=lambda: make_request(accelerator="not-a-chip"),
        expected_error_kind=None,
        patience_s=20.0,
        env=env,
        state_dir=state_dir,
    )


@pytest.fixture(params=["fake", pytest.param("local", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """Each contract test runs once per provider: the in-memory fake and local processes."""
    if request.param == "fake":
        yield _fake_harness()
        return
    env: dict[str, str] = request.getfixturevalue("local_env")
    h = _local_harness(env, tmp_path / "state", tmp_path / "logs")
    assert isinstance(h.provider, LocalProvider)
    try:
        yield h
    finally:
        errors = h.provider.terminate_all(time.time())
        assert errors == [], errors


@pytest.fixture
def provider(harness: Harness) -> Provider:
    """The provider under test (fake, then local)."""
    return harness.provider

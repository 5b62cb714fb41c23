"""Fixtures: a real broker (Redis, then RabbitMQ), a client, and real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from fleet.app import create_app
from fleet.client import Fleet
from fleet.settings import Settings
from tests.integration.brokers import rabbitmq_namespace, redis_url

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Broker:
    """One broker under test: its settings, the env for worker processes, a client app."""

    kind: str
    settings: Settings
    env: dict[str, str]
    app: Celery


@pytest.fixture(scope="session", params=["redis", "rabbitmq"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    """A real broker; every test using it runs on Redis and again on RabbitMQ."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    if request.param == "redis":
        with redis_url() as url:
            env = {
                "FLEET_BROKER_URL": url,
                "FLEET_RESULT_BACKEND": url,
                "FLEET_NAMESPACE": "",
                "FLEET_ARTIFACT_DIR": str(artifacts),
            }
            settings = Settings.from_env(env)
            yield Broker("redis", settings, env, create_app(settings))
    else:
        with rabbitmq_namespace() as (url, namespace):
            env = {
                "FLEET_BROKER_URL": url,
                "FLEET_RESULT_BACKEND": "rpc://",
                "FLEET_NAMESPACE": namespace,
                "FLEET_ARTIFACT_DIR": str(artifacts),
            }
            settings = Settings.from_env(env)
            yield Broker("rabbitmq", settings, env, create_app(settings))


@pytest.fixture
def fleet(broker: Broker) -> Iterator[Fleet]:
    """A client on the test broker."""
    with Fleet(broker.settings, app=broker.app, stats_interval_s=0.2) as client:
        yield client


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Where worker logs go (shown on failure)."""
    return tmp_path

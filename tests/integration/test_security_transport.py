"""Transport security on real servers the tests start: Redis with TLS and an ACL user, RabbitMQ over TLS.

Certificates are throwaway (trustme). Worker and client find the CA through
``FLEET_TLS_CA_FILE`` and verify the server; credentials travel in the URL and never
show up in an error message.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.app import create_app
from fleet.client import Fleet
from fleet.settings import Settings
from fleet.submiterrors import SubmitError
from tests.integration.procs import worker_process
from tests.integration.servers import Certs, make_certs, rabbitmq_node, redis_server

pytestmark = pytest.mark.integration

ECHO: dict[str, Any] = {
    "kind": "batch",
    "model": {"name": "echo", "params_b": 0.001},
    "input": {"op": "echo", "payload": {"over": "tls"}},
    "requirements": {"accelerators": ["cpu"]},
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and a server certificate for 127.0.0.1 (and a client pair)."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def password() -> str:
    """A fresh password, so a leak is unmistakable."""
    return f"pw-{secrets.token_hex(8)}"


@pytest.fixture
def tls_redis(tmp_path: Path, certs: Certs, password: str) -> Iterator[Any]:
    """A private Redis: TLS only, default user off, user ``fleet`` with FLEET_ACL_RULES."""
    with redis_server(tmp_path, tls=certs, acl_user=("fleet", password)) as server:
        yield server


def env_for(url: str, backend: str, certs: Certs, tmp_path: Path) -> dict[str, str]:
    """Worker and client environment: the TLS URL and the CA to verify it with."""
    return {
        "FLEET_BROKER_URL": url,
        "FLEET_RESULT_BACKEND": backend,
        "FLEET_TLS_CA_FILE": str(certs.ca),
        "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }


def test_worker_and_client_over_rediss_with_an_acl_user(
    tls_redis: Any, certs: Certs, tmp_path: Path
) -> None:
    """A task goes through a TLS-only Redis as an ACL user and its result comes back."""
    url = tls_redis.url()
    assert url.startswith("rediss://fleet:")
    env = env_for(url, url, certs, tmp_path)
    settings = Settings.from_env(env)
    app = create_app(settings)
    with worker_process(app, env, "cpu", log_dir=tmp_path), Fleet(settings, app=app) as fleet:
        result = fleet.submit(ECHO).get(timeout=60)
    assert result["output"]["payload"] == {"over": "tls"}


def test_plain_redis_to_a_tls_only_server_is_refused(tls_redis: Any) -> None:
    """The server has no plaintext port: a redis:// client cannot talk to it."""
    plain = redis.Redis.from_url(tls_redis.url().replace("rediss://", "redis://"), socket_timeout=3)
    with pytest.raises(redis.ConnectionError):
        plain.ping()


def test_the_acl_user_cannot_run_dangerous_commands(tls_redis: Any) -> None:
    """The fleet user has what fleet needs and not FLUSHALL, CONFIG, or KEYS."""
    client = tls_redis.client()
    client.lpush("probe", "x")  # what queues need works
    for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)


def test_a_wrong_password_fails_without_showing_it(
    tls_redis: Any, certs: Certs, password: str, tmp_path: Path
) -> None:
    """Submitting with a wrong password raises SubmitError; the message has neither password."""
    wrong = f"wrong-{secrets.token_hex(6)}"
    url = tls_redis.url(password=wrong)
    settings = Settings.from_env(env_for(url, url, certs, tmp_path))
    with Fleet(settings, stats_interval_s=0.5) as fleet, pytest.raises(SubmitError) as caught:
        fleet.submit(ECHO)
    message = str(caught.value)
    assert "fleet:***@" in message
    assert wrong not in message
    assert password not in message
    assert "invalid username-password" in message.lower() or "auth" in message.lower()


def test_worker_and_client_over_amqps(certs: Certs, tmp_path: Path) -> None:
    """A private RabbitMQ node with only a TLS listener: worker and client meet over amqps://."""
    with rabbitmq_node(tmp_path, tls=certs) as node:
        assert node.url.startswith("amqps://")
        env = {**env_for(node.url, "rpc://", certs, tmp_path), "FLEET_NAMESPACE": "tls."}
        settings = Settings.from_env(env)
        app = create_app(settings)
        assert app.conf.broker_use_ssl["server_hostname"] == "127.0.0.1"
        with worker_process(app, env, "cpu", log_dir=tmp_path), Fleet(settings, app=app) as fleet:
            result = fleet.submit(ECHO).get(timeout=60)
        assert result["output"]["payload"] == {"over": "tls"}
        # A client that does not trust the CA is refused by certificate verification.
        # (Via "localhost": kombu's global connection pools key on the host, not on TLS
        # options, so the same host would reuse the verified connection above.)
        other_host = node.url.replace("127.0.0.1", "localhost")
        untrusted = Settings.from_env(
            {**env, "FLEET_BROKER_URL": other_host, "FLEET_TLS_CA_FILE": ""}
        )
        with (
            Fleet(untrusted, stats_interval_s=0.5) as fleet,
            pytest.raises(SubmitError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            fleet.submit(ECHO)

"""TLS mapping: FLEET_TLS_* files to the options Celery, kombu, py-amqp and redis-py take."""

from __future__ import annotations

import ssl

import pytest

from fleet.app import create_app
from fleet.settings import Settings
from fleet.tls import (
    TlsFiles,
    amqp_ssl_options,
    celery_tls_conf,
    redis_client,
    redis_ssl_options,
    uses_tls,
)

FILES = TlsFiles(ca_file="/ca.pem", cert_file="/c.pem", key_file="/c.key")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rediss://u:p@h:6380/0", True),
        ("amqps://guest:guest@h:5671//", True),
        ("AMQPS://h//", True),
        ("redis://h:6379/0", False),
        ("amqp://h//", False),
        ("rpc://", False),
    ],
)
def test_uses_tls_by_scheme(url, expected):
    """Only rediss:// and amqps:// switch TLS on."""
    assert uses_tls(url) is expected


def test_env_reads_the_three_files():
    """The three variables land in TlsFiles; empty strings count as unset."""
    env = {"FLEET_TLS_CA_FILE": "/ca", "FLEET_TLS_CERT_FILE": "/c", "FLEET_TLS_KEY_FILE": "/k"}
    assert TlsFiles.from_env(env) == TlsFiles("/ca", "/c", "/k")
    assert TlsFiles.from_env({"FLEET_TLS_CA_FILE": ""}) == TlsFiles()


@pytest.mark.parametrize("only", ["FLEET_TLS_CERT_FILE", "FLEET_TLS_KEY_FILE"])
def test_client_cert_and_key_go_together(only):
    """A client certificate without its key (or the reverse) is refused, naming both."""
    with pytest.raises(ValueError, match="FLEET_TLS_CERT_FILE and FLEET_TLS_KEY_FILE"):
        TlsFiles.from_env({only: "/x"})


def test_redis_options_require_verification():
    """redis-py gets CERT_REQUIRED and the CA; client cert and key only when given."""
    assert redis_ssl_options(TlsFiles(ca_file="/ca.pem")) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
    }
    assert redis_ssl_options(FILES) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/c.key",
    }
    assert redis_ssl_options(TlsFiles()) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_amqp_options_check_the_host_name():
    """py-amqp gets CERT_REQUIRED, the CA, the client pair and the URL's host for SNI and checks."""
    assert amqp_ssl_options(FILES, "amqps://guest:pw@broker.internal:5671//") == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "broker.internal",
        "ca_certs": "/ca.pem",
        "certfile": "/c.pem",
        "keyfile": "/c.key",
    }


@pytest.mark.parametrize(
    ("broker", "backend", "keys"),
    [
        ("redis://h/0", "redis://h/0", set()),
        ("rediss://h/0", "rediss://h/0", {"broker_use_ssl", "redis_backend_use_ssl"}),
        ("rediss://h/0", "redis://other/0", {"broker_use_ssl"}),
        ("amqps://h//", "rpc://", {"broker_use_ssl"}),
        ("amqp://h//", "rediss://h/1", {"redis_backend_use_ssl"}),
    ],
)
def test_celery_conf_only_for_tls_urls(broker, backend, keys):
    """Celery's TLS settings appear exactly for the TLS URLs, with the right library's names."""
    conf = celery_tls_conf(broker, backend, FILES)
    assert set(conf) == keys
    if broker.startswith("amqps"):
        assert conf["broker_use_ssl"]["ca_certs"] == "/ca.pem"
    elif broker.startswith("rediss"):
        assert conf["broker_use_ssl"]["ssl_ca_certs"] == "/ca.pem"


def test_settings_carry_the_files_into_the_app():
    """Settings.from_env reads the files and create_app sets broker_use_ssl from them."""
    env = {
        "FLEET_BROKER_URL": "rediss://fleet:pw@127.0.0.1:6390/0",
        "FLEET_TLS_CA_FILE": "/ca.pem",
    }
    settings = Settings.from_env(env)
    assert settings.tls == TlsFiles(ca_file="/ca.pem")
    app = create_app(settings)
    assert app.conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
    }
    assert app.conf.redis_backend_use_ssl == app.conf.broker_use_ssl


def test_redis_client_verifies_rediss_only():
    """Fleet's own redis-py clients verify rediss:// servers against the CA; redis:// stays plain."""
    secure = redis_client("rediss://u:pw@127.0.0.1:6390/0", TlsFiles(ca_file="/ca.pem"))
    kwargs = secure.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/ca.pem"
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    plain = redis_client("redis://127.0.0.1:6390/0", FILES)
    assert "ssl_ca_certs" not in plain.connection_pool.connection_kwargs

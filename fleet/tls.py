"""TLS to the broker and the result store: ``rediss://`` and ``amqps://``.

Pure mappings from the ``FLEET_TLS_*`` files to the options each library takes, plus
one thin constructor for fleet's own redis-py clients:

``FLEET_TLS_CA_FILE``    CA bundle that signed the server's certificate (default: the system's)
``FLEET_TLS_CERT_FILE``  client certificate, when the server asks for one (optional)
``FLEET_TLS_KEY_FILE``   its private key (required with the certificate)

The server's certificate is always verified (``CERT_REQUIRED``); on AMQP the host name
is checked too. The files only apply to ``rediss://`` and ``amqps://`` URLs; a plain
URL stays plain whatever the environment says.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

__all__ = [
    "TlsFiles",
    "amqp_ssl_options",
    "celery_tls_conf",
    "redis_client",
    "redis_ssl_options",
    "uses_tls",
]

TLS_SCHEMES = frozenset({"rediss", "amqps"})


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths to PEM files for TLS connections (any may be None)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsFiles:
        """Read ``FLEET_TLS_CA_FILE``, ``FLEET_TLS_CERT_FILE``, ``FLEET_TLS_KEY_FILE``.

        Raises:
            ValueError: a certificate without its key or a key without its certificate.

        """
        files = cls(
            ca_file=env.get("FLEET_TLS_CA_FILE") or None,
            cert_file=env.get("FLEET_TLS_CERT_FILE") or None,
            key_file=env.get("FLEET_TLS_KEY_FILE") or None,
        )
        if (files.cert_file is None) != (files.key_file is None):
            raise ValueError(
                "FLEET_TLS_CERT_FILE and FLEET_TLS_KEY_FILE go together: set both or neither"
            )
        return files


def uses_tls(url: str) -> bool:
    """True for ``rediss://`` and ``amqps://`` URLs."""
    return url.split(":", 1)[0].lower() in TLS_SCHEMES


def redis_ssl_options(tls: TlsFiles) -> dict[str, Any]:
    """redis-py ``SSLConnection`` options (kombu's ``broker_use_ssl``, ``redis_backend_use_ssl``)."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if tls.ca_file:
        options["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        options["ssl_certfile"] = tls.cert_file
        options["ssl_keyfile"] = tls.key_file
    return options


def amqp_ssl_options(tls: TlsFiles, url: str) -> dict[str, Any]:
    """py-amqp ``ssl`` options for ``url`` (``broker_use_ssl`` on RabbitMQ).

    ``server_hostname`` makes py-amqp check the certificate against the URL's host
    (without it, it verifies the chain only).
    """
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    host = urlsplit(url).hostname
    if host:
        options["server_hostname"] = host
    if tls.ca_file:
        options["ca_certs"] = tls.ca_file
    if tls.cert_file:
        options["certfile"] = tls.cert_file
        options["keyfile"] = tls.key_file
    return options


def celery_tls_conf(broker_url: str, result_backend: str, tls: TlsFiles) -> dict[str, Any]:
    """The Celery settings for TLS brokers and back-ends (empty when neither URL uses TLS).

    ``broker_use_ssl`` for a ``rediss://`` or ``amqps://`` broker, ``redis_backend_use_ssl``
    for a ``rediss://`` result store. (The ``rpc://`` store rides on the broker connection.)
    """
    conf: dict[str, Any] = {}
    if uses_tls(broker_url):
        conf["broker_use_ssl"] = (
            amqp_ssl_options(tls, broker_url)
            if broker_url.lower().startswith("amqps")
            else redis_ssl_options(tls)
        )
    if result_backend.lower().startswith("rediss:"):
        conf["redis_backend_use_ssl"] = redis_ssl_options(tls)
    return conf


def redis_client(url: str, tls: TlsFiles | None = None, **kwargs: Any) -> redis.Redis:  # noqa: ANN401 - redis-py's keyword arguments
    """``redis.Redis.from_url(url)``, verifying the server with ``tls`` for ``rediss://``."""
    if uses_tls(url):
        kwargs = {**redis_ssl_options(tls or TlsFiles()), **kwargs}
    return redis.Redis.from_url(url, **kwargs)

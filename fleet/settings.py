"""Settings from the environment, read once per process, with secrets masked for display.

``FLEET_BROKER_URL``     broker (default ``redis://127.0.0.1:6379/0``); ``amqp://`` for RabbitMQ
``FLEET_RESULT_BACKEND`` results (default: the broker URL on Redis, ``rpc://`` on RabbitMQ)
``FLEET_NAMESPACE``      queue-name prefix so several fleets can share one broker
``FLEET_ARTIFACT_DIR``   where workers write checkpoints (default ``./.fleet/artifacts``)
``FLEET_CATALOG_DIR``    a catalog directory replacing the shipped one
``FLEET_TLS_CA_FILE``, ``FLEET_TLS_CERT_FILE``, ``FLEET_TLS_KEY_FILE``
                         TLS files for ``rediss://`` / ``amqps://`` (``fleet.tls``)
``FLEET_VISIBILITY_TIMEOUT_S``
                         Redis: seconds before an unacked message of a dead worker is
                         redelivered (default 300; live workers extend their leases)
``FLEET_MAX_TASK_BYTES`` cap on a spec's serialized size at submit and at the worker
                         (default 1 MiB; ``fleet.spec.check_size``)
``FLEET_CONFIG``         the fleet config whose ``[[models]]`` extend the model registry
                         (clients and workers; default: the built-in models only)
``FLEET_MODEL_CACHE``    where model weights are fetched or built once (default
                         ``~/.cache/fleet/models``)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fleet.tls import TlsFiles

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_TASK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings. ``broker_url`` may hold a password: print ``masked(url)`` instead."""

    broker_url: str
    result_backend: str
    namespace: str
    artifact_dir: Path
    tls: TlsFiles = field(default_factory=TlsFiles)
    visibility_timeout_s: int = 300
    max_task_bytes: int = DEFAULT_MAX_TASK_BYTES
    config_path: str | None = None
    model_cache: Path = field(default_factory=lambda: Path.home() / ".cache/fleet/models")

    @property
    def is_redis(self) -> bool:
        """True when the broker is Redis (``redis://``, ``rediss://``, ``redis+socket://``)."""
        return is_redis_url(self.broker_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the ``FLEET_*`` variables (``env`` defaults to ``os.environ``)."""
        env = os.environ if env is None else env
        broker = env.get("FLEET_BROKER_URL") or DEFAULT_BROKER_URL
        backend = env.get("FLEET_RESULT_BACKEND") or (broker if is_redis_url(broker) else "rpc://")
        return cls(
            broker_url=broker,
            result_backend=backend,
            namespace=env.get("FLEET_NAMESPACE", ""),
            artifact_dir=Path(env.get("FLEET_ARTIFACT_DIR") or ".fleet/artifacts"),
            tls=TlsFiles.from_env(env),
            visibility_timeout_s=int(env.get("FLEET_VISIBILITY_TIMEOUT_S") or 300),
            max_task_bytes=int(env.get("FLEET_MAX_TASK_BYTES") or DEFAULT_MAX_TASK_BYTES),
            config_path=env.get("FLEET_CONFIG") or None,
            model_cache=Path(env.get("FLEET_MODEL_CACHE") or Path.home() / ".cache/fleet/models"),
        )


def is_redis_url(url: str) -> bool:
    """True for Redis URLs."""
    return url.split(":", 1)[0] in {"redis", "rediss", "redis+socket"}


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)  # host keeps its brackets and port as written
    # "user:password" keeps the user; a bare userinfo may itself be a token, so it goes.
    netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

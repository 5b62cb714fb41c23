"""Optional message signing with Celery's ``auth`` serializer (off unless configured).

Set all three (paths) in the environment of every client **and** worker:

``FLEET_SIGNING_KEY``         this process's RSA private key (PEM)
``FLEET_SIGNING_CERT``        its X.509 certificate (PEM)
``FLEET_SIGNING_CERT_STORE``  a directory (or glob) of the certificates whose signatures
                              are accepted: every client's and every worker's

With them, ``create_app`` switches the app to ``task_serializer="auth"`` and
``accept_content=["auth"]`` and calls Celery's ``app.setup_security()``: each task
message is JSON signed with the key (RSA-PSS, SHA-256) and carries the signer's
certificate id; a worker verifies the signature against the store before decoding.
An unsigned JSON message, a pickle, or one signed by a certificate outside the store is
refused by kombu and logged by Celery, never run. Remote control (ping, inspect, the
autoscaler's drain) goes through the same serializer, so tools that talk to signed
workers need the variables too. Results stay plain JSON (``result_serializer``).

Limits, from Celery: signing is process-wide (``setup_security`` registers one ``auth``
serializer in kombu's global registry and makes it the default), so one process signs
with one key; messages are signed, not encrypted; every certificate in the store must be
unexpired at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

__all__ = ["ENV_VARS", "SigningConfigError", "SigningFiles", "enable_signing", "signing_conf"]

ENV_VARS = ("FLEET_SIGNING_KEY", "FLEET_SIGNING_CERT", "FLEET_SIGNING_CERT_STORE")
DIGEST = "sha256"
AUTH_CONTENT_TYPE = "application/data"  # what Celery's auth serializer registers as


class SigningConfigError(ValueError):
    """Signing is half configured, or a file it names is missing."""


@dataclass(frozen=True, slots=True)
class SigningFiles:
    """Where the signing key, certificate and trusted certificate store are."""

    key: Path
    cert: Path
    cert_store: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SigningFiles | None:
        """The files named by ``FLEET_SIGNING_*`` (``env`` defaults to ``os.environ``); None when unset.

        Raises:
            SigningConfigError: some but not all of the three are set.

        """
        env = os.environ if env is None else env
        values = [env.get(name) or "" for name in ENV_VARS]
        if not any(values):
            return None
        missing = [name for name, value in zip(ENV_VARS, values, strict=True) if not value]
        if missing:
            raise SigningConfigError(
                f"message signing needs all of {', '.join(ENV_VARS)}; missing {', '.join(missing)}"
            )
        key, cert, store = (Path(v) for v in values)
        return cls(key, cert, store)

    def check(self) -> None:
        """Fail early, naming the variable, when a file is missing.

        Raises:
            SigningConfigError: the key or certificate is not a file, or the store is absent.

        """
        for name, path in zip(ENV_VARS, (self.key, self.cert), strict=False):
            if not path.is_file():
                raise SigningConfigError(f"{name}: {path} is not a file")
        if not (self.cert_store.is_dir() or any(self.cert_store.parent.glob(self.cert_store.name))):
            raise SigningConfigError(f"FLEET_SIGNING_CERT_STORE: nothing at {self.cert_store}")


def signing_conf(files: SigningFiles) -> dict[str, Any]:
    """The Celery settings that sign and accept only signed task messages (pure)."""
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": str(files.key),
        "security_certificate": str(files.cert),
        "security_cert_store": str(files.cert_store),
        "security_digest": DIGEST,
        # Results are data, never run: plain JSON, as without signing.
        "result_serializer": "json",
        "result_accept_content": ["json"],
    }


def enable_signing(app: Celery, files: SigningFiles) -> None:
    """Sign and verify ``app``'s task and control messages (see the module docstring).

    Raises:
        SigningConfigError: a file is missing.
        celery.exceptions.SecurityError: the key, certificate or store cannot be loaded
            (for example an expired certificate in the store).

    """
    files.check()
    app.conf.update(signing_conf(files))
    # JSON stays decodable for results; task messages are held to ``accept_content``. The
    # auth serializer is named by content type: it is registered only after this step.
    allowed = {"json", AUTH_CONTENT_TYPE}
    app.setup_security(allowed_serializers=allowed, digest=DIGEST, serializer="json")

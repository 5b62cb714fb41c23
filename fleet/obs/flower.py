"""Start Flower (Celery's monitoring UI) on fleet's app, refusing to expose it without auth.

``python -m fleet.obs.flower [--address 127.0.0.1] [--port 5555]`` execs
``celery -A fleet.app flower ...`` (the app reads ``FLEET_BROKER_URL``). Flower can revoke tasks and
shut workers down, so listening on anything but loopback (127.0.0.0/8, ``::1``,
``localhost``) needs HTTP basic auth: ``FLOWER_BASIC_AUTH=user:password`` in the environment
(Flower reads it itself, so the secret never reaches the command line) or the ``basic_auth``
argument of ``flower_argv``. Without it the launcher refuses and exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
from collections.abc import Mapping

from fleet.settings import DEFAULT_BROKER_URL, masked

__all__ = ["FlowerRefused", "flower_argv", "is_loopback", "main"]

AUTH_ENV = "FLOWER_BASIC_AUTH"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5555
EXIT_REFUSED = 2


class FlowerRefused(ValueError):  # noqa: N818 - the name is the public API (a refusal, not a bug)
    """Flower would listen beyond loopback without basic auth, or the auth is malformed."""


def is_loopback(address: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed); ``""`` means all interfaces."""
    host = address.strip().removeprefix("[").removesuffix("]")
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # "", "0.0.0.0"-like names, or a hostname we cannot vouch for
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _check_auth(basic_auth: str, source: str) -> None:
    """Raise unless every comma-separated entry is ``user:password`` (never echoing it)."""
    for entry in basic_auth.split(","):
        user, sep, password = entry.partition(":")
        if not (sep and user and password):
            raise FlowerRefused(
                f"{source} must be user:password[,user2:password2] with non-empty parts"
            )


def flower_argv(
    broker_url: str,
    address: str,
    port: int,
    basic_auth: str | None,
    env: Mapping[str, str],
) -> list[str]:
    """The ``celery ... flower`` argv for these options.

    ``basic_auth`` goes on the command line only when passed here; ``FLOWER_BASIC_AUTH`` in
    ``env`` is left for Flower to read from its environment.

    Raises:
        FlowerRefused: a non-loopback ``address`` without any basic auth, a malformed auth
            value, or a port out of range. The message never contains the secret.

    """
    if not 0 < port < 65536:  # noqa: PLR2004 - the TCP port range
        raise FlowerRefused(f"port must be 1-65535, got {port}")
    env_auth = env.get(AUTH_ENV) or None
    if basic_auth is not None:
        _check_auth(basic_auth, "basic auth")
    if env_auth is not None:
        _check_auth(env_auth, AUTH_ENV)
    if basic_auth is None and env_auth is None and not is_loopback(address):
        shown = address or "<all interfaces>"
        raise FlowerRefused(
            f"refusing to start Flower on {shown}: it is not a loopback address and no basic "
            f"auth is set. Flower can revoke tasks and shut workers down; set {AUTH_ENV}="
            "user:password or listen on 127.0.0.1"
        )
    # No --broker: fleet.app reads FLEET_BROKER_URL from the environment, so the broker's
    # password never shows in the process list (`ps`). broker_url is validated by the caller.
    del broker_url
    argv = [
        "celery", "-A", "fleet.app", "flower",
        f"--address={address}", f"--port={port}",
    ]  # fmt: skip
    if basic_auth is not None:
        argv.append(f"--basic-auth={basic_auth}")
    return argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.obs.flower",
        description=(
            "Start Flower on fleet's Celery app. The broker comes from FLEET_BROKER_URL; "
            f"a non-loopback --address needs {AUTH_ENV}=user:password."
        ),
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="listen address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check the options and exec Flower; returns 2 (without starting it) on refusal."""
    args = _parser().parse_args(argv)
    broker = os.environ.get("FLEET_BROKER_URL") or DEFAULT_BROKER_URL
    try:
        cmd = flower_argv(broker, args.address, args.port, None, os.environ)
    except FlowerRefused as exc:
        sys.stderr.write(f"fleet flower: {exc}\n")
        return EXIT_REFUSED
    # The celery next to this interpreter (a venv's), else the one on PATH.
    local = os.path.join(os.path.dirname(sys.executable), "celery")  # noqa: PTH118, PTH120
    celery = local if os.access(local, os.X_OK) else shutil.which("celery")
    if celery is None:
        sys.stderr.write("fleet flower: the celery command is not installed\n")
        return 1
    os.environ["FLEET_BROKER_URL"] = broker  # what fleet.app (-A) reads in the Flower process
    shown = ["--basic-auth=***" if a.startswith("--basic-auth=") else a for a in cmd]
    sys.stderr.write(f"fleet flower: {' '.join(shown)} (broker {masked(broker)})\n")
    sys.stderr.flush()
    os.execv(celery, [celery, *cmd[1:]])  # noqa: S606 - a fixed argv; only checked options reach it
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())

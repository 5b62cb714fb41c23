"""Broker servers the tests start themselves: a private ``redis-server`` and a private RabbitMQ node.

Each runs on free loopback ports with its own data directory and log under the test's
temporary directory, so a test can restart it, configure it (AOF, TLS, an ACL user, a
short ``consumer_timeout``) or break it without touching the machine's own servers
(Redis on 6379, RabbitMQ ``rabbit@localhost`` on 5672). Teardown always stops what was
started: the process group for Redis; ``rabbitmqctl shutdown`` then a kill for RabbitMQ.

When a server cannot be started (binary missing, start-up timeout) the test is skipped
with the reason, except under ``CI=true``, where it fails.

Measured on the 2-core development machine: a private Redis is ready in about 0.1 s, a
private RabbitMQ node in about 5 s (``stop_app``/``start_app`` about 1 s, a full
``shutdown`` about 2.5 s), which is why RabbitMQ tests share one node per module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import trustme

from tests.integration.brokers import in_ci

HOST = "127.0.0.1"
REDIS_START_TIMEOUT_S = float(os.environ.get("FLEET_TEST_REDIS_START_TIMEOUT_S", "10"))
RABBIT_START_TIMEOUT_S = float(os.environ.get("FLEET_TEST_RABBIT_START_TIMEOUT_S", "60"))
RABBIT_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``, or fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Certs:
    """Throwaway PEM files from trustme: a CA, a server cert for 127.0.0.1/localhost, a client cert."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> Certs:
    """Write a fresh CA, server and client certificate into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    client = ca.issue_cert("fleet-client@example.org")
    certs = Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(certs.server_cert), append=True)
    server.private_key_pem.write_to_path(str(certs.server_key))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(certs.client_cert), append=True)
    client.private_key_pem.write_to_path(str(certs.client_key))
    return certs


# --------------------------------------------------------------------------- Redis

# What fleet needs and no more: every key and channel, every command except the
# dangerous ones (FLUSHALL, CONFIG, DEBUG, KEYS, SHUTDOWN, ACL, ...). The README shows it.
FLEET_ACL_RULES = "on ~* &* +@all -@dangerous"


@dataclass
class RedisServer:
    """A private ``redis-server``; ``url()`` for clients, ``restart()`` keeps its data dir."""

    directory: Path
    port: int
    aof: bool
    tls: Certs | None
    acl_user: tuple[str, str] | None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        """``redis://`` or ``rediss://`` for this server (the ACL user's credentials if any)."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.acl_user is not None:
            user, real = self.acl_user
            auth = f"{user}:{real if password is None else password}@"
        return f"{scheme}://{auth}{HOST}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A redis-py client with this server's CA (for the test's own checks)."""
        kwargs: dict[str, object] = {"socket_timeout": 5, "socket_connect_timeout": 2}
        if self.tls is not None:
            kwargs |= {"ssl_ca_certs": str(self.tls.ca), "ssl_cert_reqs": "required"}
        return redis.Redis.from_url(self.url(db), **kwargs)

    def _argv(self) -> list[str]:
        argv = [
            "redis-server",
            "--bind", HOST, "--dir", str(self.directory), "--logfile", str(self.log_path),
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        if self.aof:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.tls is not None:
            argv += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "optional",
            ]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.acl_user is not None:
            argv += ["--aclfile", str(self.directory / "users.acl")]
        return argv

    def start(self) -> None:
        """Start the server (same port, same data directory) and wait until it answers PING."""
        if self.acl_user is not None:
            user, password = self.acl_user
            (self.directory / "users.acl").write_text(
                f"user default off\nuser {user} {FLEET_ACL_RULES} >{password}\n"
            )
        self.proc = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log_tail()}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready: {self._log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save: what survives is what AOF wrote)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, hard: bool = True) -> None:
        """Kill (``hard``) or SHUTDOWN the server, then start it again on the same dir and port."""
        if hard:
            self.kill()
        else:
            with suppress(redis.RedisError):
                self.client().shutdown(nosave=not self.aof)
            if self.proc is not None:
                self.proc.wait(timeout=10)
        self.start()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextmanager
def redis_server(
    tmp_path: Path,
    *,
    aof: bool = False,
    tls: Certs | None = None,
    acl_user: tuple[str, str] | None = None,
) -> Iterator[RedisServer]:
    """A private ``redis-server`` for one test; always killed afterwards.

    Args:
        tmp_path: a directory of the test's; the server's data and log go under it.
        aof: append-only file with ``appendfsync always`` (every write survives kill -9).
        tls: certificates: TLS only (``--port 0``), clients use ``rediss://`` and the CA.
        acl_user: ``(user, password)``: the default user is switched off and this one
            gets ``FLEET_ACL_RULES``.

    """
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    directory = tmp_path / f"redis-{secrets.token_hex(3)}"
    directory.mkdir(parents=True)
    server = RedisServer(directory, free_port(), aof, tls, acl_user)
    try:
        try:
            server.start()
        except RuntimeError as exc:
            unavailable(f"private redis-server did not start: {exc}")
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------- RabbitMQ


def _rabbit_bin(name: str) -> str | None:
    """The real script, not Debian's /usr/sbin wrapper that switches to the rabbitmq user."""
    direct = RABBIT_LIB_BIN / name
    return str(direct) if direct.exists() else shutil.which(name)


@dataclass
class RabbitNode:
    """A private RabbitMQ node: its own node name, ports, cookie, mnesia and logs."""

    directory: Path
    node: str
    port: int
    dist_port: int
    tls: Certs | None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``amqp://`` (or ``amqps://`` with TLS) for guest on this node."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://guest:guest@{HOST}:{self.port}//"

    @property
    def ctl_path(self) -> str:
        """The ``rabbitmqctl`` that talks to this node (with ``env``: its cookie)."""
        return _rabbit_bin("rabbitmqctl") or "rabbitmqctl"

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` and return its output."""
        done = subprocess.run(
            [self.ctl_path, "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        """Start the node in the background and wait for ``await_startup``."""
        server = _rabbit_bin("rabbitmq-server")
        if server is None:
            raise RuntimeError("rabbitmq-server is not installed")
        with (self.directory / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [server], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.directory,
            )  # fmt: skip
        deadline = time.monotonic() + RABBIT_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.log_tail()}")
            # await_startup fails at once while the node is not registered yet: poll it.
            done = subprocess.run(
                [self.ctl_path, "-n", self.node, "await_startup", "--timeout", "30"],
                env=self.env, capture_output=True, timeout=40, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} not ready: {self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """``rabbitmqctl shutdown``; kill the process group if that fails."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("shutdown", timeout=30)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self, *, full: bool = True) -> None:
        """Stop and start the node keeping its mnesia (durable queues, persistent messages).

        ``full``: the whole Erlang node (``shutdown`` + start); otherwise the RabbitMQ
        application only (``stop_app`` + ``start_app``).
        """
        if full:
            self.stop()
            self.start()
        else:
            self.ctl("stop_app")
            self.ctl("start_app")

    def log_tail(self) -> str:
        """The end of the node's log (for error messages)."""
        try:
            return (self.directory / "log" / f"{self.node}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return (self.directory / "server.out").read_text(errors="replace")[-3000:]


def _node_env(directory: Path, node: str, port: int, dist_port: int) -> dict[str, str]:
    home = directory / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    (directory / "enabled_plugins").write_text("[].\n")  # no management port to clash
    keep = {k: v for k, v in os.environ.items() if k in {"PATH", "LANG", "LC_ALL", "TMPDIR"}}
    return {
        **keep,
        "HOME": str(home),  # the node's and rabbitmqctl's Erlang cookie
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),  # not the machine's
        "RABBITMQ_PID_FILE": str(directory / "node.pid"),
    }


@contextmanager
def rabbitmq_node(
    tmp_path: Path, *, config: str = "", tls: Certs | None = None, advanced: str = "[]."
) -> Iterator[RabbitNode]:
    """A private RabbitMQ node (3.10 here), shut down afterwards.

    Args:
        tmp_path: a directory of the test's (module-scoped is best: a start takes ~5 s).
        config: extra ``rabbitmq.conf`` lines, e.g. ``consumer_timeout = 5000``.
        tls: certificates: the node listens with TLS only, clients use ``amqps://``.
        advanced: an ``advanced.config`` term, e.g. a short ``channel_tick_interval`` so
            a short consumer timeout is enforced within seconds instead of a minute.

    """
    if _rabbit_bin("rabbitmq-server") is None:
        unavailable("rabbitmq-server is not installed")
    directory = tmp_path / f"rabbit-{secrets.token_hex(3)}"
    directory.mkdir(parents=True)
    node = f"fleet-test-{secrets.token_hex(4)}@localhost"
    port, dist_port = free_port(), free_port()
    lines = ["loopback_users.guest = true", "log.file.level = info"]
    if tls is None:
        lines.append(f"listeners.tcp.default = {HOST}:{port}")
    else:
        lines += [
            "listeners.tcp = none",
            f"listeners.ssl.default = {HOST}:{port}",
            f"ssl_options.cacertfile = {tls.ca}",
            f"ssl_options.certfile = {tls.server_cert}",
            f"ssl_options.keyfile = {tls.server_key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
        ]
    (directory / "rabbitmq.conf").write_text("\n".join([*lines, config, ""]))
    (directory / "advanced.config").write_text(advanced + "\n")
    (directory / "rabbitmq-env.conf").write_text("")
    rabbit = RabbitNode(
        directory, node, port, dist_port, tls, env=_node_env(directory, node, port, dist_port)
    )
    try:
        try:
            rabbit.start()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            unavailable(f"private RabbitMQ node did not start: {exc}")
        yield rabbit
    finally:
        rabbit.stop()

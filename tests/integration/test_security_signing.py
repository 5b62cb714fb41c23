"""Message signing end to end: a signed client's tasks run on a signed worker; others do not.

Throwaway RSA keys and self-signed certificates are made by the test. The trusted
certificate is the only one in the store; a message signed by another key, or plain
JSON, published straight to the queue is refused and logged, never run, and the worker
goes on.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import dumps, registry

from fleet.app import TASK_NAME, create_app
from fleet.client import Fleet
from fleet.signing import SigningFiles, enable_signing
from tests.faults import FaultLedger
from tests.integration.conftest import Broker
from tests.integration.procs import worker_process
from tests.integration.test_end_to_end import purge
from tests.integration.test_fault_bad_input import EMBED, cpu_queue, wait_for_log

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WAIT_S = float(os.environ.get("FLEET_TEST_BAD_INPUT_WAIT_S", "30"))


@dataclass(frozen=True)
class Identity:
    """A throwaway signing identity: key and certificate files."""

    key: Path
    cert: Path


def make_identity(directory: Path, name: str) -> Identity:
    """A fresh RSA key and a self-signed certificate, valid for a day, written as PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key_path, cert_path)


@pytest.fixture
def signed(broker: Broker, tmp_path: Path) -> Iterator[tuple[Celery, dict[str, str], Identity]]:
    """(signed client app, signed worker env, an untrusted identity outside the store).

    Celery's ``setup_security`` is process-wide (kombu's registry): undone afterwards so
    later tests in this process publish plain JSON again.
    """
    trusted = make_identity(tmp_path / "trusted", "fleet")
    store = tmp_path / "store"
    store.mkdir()
    (store / "fleet.pem").write_bytes(trusted.cert.read_bytes())
    untrusted = make_identity(tmp_path / "untrusted", "mallory")
    env = {
        **broker.env,
        "FLEET_SIGNING_KEY": str(trusted.key),
        "FLEET_SIGNING_CERT": str(trusted.cert),
        "FLEET_SIGNING_CERT_STORE": str(store),
    }
    files = SigningFiles.from_env(env)
    assert files is not None
    app = create_app(broker.settings)
    enable_signing(app, files)
    try:
        yield app, env, untrusted
    finally:
        registry._set_default_serializer("json")
        registry.unregister("auth")


def publish(app: Celery, queue: str, body: bytes, content_type: str) -> str:
    """Publish a fleet.run message with ``body`` as is; return its task id."""
    task_id = str(uuid.uuid4())
    amqp = app.amqp
    kq = amqp.queues[queue]
    headers = amqp.create_task_message(task_id, TASK_NAME, (), {}).headers
    with app.connection_for_write() as conn, conn.Producer() as producer:
        producer.publish(
            body,
            exchange=kq.exchange,
            routing_key=kq.routing_key,
            declare=[kq],
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
        )
    return task_id


def test_signed_tasks_run_and_unsigned_or_forged_ones_are_refused(
    broker: Broker,
    signed: tuple[Celery, dict[str, str], Identity],
    faults: FaultLedger,
    logs: Path,
) -> None:
    """A signed worker runs the signed client's tasks and refuses plain JSON and a stranger's signature."""
    app, env, untrusted = signed
    queue = cpu_queue(broker)
    purge(broker, [queue])
    body = (
        [dict(EMBED, input={"texts": ["must not run"]})],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    _, _, plain = dumps(body, serializer="json")
    forger = SecureSerializer(
        PrivateKey(untrusted.key.read_text()),
        Certificate(untrusted.cert.read_text()),
        None,
        "sha256",
        serializer="json",
    )
    forged = forger.serialize(body)
    with (
        Fleet(broker.settings, app=app, stats_interval_s=0.2) as client,
        worker_process(app, env, "cpu", log_dir=logs) as (proc, node),
    ):
        first = client.submit(EMBED).get(timeout=WAIT_S)
        faults.inject("unsigned message")
        unsigned_id = publish(app, queue, plain.encode(), "application/json")
        faults.inject("forged signature")
        forged_id = publish(app, queue, forged.encode(), "application/data")
        second = client.submit(EMBED).get(timeout=WAIT_S)
        log_path = logs / f"worker-{node.replace('@', '_')}.log"
        text = wait_for_log(
            log_path,
            [
                "Refusing to deserialize untrusted content of type json",
                "Can't decode message body",
            ],
        )
        assert proc.poll() is None, "the worker is still running"
        time.sleep(0.5)  # nothing more arrives for the refused ids
        text = log_path.read_text()
    assert first["output"]["embeddings"]
    assert second["output"]["embeddings"]
    for refused in (unsigned_id, forged_id):
        assert f"fleet.run[{refused}] received" not in text
        assert f"fleet.run[{refused}] succeeded" not in text
    assert "SecurityError" in text  # the stranger's certificate is not in the store
    faults.account(submitted=2, completed=2)

"""A local fake of the three clouds' instance metadata services, for spot-notice tests.

Serves, on a loopback port, what ``workers.preemption`` reads:

* AWS IMDSv2: ``PUT /latest/api/token`` (needs ``X-aws-ec2-metadata-token-ttl-seconds``)
  returns a token; ``GET /latest/meta-data/spot/instance-action`` needs that token
  (401 otherwise) and answers 404 without a notice, 200 ``{"action", "time"}`` with one.
* GCE: ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google``
  (403 otherwise) and answers ``TRUE`` or ``FALSE``.
* Azure: ``GET /metadata/scheduledevents?api-version=...`` needs ``Metadata: true`` (400
  otherwise) and answers ``{"DocumentIncarnation", "Events": [...]}``.

A notice is switched on and off at run time (``notice_aws``, ``notice_gcp``,
``notice_azure``, ``clear``), and every request is recorded (method, path, headers) so a
test can check the headers and the token. ``body_override`` makes every notice endpoint
answer 200 with the given bytes (malformed-body tests).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


@dataclass(frozen=True)
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _State:
    aws: dict[str, Any] | None = None
    gcp: bool = False
    azure: list[dict[str, Any]] = field(default_factory=list)
    incarnation: int = 1
    tokens: set[str] = field(default_factory=set)
    body_override: bytes | None = None
    requests: list[Recorded] = field(default_factory=list)


class MetadataServer:
    """The fake on ``127.0.0.1:<free port>``; use as a context manager."""

    def __init__(self) -> None:
        """Bind a free port; ``start`` (or ``with``) serves it."""
        self._server = _Server()
        self.state = self._server.state
        self._lock = self._server.lock
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL to give as ``FLEET_METADATA_URL``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        """Start serving."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving."""
        self.close()

    # --- switching notices

    def notice_aws(self, deadline: float, action: str = "terminate") -> None:
        """Serve an AWS spot instance-action for ``deadline`` (epoch seconds)."""
        when = datetime.fromtimestamp(deadline, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self.state.aws = {"action": action, "time": when}

    def notice_gcp(self) -> None:
        """Make ``instance/preempted`` answer TRUE."""
        with self._lock:
            self.state.gcp = True

    def notice_azure(self, not_before: float | None, resources: tuple[str, ...] = ()) -> None:
        """Add a Preempt scheduled event (``not_before`` None: already started, empty NotBefore)."""
        event = {
            "EventId": str(uuid.uuid4()).upper(),
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": list(resources),
            "EventStatus": "Scheduled",
            "NotBefore": ""
            if not_before is None
            else format_datetime(datetime.fromtimestamp(not_before, tz=UTC), usegmt=True),
            "Description": "Virtual machine is being evicted from Azure Spot.",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._lock:
            self.state.azure.append(event)
            self.state.incarnation += 1

    def body_override(self, body: bytes | None) -> None:
        """Answer every notice endpoint with 200 and ``body`` (None: back to normal)."""
        with self._lock:
            self.state.body_override = body

    def clear(self) -> None:
        """No notice on any cloud."""
        with self._lock:
            self.state.aws = None
            self.state.gcp = False
            self.state.azure.clear()
            self.state.incarnation += 1

    def requests(self, path_prefix: str = "") -> list[Recorded]:
        """Requests received so far whose path starts with ``path_prefix``."""
        with self._lock:
            return [r for r in self.state.requests if r.path.startswith(path_prefix)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = _State()
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet: tests read ``requests`` instead."""

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        with self.server.lock:
            self.server.state.requests.append(
                Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )

    def do_PUT(self) -> None:
        self._record()
        if self.path != "/latest/api/token":
            self._reply(404, b"")
            return
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(400, b"missing token TTL header")
            return
        token = uuid.uuid4().hex
        with self.server.lock:
            self.server.state.tokens.add(token)
        self._reply(200, token.encode())

    def do_GET(self) -> None:
        self._record()
        routes = {
            "/latest/meta-data/spot/instance-action": self._aws,
            "/computeMetadata/v1/instance/preempted": self._gcp,
            "/metadata/scheduledevents": self._azure,
        }
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._reply(404, b"")
            return
        with self.server.lock:
            override = self.server.state.body_override
        route(override)

    def _aws(self, override: bytes | None) -> None:
        with self.server.lock:
            aws, tokens = self.server.state.aws, set(self.server.state.tokens)
        if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
            self._reply(401, b"")
        elif override is not None:
            self._reply(200, override)
        elif aws is None:
            self._reply(404, b"Not Found")
        else:
            self._reply(200, json.dumps(aws).encode(), "application/json")

    def _gcp(self, override: bytes | None) -> None:
        with self.server.lock:
            preempted = self.server.state.gcp
        if self.headers.get("Metadata-Flavor") != "Google":
            self._reply(403, b"Missing Metadata-Flavor:Google header.")
            return
        default = b"TRUE" if preempted else b"FALSE"
        self._reply(200, override if override is not None else default)

    def _azure(self, override: bytes | None) -> None:
        with self.server.lock:
            doc = {
                "DocumentIncarnation": self.server.state.incarnation,
                "Events": list(self.server.state.azure),
            }
        if self.headers.get("Metadata") != "true":
            self._reply(400, b'{"error": "Bad request. Required metadata header not specified"}')
            return
        body = override if override is not None else json.dumps(doc).encode()
        self._reply(200, body, "application/json")

"""A local HTTP fake of the Compute Engine (and Cloud Billing Catalog) REST API subset fleet uses.

Paths and JSON shapes follow ``google-cloud-compute``'s REST transport
(``compute_v1/services/{instances,zone_operations}/transports/rest_base.py``) and
``google-cloud-billing``'s ``CloudCatalog`` transport:

* ``POST   /compute/v1/projects/{p}/zones/{z}/instances`` (insert; ``requestId`` query:
  the same id returns the same operation and creates nothing new)
* ``GET    /compute/v1/projects/{p}/zones/{z}/instances/{name}``
* ``DELETE /compute/v1/projects/{p}/zones/{z}/instances/{name}``
* ``GET    /compute/v1/projects/{p}/aggregated/instances`` (``filter`` ``labels.KEY = "V"``
  honoured; items keyed ``zones/{z}``)
* ``GET    /compute/v1/projects/{p}/zones/{z}/operations/{op}`` and ``POST .../{op}/wait``
* ``GET    /v1/services/{service}/skus`` (the SKUs in ``GceFake.skus``)

Faults (set on the ``GceFake`` the context manager yields): ``insert_errors`` (each insert
pops one ``(code, message, http_status)`` and answers a DONE operation carrying it;
nothing is created), ``throttle_next`` (the next N calls of any kind answer 429
``rateLimitExceeded``), ``lose_insert_responses`` (the next N inserts are applied but
answered 503, as a lost answer), ``pending_operations`` (operations start RUNNING and are
DONE at the first poll) and ``running_after_get`` (instances start PROVISIONING and are
RUNNING from the first read that shows them). Every request is recorded in ``calls``;
insert bodies (with their ``requestId``) in ``inserts``.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_BASE = "/compute/v1/projects/(?P<project>[^/]+)"
_INSTANCES = re.compile(_BASE + r"/zones/(?P<zone>[^/]+)/instances(?:/(?P<name>[^/]+))?")
_AGGREGATED = re.compile(_BASE + r"/aggregated/instances")
_OPERATION = re.compile(_BASE + r"/zones/(?P<zone>[^/]+)/operations/(?P<op>[^/]+?)(?P<wait>/wait)?")
_SKUS = re.compile(r"/v1/services/(?P<service>[^/]+)/skus")
_FILTER = re.compile(r'labels\.(?P<key>[\w-]+)\s*=\s*"?(?P<value>[^"\s]*)"?')


@dataclass
class Call:
    """One request the fake answered."""

    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None
    status: int


@dataclass
class GceFake:
    """The fake's state and knobs; ``base_url`` is where it listens."""

    base_url: str = ""
    instances: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    skus: list[dict[str, Any]] = field(default_factory=list)
    insert_errors: list[tuple[str, str, int]] = field(default_factory=list)
    throttle_next: int = 0
    lose_insert_responses: int = 0
    pending_operations: bool = False
    running_after_get: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    def instance(self, name: str) -> dict[str, Any]:
        """The stored JSON of the instance called ``name`` (any project and zone)."""
        with self.lock:
            [found] = [v for (_, _, n), v in self.instances.items() if n == name]
            return found

    def metadata(self, name: str) -> dict[str, str]:
        """The metadata items of instance ``name`` as a dict."""
        items = self.instance(name).get("metadata", {}).get("items", [])
        return {i["key"]: i.get("value", "") for i in items}

    # -- request handling (called by the handler, under the lock) --------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request: (HTTP status, JSON body)."""
        with self.lock:
            status, payload = self._route(method, path, query, body)
            self.calls.append(Call(method, path, query, body, status))
            return status, payload

    def _route(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return _error(429, "Rate Limit Exceeded", "rateLimitExceeded", "usageLimits")
        answer: tuple[int, dict[str, Any]] | None = None
        if (m := _SKUS.fullmatch(path)) and method == "GET":
            answer = 200, {"skus": self.skus, "nextPageToken": ""}
        elif m := _OPERATION.fullmatch(path):
            answer = self._operation(m["op"], method)
        elif (m := _AGGREGATED.fullmatch(path)) and method == "GET":
            answer = 200, self._aggregated(m["project"], query.get("filter", ""))
        elif m := _INSTANCES.fullmatch(path):
            answer = self._instances_route(method, m, query, body)
        return answer or _error(404, f"no route for {method} {path}", "notFound")

    def _instances_route(
        self,
        method: str,
        m: re.Match[str],
        query: dict[str, str],
        body: dict[str, Any] | None,
    ) -> tuple[int, dict[str, Any]] | None:
        key = (m["project"], m["zone"], m["name"] or "")
        if method == "POST" and not m["name"]:
            return self._insert(m["project"], m["zone"], query, body or {})
        if method == "GET" and m["name"]:
            return self._get(key)
        if method == "DELETE" and m["name"]:
            return self._delete(key)
        return None

    def _operation(self, name: str, method: str) -> tuple[int, dict[str, Any]]:
        op = self.operations.get(name)
        if op is None or method not in {"GET", "POST"}:
            return _error(404, f"The resource 'operations/{name}' was not found", "notFound")
        op["status"] = "DONE"
        op["progress"] = 100
        return 200, op

    def _new_operation(
        self, project: str, zone: str, kind: str, target: str, error: tuple[str, str, int] | None
    ) -> dict[str, Any]:
        op_id = next(self._ids)
        name = f"operation-{op_id}"
        zone_url = f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(op_id),
            "name": name,
            "zone": zone_url,
            "operationType": kind,
            "targetLink": f"{zone_url}/instances/{target}",
            "status": "RUNNING" if self.pending_operations and error is None else "DONE",
            "progress": 0 if self.pending_operations and error is None else 100,
            "insertTime": _now(),
            "selfLink": f"{zone_url}/operations/{name}",
        }
        if error is not None:
            code, message, http_status = error
            op["error"] = {"errors": [{"code": code, "message": message}]}
            op["httpErrorStatusCode"] = http_status
            op["httpErrorMessage"] = "SERVICE UNAVAILABLE" if http_status == 503 else "ERROR"
        self.operations[name] = op
        return op

    def _insert(
        self, project: str, zone: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        self.inserts.append({**body, "requestId": query.get("requestId")})
        rid = query.get("requestId")
        if rid and rid in self.request_ids:
            return 200, self.operations[self.request_ids[rid]]
        name = body.get("name", "")
        if self.insert_errors:
            op = self._new_operation(project, zone, "insert", name, self.insert_errors.pop(0))
        elif (project, zone, name) in self.instances:
            return _error(
                409,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists",
                "alreadyExists",
            )
        else:
            zone_url = f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}"
            machine = body.get("machineType", "")
            self.instances[(project, zone, name)] = {
                **body,
                "kind": "compute#instance",
                "id": str(next(self._ids)),
                "zone": zone_url,
                "machineType": machine
                if machine.startswith("http")
                else f"{zone_url}/{machine.split(f'zones/{zone}/', 1)[-1]}",
                "status": "PROVISIONING" if self.running_after_get else "RUNNING",
                "creationTimestamp": _now(),
                "selfLink": f"{zone_url}/instances/{name}",
            }
            op = self._new_operation(project, zone, "insert", name, None)
        if rid:
            self.request_ids[rid] = op["name"]
        if self.lose_insert_responses > 0:
            self.lose_insert_responses -= 1
            return _error(503, "Backend Error (answer lost)", "backendError")
        return 200, op

    def _visible(self, instance: dict[str, Any]) -> dict[str, Any]:
        shown = dict(instance)
        if instance["status"] == "PROVISIONING":
            instance["status"] = "RUNNING"  # the next read sees it running
        return shown

    def _get(self, key: tuple[str, str, str]) -> tuple[int, dict[str, Any]]:
        instance = self.instances.get(key)
        if instance is None:
            return _error(404, f"The resource 'instances/{key[2]}' was not found", "notFound")
        return 200, self._visible(instance)

    def _delete(self, key: tuple[str, str, str]) -> tuple[int, dict[str, Any]]:
        if self.instances.pop(key, None) is None:
            return _error(404, f"The resource 'instances/{key[2]}' was not found", "notFound")
        return 200, self._new_operation(key[0], key[1], "delete", key[2], None)

    def _aggregated(self, project: str, expression: str) -> dict[str, Any]:
        wanted = _FILTER.search(expression) if expression else None
        items: dict[str, dict[str, Any]] = {}
        for (p, zone, _), instance in list(self.instances.items()):
            if p != project:
                continue
            labels = instance.get("labels", {})
            if wanted and labels.get(wanted["key"]) != wanted["value"]:
                continue
            items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(
                self._visible(instance)
            )
        return {
            "kind": "compute#instanceAggregatedList",
            "id": f"projects/{project}/aggregated/instances",
            "items": items,
            "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}/aggregated/instances",
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _error(
    status: int, message: str, reason: str, domain: str = "global"
) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
        }
    }


class _Handler(BaseHTTPRequestHandler):
    fake: GceFake  # set on a subclass per server

    def _answer(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw.strip() else None
        status, payload = self.fake.handle(self.command, parts.path, query, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer  # noqa: N815 - http.server's naming

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        """Stay quiet (pytest shows the recorded calls on failure instead)."""


@contextmanager
def gce_server() -> Iterator[GceFake]:
    """Run the fake on 127.0.0.1 (a free port) in a thread; shut it down on exit."""
    fake = GceFake()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="gce-fake", daemon=True
    )
    thread.start()
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

"""A local HTTPS fake of the Azure Resource Manager subset ``AzureProvider`` calls.

Shapes follow azure-mgmt-compute 39 (api-version 2026-04-01) and azure-core's ARM
long-running-operation polling:

* ``PUT  /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}``
  stores the body as the VM (``provisioningState: Creating``) and answers 201 (200 when it
  existed) with ``Azure-AsyncOperation`` pointing at ``/fake/operations/{id}``; that
  operation answers ``{"status": "Succeeded"}`` and flips the VM to ``Succeeded`` (or
  ``{"status": "Failed", "error": ...}`` with ``fail_operation``), after which the SDK's
  final GET on the VM returns it.
* ``GET`` of one VM: 200 or 404 ``ResourceNotFound``.
* ``DELETE``: 202 with ``Location`` and ``Azure-AsyncOperation`` (the VM shows
  ``Deleting`` until the operation is polled, then is gone: 404); 204 when there was none.
* ``GET .../virtualMachines``: ``{"value": [...], "nextLink": ...}`` in pages of
  ``page_size``.
* ``GET /api/retail/prices``: the Azure Retail Prices API over ``prices`` (filtered on the
  ``armRegionName``/``armSkuName``/``serviceName`` clauses of ``$filter``), in pages of
  ``prices_page_size`` linked by ``NextPageLink``.

ARM routes need ``api-version`` (400 otherwise) and a bearer token (401 otherwise). The
certificate comes from a throwaway ``trustme`` CA whose bundle is ``ca_path``: azure-core
refuses to send bearer tokens over plain HTTP. Faults: ``fail_put(code)`` fails the next
PUT synchronously with an ARM error; ``fail_operation(code)`` accepts the next PUT and
fails its operation; ``throttle_next = N`` answers the next N requests 429 with
``Retry-After: 0``. Every request is recorded in ``requests`` and every PUT body in
``put_bodies``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import trustme

VM_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Compute/virtualMachines(?:/(?P<name>[^/]+))?$",
    re.IGNORECASE,
)
OP_PATH = re.compile(r"^/fake/operations/(?P<op>[^/]+)$")
PRICES_PATH = "/api/retail/prices"


@dataclass
class ArmFake:
    """The fake's state and knobs; safe to touch from the test thread while it serves."""

    base_url: str = ""
    ca_path: str = ""
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    put_bodies: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    throttle_next: int = 0
    page_size: int = 50
    prices: list[dict[str, Any]] = field(default_factory=list)
    prices_page_size: int = 2
    _put_faults: list[tuple[int, str, str]] = field(default_factory=list)
    _op_faults: list[tuple[str, str]] = field(default_factory=list)
    _ops: dict[str, tuple[str, str, tuple[str, str] | None]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.RLock = field(default_factory=threading.RLock)

    def fail_put(self, code: str, status: int = 409, message: str = "") -> None:
        """Fail the next VM PUT with this ARM error code (nothing is created)."""
        with self.lock:
            self._put_faults.append((status, code, message or f"fake {code}"))

    def fail_operation(self, code: str, message: str = "") -> None:
        """Accept the next VM PUT, then fail its long-running operation with ``code``."""
        with self.lock:
            self._op_faults.append((code, message or f"fake {code}"))

    def tags(self, name: str) -> dict[str, str]:
        """The tags VM ``name`` carries (KeyError if there is none)."""
        with self.lock:
            return dict(self.vms[name.lower()].get("tags") or {})

    def calls(self, method: str) -> list[str]:
        """Paths of the requests made with ``method``."""
        with self.lock:
            return [p for m, p in self.requests if m == method]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ARG002 - base signature
        return

    # -- plumbing --------------------------------------------------------------------

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _handle(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with fake.lock:
            fake.requests.append((method, url.path))
            if fake.throttle_next > 0:
                fake.throttle_next -= 1
                self._send(
                    429,
                    {"error": {"code": "TooManyRequests", "message": "fake throttle"}},
                    {"Retry-After": "0"},
                )
                return
            if url.path == PRICES_PATH and method == "GET":
                self._prices(query)
                return
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                self._error(401, "AuthenticationFailed", "no bearer token")
                return
            if "api-version" not in query:
                self._error(400, "MissingApiVersionParameter", "api-version is required")
                return
            self._arm(method, url.path, query)

    def _arm(self, method: str, path: str, query: dict[str, str]) -> None:
        op = OP_PATH.match(path)
        if op and method == "GET":
            self._operation(op["op"])
            return
        match = VM_PATH.match(path)
        if match is None:
            self._error(404, "NotFound", f"no route {method} {path}")
            return
        name = match["name"]
        if name is None and method == "GET":
            self._list(path, query)
        elif name is not None and method == "PUT":
            self._put(path, name)
        elif name is not None and method == "GET":
            vm = self.server.fake.vms.get(name.lower())
            if vm is None:
                self._error(404, "ResourceNotFound", f"VM {name} not found")
            else:
                self._send(200, vm)
        elif name is not None and method == "DELETE":
            self._delete(name)
        else:
            self._error(405, "MethodNotAllowed", method)

    # -- routes ----------------------------------------------------------------------

    def _new_op(self, kind: str, name: str, fault: tuple[str, str] | None = None) -> str:
        fake = self.server.fake
        op_id = f"op{next(fake._ids)}"
        fake._ops[op_id] = (kind, name.lower(), fault)
        return f"{fake.base_url}/fake/operations/{op_id}?api-version=2026-04-01"

    def _put(self, path: str, name: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        fake.put_bodies.append(body)
        if fake._put_faults:
            status, code, message = fake._put_faults.pop(0)
            self._error(status, code, message)
            return
        key = name.lower()
        existing = fake.vms.get(key)
        vm = dict(body)
        props = dict(vm.get("properties") or {})
        props["provisioningState"] = "Creating" if existing is None else "Updating"
        props["vmId"] = (existing or {}).get("properties", {}).get("vmId") or f"vm-{key}"
        props["timeCreated"] = (existing or {}).get("properties", {}).get(
            "timeCreated"
        ) or datetime.now(UTC).isoformat().replace("+00:00", "Z")
        vm.update(
            id=path,
            name=name,
            type="Microsoft.Compute/virtualMachines",
            location=vm.get("location", ""),
            properties=props,
        )
        fake.vms[key] = vm
        fault = fake._op_faults.pop(0) if fake._op_faults else None
        op_url = self._new_op("put", name, fault)
        self._send(201 if existing is None else 200, vm, {"Azure-AsyncOperation": op_url})

    def _delete(self, name: str) -> None:
        fake = self.server.fake
        vm = fake.vms.get(name.lower())
        if vm is None:
            self._send(204)
            return
        vm["properties"]["provisioningState"] = "Deleting"
        op_url = self._new_op("delete", name)
        self._send(202, None, {"Azure-AsyncOperation": op_url, "Location": op_url})

    def _operation(self, op_id: str) -> None:
        fake = self.server.fake
        if op_id not in fake._ops:
            self._error(404, "NotFound", "no such operation")
            return
        kind, key, fault = fake._ops[op_id]
        vm = fake.vms.get(key)
        if kind == "delete":
            fake.vms.pop(key, None)
            self._send(200, {"status": "Succeeded"})
        elif fault is not None:
            if vm is not None:
                vm["properties"]["provisioningState"] = "Failed"
            code, message = fault
            self._send(200, {"status": "Failed", "error": {"code": code, "message": message}})
        else:
            if vm is not None:
                vm["properties"]["provisioningState"] = "Succeeded"
            self._send(200, {"status": "Succeeded"})

    def _list(self, path: str, query: dict[str, str]) -> None:
        fake = self.server.fake
        start = int(query.get("$skiptoken", "0"))
        vms = list(fake.vms.values())
        page = vms[start : start + fake.page_size]
        out: dict[str, Any] = {"value": page}
        if start + fake.page_size < len(vms):
            nxt = {"api-version": query["api-version"], "$skiptoken": str(start + fake.page_size)}
            out["nextLink"] = f"{fake.base_url}{path}?{urlencode(nxt)}"
        self._send(200, out)

    def _prices(self, query: dict[str, str]) -> None:
        fake = self.server.fake
        clauses = dict(re.findall(r"(\w+) eq '([^']*)'", query.get("$filter", "")))
        items = [
            item
            for item in fake.prices
            if all(str(item.get(k, "")).lower() == v.lower() for k, v in clauses.items())
        ]
        skip = int(query.get("$skip", "0"))
        page = items[skip : skip + fake.prices_page_size]
        out: dict[str, Any] = {
            "BillingCurrency": "USD",
            "CustomerEntityId": "Default",
            "CustomerEntityType": "Retail",
            "Items": page,
            "NextPageLink": None,
            "Count": len(page),
        }
        if skip + fake.prices_page_size < len(items):
            nxt = dict(query) | {"$skip": str(skip + fake.prices_page_size)}
            out["NextPageLink"] = f"{fake.base_url}{PRICES_PATH}?{urlencode(nxt)}"
        self._send(200, out)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: ArmFake


@contextlib.contextmanager
def arm_server() -> Iterator[ArmFake]:
    """Serve a fresh fake on 127.0.0.1 over HTTPS until the block exits (then shut down)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    with tempfile.TemporaryDirectory(prefix="arm-fake-") as tmp:
        ca_path = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        server = _Server(("127.0.0.1", 0), _Handler)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        fake = ArmFake(
            base_url=f"https://127.0.0.1:{server.server_address[1]}", ca_path=str(ca_path)
        )
        server.fake = fake
        thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="arm-fake", daemon=True
        )
        thread.start()
        try:
            yield fake
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)

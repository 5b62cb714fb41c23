"""EMULATED OpenAI-compatible inference endpoint: a local server for tests, the demo and drills.

This is not a model. It answers the OpenAI wire protocol with deterministic fake
output so that API workers can be exercised end to end without a provider account:

* ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``,
  ending with a usage chunk when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``), ``POST /v1/completions``, ``GET /v1/models``.
* Tokens are counted by one documented rule, ``count_tokens``: every run of word
  characters is a token and every other non-space character is one. The prompt is the
  concatenated message contents (no per-message overhead). The reply is the last user
  message's tokens repeated until ``max_tokens`` (default 16) are produced, joined by
  spaces, so ``completion_tokens == max_tokens`` and ``finish_reason`` is ``length``.
* ``Authorization: Bearer <key>`` is checked when a key is configured (401 otherwise).
* Injectable at run time (in process, or over HTTP at ``POST /emulated/config``): time
  to first token and per-token latency, scripted errors (the next N requests answer
  429 with ``Retry-After``, 500, 503, 400, ...), and its own limits: requests per
  minute (every request that passed authentication and validation, scripted errors
  included, its own 429s excluded) and tokens per minute (prompt plus completion of
  the requests it serves), both over a sliding 60 s window, answering 429 when a
  request would exceed them.
* A request log (``records()``, or ``GET /emulated/requests``) with arrival time,
  status, tokens and model, from which tests check that limits were never exceeded
  (``window_peaks``).
* An in-flight counter: requests being served (admitted, reply not yet written) now and
  at most at once (``in_flight()``, ``peak_in_flight(reset=...)``, or ``GET
  /emulated/in_flight``), from which tests check a client's concurrency.

Every response carries ``X-Fleet-Emulated: true`` and ``system_fingerprint``
``fleet-emulated``; every log line says EMULATED. Run it standalone with
``python -m fleet.emulated.openai_server --port 8099`` (the key, if any, comes from the
environment variable named by ``--api-key-env``, never from the command line).
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

log = logging.getLogger("fleet.emulated.openai")

WINDOW_S = 60.0
DEFAULT_MAX_TOKENS = 16
FINGERPRINT = "fleet-emulated"
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """The emulated tokenizer's count: word runs and other non-space characters."""
    return len(_TOKEN.findall(text))


def reply_tokens(prompt: str, max_tokens: int) -> list[str]:
    """The emulated reply: the prompt's tokens repeated until there are ``max_tokens``."""
    source = _TOKEN.findall(prompt) or ["emulated"]
    return list(itertools.islice(itertools.cycle(source), max_tokens))


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (``at``: the server clock at arrival)."""

    at: float
    path: str
    model: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    stream: bool
    note: str = ""

    @property
    def counts_as_request(self) -> bool:
        """Whether the requests-per-minute limit counts it (see the module docstring)."""
        if self.note == "scripted":
            return True
        return self.note != "rate_limit" and self.status not in (400, 401, 404)

    @property
    def served_tokens(self) -> int:
        """Tokens the tokens-per-minute limit counts (served requests only)."""
        return self.prompt_tokens + self.completion_tokens if self.status == 200 else 0  # noqa: PLR2004


def window_peaks(records: Iterable[RequestRecord], window_s: float = WINDOW_S) -> tuple[int, int]:
    """The most requests and tokens counted in any ``window_s`` window (pure).

    Windows start at each arrival and include arrivals ``< start + window_s``, the
    same rule the server enforces.
    """
    rows = sorted((r for r in records if r.counts_as_request), key=lambda r: r.at)
    most_requests = most_tokens = 0
    for i, first in enumerate(rows):
        inside = [r for r in rows[i:] if r.at < first.at + window_s]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(r.served_tokens for r in inside))
    return most_requests, most_tokens


@dataclass(frozen=True, slots=True)
class ScriptedError:
    """An error the server answers instead of serving a request."""

    status: int
    retry_after_s: float | None = None


@dataclass
class EmulatedConfig:
    """What the server does; change it through ``EmulatedOpenAIServer.configure``."""

    api_key: str | None = None
    models: frozenset[str] | None = None  # None: any model name is served
    ttft_s: float = 0.0
    per_token_s: float = 0.0
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    errors: deque[ScriptedError] = field(default_factory=deque)


class _Reject(Exception):  # noqa: N818 - internal control flow, not an error type users see
    def __init__(
        self, status: int, message: str, kind: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.retry_after_s = status, kind, retry_after_s


@dataclass(frozen=True, slots=True)
class _Call:
    path: str
    model: str
    prompt: str
    echo_from: str
    max_tokens: int
    stream: bool
    include_usage: bool
    chat: bool


class EmulatedOpenAIServer:
    """The EMULATED endpoint on a background thread (``with EmulatedOpenAIServer() as s: ...``).

    ``base_url`` is what a client uses as its OpenAI base (``http://127.0.0.1:PORT/v1``).
    Thread-safe; ``clock`` (default ``time.monotonic``) stamps the request log.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Bind ``host:port`` (0: a free port); serving starts with ``start()``."""
        self.config = EmulatedConfig(
            api_key=api_key, models=frozenset(models) if models is not None else None
        )
        self.clock = clock
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._peak_in_flight = 0
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in ``/v1``."""
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Self:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="emulated-openai", daemon=True
        )
        self._thread.start()
        log.info("EMULATED OpenAI-compatible server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop."""
        self.stop()

    def configure(self, **changes: Any) -> None:  # noqa: ANN401 - EmulatedConfig's fields
        """Change ``ttft_s``, ``per_token_s``, ``requests_per_min``, ``tokens_per_min``, ...

        Raises:
            TypeError: an unknown setting.

        """
        with self._lock:
            for name, value in changes.items():
                if name == "errors" or not hasattr(self.config, name):
                    raise TypeError(f"unknown setting {name!r}")
                setattr(self.config, name, value)

    def fail_next(self, count: int, status: int = 429, retry_after_s: float | None = None) -> None:
        """Answer the next ``count`` valid requests with ``status`` instead of serving them."""
        with self._lock:
            self.config.errors.extend([ScriptedError(status, retry_after_s)] * count)

    def records(self) -> list[RequestRecord]:
        """A copy of the request log."""
        with self._lock:
            return list(self._records)

    def in_flight(self) -> int:
        """Requests being served now."""
        with self._lock:
            return self._in_flight

    def peak_in_flight(self, *, reset: bool = False) -> int:
        """The most requests served at once since the start or the last reset.

        ``reset`` starts a new count from the requests in flight now (after reading).
        """
        with self._lock:
            peak = self._peak_in_flight
            if reset:
                self._peak_in_flight = self._in_flight
            return peak

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Count one admitted request as in flight while its reply is written."""
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    # --- request handling (called on the server's threads) -----------------------------

    def admit(self, call: _Call) -> RequestRecord:
        """Decide, under the lock, whether ``call`` is served; log it either way.

        Raises:
            _Reject: a scripted error or a limit; the record is already logged.

        """
        prompt_tokens = count_tokens(call.prompt)
        with self._lock:
            now = self.clock()
            cfg = self.config
            record = RequestRecord(
                now, call.path, call.model, 200, prompt_tokens, call.max_tokens, call.stream
            )
            reject: _Reject | None = None
            if cfg.errors:
                err = cfg.errors.popleft()
                reject = _Reject(
                    err.status, "EMULATED scripted error", "scripted", err.retry_after_s
                )
            else:
                reject = self._over_limit(now, record)
            if reject is not None:
                record = RequestRecord(
                    now,
                    call.path,
                    call.model,
                    reject.status,
                    prompt_tokens,
                    0,
                    call.stream,
                    reject.kind,
                )
            self._records.append(record)
        if reject is not None:
            raise reject
        return record

    def _over_limit(self, now: float, record: RequestRecord) -> _Reject | None:
        cfg = self.config
        recent = [r for r in self._records if r.at > now - WINDOW_S and r.counts_as_request]
        if cfg.requests_per_min is not None and len(recent) + 1 > cfg.requests_per_min:
            wait = recent[0].at + WINDOW_S - now
            return _Reject(429, "EMULATED rate limit: requests per minute", "rate_limit", wait)
        used = sum(r.served_tokens for r in recent)
        if cfg.tokens_per_min is not None and used + record.served_tokens > cfg.tokens_per_min:
            wait = recent[0].at + WINDOW_S - now if recent else WINDOW_S
            return _Reject(429, "EMULATED rate limit: tokens per minute", "rate_limit", wait)
        return None

    def reject_logged(self, path: str, status: int, note: str) -> None:
        """Log a request refused before admission (bad key, bad body, unknown model)."""
        with self._lock:
            self._records.append(RequestRecord(self.clock(), path, "", status, 0, 0, False, note))  # noqa: FBT003

    def next_id(self) -> int:
        """A sequence number for response ids."""
        return next(self._ids)


def _parse_call(path: str, body: dict[str, Any], models: frozenset[str] | None) -> _Call:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(400, "model: required", "invalid_request_error")
    if models is not None and model not in models:
        raise _Reject(404, f"The model `{model}` does not exist", "model_not_found")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _Reject(400, "max_tokens: expected a positive integer", "invalid_request_error")
    options = body.get("stream_options") or {}
    stream = bool(body.get("stream"))
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reject(400, "messages: expected a non-empty list", "invalid_request_error")
        contents: list[str] = []
        last_user = ""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise _Reject(400, "messages: each needs a string content", "invalid_request_error")
            contents.append(m["content"])
            if m.get("role") == "user":
                last_user = m["content"]
        joined = "\n".join(contents)
        return _Call(path, model, joined, last_user, max_tokens, stream, usage, chat=True)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _Reject(400, "prompt: expected a string", "invalid_request_error")
    return _Call(path, model, prompt, prompt, max_tokens, stream, usage, chat=False)


def _handler_for(server: EmulatedOpenAIServer) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - one small HTTP handler
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fleet-emulated-openai/1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 - stdlib signature
            """Quiet: the request log replaces the access log."""

        def _send_json(
            self, status: int, payload: object, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Fleet-Emulated", "true")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: _Reject) -> None:
            headers = {}
            if exc.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
                headers["retry-after-ms"] = str(max(1, round(exc.retry_after_s * 1000)))
            body = {"error": {"message": str(exc), "type": exc.kind, "code": exc.status}}
            self._send_json(exc.status, body, headers)

        def _authorized(self) -> bool:
            key = server.config.api_key
            if key is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise _Reject(400, "body: not JSON", "invalid_request_error") from None
            if not isinstance(body, dict):
                raise _Reject(400, "body: expected a JSON object", "invalid_request_error")
            return body

        def do_GET(self) -> None:
            if not self._authorized():
                server.reject_logged(self.path, 401, "bad key")
                self._error(_Reject(401, "Invalid API key", "invalid_api_key"))
            elif self.path == "/v1/models":
                names = sorted(server.config.models or {"emulated"})
                data = [{"id": n, "object": "model", "owned_by": FINGERPRINT} for n in names]
                self._send_json(200, {"object": "list", "data": data})
            elif self.path == "/emulated/requests":
                self._send_json(200, [asdict(r) for r in server.records()])
            elif self.path == "/emulated/in_flight":
                body = {"in_flight": server.in_flight(), "peak": server.peak_in_flight()}
                self._send_json(200, body)
            else:
                self._error(_Reject(404, f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            try:
                call = self._admitted()
            except _Reject as exc:
                self._error(exc)
                return
            if call is not None:
                with server.serving():
                    self._serve(call)

        def _admitted(self) -> _Call | None:
            """The call to serve (None: an admin request, already answered); raises _Reject."""
            body = self._body()
            if not self._authorized():
                server.reject_logged(self.path, 401, "bad key")
                raise _Reject(401, "Invalid API key", "invalid_api_key")
            if self.path == "/emulated/config":
                self._configure(body)
                return None
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                raise _Reject(404, f"no route {self.path}", "not_found")
            try:
                call = _parse_call(self.path, body, server.config.models)
            except _Reject as exc:
                server.reject_logged(self.path, exc.status, exc.kind)
                raise
            server.admit(call)
            return call

        def _configure(self, body: dict[str, Any]) -> None:
            fail = body.pop("fail_next", None)
            try:
                server.configure(**body)
            except TypeError as exc:
                raise _Reject(400, str(exc), "invalid_request_error") from None
            if isinstance(fail, dict):
                server.fail_next(
                    int(fail.get("count", 1)),
                    int(fail.get("status", 429)),
                    fail.get("retry_after_s"),
                )
            log.warning(
                "EMULATED server reconfigured: %s", sorted(body) + (["fail_next"] if fail else [])
            )
            self._send_json(200, {"ok": True})

        def _serve(self, call: _Call) -> None:
            tokens = reply_tokens(call.echo_from, call.max_tokens)
            usage = {
                "prompt_tokens": count_tokens(call.prompt),
                "completion_tokens": len(tokens),
                "total_tokens": count_tokens(call.prompt) + len(tokens),
            }
            ident = f"{'chatcmpl' if call.chat else 'cmpl'}-emulated-{server.next_id()}"
            head = {"id": ident, "created": int(time.time()), "model": call.model,
                    "system_fingerprint": FINGERPRINT}  # fmt: skip
            time.sleep(server.config.ttft_s)
            if call.stream:
                self._stream(call, head, tokens, usage)
                return
            time.sleep(server.config.per_token_s * len(tokens))
            text = " ".join(tokens)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if call.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            obj = "chat.completion" if call.chat else "text_completion"
            self._send_json(200, {**head, "object": obj, "choices": [choice], "usage": usage})

        def _stream(
            self, call: _Call, head: dict[str, Any], tokens: list[str], usage: dict[str, int]
        ) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Fleet-Emulated", "true")
            self.end_headers()
            obj = "chat.completion.chunk" if call.chat else "text_completion"
            for event in _events(call, head, obj, tokens, usage, server.config.per_token_s):
                data = f"data: {event}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def _events(
    call: _Call,
    head: dict[str, Any],
    obj: str,
    tokens: list[str],
    usage: dict[str, int],
    per_token_s: float,
) -> Iterator[str]:
    """The server-sent events of one streamed reply (sleeping ``per_token_s`` per token)."""
    for i, token in enumerate(tokens):
        piece = token if i == 0 else f" {token}"
        if i:
            time.sleep(per_token_s)
        choice: dict[str, Any] = {"index": 0, "finish_reason": None}
        if call.chat:
            choice["delta"] = {"content": piece} if i else {"role": "assistant", "content": piece}
        else:
            choice["text"] = piece
        yield json.dumps({**head, "object": obj, "choices": [choice]})
    last: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    last["delta" if call.chat else "text"] = {} if call.chat else ""
    yield json.dumps({**head, "object": obj, "choices": [last]})
    if call.include_usage:
        yield json.dumps({**head, "object": obj, "choices": [], "usage": usage})
    yield "[DONE]"


def main(argv: list[str] | None = None) -> None:
    """``python -m fleet.emulated.openai_server``: serve until interrupted."""
    parser = argparse.ArgumentParser(
        description="EMULATED OpenAI-compatible endpoint (fake output)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument(
        "--api-key-env", default=None, help="Name of the variable holding the key to require."
    )
    parser.add_argument("--requests-per-min", type=int, default=None)
    parser.add_argument("--tokens-per-min", type=int, default=None)
    parser.add_argument("--ttft-s", type=float, default=0.0)
    parser.add_argument("--per-token-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    srv = EmulatedOpenAIServer(args.host, args.port, api_key=key)
    srv.configure(
        requests_per_min=args.requests_per_min,
        tokens_per_min=args.tokens_per_min,
        ttft_s=args.ttft_s,
        per_token_s=args.per_token_s,
    )
    srv.start()
    banner = f"EMULATED OpenAI-compatible server (fake output, not a model): {srv.base_url}"
    print(banner, flush=True)  # noqa: T201 - the ops command's one line of output
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()

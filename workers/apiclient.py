"""Calling an OpenAI-compatible endpoint: request building, retry decisions, SSE parsing, the call.

The decisions are pure functions (``build_request``, ``estimate_tokens``,
``retry_delay``, ``parse_retry_after``, ``SseAccumulator``); ``call_endpoint`` is the
thin async I/O around them (httpx), shared rate limits included.

Retry contract: a 429, a 408, any 5xx and a connection or timeout error are retried up
to ``RetryPolicy.max_attempts`` attempts in all, with full-jitter exponential backoff
(``base_s * 2**(n-1)`` capped at ``cap_s``, times a uniform draw); a ``Retry-After`` /
``retry-after-ms`` header sets a floor on the delay (a provider asking for longer than
``max_retry_after_s`` ends the call). Any other 4xx is not retried. Every attempt
draws from the rate limiter first; an attempt that got no completion gives its token
estimate back (its request still counts).

The API key goes into the ``Authorization`` header and nowhere else: not into an
error message, a log line, a ``repr`` or a result.

The same call serves fleet's local OpenAI-compatible servers (``workers.engines.vllm``):
``ChatRequest.path`` picks the route (``completions``, ``embeddings``; default
``chat/completions``), an endpoint without a key sends no ``Authorization`` header, the
accumulator also reads legacy completion chunks (``choices[].text``, ``token_ids``), and a
``Completion`` carries the time to the first streamed token and, for a non-streamed
reply, its JSON body (``data``: embeddings live there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from fleet.obs.logs import get_logger
from workers.handlers import HandlerError, describe, get_float, get_int, input_object

if TYPE_CHECKING:
    from pydantic import JsonValue

    from fleet.catalog.apis import ApiOffer
    from fleet.ratelimit import Grant, RateLimiter
    from fleet.spec import TaskSpec

log = get_logger("fleet.api")

DEFAULT_MAX_TOKENS = 256
CHARS_PER_TOKEN = 4  # estimate only; ``settle`` corrects it with the endpoint's count
RETRYABLE_4XX = frozenset({408, 429})
_INPUT_KEYS = ("prompt", "messages", "system", "temperature", "seed", "stream")
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_HTTP_OK = 200
_HTTP_SERVER_ERROR = 500


class ApiCallError(Exception):
    """The endpoint did not complete the request (a non-retryable status, or retries exhausted).

    ``status`` is the last HTTP status (None: no response, e.g. connection refused).
    """

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        """Record the message, the last status and how many attempts were made."""
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class ApiRejectedError(ApiCallError, HandlerError):
    """The endpoint refused the request itself (a 4xx other than 408/429): never retried.

    It is a ``HandlerError``, so the task fails at once (refused, not retried later).
    """


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and as whom to call: the key is kept out of ``repr``."""

    provider: str
    base_url: str
    api_model: str
    api_key: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        """Request headers (with the bearer token when there is a key)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The body of one call (to ``path``, under the base URL) and the facts the limiter needs."""

    body: dict[str, Any]
    prompt_chars: int
    max_tokens: int
    path: str = "chat/completions"

    @property
    def stream(self) -> bool:
        """Whether the reply is streamed (server-sent events)."""
        return bool(self.body.get("stream"))


def _messages(raw: JsonValue) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise HandlerError(f"input.messages: expected a non-empty list, got {describe(raw)}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise HandlerError(f"input.messages[{i}]: expected an object, got {describe(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise HandlerError(
                f"input.messages[{i}].role: expected one of {', '.join(sorted(_ROLES))}"
            )
        if not isinstance(content, str):
            raise HandlerError(
                f"input.messages[{i}].content: expected a string, got {describe(content)}"
            )
        out.append({"role": str(role), "content": content})
    return out


def _conversation(data: dict[str, JsonValue]) -> list[dict[str, str]]:
    """The messages of ``input``: ``messages``, or ``prompt`` as one user message; ``system`` first."""
    if ("prompt" in data) == ("messages" in data):
        raise HandlerError("input: give prompt or messages (exactly one)")
    if "messages" in data:
        messages = _messages(data["messages"])
    else:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise HandlerError(f"input.prompt: expected a string, got {describe(prompt)}")
        messages = [{"role": "user", "content": prompt}]
    system = data.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise HandlerError(f"input.system: expected a string, got {describe(system)}")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def build_request(spec: TaskSpec, offer: ApiOffer) -> ChatRequest:
    """The chat request for an ``inference`` spec on ``offer`` (pure).

    ``spec.input`` is a prompt string, or an object with ``prompt`` or ``messages``
    (OpenAI roles and string contents), optional ``system``, ``temperature`` (0-2),
    ``seed`` and ``stream`` (default true). ``tokens_out`` is ``max_tokens`` (default
    256); prompt and output must fit the offer's context window.

    Raises:
        HandlerError: bad input, naming the field.

    """
    data: dict[str, JsonValue] = (
        {"prompt": spec.input} if isinstance(spec.input, str) else input_object(spec, _INPUT_KEYS)
    )
    messages = _conversation(data)
    max_tokens = spec.tokens_out or DEFAULT_MAX_TOKENS
    if not offer.fits_context(spec.tokens_in, max_tokens):
        raise HandlerError(
            f"tokens_in: {spec.tokens_in:,} + tokens_out {max_tokens:,} exceed {offer.key}'s "
            f"context of {offer.context_tokens:,} tokens"
        )
    stream = data.get("stream", True)
    if not isinstance(stream, bool):
        raise HandlerError(f"input.stream: expected a boolean, got {describe(stream)}")
    body: dict[str, Any] = {
        "model": offer.api_model,
        "messages": messages,
        "max_tokens": max_tokens,
    }
    if "temperature" in data:
        body["temperature"] = get_float(data, "temperature", 1.0, 0.0, 2.0)
    if "seed" in data:
        body["seed"] = get_int(data, "seed", 0, 0, 2**63 - 1)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    chars = sum(len(m["content"]) for m in messages)
    return ChatRequest(body, chars, max_tokens)


def estimate_tokens(spec: TaskSpec, request: ChatRequest) -> int:
    """Tokens to reserve before the call: the larger prompt estimate plus ``max_tokens``."""
    prompt = max(spec.tokens_in, math.ceil(request.prompt_chars / CHARS_PER_TOKEN))
    return prompt + request.max_tokens


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds on retrying one call (see the module docstring)."""

    max_attempts: int = 5
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0


def is_retryable(status: int | None) -> bool:
    """True for no response (None), 408, 429 and any 5xx."""
    return status is None or status in RETRYABLE_4XX or status >= _HTTP_SERVER_ERROR


def retry_delay(
    policy: RetryPolicy, attempts: int, status: int | None, retry_after_s: float | None, draw: float
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up (pure).

    Args:
        policy: the bounds.
        attempts: attempts made so far (1 after the first).
        status: the last HTTP status, None when there was no response.
        retry_after_s: what the endpoint asked for, if anything.
        draw: a uniform number in [0, 1) (the jitter).

    """
    if not is_retryable(status) or attempts >= policy.max_attempts:
        return None
    if retry_after_s is not None and retry_after_s > policy.max_retry_after_s:
        return None
    backoff = draw * min(policy.cap_s, policy.base_s * 2.0 ** (attempts - 1))
    return max(backoff, retry_after_s or 0.0)


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - now)


@dataclass
class SseAccumulator:
    """Collects a streamed chat completion from its ``data:`` lines (pure)."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    chunks: int = 0
    done: bool = False
    emulated: bool = False

    def feed(self, line: str) -> None:
        """Take one line of the event stream (blank lines and comments are ignored)."""
        if not line.startswith("data:"):
            return
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            self.done = True
            return
        event = json.loads(payload)
        self.emulated = self.emulated or event.get("system_fingerprint") == "fleet-emulated"
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            ids = choice.get("token_ids")
            if isinstance(ids, list):
                self.token_ids.extend(int(i) for i in ids)
            if isinstance(piece, str) and piece:
                self.parts.append(piece)
            if (isinstance(piece, str) and piece) or ids:
                self.chunks += 1
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def text(self) -> str:
        """The output so far."""
        return "".join(self.parts)


@dataclass(frozen=True, slots=True)
class Completion:
    """One completed call: output, token usage (as the endpoint reported it) and attempts.

    ``ttft_s``: seconds from sending the request to its first streamed token (None when not
    streamed); ``token_ids``: the generated token ids when the endpoint returned them;
    ``data``: the JSON body of a non-streamed reply.
    """

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str | None
    usage_reported: bool
    attempts: int
    emulated: bool
    rate_wait_s: float
    ttft_s: float | None = None
    token_ids: tuple[int, ...] | None = None
    data: dict[str, Any] | None = None


class _StatusError(Exception):
    def __init__(self, status: int, detail: str, retry_after_s: float | None) -> None:
        super().__init__(detail)
        self.status, self.retry_after_s = status, retry_after_s


def _error_detail(raw: bytes) -> str:
    """The provider's error message, shortened (never echoes request headers)."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace")
    return str(message)[:200]


async def _post_once(
    client: httpx.AsyncClient, endpoint: Endpoint, request: ChatRequest, estimate_in: int
) -> Completion:
    url = f"{endpoint.base_url.rstrip('/')}/{request.path}"
    started = time.monotonic()
    ttft: float | None = None
    token_ids: tuple[int, ...] | None = None
    data: dict[str, Any] | None = None
    if request.stream:
        acc = SseAccumulator()
        async with client.stream(
            "POST", url, json=request.body, headers=endpoint.headers()
        ) as resp:
            if resp.status_code != _HTTP_OK:
                raw = await resp.aread()
                raise _StatusError(
                    resp.status_code,
                    _error_detail(raw),
                    parse_retry_after(resp.headers, time.time()),
                )
            async for line in resp.aiter_lines():
                acc.feed(line)
                if ttft is None and acc.chunks:
                    ttft = time.monotonic() - started
            emulated = acc.emulated or resp.headers.get("x-fleet-emulated") == "true"
        usage = acc.usage
        text, finish = acc.text, acc.finish_reason
        fallback_out = acc.chunks
        token_ids = tuple(acc.token_ids) if acc.token_ids else None
    else:
        resp = await client.post(url, json=request.body, headers=endpoint.headers())
        if resp.status_code != _HTTP_OK:
            raise _StatusError(
                resp.status_code,
                _error_detail(resp.content),
                parse_retry_after(resp.headers, time.time()),
            )
        data = resp.json()
        choice = (data.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or choice.get("text") or "")
        finish = choice.get("finish_reason")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        emulated = resp.headers.get("x-fleet-emulated") == "true"
        fallback_out = 0
    if usage is not None:
        tin, tout = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    else:
        tin, tout = estimate_in, fallback_out
    return Completion(text, tin, tout, finish, usage is not None, 0, emulated, 0.0,
                      ttft, token_ids, data)  # fmt: skip


async def _acquire(
    limiter: RateLimiter, tokens: int, timeout_s: float, sleep: Callable[[float], Awaitable[None]]
) -> Grant:
    from fleet.ratelimit import Grant  # noqa: PLC0415 - keeps this module light

    started = limiter.clock()
    while not isinstance(step := limiter.attempt(tokens, started, timeout_s), Grant):
        await sleep(min(step, 5.0))
    return step


async def call_endpoint(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    request: ChatRequest,
    tokens_estimate: int,
    limiter: RateLimiter | None,
    policy: RetryPolicy = RetryPolicy(),
    *,
    rate_wait_timeout_s: float = 300.0,
    draw: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Completion:
    """Call the endpoint until it completes, the policy gives up, or the limiter times out.

    Raises:
        ApiRejectedError: a non-retryable status (an ``ApiCallError`` and a ``HandlerError``).
        ApiCallError: retries exhausted (the message names the
            provider, the status and the endpoint's own message; never the key).
        fleet.ratelimit.RateLimitError: no rate-limit grant in time, or a request larger
            than the buckets.

    """
    estimate_in = tokens_estimate - request.max_tokens
    waited = 0.0
    attempts = 0
    while True:
        attempts += 1
        grant = None
        if limiter is not None:
            grant = await _acquire(limiter, tokens_estimate, rate_wait_timeout_s, sleep)
            waited += grant.waited_s
        try:
            done = await _post_once(client, endpoint, request, estimate_in)
        except _StatusError as exc:
            status, retry_after, detail = exc.status, exc.retry_after_s, str(exc)
        except httpx.TransportError as exc:
            status, retry_after, detail = None, None, f"{type(exc).__name__} (no response)"
        else:
            if limiter is not None and grant is not None:
                limiter.settle(grant, done.tokens_in + done.tokens_out)
            return dataclasses.replace(done, attempts=attempts, rate_wait_s=waited)
        if limiter is not None and grant is not None:
            limiter.settle(grant, 0)
        delay = retry_delay(policy, attempts, status, retry_after, draw())
        shown = "no response" if status is None else f"HTTP {status}"
        if delay is None:
            why = (
                "not retryable"
                if not is_retryable(status)
                else f"gave up after {attempts} attempt(s)"
            )
            error = ApiCallError if is_retryable(status) else ApiRejectedError
            raise error(f"{endpoint.provider}: {shown} ({why}): {detail}", status, attempts)
        log.warning(
            "api.retry",
            provider=endpoint.provider,
            attempt=attempts,
            status=status,
            delay_s=round(delay, 3),
        )
        await sleep(delay)

"""API workers' client side: request building, retry decisions, SSE, cost; and the emulated server.

The ``call_endpoint`` tests talk real HTTP to ``EmulatedOpenAIServer`` in this process
(no broker, no worker); the worker-process path is in tests/integration/test_api_workers.py.
"""

from __future__ import annotations

import asyncio
import json
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from fleet.catalog import default_catalog
from fleet.catalog.apis import ApiOffer, find_api_offer
from fleet.emulated.openai_server import (
    EmulatedOpenAIServer,
    RequestRecord,
    count_tokens,
    reply_tokens,
    window_peaks,
)
from fleet.ratelimit import Limits, MemoryBucket, RateLimiter
from fleet.spec import parse_spec
from workers.apiclient import (
    ApiCallError,
    ApiRejectedError,
    Endpoint,
    RetryPolicy,
    SseAccumulator,
    build_request,
    call_endpoint,
    estimate_tokens,
    parse_retry_after,
    retry_delay,
)
from workers.handlers import HandlerError

KEY = "sk-test-" + "k" * 24


def offer() -> ApiOffer:
    found = find_api_offer(default_catalog(), "groq", "llama-3.1-8b-instruct")
    assert found is not None
    return found


def spec(input_: Any, tokens_in: int = 10, tokens_out: int = 8) -> Any:
    return parse_spec(
        {
            "kind": "inference",
            "model": {"name": "llama-3.1-8b-instruct", "params_b": 8},
            "input": input_,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
    )


# --- building the request --------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_", "messages"),
    [
        ("hello there", [{"role": "user", "content": "hello there"}]),
        ({"prompt": "hi"}, [{"role": "user", "content": "hi"}]),
        (
            {"prompt": "hi", "system": "be brief"},
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        ),
    ],
)
def test_request_messages_from_each_input_shape(input_, messages):
    """A prompt string, {"prompt"} and {"messages"} all become chat messages."""
    req = build_request(spec(input_), offer())
    assert req.body["messages"] == messages
    assert req.body["model"] == offer().api_model  # the provider's own id, not fleet's name
    assert req.body["max_tokens"] == 8
    assert req.body["stream"] is True
    assert req.body["stream_options"] == {"include_usage": True}


def test_request_options_pass_through():
    """Temperature and seed are forwarded; stream false collects the reply in one body."""
    req = build_request(
        spec({"prompt": "x", "temperature": 0.2, "seed": 7, "stream": False}), offer()
    )
    assert req.body["temperature"] == 0.2
    assert req.body["seed"] == 7
    assert "stream" not in req.body
    assert not req.stream


@pytest.mark.parametrize(
    ("input_", "field"),
    [
        ({"prompt": "a", "messages": []}, "input: give prompt or messages"),
        ({"messages": []}, "input.messages"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "input.messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "input.messages[0].content"),
        ({"prompt": "a", "top_k": 3}, "input.top_k"),
        ({"prompt": "a", "temperature": 9}, "input.temperature"),
        ({"prompt": 5}, "input.prompt"),
        (None, "input"),
    ],
)
def test_bad_input_is_refused_naming_the_field(input_, field):
    """Each malformed input fails with a HandlerError that starts with the field."""
    with pytest.raises(HandlerError) as info:
        build_request(spec(input_), offer())
    assert str(info.value).startswith(field)


def test_request_beyond_the_context_window_is_refused():
    """Prompt plus output larger than the offer's context is bad input, not a call."""
    big = offer().context_tokens
    with pytest.raises(HandlerError, match="context"):
        build_request(spec("x", tokens_in=big, tokens_out=10), offer())


def test_token_estimate_covers_prompt_and_max_tokens():
    """The reservation is the larger of tokens_in and chars/4, plus max_tokens."""
    assert (
        estimate_tokens(
            spec("x" * 400, tokens_in=10, tokens_out=50),
            build_request(spec("x" * 400, 10, 50), offer()),
        )
        == 150
    )
    assert estimate_tokens(spec("hi", tokens_in=30), build_request(spec("hi", 30), offer())) == 38


def test_cost_is_tokens_at_the_offer_prices():
    """1M input and 1M output tokens cost the two per-million prices."""
    o = offer()
    assert o.cost_usd(1_000_000, 1_000_000) == pytest.approx(o.usd_per_m_input + o.usd_per_m_output)


# --- retry decisions (pure) -------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=4, base_s=1.0, cap_s=8.0, max_retry_after_s=30.0)


@pytest.mark.parametrize(
    ("attempts", "status", "retry_after", "draw", "expected"),
    [
        (1, 429, None, 0.5, 0.5),  # full jitter on base 1 s
        (2, 503, None, 0.5, 1.0),  # doubles
        (3, 500, None, 0.99, 3.96),
        (3, None, None, 1.0, 4.0),  # no response: retried like a 5xx
        (1, 429, 2.5, 0.1, 2.5),  # Retry-After is a floor
        (1, 408, None, 0.0, 0.0),
        (4, 429, None, 0.5, None),  # attempts exhausted
        (1, 400, None, 0.5, None),  # a 4xx is not retried
        (1, 401, None, 0.5, None),
        (1, 404, None, 0.5, None),
        (1, 429, 31.0, 0.5, None),  # asked to wait longer than the policy allows
    ],
)
def test_retry_delay_table(attempts, status, retry_after, draw, expected):
    """Which outcomes are retried, and after how long."""
    got = retry_delay(POLICY, attempts, status, retry_after, draw)
    assert got == (None if expected is None else pytest.approx(expected))


def test_backoff_is_capped():
    """The exponential stops growing at cap_s."""
    assert retry_delay(RetryPolicy(max_attempts=50, base_s=1, cap_s=8), 20, 500, None, 1.0) == 8.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "Retry-After": "1"}, 0.25),
        ({"Retry-After": formatdate(1_000_010, usegmt=True)}, 10.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    """Seconds, milliseconds (preferred) and HTTP dates; garbage is ignored."""
    got = parse_retry_after(headers, now=1_000_000.0)
    assert got == (None if expected is None else pytest.approx(expected))


def test_sse_accumulator_collects_text_usage_and_finish():
    """Content deltas concatenate; the usage chunk and finish reason are kept; [DONE] ends."""
    acc = SseAccumulator()
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    for e in events:
        acc.feed(f"data: {json.dumps(e)}")
        acc.feed("")
    acc.feed(": keep-alive comment")
    acc.feed("data: [DONE]")
    assert (acc.text, acc.finish_reason, acc.done) == ("Hello", "stop", True)
    assert acc.usage == {"prompt_tokens": 4, "completion_tokens": 2}


# --- the emulated server ------------------------------------------------------------------


def test_emulated_tokenizer_rule():
    """Word runs and other non-space characters are one token each; replies cycle the prompt."""
    assert count_tokens("Hello, world!") == 4
    assert reply_tokens("a b", 5) == ["a", "b", "a", "b", "a"]
    assert reply_tokens("", 2) == ["emulated", "emulated"]


def test_window_peaks_counts_sliding_windows():
    """Peaks are over windows starting at each arrival; refused and bad requests do not count."""
    rows = [
        RequestRecord(0.0, "/v1/chat/completions", "m", 200, 5, 5, False),
        RequestRecord(30.0, "/v1/chat/completions", "m", 200, 5, 5, False),
        RequestRecord(59.9, "/v1/chat/completions", "m", 503, 5, 0, False, "scripted"),
        RequestRecord(60.0, "/v1/chat/completions", "m", 200, 5, 5, False),
        RequestRecord(61.0, "/v1/chat/completions", "m", 429, 5, 0, False, "rate_limit"),
        RequestRecord(62.0, "/v1/chat/completions", "", 401, 0, 0, False, "bad key"),
    ]
    assert window_peaks(rows) == (3, 20)


def test_server_enforces_its_own_limits_and_logs_them():
    """Past requests/min the server answers 429 with Retry-After and logs the refusal."""
    with EmulatedOpenAIServer() as server:
        server.configure(requests_per_min=2)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        url = f"{server.base_url}/chat/completions"
        codes = [httpx.post(url, json=body).status_code for _ in range(3)]
        last = httpx.post(url, json=body)
    assert codes == [200, 200, 429]
    assert int(last.headers["Retry-After"]) >= 1
    assert [r.note for r in server.records()][-2:] == ["rate_limit", "rate_limit"]
    assert window_peaks(server.records())[0] == 2


def test_server_non_streamed_reply_and_models():
    """A plain JSON reply carries the echo, usage and the emulated marks; /v1/models answers."""
    with EmulatedOpenAIServer(api_key=KEY, models=["emu-8b"]) as server:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {
            "model": "emu-8b",
            "messages": [{"role": "user", "content": "one two"}],
            "max_tokens": 3,
        }
        reply = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=headers)
        models = httpx.get(f"{server.base_url}/models", headers=headers).json()
        unknown = httpx.post(
            f"{server.base_url}/chat/completions", json={**body, "model": "x"}, headers=headers
        )
        no_key = httpx.get(f"{server.base_url}/models")
    data = reply.json()
    assert data["choices"][0]["message"]["content"] == "one two one"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert reply.headers["x-fleet-emulated"] == "true"
    assert [m["id"] for m in models["data"]] == ["emu-8b"]
    assert unknown.status_code == 404
    assert no_key.status_code == 401


# --- call_endpoint against the emulated server (real HTTP, in process) -------------------


class Sleeps:
    """An injected async sleep that records its delays and does not wait."""

    def __init__(self) -> None:
        """No delays yet."""
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record ``seconds``; return at once."""
        self.delays.append(seconds)


def call(
    server: EmulatedOpenAIServer,
    request_spec: Any,
    *,
    key: str | None = KEY,
    base: str | None = None,
    policy: RetryPolicy = POLICY,
    limiter: RateLimiter | None = None,
) -> tuple[Any, Sleeps]:
    sleeps = Sleeps()
    endpoint = Endpoint("emu", base or server.base_url, offer().api_model, key)
    req = build_request(request_spec, offer())

    async def go() -> Any:
        async with httpx.AsyncClient(timeout=10) as client:
            return await call_endpoint(
                client,
                endpoint,
                req,
                estimate_tokens(request_spec, req),
                limiter,
                policy,
                draw=lambda: 0.5,
                sleep=sleeps,
            )

    return asyncio.run(go()), sleeps


def test_streamed_call_returns_text_and_reported_usage():
    """A streamed call reassembles the text and takes the endpoint's usage chunk."""
    with EmulatedOpenAIServer(api_key=KEY) as server:
        done, _ = call(server, spec("alpha beta gamma", tokens_out=5))
    assert done.text == "alpha beta gamma alpha beta"
    assert (done.tokens_in, done.tokens_out, done.usage_reported) == (3, 5, True)
    assert done.finish_reason == "length"
    assert done.emulated
    assert done.attempts == 1


def test_429s_are_retried_after_retry_after():
    """Two 429s with retry-after 0.2 s, then success: three attempts, delays >= 0.2 s."""
    with EmulatedOpenAIServer(api_key=KEY) as server:
        server.fail_next(2, status=429, retry_after_s=0.2)
        done, sleeps = call(server, spec({"prompt": "x", "stream": False}))
    assert done.attempts == 3
    assert len(sleeps.delays) == 2
    assert all(d >= 0.2 for d in sleeps.delays)
    assert [r.status for r in server.records()] == [429, 429, 200]


def test_5xx_retried_until_the_policy_gives_up():
    """A 503 that never clears ends with ApiCallError after max_attempts, naming the status."""
    with EmulatedOpenAIServer(api_key=KEY) as server:
        server.fail_next(10, status=503)
        with pytest.raises(ApiCallError) as info:
            call(server, spec("x"))
    assert info.value.attempts == POLICY.max_attempts
    assert info.value.status == 503
    assert not isinstance(info.value, HandlerError)  # transient: the task may be retried later
    assert "HTTP 503" in str(info.value)


def test_400_fails_at_once_and_clearly():
    """A 400 is not retried: one attempt, ApiRejectedError (a HandlerError) with the message."""
    with EmulatedOpenAIServer(api_key=KEY) as server:
        server.fail_next(5, status=400)
        with pytest.raises(ApiRejectedError) as info:
            call(server, spec("x"))
    assert info.value.attempts == 1
    assert isinstance(info.value, HandlerError)
    assert "HTTP 400 (not retryable)" in str(info.value)


def test_wrong_key_is_rejected_without_echoing_it():
    """A 401 fails at once and neither the key sent nor the expected one is in the error."""
    with EmulatedOpenAIServer(api_key=KEY) as server, pytest.raises(ApiRejectedError) as info:
        call(server, spec("x"), key="sk-wrong-" + "w" * 20)
    assert "401" in str(info.value)
    assert "sk-" not in str(info.value)
    assert "sk-" not in repr(Endpoint("emu", "http://x", "m", KEY))


def test_connection_refused_is_retried_then_reported():
    """No server at all: retried as a transient error, then ApiCallError with no status."""
    with EmulatedOpenAIServer() as server:
        dead = server.base_url
    with pytest.raises(ApiCallError) as info:
        call(server, spec("x"), base=dead, policy=RetryPolicy(max_attempts=2, base_s=0.01))
    assert info.value.status is None
    assert info.value.attempts == 2


def test_every_attempt_draws_from_the_limiter_and_failures_give_tokens_back():
    """Two attempts take two requests; the failed one's tokens are credited back."""
    limits = Limits.per_minute(60, 6000, burst_fraction=0.5)
    bucket = MemoryBucket(limits)
    limiter = RateLimiter(bucket, limits)
    with EmulatedOpenAIServer(api_key=KEY) as server:
        server.fail_next(1, status=500)
        done, _ = call(
            server,
            spec({"prompt": "one two", "stream": False}, tokens_in=2, tokens_out=4),
            limiter=limiter,
        )
    assert done.attempts == 2
    assert bucket.requests_state is not None
    assert bucket.tokens_state is not None
    assert limits.requests.burst - bucket.requests_state.level == pytest.approx(2, abs=0.1)
    assert limits.tokens.burst - bucket.tokens_state.level == pytest.approx(
        6, abs=2
    )  # only the served call

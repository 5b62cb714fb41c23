"""API workers end to end: real Redis, real ``fleet worker --api`` processes, the emulated endpoint.

Tasks are published straight to ``inference.api-emu`` (provider ``emu``, declared in a
test catalog whose base URL is overridden by ``FLEET_API_BASE_URL_EMU``), forwarded by
API workers to ``EmulatedOpenAIServer`` running in this process, and come back with
output, tokens and the actual cost. The server's request log is the witness for retries
and rate limits.
"""

from __future__ import annotations

import csv
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from fleet.app import TASK_NAME, create_app
from fleet.catalog import DATA_DIR
from fleet.catalog.apis import API_FIELDS
from fleet.emulated.openai_server import EmulatedOpenAIServer, RequestRecord, window_peaks
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers, wait_ready
from fleet.queues import queue_name
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration

KEY = "sk-emu-" + uuid.uuid4().hex  # a fresh secret: it must never appear in a log
RPM, TPM = 40, 1200
BURST_FRACTION = 0.5
PRICE_IN, PRICE_OUT = 0.5, 2.0  # USD per million tokens


def write_catalog(directory: Path) -> Path:
    """The shipped catalog plus one API offer, ``emu``, with small limits."""
    for name in ("manifest.json", "accelerators.json", "offers.csv"):
        shutil.copy(DATA_DIR / name, directory / name)
    row = dict.fromkeys(API_FIELDS, "")
    row.update(
        provider="emu", model="llama-3.1-8b-instruct", api_model="emu-llama-8b",
        base_url="https://emu.invalid/v1", usd_per_m_input=str(PRICE_IN),
        usd_per_m_output=str(PRICE_OUT), tokens_per_s="500", ttft_s="0.1",
        requests_per_min=str(RPM), tokens_per_min=str(TPM), context_tokens="8192",
        residency="self", external="false", price_date="2026-01-01", source="test",
    )  # fmt: skip
    with (directory / "api_offers.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=API_FIELDS)
        writer.writeheader()
        writer.writerow(row)
    return directory


@dataclass
class Stack:
    """Redis, the emulated endpoint, and the environment API workers need."""

    url: str
    server: EmulatedOpenAIServer
    env: dict[str, str]
    app: Celery
    logs: Path

    def spawn(self, count: int = 1, concurrency: int = 4, **env: str) -> list[LocalWorker]:
        """Start ``count`` API workers for ``emu`` and wait until they answer ping."""
        workers = [
            spawn_worker(
                {**self.env, **env},
                "cpu",
                self.logs,
                api="emu",
                concurrency=concurrency,
                loglevel="DEBUG",
            )
            for _ in range(count)
        ]
        try:
            wait_ready(self.app, workers)
        except RuntimeError:
            stop_workers(workers)
            raise
        return workers

    def send(self, spec: dict[str, Any]) -> Any:
        """Publish ``spec`` straight to ``inference.api-emu``; return its AsyncResult."""
        queue = queue_name("inference", "api-emu", 1, self.env["FLEET_NAMESPACE"])
        return self.app.send_task(
            TASK_NAME,
            args=[spec],
            kwargs={"placement": {"submitted_at": time.time(), "queue": queue}},
            queue=queue,
            routing_key=queue,
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A fresh namespace (queues and rate-limit buckets) and endpoint per test."""
    (tmp_path / "catalog").mkdir()
    catalog = write_catalog(tmp_path / "catalog")
    with redis_url() as url, EmulatedOpenAIServer(api_key=KEY, models=["emu-llama-8b"]) as server:
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": f"t{uuid.uuid4().hex[:6]}.",
            "FLEET_CATALOG_DIR": str(catalog),
            "FLEET_API_KEY_EMU": KEY,
            "FLEET_API_BASE_URL_EMU": server.base_url,
            "FLEET_API_BURST_FRACTION": str(BURST_FRACTION),
            "FLEET_API_BACKOFF_S": "0.05",
            "FLEET_API_BACKOFF_CAP_S": "0.5",
            "FLEET_API_MAX_ATTEMPTS": "4",
            "FLEET_API_RATE_WAIT_S": "60",
            "FLEET_LOG_FORMAT": "json",
        }
        settings = Settings.from_env(env)
        yield Stack(url, server, env, create_app(settings), tmp_path)


def chat(prompt: str, tokens_out: int = 20, **extra: Any) -> dict[str, Any]:
    """An 8B inference spec whose prompt is ``prompt``."""
    return {
        "kind": "inference",
        "model": {"name": "llama-3.1-8b-instruct", "params_b": 8},
        "input": {"prompt": prompt, **extra},
        "tokens_in": len(prompt.split()),
        "tokens_out": tokens_out,
    }


def served(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.status == 200]


def assert_no_key_in(logs: Path) -> None:
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))
    assert text, "no worker logs to check"
    assert KEY not in text
    assert KEY[8:] not in text  # not even the random part


def test_task_round_trip_through_an_api_worker(stack: Stack) -> None:
    """Output, endpoint-reported tokens and the actual cost come back; the key stays out of logs."""
    workers = stack.spawn()
    try:
        streamed = stack.send(chat("the queue is long today")).get(timeout=60)
        collected = stack.send(chat("plain json please", tokens_out=6, stream=False)).get(
            timeout=60
        )
    finally:
        stop_workers(workers)
    out = streamed["output"]
    assert streamed["accelerator"] == "api-emu"
    assert streamed["queue"].endswith("inference.api-emu")
    assert (
        out["text"]
        == "the queue is long today the queue is long today the queue is long today the queue is long today"
    )
    assert (out["tokens_in"], out["tokens_out"], out["usage_reported"]) == (5, 20, True)
    assert streamed["tokens"] == {"in": 5, "out": 20}
    expected = (5 * PRICE_IN + 20 * PRICE_OUT) / 1e6
    assert streamed["actual_cost_usd"] == pytest.approx(expected)
    assert streamed["emulated"] is True  # the endpoint is fleet's emulated one
    assert collected["output"]["text"] == "plain json please plain json please"
    assert [(r.model, r.stream) for r in served(stack.server.records())] == [
        ("emu-llama-8b", True),
        ("emu-llama-8b", False),
    ]
    assert_no_key_in(stack.logs)


@pytest.mark.fault
def test_injected_429s_and_500s_are_retried(stack: Stack, faults: Any) -> None:
    """Two 429s (Retry-After 0.2 s) then a 500: the task still succeeds, in four attempts."""
    workers = stack.spawn(concurrency=1)
    try:
        stack.server.fail_next(2, status=429, retry_after_s=0.2)
        stack.server.fail_next(1, status=500)
        faults.inject("api 429", times=2)
        faults.inject("api 500")
        result = stack.send(chat("retry me")).get(timeout=60)
    finally:
        stop_workers(workers)
    faults.account(submitted=1, completed=1)
    assert result["output"]["attempts"] == 4
    assert [r.status for r in stack.server.records()] == [429, 429, 500, 200]
    first_429, second_429 = stack.server.records()[:2]
    assert second_429.at - first_429.at >= 0.2  # Retry-After honoured
    assert_no_key_in(stack.logs)


@pytest.mark.fault
def test_persistent_400_fails_clearly_without_retries(stack: Stack, faults: Any) -> None:
    """An endpoint that answers 400 fails the task at once, naming the status; one request made."""
    workers = stack.spawn(concurrency=1)
    try:
        stack.server.fail_next(50, status=400)
        faults.inject("api 400")
        handle = stack.send(chat("refuse me"))
        with pytest.raises(Exception) as info:  # noqa: PT011 - the type is the worker's; the message matters
            handle.get(timeout=60)
    finally:
        stop_workers(workers)
    faults.account(submitted=1, completed=1)  # failed and dead-lettered, as intended
    assert "HTTP 400" in str(info.value)
    assert len(stack.server.records()) == 1
    assert_no_key_in(stack.logs)


def test_three_workers_share_the_rate_limits(stack: Stack) -> None:
    """Three API worker processes never exceed the provider's limits, nor the shared bucket's pace.

    26 tasks at 30 tokens each, limits 40 requests and 1,200 tokens a minute, bucket
    burst half of that: 20 go at once, the rest at the refill rate. The server enforces
    the per-minute limits itself (a 429 would show in its log).
    """
    stack.server.configure(requests_per_min=RPM, tokens_per_min=TPM, ttft_s=0.05)
    prompt = " ".join(f"w{i}" for i in range(10))  # 10 tokens for the endpoint
    workers = stack.spawn(count=3, concurrency=4)
    try:
        handles = [stack.send(chat(prompt, tokens_out=20, seed=i)) for i in range(26)]
        results = [h.get(timeout=90) for h in handles]
    finally:
        stop_workers(workers)
    records = stack.server.records()
    assert len({r["worker"] for r in results}) == 3  # all three took part
    assert all(r["output"]["tokens_in"] + r["output"]["tokens_out"] == 30 for r in results)
    assert [r for r in records if r.status != 200] == []  # never a 429
    most_requests, most_tokens = window_peaks(records)
    assert most_requests <= RPM
    assert most_tokens <= TPM
    # The shared bucket's envelope: in any interval, at most burst + refill x length (+1 for
    # the grant-to-arrival jitter). Without a shared limiter all 26 would arrive at once.
    burst = int(RPM * BURST_FRACTION)
    refill = (RPM - burst) / 61.0
    times = sorted(r.at for r in records)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + refill * (times[j] - start) + 1
    assert_no_key_in(stack.logs)

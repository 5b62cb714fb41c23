"""The engine benchmark parts: start-to-ready, embedding, generation, vLLM (see ``bench.engines_bench``).

Each throughput part first checks that both sides do the same work (the worker's vectors
match direct ``encode``'s, its greedy tokens or text match direct generation's) and raises
otherwise: a ratio of different work would be no figure at all.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench.engines_common import (
    EMBED_BATCHES,
    EMBED_TARGET_BATCH,
    GEN_TASKS_PER_ROUND,
    NEW_TOKENS,
    PROMPT,
    RESULT_TIMEOUT_S,
    TARGET,
    TEXTS_PER_ROUND,
    TINY,
    WARMUP,
    Bench,
    FleetSide,
    alternate,
    batches,
    compare,
    embedding_spec,
    generation_spec,
    per_task_ms,
    server_port,
    through_fleet,
    timed,
)
from fleet.catalog import default_catalog
from fleet.localworkers import LocalWorker, spawn_worker, stop_workers
from fleet.registry import HEARTBEAT_S, live_workers

READY_TIMEOUT_S = 300.0
EMBED_TOLERANCE = 1e-4  # the worker rounds to 6 decimals; fp32 runs differ below 1e-6
_FIND_VLLM = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"


def start_worker(
    bench: Bench, engine: str | None, models: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[LocalWorker, dict[str, Any]]:
    """Spawn a cpu worker (concurrency 1) and time it to Celery's ping and to a ``ready`` heartbeat.

    Returns the running worker (the caller stops it) and the timings.

    Raises:
        RuntimeError: the worker exited or was not ready in ``READY_TIMEOUT_S`` (log tail).

    """
    t0 = time.perf_counter()
    worker = spawn_worker(
        {**bench.env, **(env or {})}, "cpu", bench.logs, engine=engine, models=models,
        loglevel="WARNING",
    )  # fmt: skip
    ping_s: float | None = None
    while True:
        elapsed = time.perf_counter() - t0
        if worker.proc.poll() is not None or elapsed > READY_TIMEOUT_S:
            stop_workers([worker])
            raise RuntimeError(
                f"worker {worker.node} not ready after {elapsed:.0f} s:\n{worker.log_tail()}"
            )
        if ping_s is None and bench.fleet.app.control.ping(destination=[worker.node], timeout=0.2):
            ping_s = time.perf_counter() - t0
        if ping_s is not None and any(
            w.hostname == worker.node and w.ready for w in live_workers(bench.client)
        ):
            break
        time.sleep(0.1)
    return worker, {
        "engine": engine or "reference",
        "models": list(models),
        "ping_s": ping_s,
        "ready_s": time.perf_counter() - t0,
        "family_cold_start_s": default_catalog().family("cpu").cold_start_s,
        "heartbeat_s": HEARTBEAT_S,
    }


def bench_embedding(bench: Bench, st: Any) -> dict[str, Any]:  # noqa: ANN401 - a SentenceTransformer
    """MiniLM texts/s through the worker vs ``st.encode`` in a loop, per batch size.

    Raises:
        RuntimeError: the worker's vectors differ from ``st.encode``'s.

    """

    def encode(texts: list[str]) -> Any:  # noqa: ANN401 - a numpy array
        return st.encode(texts, normalize_embeddings=True, show_progress_bar=False)

    out: dict[str, Any] = {}
    for size in EMBED_BATCHES:
        tasks = batches(size, TEXTS_PER_ROUND[size] // size)
        specs = [embedding_spec(t) for t in tasks]

        def direct_round(tasks: list[list[str]] = tasks) -> float:
            t0 = time.perf_counter()
            for texts in tasks:
                encode(texts)
            return time.perf_counter() - t0

        _, warm = through_fleet(bench.fleet, specs[:WARMUP])
        for texts in tasks[:WARMUP]:
            encode(texts)
        direct = encode(tasks[0]).tolist()
        got = warm[0]["output"]["embeddings"]
        diff = max(abs(a - b) for u, v in zip(got, direct, strict=True) for a, b in zip(u, v, strict=True))  # fmt: skip
        if diff > EMBED_TOLERANCE:
            raise RuntimeError(f"batch {size}: worker vectors differ from encode's by {diff:g}")
        side = FleetSide(bench.fleet, specs)
        fleet_s, direct_s = alternate(side.round, direct_round)
        target = TARGET if size == EMBED_TARGET_BATCH else None
        out[f"batch_{size}"] = {
            **compare(TEXTS_PER_ROUND[size], fleet_s, direct_s, target),
            **per_task_ms(len(tasks), fleet_s, direct_s, side.run_s, side.engine_s),
            "unit": "texts/s",
            "tasks_per_round": len(tasks),
            "max_abs_diff": diff,
        }
    out["target"] = f">= {TARGET:.2f} at batch {EMBED_TARGET_BATCH}"
    out["met"] = out[f"batch_{EMBED_TARGET_BATCH}"]["met"]
    return out


def bench_generation(bench: Bench, model: Any, tokenizer: Any) -> dict[str, Any]:  # noqa: ANN401 - transformers objects
    """tiny-llama generated tokens/s through the worker vs ``model.generate`` in a loop.

    The direct call tokenizes, generates greedily under ``torch.inference_mode`` and decodes,
    as the engine does.

    Raises:
        RuntimeError: the worker's tokens differ from direct greedy generation's.

    """
    import torch  # noqa: PLC0415 - only this part needs it in the bench process

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def direct_once() -> list[int]:
        enc = tokenizer(PROMPT, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=pad
            )
        ids: list[int] = out[0, enc["input_ids"].shape[1] :].tolist()
        tokenizer.decode(ids, skip_special_tokens=True)
        return ids

    specs = [generation_spec()] * GEN_TASKS_PER_ROUND
    _, warm = through_fleet(bench.fleet, specs[:WARMUP])
    for _ in range(WARMUP):
        ids = direct_once()
    if warm[0]["output"]["token_ids"] != ids:
        raise RuntimeError(f"worker tokens {warm[0]['output']['token_ids']} != direct {ids}")
    side = FleetSide(bench.fleet, specs)
    fleet_s, direct_s = alternate(side.round, lambda: timed(direct_once, len(specs)))
    return {
        **compare(len(ids) * len(specs), fleet_s, direct_s, TARGET),
        **per_task_ms(len(specs), fleet_s, direct_s, side.run_s, side.engine_s),
        "unit": "generated tokens/s",
        "tasks_per_round": len(specs),
        "new_tokens": len(ids),
    }


def vllm_python(env: dict[str, str]) -> tuple[str | None, str]:
    """The python of an existing vLLM virtualenv, or None and why there is none.

    ``FLEET_VLLM_PYTHON``, else ``${FLEET_VLLM_VENV:-<tests' default>}/bin/python``, as
    ``tests/engines/vllm_env.py`` looks; unlike it, never creates a virtualenv.
    """
    from tests.engines.vllm_env import DEFAULT_VENV  # noqa: PLC0415 - where the tests make it

    named = env.get("FLEET_VLLM_PYTHON")
    venv = Path(env.get("FLEET_VLLM_VENV") or DEFAULT_VENV)
    python = Path(named) if named else venv / "bin" / "python"
    if not python.exists():
        return None, f"no vLLM virtualenv at {python} (tests/engines/vllm_env.py makes one)"
    if subprocess.run([str(python), "-c", _FIND_VLLM], check=False, timeout=60).returncode:
        return None, f"{python} cannot import vllm"
    return str(python), ""


def vllm_server_url(pid: int) -> str | None:
    """``http://127.0.0.1:<port>`` of the vLLM server among ``pid``'s children, if any."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (thread / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            port = server_port(argv)
            if port is not None:
                return f"http://127.0.0.1:{port}"
    return None


def bench_vllm(bench: Bench, worker: LocalWorker) -> dict[str, Any]:
    """tiny-llama tokens/s through a vLLM worker vs its own server's ``/v1/completions``.

    The direct call is a plain (unstreamed) ``POST /v1/completions`` of the same prompt,
    ``max_tokens`` and temperature 0; the worker streams the same request.

    Raises:
        RuntimeError: no server found, or its text differs from the worker's.

    """
    import httpx  # noqa: PLC0415 - only this part needs it

    base = vllm_server_url(worker.proc.pid)
    if base is None:
        raise RuntimeError(f"no vLLM server among the children of worker {worker.node}")
    body = {"model": TINY, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    specs = [generation_spec()] * GEN_TASKS_PER_ROUND
    with httpx.Client(timeout=RESULT_TIMEOUT_S, trust_env=False) as http:

        def direct_once() -> tuple[int, str]:
            resp = http.post(f"{base}/v1/completions", json=body)
            resp.raise_for_status()
            data = resp.json()
            return int(data["usage"]["completion_tokens"]), str(data["choices"][0]["text"])

        _, warm = through_fleet(bench.fleet, specs[:WARMUP])
        for _ in range(WARMUP):
            n, text = direct_once()
        if warm[0]["output"]["text"] != text or warm[0]["tokens"]["out"] != n:
            raise RuntimeError(f"worker text {warm[0]['output']['text']!r} != direct {text!r}")
        side = FleetSide(bench.fleet, specs)
        fleet_s, direct_s = alternate(side.round, lambda: timed(direct_once, len(specs)))
    return {
        **compare(n * len(specs), fleet_s, direct_s, TARGET),
        **per_task_ms(len(specs), fleet_s, direct_s, side.run_s, side.engine_s),
        "unit": "generated tokens/s",
        "tasks_per_round": len(specs),
        "new_tokens": n,
        "server": base,
    }

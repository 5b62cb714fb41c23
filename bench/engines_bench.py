"""Engine benchmarks: real engines through a real ``fleet worker`` vs the same engine called directly.

Each throughput is a ratio, fleet over direct, measured in the same run on the same machine,
model, inputs and batch sizes. One worker process (``--concurrency 1``: one pool process
doing the work, tasks one after another) is compared with one direct loop in this process
(calls one after another), so neither side gets more parallelism than the other; the
worker is idle while the direct loop runs and the other way round (never both at once).
Both are warmed up first, then ``ROUNDS`` rounds alternate fleet-first and direct-first,
and each side's median round counts. Each throughput result also splits a task into
milliseconds (``per_task_ms``): through fleet, the worker's task (``run_s``), its engine
alone (``engine_run_s``) and direct, so a missed target says where the time went.

* embedding: MiniLM (``all-minilm-l6-v2``) on the ``transformers`` engine, texts/s, tasks
  of 1, 8 and 32 texts (``SENTENCES``); fleet is ``Fleet.submit_many`` of a round's tasks
  then ``.get()`` of each, direct is ``SentenceTransformer.encode(batch,
  normalize_embeddings=True)`` per task. Target: fleet >= 0.90x direct at batch 32.
* generation: tiny-llama greedy, ``NEW_TOKENS`` new tokens per task, generated tokens/s;
  direct is ``model.generate(do_sample=False, max_new_tokens=NEW_TOKENS)`` (tokenizing and
  decoding included, as the engine does). Target >= 0.90x.
* vllm: tiny-llama through ``fleet worker --engine vllm`` vs ``POST /v1/completions`` to the
  worker's own vLLM server (found among the worker's child processes) in a loop; skipped,
  with the reason recorded, when no vLLM virtualenv exists here (this bench never creates
  one: ``tests/engines/vllm_env.py`` does). Target >= 0.90x.
* ready: seconds from ``spawn_worker`` to the worker answering Celery's ping and to its
  heartbeat saying ``ready`` (``fleet.registry.live_workers``), per engine: reference (no
  model), transformers (MiniLM and tiny-llama, weights already in the cache), vllm. No
  target; the family's catalog cold start is given beside it. The heartbeat refreshes every
  ``fleet.registry.HEARTBEAT_S``, so ``ready_s`` includes up to that much reporting delay.

The pieces: ``bench.engines_common`` (inputs, specs, rounds, the pure comparison) and
``bench.engines_parts`` (each part). ``python -m bench.engines_bench`` runs this part alone
on a private Redis and prints its table and JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.engines_common import EMBED_BATCHES, MINILM, ROUNDS, TINY, Bench
from bench.engines_parts import (
    bench_embedding,
    bench_generation,
    bench_vllm,
    start_worker,
    vllm_python,
)
from fleet.client import Fleet
from fleet.embedded import embedded_redis
from fleet.localworkers import stop_workers
from fleet.models.registry import builtin_registry
from fleet.models.weights import resolve
from fleet.settings import Settings

FAIRNESS = (
    "one worker process at concurrency 1 (tasks one after another) vs one direct loop in the "
    "bench process (calls one after another), never both at once; same machine, model, inputs "
    "and batch sizes; both warmed up; rounds alternate which side goes first; medians"
)


def run(url: str) -> dict[str, Any]:
    """Every engine part on the broker at ``url``; see the module docstring.

    Raises:
        RuntimeError: a worker did not become ready, or a side did other work than the other.

    """
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - heavy; this part only
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    started = time.perf_counter()
    out: dict[str, Any] = {"ready": {}}
    with tempfile.TemporaryDirectory(prefix="fleet-engines-") as tmp:
        root = Path(tmp)
        cache = root / "models"
        env = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_ARTIFACT_DIR": str(root / "artifacts"),
            "FLEET_MODEL_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
        }
        os.environ["HF_HUB_OFFLINE"] = "1"  # this process loads the direct side's models
        registry = builtin_registry()
        # Weights first (tiny-llama is built here): start-to-ready then times a load, not a build.
        minilm, tiny = resolve(registry.get(MINILM), cache), resolve(registry.get(TINY), cache)
        st = SentenceTransformer(str(minilm), device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(str(tiny))
        model = AutoModelForCausalLM.from_pretrained(str(tiny))  # in eval mode
        with Fleet(Settings.from_env(env)) as fleet:
            bench = Bench(env, fleet, redis.Redis.from_url(url), root)
            worker, out["ready"]["reference"] = start_worker(bench, None, ())
            stop_workers([worker])
            worker, out["ready"]["transformers"] = start_worker(
                bench, "transformers", (MINILM, TINY)
            )
            try:
                out["embedding"] = bench_embedding(bench, st)
                out["generation"] = bench_generation(bench, model, tokenizer)
            finally:
                stop_workers([worker])
            python, why = vllm_python({**os.environ, **env})
            if python is None:
                out["vllm"] = {"skipped": why}
                out["ready"]["vllm"] = {"skipped": why}
            else:
                worker, out["ready"]["vllm"] = start_worker(
                    bench, "vllm", (TINY,), {"FLEET_VLLM_PYTHON": python}
                )
                try:
                    out["vllm"] = bench_vllm(bench, worker)
                finally:
                    stop_workers([worker])
    out["fairness"] = FAIRNESS
    out["rounds"] = ROUNDS
    out["bench_s"] = time.perf_counter() - started
    return out


def verdict(met: bool | None) -> str:  # noqa: FBT001 - one table cell
    """``ok``, ``MISSED``, or nothing where there is no target."""
    return "" if met is None else ("ok" if met else "MISSED")


def _rate_row(name: str, r: dict[str, Any]) -> str:
    target = f"{r['target']}x {verdict(r['met'])}" if r.get("target") else ""
    line = f"{name:34} {r['fleet_per_s']:>14.1f} {r['direct_per_s']:>14.1f} {r['ratio']:>7.2f}x"
    return f"{line}  {target}".rstrip()


def table_rows(results: dict[str, Any]) -> list[str]:
    """The printed lines of ``run``'s results, in ``bench.run``'s columns (pure)."""
    rows = [
        f"{'engines (fleet worker vs direct)':34} {'fleet':>14} {'direct':>14} {'ratio':>8}  target"
    ]
    emb = results["embedding"]
    rows += [
        _rate_row(f"embed MiniLM, batch {size:>2}, texts/s", emb[f"batch_{size}"])
        for size in EMBED_BATCHES
    ]
    rows.append(_rate_row("generate tiny-llama, tokens/s", results["generation"]))
    vllm = results["vllm"]
    if "skipped" in vllm:
        rows.append(f"{'generate vLLM tiny-llama, tokens/s':34} skipped: {vllm['skipped']}")
    else:
        rows.append(_rate_row("generate vLLM tiny-llama, tokens/s", vllm))
    for engine, r in results["ready"].items():
        if "skipped" in r:
            continue
        ready = f"{r['ready_s']:.1f} s"
        note = f"ping {r['ping_s']:.1f} s; catalog cold start {r['family_cold_start_s']:.0f} s"
        rows.append(f"{f'start-to-ready, {engine}':34} {ready:>14} {'':>14} {'':>8}  {note}")
    return rows


def print_table(results: dict[str, Any]) -> None:
    """Print ``run``'s results (fleet, direct, ratio, target), as ``bench.run`` prints its own."""
    for line in table_rows(results):
        print(line)


def main() -> int:
    """Run the engine part alone on a private Redis; print its table and its JSON."""
    with embedded_redis() as url:
        results = run(url)
    print_table(results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

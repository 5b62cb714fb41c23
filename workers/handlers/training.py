"""Training and fine-tuning: a real, short training loop on a synthetic task.

The model is a 2-layer MLP (``FEATURES`` inputs, tanh hidden layer, softmax over
``CLASSES``). Its base weights come from the model name (``base_params``), standing
in for pretrained weights; the data set is ``SAMPLES`` points drawn around one
random centre per class, seeded from ``input.seed``. Each step takes a random
mini-batch of ``BATCH`` examples and one Adam update.

* ``full`` (``training``; ``training_method: "full"``): every weight is trained.
* ``lora`` (``fine_tune``; ``training_method: "lora"``): the base weights stay
  frozen and a rank-``r`` adapter on the first layer, ``w1 + scale * a @ b``, is
  trained (``a`` random, ``b`` zero, so training starts from the base model).

The loss on the whole data set is recorded before the first step, every
``LOG_EVERY`` steps and after the last. A run whose loss did not fall is an error.
The checkpoint ``<artifact_dir>/<task_id>.npz`` is written atomically (temporary
file, then rename); a LoRA checkpoint holds the frozen base and the adapter apart.

Input (all optional): ``steps`` (1 to 5000, default 200), ``hidden`` (2 to 256,
default 32), ``lr`` (1e-5 to 1, default 0.01), ``seed`` (default 0), ``rank`` (LoRA
only, 1 to min(FEATURES, hidden), default 4). Output: ``loss_first``, ``loss_last``,
``loss_curve``, ``steps``, ``accuracy`` (on the training set), ``checkpoint``, ``method``,
``trainable_params``; ``tokens_in`` counts the examples trained on.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workers.handlers import HandlerError, get_float, get_int, input_object, stable_hash

if TYPE_CHECKING:
    import numpy.typing as npt
    from pydantic import JsonValue

    from fleet.spec import TaskSpec
    from workers.handlers import HandlerContext

    Array = npt.NDArray[np.float64]
    Params = dict[str, Array]

ENGINE_FULL = "cpu-reference:mlp-adam-v1"
ENGINE_LORA = "cpu-reference:mlp-lora-adam-v1"
FEATURES = 16
CLASSES = 4
SAMPLES = 512
CENTRE_SPREAD = 0.4  # classes overlap: a short run cannot separate them all
BATCH = 64
LOG_EVERY = 10
MAX_STEPS = 5000
MAX_HIDDEN = 256
LORA_SCALE = 1.0  # alpha / rank, with alpha = rank
BETAS = (0.9, 0.999)
EPS = 1e-8
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def make_dataset(seed: int) -> tuple[Array, npt.NDArray[np.intp]]:
    """Return ``SAMPLES`` points and labels: Gaussian clouds around one centre per class."""
    rng = np.random.default_rng([seed, 1])
    centres = rng.normal(0.0, CENTRE_SPREAD, (CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, SAMPLES).astype(np.intp)
    points = centres[labels] + rng.normal(0.0, 1.0, (SAMPLES, FEATURES))
    return points, labels


def base_params(model: str, hidden: int) -> Params:
    """Return the base weights of ``model`` (a deterministic stand-in for pretrained ones)."""
    rng = np.random.default_rng(stable_hash(f"mlp:{model}"))
    return {
        "w1": rng.normal(0.0, FEATURES**-0.5, (FEATURES, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0.0, hidden**-0.5, (hidden, CLASSES)),
        "b2": np.zeros(CLASSES),
    }


def _forward(base: Params, w1: Array, x: Array) -> tuple[Array, Array]:
    """Return the hidden activations and the class probabilities."""
    h = np.tanh(x @ w1 + base["b1"])
    logits = h @ base["w2"] + base["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return h, p / p.sum(axis=1, keepdims=True)


def _loss(p: Array, y: npt.NDArray[np.intp]) -> float:
    return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))


class _Adam:
    """Adam over a dict of arrays, updated in place."""

    def __init__(self, params: Params, lr: float) -> None:
        self.lr, self.t = lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        b1, b2 = BETAS
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + EPS)


def train(
    base: Params,
    data: tuple[Array, npt.NDArray[np.intp]],
    *,
    steps: int,
    lr: float,
    rank: int,
    seed: int,
) -> tuple[Params, list[float], float]:
    """Train; ``rank`` 0 trains every weight, else a rank-``rank`` adapter on ``w1``.

    Returns the trained weights (the full set, or ``a`` and ``b`` of the adapter),
    the loss curve and the final accuracy. ``base`` is never modified.
    """
    x, y = data
    rng = np.random.default_rng([seed, 2])
    scale = LORA_SCALE
    if rank:
        params = {
            "a": rng.normal(0.0, FEATURES**-0.5, (FEATURES, rank)),
            "b": np.zeros((rank, base["w1"].shape[1])),
        }
    else:
        params = {k: v.copy() for k, v in base.items()}
    opt = _Adam(params, lr)

    def model_view() -> tuple[Params, Array]:
        if rank:
            return base, base["w1"] + scale * params["a"] @ params["b"]
        return params, params["w1"]

    curve: list[float] = []
    for step in range(steps + 1):
        net, w1 = model_view()
        if step % LOG_EVERY == 0 or step == steps:
            curve.append(_loss(_forward(net, w1, x)[1], y))
        if step == steps:
            break
        batch = rng.integers(0, len(y), BATCH)
        xb, yb = x[batch], y[batch]
        h, p = _forward(net, w1, xb)
        dlogits = p
        dlogits[np.arange(BATCH), yb] -= 1.0
        dlogits /= BATCH
        dz = (dlogits @ net["w2"].T) * (1.0 - h * h)
        dw1 = xb.T @ dz
        if rank:
            grads = {"a": scale * dw1 @ params["b"].T, "b": scale * params["a"].T @ dw1}
        else:
            grads = {"w1": dw1, "b1": dz.sum(0), "w2": h.T @ dlogits, "b2": dlogits.sum(0)}
        opt.step(params, grads)
    net, w1 = model_view()
    accuracy = float(np.mean(np.argmax(_forward(net, w1, x)[1], axis=1) == y))
    return params, curve, accuracy


def _sig(value: float) -> float:
    """Round to 6 significant digits (a small final loss must not round to 0)."""
    return float(f"{value:.6g}")


def _save_npz(path: Path, arrays: Params) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as f:
        tmp = Path(f.name)
        try:
            # numpy's stub lets **arrays reach savez's allow_pickle (new in 2.1), hence the ignore
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(path)


def handle(spec: TaskSpec, ctx: HandlerContext) -> dict[str, JsonValue]:
    """Train (``full``) or fine-tune (``lora``) the MLP of a training or fine-tune task."""
    lora = spec.method == "lora"
    data = input_object(
        spec, ("steps", "hidden", "lr", "seed", *(["rank"] if lora else [])), required=False
    )
    steps = get_int(data, "steps", 200, 1, MAX_STEPS)
    hidden = get_int(data, "hidden", 32, 2, MAX_HIDDEN)
    lr = get_float(data, "lr", 0.01, 1e-5, 1.0)
    seed = get_int(data, "seed", 0, 0, 2**63 - 1)
    rank = get_int(data, "rank", 4, 1, min(FEATURES, hidden)) if lora else 0
    if not _SAFE_ID.fullmatch(ctx.task_id):
        raise HandlerError(f"task_id: {ctx.task_id!r} is not a safe file name")
    base = base_params(spec.model.name, hidden)
    params, curve, accuracy = train(
        base, make_dataset(seed), steps=steps, lr=lr, rank=rank, seed=seed
    )
    if not np.isfinite(curve[-1]) or curve[-1] >= curve[0]:
        raise HandlerError(
            f"input.lr: training did not lower the loss ({curve[0]:.4g} -> {curve[-1]:.4g});"
            " try a smaller lr or more steps"
        )
    path = ctx.artifact_dir / f"{ctx.task_id}.npz"
    if lora:
        arrays = {f"base_{k}": v for k, v in base.items()}
        arrays |= {f"lora_{k}": v for k, v in params.items()}
        arrays["lora_scale"] = np.asarray(LORA_SCALE)
    else:
        arrays = dict(params)
    _save_npz(path, arrays | {"loss_curve": np.asarray(curve)})
    return {
        "engine": ENGINE_LORA if lora else ENGINE_FULL,
        "tokens_in": steps * BATCH,
        "tokens_out": 0,
        "method": "lora" if lora else "full",
        "steps": steps,
        "loss_first": _sig(curve[0]),
        "loss_last": _sig(curve[-1]),
        "loss_curve": [_sig(v) for v in curve],
        "accuracy": _sig(accuracy),
        "trainable_params": int(sum(v.size for v in params.values())),
        "checkpoint": str(path),
    }

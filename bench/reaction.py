"""Scale-up reaction time: from a backlog on a queue with no workers to its first task running.

The worker is one the autoscaler launched through the local provider (real processes).

Uses ``infra/fleet.toml`` as shipped (its ``local-l4`` pool and 5 s loop interval); the
clock starts when the task is submitted and stops at the ``started_at`` the worker
records. KEDA, for comparison, polls every 30 s by default.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fleet.autoscaler.config import load_config
from fleet.autoscaler.loop import build_autoscaler
from fleet.client import Fleet
from fleet.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 3
TARGET_S = 10.0
TASK: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
    "input": {"prompt": "hello", "seed": 1},
    "tokens_in": 50,
    "tokens_out": 4,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


def run(url: str) -> dict[str, Any]:
    """Median seconds from backlog to first task running on a new worker, over TRIALS."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    times: list[float] = []
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="fleet-reaction-") as tmp:
        fleet_cfg = base.fleet.model_copy(update={"broker_url": url, "local_state_dir": tmp})
        config = base.model_copy(update={"fleet": fleet_cfg})
        settings = Settings.from_env(
            {"FLEET_BROKER_URL": url, "FLEET_RESULT_BACKEND": url, "FLEET_ARTIFACT_DIR": tmp}
        )
        for _ in range(TRIALS):
            scaler = build_autoscaler(config, settings, locked=False)
            stop = threading.Event()
            thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
            thread.start()
            # The backlog appears at a random point of the loop's cycle, as in production.
            time.sleep(rng.uniform(1.0, 1.0 + config.fleet.loop_interval_s))
            try:
                with Fleet(settings) as fleet:
                    t0 = time.time()
                    result = fleet.submit(TASK).get(timeout=120)
                times.append(result["started_at"] - t0)
            finally:
                stop.set()
                thread.join(timeout=30)
                scaler.providers["local"].terminate_all(time.time())  # type: ignore[attr-defined]
    median = statistics.median(times)
    return {"trials_s": times, "median_s": median, "loop_interval_s": config.fleet.loop_interval_s,
            "target_s": TARGET_S, "met": median < TARGET_S}  # fmt: skip

"""The autoscaler on real parts: Redis, the local provider's real worker processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet.autoscaler.config import AutoscalerConfig, load_config
from fleet.autoscaler.loop import Autoscaler, build_autoscaler
from fleet.client import Fleet
from fleet.settings import Settings
from tests.integration.brokers import redis_url

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

L4_TASK: dict[str, Any] = {
    "kind": "inference",
    "model": {"name": "llama-3.1-8b-instruct", "params_b": 8, "dtype": "bf16"},
    "input": {"prompt": "the queue", "seed": 1},
    "tokens_in": 50,
    "tokens_out": 8,
    "requirements": {"accelerators": ["nvidia-l4"]},
}
LONG_L4_TASK: dict[str, Any] = {
    "kind": "fine_tune",
    "model": {"name": "tiny", "params_b": 0.05, "dtype": "bf16"},
    "input": {"steps": 4000, "seed": 3},
    "tokens_in": 10_000,
    "requirements": {"accelerators": ["nvidia-l4"]},
}


def fast_config(
    base: AutoscalerConfig, tmp: Path, url: str, **pool_overrides: Any
) -> AutoscalerConfig:
    """infra/fleet.toml with this test's broker, a private state dir and short timers on local-l4."""
    pools = tuple(
        p.model_copy(
            update={
                "idle_before_scale_in_s": 3.0,
                "scale_in_cooldown_s": 0.0,
                "scale_out_cooldown_s": 0.0,
                **pool_overrides,
            }
        )
        if p.name == "local-l4"
        else p
        for p in base.pools
    )
    fleet = base.fleet.model_copy(
        update={
            "broker_url": url,
            "loop_interval_s": 0.5,
            "lock_ttl_s": 2.0,
            "local_state_dir": str(tmp / "state"),
        }
    )
    return base.model_copy(update={"fleet": fleet, "pools": pools})


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[AutoscalerConfig, Settings, dict[str, str]]]:
    """A Redis, infra/fleet.toml pointed at it, and the settings the workers get."""
    with redis_url() as url:
        values = {
            "FLEET_BROKER_URL": url,
            "FLEET_RESULT_BACKEND": url,
            "FLEET_NAMESPACE": "",
            "FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        }
        config = fast_config(load_config(ROOT / "infra" / "fleet.toml", env={}), tmp_path, url)
        yield config, Settings.from_env(values), values


def make_autoscaler(
    config: AutoscalerConfig, settings: Settings, *, locked: bool = True
) -> Autoscaler:
    """An autoscaler with the local provider, as `fleet autoscale` builds it."""
    return build_autoscaler(config, settings, locked=locked)


def run_until(scaler: Autoscaler, done: Any, timeout_s: float = 90.0) -> None:
    """Step the autoscaler every 0.5 s until ``done()`` or time out."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        scaler.step()
        time.sleep(0.5)


def succeeded_lines(state_dir: Path) -> int:
    """How many task executions the local workers logged as succeeded."""
    return sum(
        p.read_text(errors="replace").count("succeeded in")
        for p in (state_dir / "logs").glob("*.log")
    )


def test_backlog_scales_up_from_zero_runs_once_and_scales_back_to_zero(env: Any) -> None:
    """A backlog on inference.nvidia-l4 with no workers gets emulated L4 workers; each task runs once; idle workers drain and stop."""
    config, settings, _ = env
    scaler = make_autoscaler(config, settings)
    provider = scaler.providers["local"]
    try:
        with Fleet(settings) as fleet:
            handles = fleet.submit_many(
                [{**L4_TASK, "input": {"prompt": "x", "seed": i}} for i in range(12)]
            )
            assert {h.placement.queue for h in handles} == {"inference.nvidia-l4"}
            first = scaler.step()
            assert first.plan is not None
            pools = [launch.pool for launch in first.plan.launches]
            assert pools
            assert set(pools) == {"local-l4"}
            run_until(scaler, lambda: all(h.state == "SUCCESS" for h in handles))
            results = [h.get(timeout=10) for h in handles]
        assert {r["accelerator"] for r in results} == {"nvidia-l4"}
        assert len({r["task_id"] for r in results}) == 12
        assert succeeded_lines(Path(config.fleet.local_state_dir)) == 12  # exactly once
        run_until(scaler, lambda: not provider.list_instances(time.time()), timeout_s=60)
        assert not provider.list_instances(time.time())
    finally:
        provider.terminate_all(time.time())
        if scaler.lease is not None:
            scaler.lease.release()


def test_scale_in_never_kills_a_task_in_flight(env: Any) -> None:
    """Tasks running when their pool scales in all complete: drain first, terminate after."""
    config, settings, _ = env
    scaler = make_autoscaler(config, settings, locked=False)
    provider = scaler.providers["local"]
    try:
        with Fleet(settings) as fleet:
            handles = fleet.submit_many([LONG_L4_TASK] * 3)
            run_until(
                scaler,
                lambda: (
                    any(h.state == "STARTED" for h in handles)
                    or any(h.state == "SUCCESS" for h in handles)
                ),
                timeout_s=60,
            )
            # Operator scale-in to zero while tasks run: the drain must let them finish.
            subprocess.run(
                [sys.executable, "-m", "fleet", "drain", "local-l4", "--config", str(_write(config, Path(config.fleet.local_state_dir).parent))],
                env={**os.environ, "FLEET_BROKER_URL": settings.broker_url, "FLEET_RESULT_BACKEND": settings.result_backend},
                check=True, timeout=300, cwd=ROOT,
            )  # fmt: skip
            started = [h for h in handles if h.state in ("STARTED", "SUCCESS")]
            for h in started:
                assert (
                    h.get(timeout=60)["output"]["loss_last"]
                    < h.get(timeout=60)["output"]["loss_first"]
                )
        assert started
    finally:
        provider.terminate_all(time.time())


def _write(config: AutoscalerConfig, directory: Path) -> Path:
    """The config as a TOML file (for CLI subprocesses)."""
    import tomli_w  # noqa: PLC0415 - test-only dependency

    path = directory / "fleet.toml"
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text(tomli_w.dumps(data))
    return path


def test_only_one_autoscaler_acts_and_a_standby_takes_over(env: Any, tmp_path: Path) -> None:
    """While `fleet autoscale` holds the lease a second autoscaler stays passive; kill -9 the first and the second takes over."""
    config, settings, values = env
    path = _write(config, tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "fleet", "autoscale", "--config", str(path)],
        env={**os.environ, **values}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    second = make_autoscaler(config, settings)
    try:
        client = redis.Redis.from_url(settings.broker_url)
        deadline = time.monotonic() + 30
        while client.get(second.lease.key) is None:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "first autoscaler never took the lease"
            time.sleep(0.2)
        for _ in range(3):
            assert second.step().active is False
            time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        deadline = time.monotonic() + config.fleet.lock_ttl_s + 10
        while not second.step().active:
            assert time.monotonic() < deadline, "standby never took over"
            time.sleep(0.3)
    finally:
        if first.poll() is None:
            first.kill()
        second.providers["local"].terminate_all(time.time())  # type: ignore[attr-defined]
        if second.lease is not None:
            second.lease.release()


def test_scale_up_reaction_time_is_recorded(env: Any) -> None:
    """The loop in a thread reacts to a new backlog by starting a worker that runs the task."""
    config, settings, _ = env
    scaler = make_autoscaler(config, settings, locked=False)
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with Fleet(settings) as fleet:
            t0 = time.time()
            result = fleet.submit(L4_TASK).get(timeout=90)
        assert result["started_at"] - t0 < 60
    finally:
        stop.set()
        thread.join(timeout=10)
        scaler.providers["local"].terminate_all(time.time())  # type: ignore[attr-defined]


def test_orphans_and_unknown_pools_are_cleaned_up(env: Any) -> None:
    """An instance carrying our tag for a pool no longer in the config is drained and terminated."""
    config, settings, _ = env
    scaler = make_autoscaler(config, settings, locked=False)
    provider = scaler.providers["local"]
    from fleet.autoscaler.model import OfferRef  # noqa: PLC0415
    from fleet.providers.base import LaunchRequest  # noqa: PLC0415

    orphan = provider.launch(
        LaunchRequest(
            "retired-pool",
            "cpu",
            OfferRef("aws", "us-east-1", "c6i.xlarge", "on_demand"),
            "orphan-token",
            1,
            0.17,
        ),
        time.time(),
    ).instance
    assert orphan is not None
    try:
        report = scaler.step()
        assert report.plan is not None
        assert any(
            t.instance_id == orphan.id and "orphan" in t.reason for t in report.plan.terminations
        )
        run_until(
            scaler,
            lambda: all(i.id != orphan.id for i in provider.list_instances(time.time())),
            timeout_s=60,
        )
    finally:
        provider.terminate_all(time.time())


def test_autoscaler_metrics_endpoint_reports_instances_spend_and_decisions(
    env: Any, tmp_path: Path
) -> None:
    """`fleet autoscale --metrics-port` serves fleet_* series that follow a real scale-up."""
    import socket  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    config, settings, values = env
    path = _write(config, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "autoscale", "--config", str(path), "--metrics-port", str(port)],
        env={**os.environ, **values}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        with Fleet(settings) as fleet:
            fleet.submit_many([L4_TASK] * 4)
        deadline = time.monotonic() + 60
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        while time.monotonic() < deadline:
            try:
                text = (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    .read()
                    .decode()
                )
            except OSError:
                time.sleep(0.5)
                continue
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            launches = sum(
                v
                for (n, labels), v in samples.items()
                if n == "fleet_autoscaler_decisions_total" and ("action", "launch") in labels
            )
            if launches >= 1 and any(n == "fleet_instances" for n, _ in samples):
                break
            time.sleep(0.5)
        assert launches >= 1
        names = {n for n, _ in samples}
        assert {"fleet_queue_depth", "fleet_instances", "fleet_spend_usd_per_hour"} <= names
        spend = sum(
            v
            for (n, labels), v in samples.items()
            if n == "fleet_spend_usd_per_hour" and ("pool", "local-l4") in labels
        )
        assert spend > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        from fleet.providers.local import LocalProvider  # noqa: PLC0415

        LocalProvider({}, Path(config.fleet.local_state_dir)).terminate_all(time.time())

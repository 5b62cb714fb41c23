"""The provider contract (``fleet.providers.base``), checked on every provider.

The first part runs against each provider through the ``harness``/``provider`` fixtures;
then come what only the fake offers (injected failures, lag) and what only local
processes can show (a real worker answering ping, a warm shutdown finishing its task).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from fleet.app import create_app
from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, ProviderError
from fleet.client import Fleet, TaskHandle
from fleet.localworkers import wait_ready
from fleet.providers.base import ACCELERATOR_TAG, FLEET_TAG, POOL_TAG, TOKEN_TAG, Provider
from fleet.providers.fake import FakeProvider
from fleet.providers.local import KILL_WAIT_S, LocalProvider, _children, _dead
from fleet.settings import Settings
from tests.contract.conftest import OFFER, SECRET_VALUE, Harness, make_request

NOW = 1_000.0
ACTIVE = {InstanceState.PENDING, InstanceState.RUNNING}


def tokens(listed: list[Instance]) -> set[str]:
    return {i.token for i in listed}


def ids(listed: list[Instance]) -> set[str]:
    return {i.id for i in listed}


def launched(provider: Provider, token: str | None = None) -> Instance:
    result = provider.launch(make_request(token), NOW)
    assert result.error is None, result.error
    assert result.instance is not None
    return result.instance


# -- the contract, on every provider --------------------------------------------------


def test_launch_returns_a_new_instance_for_the_request(provider: Provider) -> None:
    """Launch returns a PENDING or RUNNING instance with the request's pool, offer and token."""
    request = make_request()
    result = provider.launch(request, NOW)
    assert result.error is None
    instance = result.instance
    assert instance is not None
    assert instance.state in ACTIVE
    assert (instance.pool, instance.offer, instance.token) == (
        request.pool,
        request.offer,
        request.token,
    )
    assert (instance.devices, instance.usd_per_hour, instance.launched_at) == (1, 0.05, NOW)


def test_relaunch_with_the_same_token_creates_nothing(harness: Harness, provider: Provider) -> None:
    """A second launch with a used token returns the same instance and list shows only one."""
    request = make_request()
    first = provider.launch(request, NOW).instance
    again = provider.launch(request, NOW + 1).instance
    assert first is not None
    assert again is not None
    assert again.id == first.id
    listed = harness.list_until(lambda ls: request.token in tokens(ls))
    assert [i.id for i in listed if i.token == request.token] == [first.id]


def test_list_eventually_shows_the_instance_running(harness: Harness, provider: Provider) -> None:
    """List eventually reports a launched instance, in state RUNNING."""
    instance = launched(provider)
    listed = harness.list_until(
        lambda ls: any(i.id == instance.id and i.state is InstanceState.RUNNING for i in ls)
    )
    [seen] = [i for i in listed if i.id == instance.id]
    assert seen.state is InstanceState.RUNNING
    assert (seen.pool, seen.offer, seen.token) == (instance.pool, instance.offer, instance.token)


def test_terminate_removes_the_instance_and_repeats_harmlessly(
    harness: Harness, provider: Provider
) -> None:
    """Terminate removes the instance from list; terminating it again, or an unknown id, is None."""
    instance = launched(provider)
    harness.list_until(lambda ls: instance.id in ids(ls))
    assert provider.terminate(instance.id, NOW) is None
    listed = harness.list_until(lambda ls: instance.id not in ids(ls))
    assert instance.id not in ids(listed)
    assert provider.terminate(instance.id, NOW) is None
    assert provider.terminate("never-launched", NOW) is None


def test_errors_are_data(harness: Harness, provider: Provider) -> None:
    """A launch that cannot succeed returns an error, or an instance that vanishes; never raises."""
    request = harness.failing_request()
    result = provider.launch(request, NOW)
    if harness.expected_error_kind is not None:
        assert result.error is not None
        assert result.error.kind is harness.expected_error_kind
    if result.error is not None:
        assert result.instance is None
        assert isinstance(result.error.kind, ErrorKind)
        assert (result.error.pool, result.error.offer) == (request.pool, request.offer)
    else:
        assert result.instance is not None
    listed = harness.list_until(lambda ls: request.token not in tokens(ls))
    assert request.token not in tokens(listed)


def test_a_new_provider_object_finds_earlier_instances(
    harness: Harness, provider: Provider
) -> None:
    """A provider rebuilt over the same state (a restarted autoscaler) lists and can stop them."""
    instance = launched(provider)
    reopened = harness.reopen()
    listed = harness.list_until(lambda ls: instance.id in ids(ls), reopened)
    assert instance.id in ids(listed)
    assert reopened.terminate(instance.id, NOW) is None
    listed = harness.list_until(lambda ls: instance.id not in ids(ls))
    assert instance.id not in ids(listed)


def test_instances_carry_the_fleet_tags(harness: Harness, provider: Provider) -> None:
    """Every instance is tagged fleet, fleet-pool, fleet-accelerator and fleet-token; no secrets."""
    request = make_request()
    result = provider.launch(request, NOW)
    assert result.instance is not None
    tags = harness.tags_of(result.instance.id)
    assert tags == {
        FLEET_TAG: "fleet",
        POOL_TAG: request.pool,
        ACCELERATOR_TAG: request.accelerator,
        TOKEN_TAG: request.token,
    }
    if harness.state_dir is not None:
        for path in harness.state_dir.glob("*.json"):
            text = path.read_text()
            assert SECRET_VALUE not in text
            assert harness.env["FLEET_BROKER_URL"] not in text


# -- the fake's own knobs --------------------------------------------------------------


def test_fake_throttles_the_next_calls_of_any_kind() -> None:
    """throttle_next fails that many calls (launch, list, terminate) with THROTTLED, changing nothing."""
    fake = FakeProvider()
    fake.throttle_next = 3
    request = make_request()
    result = fake.launch(request, NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.THROTTLED
    listed = fake.list_instances(NOW)
    assert isinstance(listed, ProviderError)
    assert listed.kind is ErrorKind.THROTTLED
    terminated = fake.terminate("fake-000001", NOW)
    assert terminated is not None
    assert terminated.kind is ErrorKind.THROTTLED
    assert fake.instances == {}
    assert fake.launch(request, NOW).instance is not None
    assert len(fake.launch_calls) == 2
    assert fake.terminate_calls == ["fake-000001"]


def test_fake_pops_injected_launch_errors_in_order() -> None:
    """next_launch_errors fail one launch each, an ErrorKind becoming an error for the request."""
    fake = FakeProvider()
    custom = ProviderError("p", None, ErrorKind.AUTH, "denied", NOW)
    fake.next_launch_errors = [ErrorKind.QUOTA, custom]
    request = make_request()
    first = fake.launch(request, NOW).error
    assert first is not None
    assert first == ProviderError(request.pool, OFFER, ErrorKind.QUOTA, first.message, NOW)
    assert fake.launch(request, NOW).error is custom
    assert fake.launch(request, NOW).instance is not None
    assert fake.next_launch_errors == []
    assert len(fake.instances) == 1


def test_fake_lags_list_both_ways() -> None:
    """With list_lag=2 a new instance misses two listings and a terminated one stays two more."""
    fake = FakeProvider(list_lag=2)
    instance = launched(fake)
    seen = [ids(_listed(fake)) for _ in range(3)]
    assert seen == [set(), set(), {instance.id}]
    assert fake.terminate(instance.id, NOW) is None
    after = [_listed(fake) for _ in range(3)]
    assert [[i.state for i in ls] for ls in after] == [
        [InstanceState.TERMINATING],
        [InstanceState.TERMINATING],
        [],
    ]


def test_fake_lifecycle_knobs() -> None:
    """start_running, promote_on_list=False with mark_running, and set_state drive the state."""
    assert launched(FakeProvider(start_running=True)).state is InstanceState.RUNNING
    fake = FakeProvider(promote_on_list=False)
    instance = launched(fake)
    assert [i.state for i in _listed(fake)] == [InstanceState.PENDING]
    fake.mark_running(instance.id)
    assert [i.state for i in _listed(fake)] == [InstanceState.RUNNING]
    fake.set_state(instance.id, InstanceState.DRAINING)
    assert [i.state for i in _listed(fake)] == [InstanceState.DRAINING]
    with pytest.raises(KeyError):
        fake.set_state("nope", InstanceState.RUNNING)


def test_fake_plants_foreign_instances() -> None:
    """add_foreign lists an instance of an unknown pool at once, tagged as ours."""
    fake = FakeProvider(list_lag=5)
    orphan = Instance("i-orphan", "gone-pool", OFFER, InstanceState.RUNNING, 0.0, "t-old", 1.0)
    fake.add_foreign(orphan, accelerator="nvidia-l4")
    assert _listed(fake) == [orphan]
    assert fake.tags("i-orphan")[POOL_TAG] == "gone-pool"
    assert fake.launch(make_request("t-old"), NOW).instance == orphan


def _listed(provider: Provider) -> list[Instance]:
    listed = provider.list_instances(NOW)
    assert not isinstance(listed, ProviderError)
    return listed


# -- local processes without a broker --------------------------------------------------


def _state(instance_id: str, pid: int, start_ticks: int | None) -> dict[str, object]:
    return {
        "version": 1,
        "id": instance_id,
        "pool": "cpu-pool",
        "accelerator": "cpu",
        "offer": {"cloud": "aws", "region": "r", "instance_type": "t", "market": "spot"},
        "token": f"tok-{instance_id}",
        "pid": pid,
        "start_ticks": start_ticks,
        "node": f"cpu-{instance_id}@localhost",
        "launched_at": 0.0,
        "usd_per_hour": 0.05,
        "devices": 1,
        "tags": {},
        "log_path": "",
    }


def test_local_skips_bad_state_and_drops_dead_instances(tmp_path: Path) -> None:
    """Unreadable state files are skipped; an instance whose process is gone is dropped."""
    local = LocalProvider({}, tmp_path / "state")
    (local.state_dir / "local-0000000000.json").write_text("{not json")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (local.state_dir / "local-1111111111.json").write_text(
        json.dumps(_state("local-1111111111", dead.pid, None))
    )
    assert local.list_instances(NOW) == []
    assert not (local.state_dir / "local-1111111111.json").exists()
    assert (local.state_dir / "local-0000000000.json").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_local_never_signals_a_reused_pid(tmp_path: Path) -> None:
    """A state file whose pid now belongs to another process is gone, and that process is left alone."""
    local = LocalProvider({}, tmp_path / "state", stop_timeout_s=1.0)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (local.state_dir / "local-2222222222.json").write_text(
            json.dumps(_state("local-2222222222", stranger.pid, 1))
        )
        assert local.terminate_all(NOW) == []
        assert local.list_instances(NOW) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_local_rejects_an_unknown_accelerator_as_unsupported(tmp_path: Path) -> None:
    """An accelerator the catalog does not know is an UNSUPPORTED error and starts nothing."""
    local = LocalProvider({}, tmp_path / "state")
    result = local.launch(make_request(accelerator="not-a-chip"), NOW)
    assert result.error is not None
    assert result.error.kind is ErrorKind.UNSUPPORTED
    assert list(local.state_dir.glob("*.json")) == []


# -- real local workers -----------------------------------------------------------------

SLOW_FINE_TUNE = {
    "kind": "fine_tune",
    "model": {"name": "m", "params_b": 0.001, "dtype": "fp32"},
    "input": {"steps": 5000, "hidden": 256},
    "tokens_in": 1000,
    "requirements": {"accelerators": ["cpu"]},
}


def wait_running(app: Celery, node: str, handle: TaskHandle) -> None:
    """Return once ``node`` runs the task (STARTED, or listed active by the worker)."""
    deadline = time.monotonic() + 60
    while handle.state != "STARTED":
        # Celery reports STARTED only with task_track_started; ask the worker instead.
        active = app.control.inspect(destination=[node], timeout=1, limit=1).active()
        if any(t["id"] == handle.id for t in (active or {}).get(node, [])):
            return
        assert handle.state == "PENDING", f"task finished before terminate: {handle.state}"
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.05)


@pytest.fixture
def local(local_env: dict[str, str], tmp_path: Path) -> Iterator[LocalProvider]:
    """A local provider on the test Redis; every instance is terminated afterwards."""
    provider = LocalProvider(local_env, tmp_path / "state", tmp_path / "logs", stop_timeout_s=30)
    try:
        yield provider
    finally:
        assert provider.terminate_all(time.time()) == []


@pytest.mark.integration
def test_local_worker_answers_ping(local: LocalProvider, local_env: dict[str, str]) -> None:
    """A launched instance is a real Celery worker that answers ping and knows its instance id."""
    app = create_app(Settings.from_env(local_env))
    instance = launched(local)
    worker = local.local_worker(instance.id)
    assert worker is not None
    assert worker.node == instance.workers[0]
    wait_ready(app, [worker], timeout_s=60)
    replies = app.control.broadcast(
        "fleet_identity", destination=[worker.node], reply=True, timeout=5
    )
    assert replies is not None
    assert [r[worker.node]["instance_id"] for r in replies] == [instance.id]


@pytest.mark.integration
def test_terminate_lets_the_running_task_finish(
    local: LocalProvider, local_env: dict[str, str]
) -> None:
    """Terminate is a warm shutdown: a task running on the worker completes before it exits."""
    settings = Settings.from_env(local_env)
    app = create_app(settings)
    instance = launched(local)
    worker = local.local_worker(instance.id)
    assert worker is not None
    wait_ready(app, [worker], timeout_s=60)
    with Fleet(settings, app=app, stats_interval_s=0.2) as fleet:
        handle = fleet.submit(SLOW_FINE_TUNE)
        wait_running(app, worker.node, handle)
        signalled_at, started = time.time(), time.monotonic()
        assert local.terminate(instance.id, signalled_at) is None
        assert time.monotonic() - started < local.stop_timeout_s  # no SIGKILL was needed
        result = handle.get(timeout=60)
    assert result["worker"] == worker.node
    assert result["started_at"] + result["run_s"] > signalled_at  # still running at SIGTERM
    assert result["output"]["steps"] == 5000
    assert instance.id not in ids(_listed(local))
    assert "warm shutdown" in worker.log_tail(20_000).lower()


@pytest.mark.integration
def test_terminate_kills_worker_and_pool_after_the_stop_timeout(
    local_env: dict[str, str], tmp_path: Path
) -> None:
    """Past stop_timeout_s terminate SIGKILLs the worker and its pool processes, and returns."""
    settings = Settings.from_env(local_env)
    app = create_app(settings)
    local = LocalProvider(local_env, tmp_path / "state", tmp_path / "logs", stop_timeout_s=0.2)
    try:
        instance = launched(local)
        worker = local.local_worker(instance.id)
        assert worker is not None
        wait_ready(app, [worker], timeout_s=60)
        with Fleet(settings, app=app, stats_interval_s=0.2) as fleet:
            wait_running(app, worker.node, fleet.submit(SLOW_FINE_TUNE))
        pool = _children(worker.proc.pid)
        assert pool, "a prefork worker has pool processes"
        started = time.monotonic()
        assert local.terminate(instance.id, time.time()) is None
        assert time.monotonic() - started < 0.2 + KILL_WAIT_S
        assert worker.proc.returncode == -signal.SIGKILL
        assert [pid for pid in pool if not _dead(pid)] == []
        assert instance.id not in ids(_listed(local))
    finally:
        assert local.terminate_all(time.time()) == []

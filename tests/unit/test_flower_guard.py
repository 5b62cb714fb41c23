"""``fleet.obs.flower`` refuses to expose Flower beyond loopback without basic auth."""

from __future__ import annotations

import pytest

from fleet.obs import flower
from fleet.obs.flower import FlowerRefused, flower_argv, is_loopback

BROKER = "redis://:brokerpw@10.0.0.5:6379/0"
SECRET = "admin:s3cr3t-Pa55"  # noqa: S105 - a fake secret the messages must not contain
ANY = "0.0.0.0"  # noqa: S104 - the address under test, never bound here
NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "127.255.255.254",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST",
        "::ffff:127.0.0.1",
    ],
)
def test_loopback_allowed_without_auth(address):
    assert is_loopback(address)
    argv = flower_argv(BROKER, address, 5555, None, NO_ENV)
    assert not any(a.startswith("--basic-auth") for a in argv)
    assert f"--address={address}" in argv


@pytest.mark.parametrize(
    "address", [ANY, "", "192.168.1.20", "10.0.0.7", "::", "fe80::1", "example.com", "128.0.0.1"]
)
def test_non_loopback_refused_without_auth(address):
    assert not is_loopback(address)
    with pytest.raises(FlowerRefused, match="refusing to start Flower"):
        flower_argv(BROKER, address, 5555, None, NO_ENV)


@pytest.mark.parametrize("address", [ANY, "192.168.1.20"])
def test_non_loopback_allowed_with_auth_argument(address):
    argv = flower_argv(BROKER, address, 8080, SECRET, NO_ENV)
    assert f"--basic-auth={SECRET}" in argv
    assert f"--address={address}" in argv
    assert "--port=8080" in argv


@pytest.mark.parametrize("address", [ANY, "192.168.1.20"])
def test_non_loopback_allowed_with_auth_env(address):
    argv = flower_argv(BROKER, address, 5555, None, {"FLOWER_BASIC_AUTH": SECRET})
    # Flower reads FLOWER_BASIC_AUTH itself: the secret stays off the command line.
    assert not any(a.startswith("--basic-auth") for a in argv)
    assert not any(SECRET in a for a in argv)


def test_empty_env_auth_does_not_count():
    with pytest.raises(FlowerRefused):
        flower_argv(BROKER, ANY, 5555, None, {"FLOWER_BASIC_AUTH": ""})


@pytest.mark.parametrize("bad", ["s3cr3t-only", ":s3cr3t-Pa55", "admin:", "admin:s3cr3t-Pa55,oops"])
def test_malformed_auth_refused_without_echoing_it(bad):
    with pytest.raises(FlowerRefused) as info:
        flower_argv(BROKER, ANY, 5555, bad, NO_ENV)
    assert "s3cr3t" not in str(info.value)
    assert "oops" not in str(info.value)
    with pytest.raises(FlowerRefused) as info:
        flower_argv(BROKER, ANY, 5555, None, {"FLOWER_BASIC_AUTH": bad})
    assert "s3cr3t" not in str(info.value)
    assert "FLOWER_BASIC_AUTH" in str(info.value)


def test_refusal_message_names_the_fix_not_the_secrets():
    with pytest.raises(FlowerRefused) as info:
        flower_argv(BROKER, ANY, 5555, None, {"OTHER": SECRET})
    msg = str(info.value)
    assert ANY in msg
    assert "FLOWER_BASIC_AUTH" in msg
    assert SECRET not in msg
    assert "s3cr3t" not in msg
    assert "brokerpw" not in msg


def test_argv_shape():
    argv = flower_argv(BROKER, "127.0.0.1", 5555, None, NO_ENV)
    assert argv == [
        "celery", "-A", "fleet.app", "flower",
        "--address=127.0.0.1", "--port=5555",
    ]  # fmt: skip
    assert argv.index("-A") < argv.index("flower")
    assert not any(BROKER in a for a in argv)  # the broker URL (and its password) never reaches ps


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_bad_port_refused(port):
    with pytest.raises(FlowerRefused, match="port"):
        flower_argv(BROKER, "127.0.0.1", port, None, NO_ENV)


@pytest.mark.fault
def test_main_exits_2_on_refusal_and_hides_secrets(monkeypatch, capsys, faults):
    faults.inject("flower without auth off loopback")
    monkeypatch.setenv("FLEET_BROKER_URL", BROKER)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)

    def no_exec(*_args):
        pytest.fail("Flower must not start")

    monkeypatch.setattr(flower.os, "execv", no_exec)
    assert flower.main(["--address", ANY]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err
    assert "brokerpw" not in err


def test_main_execs_celery_with_masked_echo(monkeypatch, capsys):
    monkeypatch.setenv("FLEET_BROKER_URL", BROKER)
    monkeypatch.setenv("FLOWER_BASIC_AUTH", SECRET)
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(flower.os, "execv", lambda path, args: calls.append((path, args)))
    assert flower.main(["--address", ANY, "--port", "5600"]) == 0
    [(path, args)] = calls
    assert path.endswith("celery")
    assert args[1:] == flower_argv(BROKER, ANY, 5600, None, {"FLOWER_BASIC_AUTH": SECRET})[1:]
    err = capsys.readouterr().err
    assert "brokerpw" not in err
    assert "***" in err
    assert "s3cr3t" not in err


def test_main_defaults_to_loopback(monkeypatch):
    monkeypatch.delenv("FLEET_BROKER_URL", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    calls: list[list[str]] = []
    monkeypatch.setattr(flower.os, "execv", lambda _path, args: calls.append(args))
    assert flower.main([]) == 0
    assert "--address=127.0.0.1" in calls[0]
    assert "--port=5555" in calls[0]

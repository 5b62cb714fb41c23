"""fleet.signing: configuration from the environment and the Celery settings it implies."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.signing import ENV_VARS, SigningConfigError, SigningFiles, signing_conf


def test_signing_is_off_when_no_variable_is_set() -> None:
    """No FLEET_SIGNING_* variable: no signing (plain JSON, the default)."""
    assert SigningFiles.from_env({}) is None
    assert SigningFiles.from_env(dict.fromkeys(ENV_VARS, "")) is None


@pytest.mark.parametrize("missing", ENV_VARS)
def test_half_configured_signing_names_the_missing_variable(missing: str) -> None:
    """Two of three set is an error naming the third, not a silent fallback to unsigned."""
    env = {name: f"/x/{name}" for name in ENV_VARS if name != missing}
    with pytest.raises(SigningConfigError, match=missing):
        SigningFiles.from_env(env)


def test_signing_conf_signs_tasks_and_keeps_results_json() -> None:
    """Tasks: auth serializer, only auth accepted; results stay JSON; the files are passed on."""
    files = SigningFiles(Path("/k.pem"), Path("/c.pem"), Path("/store"))
    conf = signing_conf(files)
    assert conf["task_serializer"] == "auth"
    assert conf["accept_content"] == ["auth"]
    assert conf["result_serializer"] == "json"
    assert conf["result_accept_content"] == ["json"]
    assert (conf["security_key"], conf["security_certificate"], conf["security_cert_store"]) == (
        "/k.pem",
        "/c.pem",
        "/store",
    )


def test_missing_files_are_named(tmp_path: Path) -> None:
    """A key path that is not a file fails early, naming its variable."""
    files = SigningFiles(tmp_path / "nope.key", tmp_path / "nope.pem", tmp_path)
    with pytest.raises(SigningConfigError, match="FLEET_SIGNING_KEY"):
        files.check()

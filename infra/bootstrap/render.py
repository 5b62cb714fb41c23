# ruff: noqa: INP001 - a script, not a package
"""Embed fleet-bootstrap.sh and fleet-worker.service into cloud-init.yaml and gce-startup.sh.

The standalone files are the source; run ``python infra/bootstrap/render.py`` after editing
them (``--check`` exits 1 when the carriers are stale; tests/unit/test_infra.py checks too).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOTSTRAP = "fleet-bootstrap.sh"
UNIT = "fleet-worker.service"


def indent(text: str, prefix: str) -> str:
    """``text`` with every non-empty line indented by ``prefix`` (YAML block scalars)."""
    return "".join(
        prefix + line if line.strip() else line for line in text.splitlines(keepends=True)
    )


def render_cloud_init(bootstrap: str, unit: str, template: str) -> str:
    """cloud-init.yaml from its template (``@@BOOTSTRAP@@``/``@@UNIT@@`` mark the bodies)."""
    return template.replace("@@BOOTSTRAP@@\n", indent(bootstrap, "    ")).replace(
        "@@UNIT@@\n", indent(unit, "    ")
    )


def render_gce(bootstrap: str, unit: str, template: str) -> str:
    """gce-startup.sh from its template (heredoc bodies marked like cloud-init's)."""
    return template.replace("@@BOOTSTRAP@@\n", bootstrap).replace("@@UNIT@@\n", unit)


def main(argv: list[str]) -> int:
    """Render (or with ``--check`` compare) both carriers; 1 when a carrier is stale."""
    bootstrap = (HERE / BOOTSTRAP).read_text()
    unit = (HERE / UNIT).read_text()
    outputs = {
        "cloud-init.yaml": render_cloud_init(
            bootstrap, unit, (HERE / "templates" / "cloud-init.yaml.in").read_text()
        ),
        "gce-startup.sh": render_gce(
            bootstrap, unit, (HERE / "templates" / "gce-startup.sh.in").read_text()
        ),
    }
    stale = [
        name
        for name, text in outputs.items()
        if not (HERE / name).exists() or (HERE / name).read_text() != text
    ]
    if "--check" in argv:
        for name in stale:
            sys.stderr.write(f"{name} is stale: run python infra/bootstrap/render.py\n")
        return 1 if stale else 0
    for name, text in outputs.items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

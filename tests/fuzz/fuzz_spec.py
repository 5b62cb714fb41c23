"""Coverage-guided fuzzing of ``fleet.spec.parse_spec`` with atheris (run by hand).

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz.fuzz_spec -max_total_time=60 [CORPUS_DIR]

The contract is the one ``tests/unit/test_fuzz_spec.py`` checks with hypothesis: any bytes
give a TaskSpec or a SpecError (never another exception), and an accepted spec serializes
again. Each input is tried as raw JSON bytes and, when it decodes, as a Python object (the
path ``Fleet.submit(dict)`` takes). A crash stops the run and writes the input to
``crash-*`` for replay (``python -m tests.fuzz.fuzz_spec crash-...``).
"""

from __future__ import annotations

import contextlib
import json
import sys

import atheris  # type: ignore[import-not-found]  # optional, installed by hand

with atheris.instrument_imports():
    from fleet.spec import SpecError, parse_spec, spec_json


def one_input(data: bytes) -> None:
    """Feed ``data`` to parse_spec as bytes and, when it is JSON, as an object."""
    candidates: list[object] = [data]
    with contextlib.suppress(ValueError, RecursionError):  # not JSON: bytes only
        candidates.append(json.loads(data))
    for candidate in candidates:
        try:
            spec = parse_spec(candidate)  # type: ignore[arg-type]  # fuzzing the type too
        except SpecError:
            continue
        spec_json(spec)


def main() -> None:
    """Run atheris with the command line's libFuzzer options."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

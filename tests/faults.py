"""The fault ledger: what the fault suite injected and whether any task was lost.

Every test marked ``fault`` takes the ``faults`` fixture, calls ``faults.inject(name)``
for each fault it causes (a signal, a broker restart, a poison message, ...) and
``faults.account(submitted=..., completed=...)`` for the tasks it put through. At the
end of the run pytest prints one summary line::

    fault suite: 31 faults injected, 214 tasks submitted, 0 lost

and writes the same figures to ``$FLEET_FAULT_SUMMARY`` (JSON) when that is set. A task
counts as lost when it was submitted, was meant to complete (or to be dead-lettered) and
did neither.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FaultLedger:
    """Counts for one test run (shared by every fault test in it)."""

    injected: Counter[str] = field(default_factory=Counter)
    submitted: int = 0
    lost: int = 0
    tests: int = 0

    def inject(self, name: str, times: int = 1) -> None:
        """Record that the test caused fault ``name`` (``times`` times)."""
        self.injected[name] += times

    def account(self, *, submitted: int, completed: int) -> None:
        """Record ``submitted`` tasks of which ``completed`` finished (or were dead-lettered)."""
        if completed > submitted:
            raise ValueError(f"completed {completed} > submitted {submitted}")
        self.submitted += submitted
        self.lost += submitted - completed

    def summary(self) -> str:
        """The one-line summary printed at the end of the run."""
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.injected.items()))
        return (
            f"fault suite: {sum(self.injected.values())} faults injected, "
            f"{self.submitted} tasks submitted, {self.lost} lost" + (f" ({kinds})" if kinds else "")
        )

    def write(self, path: Path) -> None:
        """Write the figures as JSON to ``path``."""
        path.write_text(
            json.dumps(
                {
                    "faults_injected": sum(self.injected.values()),
                    "by_fault": dict(sorted(self.injected.items())),
                    "tasks_submitted": self.submitted,
                    "tasks_lost": self.lost,
                    "tests": self.tests,
                },
                indent=2,
            )
            + "\n"
        )


LEDGER = FaultLedger()


def summary_path() -> Path | None:
    """Where to write the JSON summary, if anywhere."""
    value = os.environ.get("FLEET_FAULT_SUMMARY")
    return Path(value) if value else None

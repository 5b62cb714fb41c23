"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.faults import LEDGER, FaultLedger, summary_path

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> FaultLedger:
    """The run's fault ledger; only ``fault``-marked tests may use it."""
    if request.node.get_closest_marker("fault") is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses `faults` without @pytest.mark.fault")
    LEDGER.tests += 1
    return LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault suite's line (faults injected, tasks lost) when any fault test ran."""
    if LEDGER.tests == 0:
        return
    terminalreporter.write_sep("=", LEDGER.summary())
    path = summary_path()
    if path is not None:
        LEDGER.write(path)

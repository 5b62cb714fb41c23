"""The submit-side size cap: refused before any broker I/O, naming the size, limit and index."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from fleet.client import Fleet
from fleet.settings import DEFAULT_MAX_TASK_BYTES, Settings
from fleet.spec import SpecTooLargeError
from fleet.stats import QueueStats
from tests.faults import FaultLedger

pytestmark = pytest.mark.fault

SPEC: dict[str, Any] = {
    "kind": "embedding",
    "model": {"name": "all-minilm-l6-v2", "params_b": 0.0227, "dtype": "fp32"},
    "input": {"texts": ["hello"]},
    "tokens_in": 2,
}
BIG = {**SPEC, "input": {"texts": ["x" * 2000]}}


class NoStats:
    """Empty queue statistics: placement needs no broker."""

    def read(self, queues: Sequence[str]) -> dict[str, QueueStats]:
        """Every queue empty."""
        return {q: QueueStats(q) for q in queues}


@pytest.fixture
def client() -> Iterator[Fleet]:
    """A client whose broker does not exist: any broker I/O would raise a different error."""
    env = {"FLEET_BROKER_URL": "redis://127.0.0.1:1/0", "FLEET_MAX_TASK_BYTES": "1024"}
    with Fleet(Settings.from_env(env), stats=NoStats(), stats_interval_s=60) as fleet:
        yield fleet


def test_default_cap_is_one_mebibyte() -> None:
    """FLEET_MAX_TASK_BYTES unset: 1 MiB."""
    assert Settings.from_env({}).max_task_bytes == DEFAULT_MAX_TASK_BYTES == 1 << 20


def test_submit_refuses_an_oversized_spec_before_the_broker(
    client: Fleet, faults: FaultLedger
) -> None:
    """The error names the spec's size and the limit; the unreachable broker is never tried."""
    faults.inject("oversized payload")
    with pytest.raises(
        SpecTooLargeError, match=r"spec is [\d,]+ bytes serialized; the limit is 1,024"
    ):
        client.submit(BIG)


def test_submit_many_is_all_or_nothing_and_names_the_index(
    client: Fleet, faults: FaultLedger
) -> None:
    """One oversized spec among many: SpecTooLargeError prefixed with its index, nothing sent."""
    faults.inject("oversized payload")
    with pytest.raises(SpecTooLargeError, match=r"^\[3\] spec is"):
        client.submit_many([SPEC, SPEC, SPEC, BIG, SPEC])

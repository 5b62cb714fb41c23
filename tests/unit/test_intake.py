"""workers.intake: which decoded task bodies have a shape Celery can run (pure)."""

from __future__ import annotations

import pytest

from workers.intake import payload_problem

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param([[{"kind": "x"}], {}, EMBED], None, id="ok"),
        pytest.param([[], {}, None], None, id="ok-no-embed"),
        pytest.param(None, "body must be", id="null"),
        pytest.param(5, "body must be", id="number"),
        pytest.param(b"", "body must be", id="empty-bytes"),
        pytest.param("abc", "body must be", id="string"),
        pytest.param({"args": []}, "body must be", id="object"),
        pytest.param([[{}]], "3 parts", id="missing-kwargs"),
        pytest.param([[], {}, {}, {}], "3 parts", id="four-parts"),
        pytest.param([{"a": 1}, {}, EMBED], "args must be a list", id="args-object"),
        pytest.param([[], [], EMBED], "kwargs must be an object", id="kwargs-list"),
        pytest.param([[], {}, "x"], "embed must be an object", id="embed-string"),
    ],
)
def test_payload_problem(payload: object, problem: str | None) -> None:
    """Only [list, object, object-or-null] passes; anything else is named."""
    found = payload_problem(payload)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found

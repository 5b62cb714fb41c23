"""How submit_many plans a batch into messages: packs by placement and priority, in order."""

from __future__ import annotations

import pytest

from fleet.bulk import Item, message_id, plan
from fleet.catalog import default_catalog
from fleet.placement import place
from fleet.spec import TaskSpec, parse_spec

CATALOG = default_catalog()


def spec(priority: int = 0, model: str = "noop") -> TaskSpec:
    return parse_spec(
        {
            "kind": "batch",
            "model": {"name": model, "params_b": 0.001, "dtype": "fp32"},
            "input": {"op": "noop"},
            "requirements": {"accelerators": ["cpu"]},
            "priority": priority,
        }
    )


def items(specs: list[TaskSpec]) -> list[Item]:
    placed = {}
    out = []
    for n, s in enumerate(specs):
        key = (s.model.name, s.priority)
        placed.setdefault(key, place(s, CATALOG, None))
        out.append(Item(s, placed[key], f"t{n}", "{}"))
    return out


def ids(messages) -> list[list[str]]:
    return [[i.task_id for i in m] for m in messages]


def test_pack_one_makes_one_message_per_task_with_the_tasks_id():
    """Without packing every task is its own message, and the message id is the task id."""
    planned = plan(items([spec()] * 3), 1)
    assert ids(planned) == [["t0"], ["t1"], ["t2"]]
    assert [message_id(m) for m in planned] == ["t0", "t1", "t2"]


@pytest.mark.parametrize(
    ("count", "pack", "sizes"),
    [(10, 4, [4, 4, 2]), (8, 4, [4, 4]), (3, 8, [3]), (1, 8, [1])],
)
def test_packs_hold_at_most_pack_tasks_in_submission_order(count, pack, sizes):
    """Tasks of one placement fill packs of ``pack`` in order; the last holds the rest."""
    planned = plan(items([spec()] * count), pack)
    assert [len(m) for m in planned] == sizes
    assert [t for m in ids(planned) for t in m] == [f"t{n}" for n in range(count)]


def test_a_pack_never_mixes_placements_or_priorities():
    """Different placements or priorities go to different messages (a pack has one queue, one priority)."""
    specs = [spec(0), spec(5), spec(0), spec(0, "other"), spec(5), spec(0)]
    planned = plan(items(specs), 8)
    assert sorted(ids(planned)) == [["t0", "t2", "t5"], ["t1", "t4"], ["t3"]]
    for message in planned:
        assert len({(id(i.placement), i.spec.priority) for i in message}) == 1


def test_a_pack_gets_a_fresh_message_id_and_a_single_keeps_its_task_id():
    """A pack's Celery id is none of its tasks' (their results are stored under theirs)."""
    pack, single = plan(items([spec()] * 3), 2)
    assert message_id(single) == "t2"
    assert message_id(pack) not in {"t0", "t1"}

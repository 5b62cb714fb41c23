"""The Mélange bench: one tiny cell end to end, and the table's arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from bench import melange
from fleet.autoscaler.config import load_config
from fleet.catalog import load_catalog


def test_example_catalog_has_the_paper_prices_and_the_shipped_families():
    """Four 1-GPU offers at $0.70/1.01/3.67/7.52, families identical to the shipped ones."""
    catalog = load_catalog(melange.CATALOG_DIR)
    prices = {
        o.accelerator: o.on_demand_usd_per_hour for o in catalog.offers if o.accelerator_count == 1
    }
    assert prices == {
        "nvidia-l4": 0.70,
        "nvidia-a10g": 1.01,
        "nvidia-a100-80gb": 3.67,
        "nvidia-h100": 7.52,
    }
    assert all("arXiv 2404.14527" in o.source for o in catalog.offers)
    assert set(catalog.families) == set(melange.TYPES)
    # After a recalibration of the shipped catalog: python -m bench.melange --sync-families
    assert melange.family_drift() == [], "re-copy: python -m bench.melange --sync-families"


def test_single_type_keeps_one_pool():
    """single_type keeps the pools of one accelerator; an unknown one is an error."""
    config = load_config(melange.CONFIG, env={})
    assert [p.accelerator for p in config.pools] == list(melange.TYPES)
    for t in melange.TYPES:
        assert [p.accelerator for p in melange.single_type(config, t).pools] == [t]
    with pytest.raises(ValueError, match="no pool"):
        melange.single_type(config, "nvidia-t4")


@pytest.mark.parametrize(
    ("costs", "attainment", "best"),
    [
        ({"a": 3.0, "b": 2.0, "c": 5.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, "b"),
        # The cheapest misses the 99%: the next one is the baseline.
        ({"a": 3.0, "b": 2.0, "c": 5.0}, {"a": 0.99, "b": 0.98, "c": 1.0}, "a"),
        ({"a": 3.0}, {"a": 0.5}, None),
    ],
)
def test_best_single_is_the_cheapest_meeting_the_slo(costs, attainment, best):
    """Best single type: lowest cost among those with SLO attainment >= 99%."""
    singles = {t: {"total_cost_usd": c, "slo_attainment": attainment[t]} for t, c in costs.items()}
    assert melange.best_single(singles) == best


def test_saving_arithmetic():
    """Saving = 1 - mix / best; negative when fleet costs more; NaN without a baseline."""
    assert melange.saving(75.0, 100.0) == pytest.approx(0.25)
    assert melange.saving(150.0, 100.0) == pytest.approx(-0.5)
    assert math.isnan(melange.saving(1.0, None))


def test_one_tiny_cell_end_to_end(capsys, tmp_path):
    """A 30-task Arena cell: every run reported, the saving and bound ratio computed right."""
    cell = melange.Cell("arena", 120.0, 1.0, duration_s=30.0, bound_time_s=20.0)
    row = melange.run_cell(cell)
    assert row["tasks"] == 30
    assert set(row["singles"]) == set(melange.TYPES)
    for r in (row["mix"], *row["singles"].values()):
        assert r["total_cost_usd"] >= 0
        assert 0.0 <= r["slo_attainment"] <= 1.0
    best = row["best_single"]
    assert best == melange.best_single(row["singles"])
    if best is not None:
        best_usd = row["singles"][best]["total_cost_usd"]
        assert row["best_single_usd"] == best_usd
        assert row["saving"] == pytest.approx(1.0 - row["mix"]["total_cost_usd"] / best_usd)
    if row["bound_usd"] > 0:
        assert row["mix_over_bound"] == pytest.approx(
            row["mix"]["total_cost_usd"] / row["bound_usd"]
        )
    assert row["paper"] == {"blog": [15, 77], "paper": [15, 32]}

    out = {"rows": [row], "command": "test", "wall_s": 1.0, "workers": 1}
    melange.print_table(out)
    table = capsys.readouterr().out
    assert f"{row['mix']['total_cost_usd']:.2f}" in table
    assert melange._pct(row["saving"]) in table
    path = tmp_path / "m.json"
    path.write_text(json.dumps(out))
    assert json.loads(path.read_text())["rows"][0]["tasks"] == 30


def test_cells_cover_the_grid():
    """Full: 3 workloads x 2 goals x 4 rates; quick: rates 1 and 16; tasks capped."""
    assert len(melange.cells()) == 24
    assert {c.rate for c in melange.cells(quick=True)} == {1.0, 16.0}
    assert melange.Cell("pubmed", 40.0, 32.0).tasks == 57_600
    assert melange.Cell("pubmed", 40.0, 32.0, max_tasks=1000).tasks == 1000

"""Autoscaler configuration: the shipped file is valid, bad keys are named, offers are ordered."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.autoscaler.config import ConfigError, load_config, parse_config, pool_offers
from fleet.autoscaler.model import (
    ErrorKind,
    Instance,
    InstanceState,
    OfferRef,
    PoolHistory,
    ProviderError,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)
from fleet.autoscaler.snapshot_io import load_snapshot, save_snapshot
from fleet.catalog import default_catalog

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "infra" / "fleet.toml"

POOL = """
[[pools]]
name = "p"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
"""


def test_shipped_config_is_valid_and_spans_three_clouds_and_local() -> None:
    """infra/fleet.toml validates and has pools on aws, gcp, azure and local."""
    config = load_config(SHIPPED, env={})
    assert {p.provider for p in config.pools} == {"aws", "gcp", "azure", "local"}
    assert config.fleet.budget_usd_per_hour is not None


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (POOL.replace('accelerator = "nvidia-l4"', 'accelerator = "l4"'), "pools[0].accelerator"),
        (POOL + "max_instances = -1\n", "pools[0].max_instances"),
        (POOL + "min_instances = 5\nmax_instances = 2\n", "pools[0]"),
        (POOL + "colour = 'red'\n", "pools[0].colour"),
        (POOL.replace('price_as = "aws/us-east-1/g6.xlarge"', ""), "price_as"),
        (POOL.replace("g6.xlarge", "g6.huge"), "price_as"),
        (POOL.replace("g6.xlarge", "c6i.xlarge"), "price_as"),
        (POOL + POOL, "duplicate names"),
        ("[fleet]\nloop_interval_s = 0\n", "fleet.loop_interval_s"),
        (
            '[[pools]]\nname = "Bad Name"\nprovider = "aws"\naccelerator = "nvidia-l4"\n',
            "pools[0].name",
        ),
        (
            '[[pools]]\nname = "x"\nprovider = "aws"\naccelerator = "nvidia-l4"\nregion = "mars-1"\n',
            "no priced nvidia-l4 offer",
        ),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(toml: str, key: str) -> None:
    """Every invalid file is refused with a message naming the key at fault."""
    with pytest.raises(
        ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        parse_config(toml, env={})


def test_environment_overrides_the_broker_url() -> None:
    """FLEET_BROKER_URL replaces fleet.broker_url."""
    config = parse_config(
        '[fleet]\nbroker_url = "redis://a:1/0"\n' + POOL, env={"FLEET_BROKER_URL": "redis://b:2/3"}
    )
    assert config.fleet.broker_url == "redis://b:2/3"


def test_pool_offers_follow_the_market_preference() -> None:
    """Spot offers come before on-demand ones when the pool prefers spot."""
    config = load_config(SHIPPED, env={})
    offers = pool_offers(config.pool("l4-gcp"), default_catalog())
    markets = [o.market.value for o in offers]
    assert markets == sorted(markets, key=lambda m: m != "spot")
    assert markets[0] == "spot"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_snapshot_round_trips_through_a_file(tmp_path: Path) -> None:
    """A saved snapshot loads back equal, so `fleet plan --snapshot` reproduces a plan."""
    offer = OfferRef("aws", "us-east-1", "g6.xlarge", "on_demand")
    snap = Snapshot(
        taken_at=100.0,
        queues={"inference.nvidia-l4": QueueObservation("inference.nvidia-l4", 3, 1, 1, 2.5)},
        instances=(
            Instance(
                "i-1", "p", offer, InstanceState.RUNNING, 50.0, "tok", 0.8, 1, ("n@h",), "local"
            ),
        ),
        workers=(WorkerObservation("n@h", "nvidia-l4", "i-1", 1, ("inference.nvidia-l4",)),),
        errors=(ProviderError("p", offer, ErrorKind.CAPACITY, "no capacity", 90.0),),
        history={"p": PoolHistory(99.0, 60.0, None)},
    )
    path = tmp_path / "snap.json"
    save_snapshot(snap, path)
    assert load_snapshot(path) == snap


def test_cli_config_check_and_plan_from_a_snapshot(tmp_path: Path) -> None:
    """`fleet config check` exits 0/2, and `fleet plan --snapshot` prints a decision table without a broker."""
    from click.testing import CliRunner  # noqa: PLC0415

    from fleet.cli import main  # noqa: PLC0415

    runner = CliRunner()
    ok = runner.invoke(main, ["config", "check", str(SHIPPED)])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad.toml"
    bad.write_text(POOL + "max_instances = -3\n")
    refused = runner.invoke(main, ["config", "check", str(bad)])
    assert refused.exit_code == 2
    assert "pools[0].max_instances" in refused.output
    snap = Snapshot(
        taken_at=1000.0,
        queues={"inference.nvidia-l4": QueueObservation("inference.nvidia-l4", 40, 0, 0)},
        instances=(),
    )
    path = tmp_path / "snap.json"
    save_snapshot(snap, path)
    planned = runner.invoke(
        main, ["plan", "--config", str(SHIPPED), "--snapshot", str(path), "--json"]
    )
    assert planned.exit_code == 0, planned.output
    import json  # noqa: PLC0415

    body = json.loads(planned.output)
    launched_pools = {d["pool"] for d in body["decisions"] if d["launches"]}
    assert launched_pools  # 40 queued L4 tasks get capacity
    assert launched_pools <= {"l4-aws", "l4-gcp", "local-l4"}


def test_placement_on_the_pools_catalog_only_chooses_what_pools_can_buy() -> None:
    """With only the local L4 and CPU pools, an 8B chat task goes to one of them, never elsewhere."""
    from fleet.autoscaler.config import catalog_for_pools  # noqa: PLC0415
    from fleet.placement import place  # noqa: PLC0415
    from fleet.spec import parse_spec  # noqa: PLC0415

    config = load_config(SHIPPED, env={})
    local = config.model_copy(
        update={"pools": tuple(p for p in config.pools if p.provider == "local")}
    )
    restricted = catalog_for_pools(default_catalog(), local)
    spec = parse_spec(
        {
            "kind": "inference",
            "model": {"name": "m", "params_b": 8},
            "tokens_in": 100,
            "tokens_out": 20,
        }
    )
    assert place(spec, restricted).accelerator == "nvidia-l4"
    assert (
        place(spec, default_catalog()).accelerator != "nvidia-l4"
    )  # the full catalog has cheaper chips
    assert {o.instance_type for o in restricted.offers} == {"g6.xlarge", "c6i.xlarge"}

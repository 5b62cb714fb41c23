"""FleetMetrics: names, gauge replacement, counters, histograms and registry isolation."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.autoscaler.model import (
    ErrorKind,
    Instance,
    InstanceState,
    Launch,
    OfferRef,
    Plan,
    PoolDecision,
    ProviderError,
    Termination,
)
from fleet.obs.exporter import refresh
from fleet.obs.metrics import UNPOOLED, FleetMetrics
from fleet.registry import WorkerInfo
from fleet.stats import QueueStats

EXPOSED = {
    "fleet_queue_depth",
    "fleet_queue_oldest_age_seconds",
    "fleet_workers",
    "fleet_instances",
    "fleet_spend_usd_per_hour",
    "fleet_spend_usd_total",
    "fleet_tasks_total",
    "fleet_task_wait_seconds",
    "fleet_task_duration_seconds",
    "fleet_task_cost_usd",
    "fleet_autoscaler_decisions_total",
    "fleet_provider_errors_total",
}
REQUIRED = {
    "fleet_queue_depth",
    "fleet_workers",
    "fleet_instances",
    "fleet_spend_usd_per_hour",
    "fleet_task_duration_seconds",
    "fleet_task_cost_usd",
}
OFFER = OfferRef("fake", "local", "g6.xlarge", "spot")


def families(m: FleetMetrics):
    return list(text_string_to_metric_families(m.exposition().decode()))


def exposed_names(m: FleetMetrics) -> set[str]:
    out = set()
    for f in families(m):
        if f.name.endswith("_created"):
            continue  # prometheus_client's creation timestamps, not metrics of ours
        out.add(f"{f.name}_total" if f.type == "counter" else f.name)
    return out


def samples(m: FleetMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in families(m)
        for s in f.samples
        if s.name == name
    }


def value(m: FleetMetrics, name: str, **labels: str) -> float | None:
    return samples(m, name).get(tuple(sorted(labels.items())))


def instance(i: str, pool: str, state: InstanceState, market: str = "spot") -> Instance:
    offer = OfferRef(OFFER.cloud, OFFER.region, OFFER.instance_type, market)
    return Instance(i, pool, offer, state, 0.0, f"tok-{i}", 0.8)


def decision(pool: str, launches: int, terminations: int, after: float) -> PoolDecision:
    return PoolDecision(
        pool=pool,
        current=1,
        desired=1 + launches - terminations,
        launches=tuple(Launch(pool, OFFER, f"t{n}", 0.8, 1, "backlog") for n in range(launches)),
        terminations=tuple(Termination(pool, f"i-{n}", 0.8, "idle") for n in range(terminations)),
        reasons=(),
        usd_per_hour_before=0.8,
        usd_per_hour_after=after,
    )


def worker(host: str, acc: str, emulated: bool = True) -> WorkerInfo:
    return WorkerInfo(host, acc, 1, emulated, (f"inference.{acc}",), 1)


def touch_everything(m: FleetMetrics) -> None:
    m.observe_queues(
        {"inference.nvidia-l4": QueueStats("inference.nvidia-l4", 1)}, {"inference.nvidia-l4": 2.0}
    )
    m.observe_workers([worker("w1", "nvidia-l4")])
    m.observe_plan(
        Plan(0.0, (decision("l4", 1, 0, 1.6),)), [instance("i-1", "l4", InstanceState.RUNNING)]
    )
    m.add_spend(0.5)
    m.record_task("nvidia-l4", "inference", "success", 0.1, 1.0, 1e-4)
    m.record_provider_error(ProviderError("l4", OFFER, ErrorKind.CAPACITY, "none", 0.0), "fake")


def test_names_all_start_with_fleet_and_are_exactly_the_documented_ones():
    """Every exposed name starts with fleet_; the set is the documented one, required included."""
    m = FleetMetrics()
    touch_everything(m)
    names = exposed_names(m)
    assert all(n.startswith("fleet_") for n in names)
    assert names == EXPOSED
    assert names >= REQUIRED
    assert all(f.name.startswith("fleet_") for f in families(m))


def test_queue_depths_are_set_and_cleared():
    """Queue depths: observe_queues sets ready/unacked and drops queues that are no longer reported."""
    m = FleetMetrics()
    m.observe_queues(
        {
            "inference.nvidia-l4": QueueStats("inference.nvidia-l4", ready=5, unacked=2),
            "embedding.cpu": QueueStats("embedding.cpu", ready=1),
        },
        {"inference.nvidia-l4": 12.5, "embedding.cpu": None},
    )
    assert value(m, "fleet_queue_depth", queue="inference.nvidia-l4", state="ready") == 5
    assert value(m, "fleet_queue_depth", queue="inference.nvidia-l4", state="unacked") == 2
    assert value(m, "fleet_queue_depth", queue="embedding.cpu", state="ready") == 1
    assert value(m, "fleet_queue_oldest_age_seconds", queue="inference.nvidia-l4") == 12.5
    assert value(m, "fleet_queue_oldest_age_seconds", queue="embedding.cpu") is None

    m.observe_queues({"embedding.cpu": QueueStats("embedding.cpu", ready=0)})
    depth = samples(m, "fleet_queue_depth")
    assert {dict(k)["queue"] for k in depth} == {"embedding.cpu"}
    assert value(m, "fleet_queue_depth", queue="embedding.cpu", state="ready") == 0
    assert samples(m, "fleet_queue_oldest_age_seconds") == {}

    m.observe_queues({})
    assert samples(m, "fleet_queue_depth") == {}


def test_record_task_twenty_times_counts_twenty():
    """Twenty record_task calls give a counter of 20 and histogram counts of 20."""
    m = FleetMetrics()
    for n in range(20):
        m.record_task("nvidia-l4", "inference", "success", wait_s=0.5, run_s=n * 0.1, cost_usd=1e-5)
    labels = {"accelerator": "nvidia-l4", "kind": "inference"}
    assert value(m, "fleet_tasks_total", outcome="success", **labels) == 20
    assert value(m, "fleet_task_duration_seconds_count", **labels) == 20
    assert value(m, "fleet_task_wait_seconds_count", **labels) == 20
    assert value(m, "fleet_task_cost_usd_count", **labels) == 20
    assert value(m, "fleet_task_duration_seconds_sum", **labels) == pytest.approx(19.0)
    assert value(m, "fleet_task_cost_usd_bucket", le="1e-05", **labels) == 20


def test_record_task_skips_unknown_values_and_rejects_bad_outcomes():
    """A None or negative measurement is not observed; an unknown outcome is an error."""
    m = FleetMetrics()
    m.record_task("cpu", "embedding", "failure", wait_s=None, run_s=-1.0, cost_usd=float("nan"))
    assert (
        value(m, "fleet_tasks_total", accelerator="cpu", kind="embedding", outcome="failure") == 1
    )
    assert (
        value(m, "fleet_task_duration_seconds_count", accelerator="cpu", kind="embedding") is None
    )
    with pytest.raises(ValueError, match="outcome"):
        m.record_task("cpu", "embedding", "maybe")  # type: ignore[arg-type]


def test_record_result_reads_the_task_result_dict():
    """The result dict gives kind from the queue and wait from started_at - submitted_at."""
    m = FleetMetrics()
    result = {
        "accelerator": "nvidia-l4",
        "queue": "staging.inference.nvidia-l4.x2",
        "started_at": 103.0,
        "run_s": 2.0,
        "estimated_cost_usd": 0.002,
    }
    m.record_result(result, submitted_at=100.0, namespace="staging.")
    labels = {"accelerator": "nvidia-l4", "kind": "inference"}
    assert value(m, "fleet_tasks_total", outcome="success", **labels) == 1
    assert value(m, "fleet_task_wait_seconds_sum", **labels) == pytest.approx(3.0)
    assert value(m, "fleet_task_cost_usd_sum", **labels) == pytest.approx(0.002)


def test_observe_workers_counts_by_pool_accelerator_and_emulated():
    """Workers are counted per label set; vanished label sets are removed."""
    m = FleetMetrics()
    ws = [worker("a", "nvidia-l4"), worker("b", "nvidia-l4"), worker("c", "cpu", emulated=False)]
    m.observe_workers(ws, lambda w: "l4" if w.accelerator == "nvidia-l4" else "")
    assert value(m, "fleet_workers", pool="l4", accelerator="nvidia-l4", emulated="true") == 2
    assert value(m, "fleet_workers", pool=UNPOOLED, accelerator="cpu", emulated="false") == 1
    m.observe_workers(ws[:1], lambda _w: "l4")
    assert samples(m, "fleet_workers") == {
        (("accelerator", "nvidia-l4"), ("emulated", "true"), ("pool", "l4")): 1.0
    }


def test_observe_plan_counts_decisions_and_sets_spend():
    """Decisions accumulate per pool and action; spend rate is set and integrated over time."""
    m = FleetMetrics()
    insts = [
        instance("i-1", "l4", InstanceState.RUNNING),
        instance("i-2", "l4", InstanceState.RUNNING),
        instance("i-3", "l4", InstanceState.PENDING, market="on_demand"),
        instance("i-4", "cpu", InstanceState.DRAINING),
    ]
    plan = Plan(1000.0, (decision("l4", 2, 0, 3.2), decision("cpu", 0, 1, 0.0)))
    m.observe_plan(plan, insts)
    assert value(m, "fleet_autoscaler_decisions_total", pool="l4", action="launch") == 2
    assert value(m, "fleet_autoscaler_decisions_total", pool="cpu", action="terminate") == 1
    assert value(m, "fleet_spend_usd_per_hour", pool="l4") == pytest.approx(3.2)
    assert value(m, "fleet_spend_usd_per_hour", pool="cpu") == 0
    assert value(m, "fleet_instances", pool="l4", market="spot", state="running") == 2
    assert value(m, "fleet_instances", pool="l4", market="on_demand", state="pending") == 1
    assert value(m, "fleet_instances", pool="cpu", market="spot", state="draining") == 1
    assert value(m, "fleet_spend_usd_total") == 0  # nothing to integrate yet

    # Half an hour later at 3.2 USD/h -> 1.6 USD; the cpu pool and its instance are gone.
    m.observe_plan(Plan(2800.0, (decision("l4", 1, 0, 4.0),)), insts[:3])
    assert value(m, "fleet_spend_usd_total") == pytest.approx(1.6)
    assert value(m, "fleet_autoscaler_decisions_total", pool="l4", action="launch") == 3
    assert value(m, "fleet_spend_usd_per_hour", pool="cpu") is None
    assert value(m, "fleet_instances", pool="cpu", market="spot", state="draining") is None
    m.add_spend(0.4)
    m.add_spend(-1.0)  # ignored
    assert value(m, "fleet_spend_usd_total") == pytest.approx(2.0)


def test_provider_errors_are_counted_by_kind():
    """Each provider error increments its (provider, kind) series."""
    m = FleetMetrics()
    for kind in (ErrorKind.CAPACITY, ErrorKind.CAPACITY, ErrorKind.QUOTA):
        m.record_provider_error(ProviderError("l4", OFFER, kind, "x", 0.0), "aws")
    m.record_provider_error(ProviderError("l4", None, ErrorKind.AUTH, "x", 0.0), "gcp")
    assert value(m, "fleet_provider_errors_total", provider="aws", kind="capacity") == 2
    assert value(m, "fleet_provider_errors_total", provider="aws", kind="quota") == 1
    assert value(m, "fleet_provider_errors_total", provider="gcp", kind="auth") == 1


def test_two_instances_do_not_share_state():
    """Each FleetMetrics has its own registry; the global default registry is untouched."""
    from prometheus_client import REGISTRY  # noqa: PLC0415

    a, b = FleetMetrics(), FleetMetrics()
    assert a.registry is not b.registry
    a.record_task("cpu", "batch", "success", run_s=1.0)
    a.observe_queues({"batch.cpu": QueueStats("batch.cpu", ready=3)})
    assert value(a, "fleet_tasks_total", accelerator="cpu", kind="batch", outcome="success") == 1
    assert value(b, "fleet_tasks_total", accelerator="cpu", kind="batch", outcome="success") is None
    assert samples(b, "fleet_queue_depth") == {}
    assert (
        REGISTRY.get_sample_value(
            "fleet_tasks_total", {"accelerator": "cpu", "kind": "batch", "outcome": "success"}
        )
        is None
    )


class FakeSource:
    """A StatsSource with fixed answers."""

    def __init__(self, ready: dict[str, int]) -> None:
        """Answer ``ready`` messages per queue (0 for the others)."""
        self.ready = ready

    def read(self, queues):
        """Fixed statistics for ``queues``."""
        return {q: QueueStats(q, ready=self.ready.get(q, 0)) for q in queues}


def test_refresh_updates_queues_and_workers_without_threads():
    """One refresh reads every named queue and the workers once."""
    m = FleetMetrics()
    names = ("inference.nvidia-l4", "embedding.cpu")
    refresh(m, FakeSource({"inference.nvidia-l4": 4}), names, lambda: [worker("a", "nvidia-l4")])
    assert value(m, "fleet_queue_depth", queue="inference.nvidia-l4", state="ready") == 4
    assert value(m, "fleet_queue_depth", queue="embedding.cpu", state="ready") == 0
    assert value(m, "fleet_workers", pool=UNPOOLED, accelerator="nvidia-l4", emulated="true") == 1
    refresh(m, FakeSource({}), names[:1], None)  # RabbitMQ: no registry, workers untouched
    assert value(m, "fleet_queue_depth", queue="embedding.cpu", state="ready") is None
    assert value(m, "fleet_workers", pool=UNPOOLED, accelerator="nvidia-l4", emulated="true") == 1

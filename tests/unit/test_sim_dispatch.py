"""The simulator's incremental bookkeeping equals the brute-force rules it replaces.

``FullScan`` is the simulation as first written: after every event it visits every instance
in id order and every queue in the order queues first got work, and placement's loads are
recomputed over instances x queues at every arrival. The incremental engine must start the
same tasks at the same times, and show placement the same loads.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from fleet.autoscaler.apipools import ApiPoolConfig
from fleet.autoscaler.config import AutoscalerConfig, load_config, parse_config
from fleet.catalog import default_catalog
from fleet.placement import QueueLoad
from fleet.queues import queue_name
from fleet.sim.engine import Simulation
from fleet.sim.generators import generate
from fleet.sim.state import QueueLoads, SimTask
from fleet.sim.trace import TraceEvent
from fleet.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CATALOG = default_catalog()


def cloud_config(*, apis: bool = False) -> AutoscalerConfig:
    """The cloud pools of infra/fleet.toml, optionally with two API pools."""
    base = load_config(ROOT / "infra" / "fleet.toml", env={})
    pools = tuple(p for p in base.pools if p.provider != "local")
    api_pools = tuple(ApiPoolConfig(provider=p) for p in ("groq", "cerebras")) if apis else ()
    return base.model_copy(update={"pools": pools, "api_pools": api_pools})


class FullScan(Simulation):
    """The brute-force rules: scan everything after every event, recount loads per arrival."""

    loads_checked = 0

    def _dispatch(self) -> None:
        self._activate()
        self.dirty.clear()
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            if inst.ended_at is not None or inst.draining or inst.ready_at > self.now:
                continue
            for q, waiting in self.queues.items():
                if not waiting or not self._serves(inst, q):
                    continue
                while waiting:
                    task = waiting[0]
                    service, share = self._cost_shape(task, inst)
                    if inst.used + share > inst.capacity() + 1e-9:
                        break
                    waiting.popleft()
                    task.start, task.service_s, task.share = self.now, service, share
                    inst.used += share
                    inst.running[task.idx] = task
                    self._push(self.now + service, "finish", (inst.id, task.idx))

    def _arrive(self, task: SimTask) -> None:
        if self.policy == "fleet":
            assert dict(QueueLoads(self.book, self.api_queues, self.now)) == self._brute_loads()
            self.loads_checked += 1
        super()._arrive(task)

    def _brute_loads(self) -> dict[str, QueueLoad]:
        consumers: dict[str, int] = {}
        for inst in self.instances.values():
            if inst.ended_at is None and not inst.draining and inst.ready_at <= self.now:
                for q in self.all_queues:
                    if self._serves(inst, q):
                        consumers[q] = consumers.get(q, 0) + 1
        loads = {
            q: QueueLoad(len(self.queues.get(q, deque())), consumers.get(q, 0))
            for q in self.all_queues
        }
        for provider, pool in self.api.items():
            loads[queue_name("inference", f"api-{provider}")] = QueueLoad(pool.waiting(self.now), 1)
        return loads


CASES = [
    ("multi-agent", 400, "fleet", {}, False),
    ("multi-agent", 300, "fleet", {"spot_interruptions_per_hour": 8.0, "seed": 5}, False),
    ("interactive-chat", 300, "cheapest", {"spot_interruptions_per_hour": 8.0}, False),
    ("training-mix", 30, "fleet", {"spot_interruptions_per_hour": 4.0, "seed": 2}, False),
    ("training-mix", 60, "fleet", {}, False),
    ("multi-agent", 300, "fleet", {"boot_s": 0.0, "stop_s": 20.0}, True),
    ("multi-agent", 300, "homogeneous", {"keda_target": 2}, False),
]


@pytest.mark.parametrize(("trace", "n", "policy", "options", "apis"), CASES)
def test_incremental_engine_equals_the_full_scan(
    trace: str, n: int, policy: str, options: dict[str, float], apis: bool
) -> None:
    """Every task starts and ends at the same time on the same queue; placement saw the same loads."""
    config = cloud_config(apis=apis)
    events = generate(trace, n=n, seed=3, duration_s=900.0)
    fast = Simulation(events, config, CATALOG, policy, **options)  # type: ignore[arg-type]
    slow = FullScan(events, config, CATALOG, policy, **options)  # type: ignore[arg-type]
    got, want = fast.run(), slow.run()
    assert [(t.queue, t.start, t.end, t.rejected) for t in fast.tasks] == [
        (t.queue, t.start, t.end, t.rejected) for t in slow.tasks
    ]
    assert got == want
    assert policy != "fleet" or slow.loads_checked == n


L4_POOL = """
[[pools]]
name = "l4"
provider = "local"
accelerator = "nvidia-l4"
price_as = "aws/us-east-1/g6.xlarge"
markets = ["on_demand"]
max_instances = 2
"""
CHAT = {"kind": "inference", "model": {"name": "m", "params_b": 8, "dtype": "bf16"}}
PREFILL_ONLY = parse_spec({**CHAT, "tokens_in": 20_000, "tokens_out": 0})  # a whole device
SHORT_CHAT = parse_spec({**CHAT, "tokens_in": 100, "tokens_out": 200})  # a batching stream


@pytest.mark.parametrize("cls", [Simulation, FullScan])
@pytest.mark.parametrize(
    ("freed", "other", "waits"), [("sim-0", "sim-1", 0.0), ("sim-1", "sim-0", 1.0)]
)
def test_a_head_taken_is_seen_by_later_instances_at_once_and_by_earlier_ones_next_event(
    cls: type[Simulation], freed: str, other: str, waits: float
) -> None:
    """When one instance takes a head, later ones (by id) see the next head at once, earlier ones next event."""
    trace = [TraceEvent(0.0, PREFILL_ONLY), TraceEvent(0.0, SHORT_CHAT)]
    sim = cls(trace, parse_config(L4_POOL, env={}), CATALOG, "fleet")
    offer = sim.offers[("aws", "us-east-1", "g6.xlarge")]
    sim._launch("l4", offer, "on_demand", 1.0, 1)
    sim._launch("l4", offer, "on_demand", 1.0, 1)
    big, small = sim.tasks
    sim.now = 1000.0
    sim.instances[freed].used, sim.instances[other].used = 1.0, 0.5  # one full, one half busy
    for task in (big, small):
        task.queue = "inference.nvidia-l4"
        sim.book.queue(task.queue).append(task)
    sim._head_changed("inference.nvidia-l4")
    sim._dispatch()  # the whole-device task fits neither; the short chat waits behind it
    assert big.start is None
    assert small.start is None
    assert sim._cost_shape(big, sim.instances[freed])[1] == 1.0
    sim.instances[freed].used = 0.0  # its work finished: only it has room now
    sim.dirty.add(freed)
    sim._dispatch()
    assert big.idx in sim.instances[freed].running
    assert big.start == sim.now
    start = sim.now
    sim.now += 1.0  # the next event
    sim._dispatch()
    assert small.idx in sim.instances[other].running
    assert small.start == start + waits

"""What the loop remembers of each queue between plans, pure.

The live loop (``fleet.autoscaler.loop``) and the simulator (``fleet.sim.engine``) pass
every snapshot's queues through these before planning, with a memory dict each keeps:

* ``carry_samples``: a queue drained to empty keeps the last device-time sample seen at its
  head while its tasks run;
* ``smooth_load``: the devices a queue's running tasks occupy, averaged over about
  ``LOAD_SMOOTHING_S``.

No I/O and no clock: ``now`` is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from fleet.autoscaler.model import QueueObservation
from fleet.queues import parse_queue


def carry_samples(
    queues: Mapping[str, QueueObservation], memory: dict[str, tuple[float, float]]
) -> dict[str, QueueObservation]:
    """Queues with running work but no head sample take the last sample seen for them.

    A queue drained to empty still has tasks in flight; without this their device share
    would be unknown (counted as whole devices). ``memory`` (the loop's, kept between
    plans) is updated with every fresh sample and forgets queues with no work.
    """
    out: dict[str, QueueObservation] = {}
    for name, q in queues.items():
        seen = q
        if q.sample_service_s is not None and q.sample_share is not None:
            memory[name] = (q.sample_service_s, q.sample_share)
        elif q.unacked and name in memory:
            busy, share = memory[name]
            seen = replace(q, sample_service_s=busy, sample_share=share)
        elif not q.ready and not q.unacked:
            memory.pop(name, None)
        out[name] = seen
    return out


LOAD_SMOOTHING_S = 120.0  # time constant of the running load the planner sizes to
FORGET_DEVICES = 1e-3  # an idle queue's average below this is forgotten


def smooth_load(
    queues: Mapping[str, QueueObservation],
    memory: dict[str, tuple[float, float]],
    now: float,
    namespace: str = "",
    tau_s: float = LOAD_SMOOTHING_S,
) -> dict[str, QueueObservation]:
    """Queues whose ``running_devices`` is the running load averaged over about ``tau_s``.

    The devices a queue's running tasks occupy swing by several times within minutes
    when request sizes are heavy-tailed; sizing to each swing launches instances that the
    stabilisation window then keeps. The planner sizes to this exponentially weighted
    average instead, and waiting tasks (its backlog term) answer a sustained rise.
    ``memory`` (the caller's, kept between plans: ``{queue: (average, at)}``) is updated;
    queues with no running work decay towards zero and are forgotten once idle.
    """
    out: dict[str, QueueObservation] = {}
    for name, q in queues.items():
        current = q.running_devices
        if current is None:
            ref = parse_queue(name, namespace)
            tier = ref.devices if ref is not None else 1
            share = q.sample_share if q.sample_share is not None and q.sample_share > 0 else 1.0
            current = q.unacked * tier * min(share, 1.0)
        before = memory.get(name)
        if before is None:
            average = current
        else:
            weight = 1.0 - math.exp(-max(0.0, now - before[1]) / tau_s)
            average = before[0] + (current - before[0]) * weight
        if q.ready or q.unacked or average > FORGET_DEVICES:
            memory[name] = (average, now)
        else:
            memory.pop(name, None)
        out[name] = replace(q, running_devices=average) if q.ready or q.unacked else q
    return out

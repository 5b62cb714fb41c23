"""A stock Celery app with its own ``fleet.run``: nothing of fleet's worker, to consume fleet's messages.

``celery -A tests.integration.stock_app worker``; reads ``FLEET_BROKER_URL`` at import. Its
only fleet setting is the Redis layout of priority bands (``queue:9``), which any consumer
of fleet's queues needs, whoever published the messages.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

url = os.environ["FLEET_BROKER_URL"]
app = Celery("stock", broker=url, backend=url)
app.conf.update(
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_transport_options={"sep": ":", "priority_steps": [0, 3, 6, 9]},
)


@app.task(name="fleet.run", bind=True)
def run(
    self: Task[Any, Any], spec: dict[str, Any], placement: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Say what arrived: the task id, the spec's kind and input, the placement's queue."""
    return {
        "task_id": self.request.id,
        "kind": spec["kind"],
        "input": spec["input"],
        "queue": (placement or {}).get("queue"),
        "delivered_to": (self.request.delivery_info or {}).get("routing_key"),
        "time_limit": list(self.request.timelimit or ()),
    }

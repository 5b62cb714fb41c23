"""A plain Celery app with one trivial task: the baseline the fleet worker is measured against.

Same broker and serializer as fleet; everything else is Celery's defaults.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("plain", broker=os.environ["FLEET_BROKER_URL"], backend=os.environ["FLEET_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


@app.task(name="plain.noop")
def noop(spec: dict[str, object], placement: dict[str, object] | None = None) -> dict[str, object]:
    """Do nothing, like the fleet ``batch`` handler's ``noop`` op."""
    return {"output": {}, "placement": placement is not None, "kind": spec.get("kind")}

"""A plain Celery app with one trivial task: the bench's plain worker (``celery -A bench.plain_app``).

Same broker, result backend and serializer as fleet; everything else is Celery's defaults:
early acks, prefetch 4 per process, no STARTED record, one queue (``bench.plain``). It
imports nothing of fleet, so its memory is Celery's alone. ``bench.like_app`` is the plain
worker configured like fleet.

Reads ``FLEET_BROKER_URL`` (and ``FLEET_RESULT_BACKEND``, default the broker) at import.
"""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ["FLEET_BROKER_URL"]
app = Celery("plain", broker=_url, backend=os.environ.get("FLEET_RESULT_BACKEND") or _url)
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

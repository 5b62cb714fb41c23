"""Celery's STARTED and SUCCESS records of ``fleet.run``, written in the guard's own store steps.

With ``track_started`` Celery writes a task's state twice per run, STARTED before the body
and SUCCESS after it, and each write is two round trips on Redis (a GET, so that a success
is never overwritten, then SET and PUBLISH); the at-most-once guard adds two more (claim,
finish). When the result backend is Redis and the state store is that same database, the
guard writes both records inside its two scripts instead (``fleet.execution.StatusRecord``:
the key, value and channel Celery's ``RedisBackend`` would use, built by the backend's own
meta builder and encoder, with its never-overwrite-a-success rule), and Celery writes
neither: a trivial task costs 5 round trips instead of 9 (fetch, unacked bookkeeping, claim
+ STARTED, finish + SUCCESS, ack).

How Celery is kept from writing them: ``fleet.run`` is registered with
``track_started=False`` (the guard always writes STARTED itself: in its claim script, or
through ``backend.store_result`` where it cannot), and after a finish that wrote SUCCESS
the running request is marked ``ignore_result``, which Celery's ``mark_as_done`` reads
before storing. Failures, retries and a redelivered task's recorded result are still
written by Celery as before. If the finish script fails (store unreachable) the request is
not marked and Celery writes SUCCESS with its own retries.

Elsewhere (``rpc://`` on RabbitMQ, a state store on another Redis, no state store, a
compressed backend) ``for_backend`` returns None and the records go through Celery's
backend exactly as Celery would write them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Task, states
from celery.backends.redis import RedisBackend

from fleet.execution import StatusRecord

__all__ = ["Records", "for_backend", "same_database", "skip_celery_success", "write_started"]

_WHERE = ("host", "port", "db", "path")


def same_database(backend_params: dict[str, Any], client_params: dict[str, Any]) -> bool:
    """Whether two sets of redis-py connection parameters name the same Redis database (pure)."""
    where = [(p.get("host"), int(p.get("port") or 0), int(p.get("db") or 0), p.get("path"))
             for p in (backend_params, client_params)]  # fmt: skip
    return where[0] == where[1]


class Records:
    """Builds the ``StatusRecord`` values Celery's Redis backend would write.

    The record is Celery's result meta (``status``, ``result``, ``traceback``,
    ``children``, ``date_done``, ``task_id``, and ``group_id``/``parent_id`` when the
    request has them), encoded as JSON: what ``Backend._get_result_meta`` and ``encode``
    produce without ``result_extended`` (``for_backend`` refuses an app that sets it).
    """

    def __init__(self, backend: Any) -> None:  # noqa: ANN401 - a RedisBackend, untyped in the stubs
        """Build records for ``backend`` (its key prefixes, expiry and clock)."""
        self._backend = backend
        expires = backend.expires
        self._ttl_s = None if not expires else float(expires)

    def record(
        self,
        task_id: str,
        state: str,
        result: Any,  # noqa: ANN401 - any JSON value
        request: Any = None,  # noqa: ANN401 - Celery's request Context
    ) -> StatusRecord:
        """The record of ``task_id`` in ``state`` with ``result``."""
        ready = state in states.READY_STATES
        meta: dict[str, Any] = {
            "status": state,
            "result": result,
            "traceback": None,
            "children": [r.as_tuple() for r in getattr(request, "children", None) or ()],
            "date_done": self._backend.app.now().isoformat() if ready else None,
        }
        for field, name in (("group", "group_id"), ("parent_id", "parent_id")):
            if value := getattr(request, field, None):
                meta[name] = value
        meta["task_id"] = task_id
        key = _text(self._backend.get_key_for_task(task_id))
        return StatusRecord(key, json.dumps(meta), self._ttl_s)

    def started(self, task_id: str, hostname: str | None, request: Any = None) -> StatusRecord:  # noqa: ANN401 - Celery's request Context
        """STARTED, with the pid and hostname Celery's tracer would report."""
        return self.record(
            task_id, states.STARTED, {"pid": os.getpid(), "hostname": hostname}, request
        )

    def success(self, task_id: str, result: dict[str, Any], request: Any = None) -> StatusRecord:  # noqa: ANN401 - Celery's request Context
        """SUCCESS with ``result``, as Celery's ``mark_as_done`` would store it."""
        return self.record(task_id, states.SUCCESS, result, request)


def for_backend(backend: Any, store_client: redis.Redis | None) -> Records | None:  # noqa: ANN401 - Celery's backends are untyped
    """``Records`` when ``backend`` is a plain JSON Redis backend on ``store_client``'s database."""
    if store_client is None or not _plain_redis(backend):
        return None
    if backend.compression or backend.serializer != "json" or backend.app.conf.result_extended:
        return None
    store_params = dict(store_client.connection_pool.connection_kwargs)
    return Records(backend) if same_database(backend.connparams, store_params) else None


def write_started(backend: Any, task_id: str, hostname: str | None, request: Any) -> None:  # noqa: ANN401 - Celery's backend and request
    """Write STARTED through ``backend`` (its own round trips), as Celery's tracer does."""
    backend.store_result(
        task_id, {"pid": os.getpid(), "hostname": hostname}, states.STARTED, request=request
    )


def skip_celery_success(task: Task[Any, Any]) -> None:
    """Tell Celery the SUCCESS record is written (its ``mark_as_done`` reads this flag)."""
    task.request.ignore_result = True


def _plain_redis(backend: object) -> bool:
    """Celery's own Redis backend (not Sentinel's or another subclass with its own ``set``)."""
    return type(backend) is RedisBackend


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

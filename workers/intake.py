"""Message intake: a malformed task envelope is rejected, never allowed to stop the worker.

Celery's default task strategy reads a protocol-2 body as ``[args, kwargs, embed]`` in
the worker's main process. A body of another shape raises there, uncaught by Celery 5.7:
``5`` or ``null`` or an empty body (``'args' in payload``: TypeError), ``[[spec]]`` or a
string (unpacking: ValueError). The consumer dies with "Unrecoverable error", and on
Redis the message is restored to its queue, so it takes down every worker that picks it
up next.

``guarded_strategy`` (set as ``Strategy`` on fleet's tasks) checks the decoded body's
shape first and raises Celery's own ``InvalidTaskError`` for a bad one; the consumer then
logs "Received invalid task message" and rejects the message (dropped, or dead-lettered
by a RabbitMQ policy). Decoding itself is unchanged: a non-JSON body, or a content type
the app does not accept (pickle; plain JSON when signing is on), fails in kombu with
``DecodeError``/``ContentDisallowed``, which Celery already logs and rejects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default as default_strategy

__all__ = ["GUARDED_STRATEGY", "guarded_strategy", "payload_problem"]

GUARDED_STRATEGY = "workers.intake:guarded_strategy"  # the task option's value


def payload_problem(payload: object) -> str | None:
    """Why a decoded task body cannot be run, or None when its shape is right (pure).

    Protocol 2: ``[args: list, kwargs: object with string keys, embed: object or null]``.
    """
    if not isinstance(payload, list | tuple):
        return f"body must be [args, kwargs, embed], not {type(payload).__name__}"
    if len(payload) != 3:  # noqa: PLR2004 - the protocol's three parts
        return f"body must have 3 parts [args, kwargs, embed], not {len(payload)}"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"args must be a list, not {type(args).__name__}"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "kwargs must be an object"
    if embed is not None and not isinstance(embed, dict):
        return f"embed must be an object, not {type(embed).__name__}"
    return None


def guarded_strategy(
    task: Any,  # noqa: ANN401 - Celery's Task
    app: Any,  # noqa: ANN401 - Celery's app
    consumer: Any,  # noqa: ANN401 - Celery's Consumer
    **kwargs: Any,  # noqa: ANN401 - passed through to Celery's strategy
) -> Callable[..., Any]:
    """Celery's default strategy behind a check of the body's shape (see the module docstring)."""
    handle: Callable[..., Any] = default_strategy(task, app, consumer, **kwargs)

    def guarded(message: Any, body: Any, *args: Any, **kw: Any) -> Any:  # noqa: ANN401 - Celery's handler signature
        if body is None:  # protocol 2: the body is decoded here (kombu caches it for Celery)
            problem = payload_problem(message.payload)
            if problem:
                raise InvalidTaskError(f"malformed task body: {problem}")
        return handle(message, body, *args, **kw)

    return guarded

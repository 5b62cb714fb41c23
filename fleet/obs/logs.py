"""Structured logs with structlog: JSON in production, readable console output for people.

``configure_logging()`` (called by ``fleet worker``, ``fleet autoscale`` and the client when
asked) routes structlog *and* the standard library (Celery's own loggers included) through
one processor chain, so every line has the same shape. ``FLEET_LOG_FORMAT`` picks ``json``
(default when not a terminal) or ``console``. Every event passes ``mask_secrets``: any URL
with a password, and any field named like a secret, is masked before it is rendered.
Worker logs carry ``task_id`` (bound for the duration of each task).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from fleet.settings import masked

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)
_SECRET_KEYS = re.compile(
    r"(password|passwd|secret|token|api_key|apikey|authorization|credential)", re.IGNORECASE
)
_configured = False


def _mask_value(value: object) -> object:
    if isinstance(value, str):
        return _URL.sub(lambda m: masked(m.group(0)), value)
    return value


def mask_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: mask passwords in URLs, and values of secret-named fields."""
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key) and key != "idempotency_key":
            event_dict[key] = "***"
        else:
            event_dict[key] = _mask_value(value)
    return event_dict


def _format() -> str:
    chosen = os.environ.get("FLEET_LOG_FORMAT")
    if chosen in ("json", "console"):
        return chosen
    return "console" if sys.stderr.isatty() else "json"


def shared_processors() -> list[Any]:
    """The processors every event goes through, before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        mask_secrets,
    ]


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Route structlog and stdlib logging (Celery's too) through one JSON or console pipeline."""
    global _configured  # noqa: PLW0603 - logging is process-wide by nature
    chosen = fmt or _format()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if chosen == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter_by_level first: a disabled level costs a dictionary lookup, not the chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _configured = True


def get_logger(name: str) -> Any:  # noqa: ANN401 - structlog's bound logger is dynamically typed
    """A structlog logger (works whether or not ``configure_logging`` ran)."""
    return structlog.stdlib.get_logger(name)

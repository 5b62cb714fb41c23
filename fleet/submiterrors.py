"""What a failed publish means, in words a caller can act on (and with no secret in them).

A submit either lands or raises (issue 6, fault 9). On RabbitMQ, publisher confirms
(``confirm_publish``) make the broker acknowledge every message; a *nack* (a queue at its
``max-length`` with ``overflow = reject-publish``, a full disk, an internal error) comes
back as ``amqp.exceptions.MessageNacked``, which kombu re-raises as an
``OperationalError`` with an empty message. A broker that cannot be reached is an
``OperationalError`` too. ``as_submit_error`` turns both into a ``SubmitError`` that says
which it was, for which queues, and whether anything may have been enqueued; the broker
URL in it has its password masked.
"""

from __future__ import annotations

import re

from amqp.exceptions import MessageNacked
from kombu.exceptions import OperationalError

from fleet.settings import masked

__all__ = ["PUBLISH_ERRORS", "SubmitError", "as_submit_error", "was_nacked"]

# What a publish raises when the broker refuses or is unreachable.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (OperationalError, MessageNacked, OSError)
SHOWN_QUEUES = 5
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)


class SubmitError(OperationalError):
    """The broker did not take the task(s). ``refused``: it said no (a nack); else unreachable.

    A subclass of ``kombu.exceptions.OperationalError``, so callers that caught that
    before keep working.
    """

    def __init__(self, message: str, *, refused: bool) -> None:
        """Keep ``refused`` for callers that retry only on an unreachable broker."""
        super().__init__(message)
        self.refused = refused


def was_nacked(exc: BaseException) -> bool:
    """True when ``exc`` is, or was caused by, a publisher-confirm nack."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MessageNacked):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _safe(text: str) -> str:
    return _URL.sub(lambda m: masked(m.group(0)), text)


def as_submit_error(
    exc: BaseException, broker_url: str, queues: list[str], count: int
) -> SubmitError:
    """The ``SubmitError`` for a publish of ``count`` task(s) to ``queues`` that raised ``exc``."""
    names = sorted(set(queues))
    where = ", ".join(names[:SHOWN_QUEUES]) + (" ..." if len(names) > SHOWN_QUEUES else "")
    what = "the task was" if count == 1 else f"the batch of {count} tasks was"
    if was_nacked(exc):
        partial = "" if count == 1 else " (messages before the refused one may have landed)"
        return SubmitError(
            f"broker {masked(broker_url)} refused the publish to {where} (publisher confirm "
            f"nack: the queue is full with overflow=reject-publish, or the broker is out of "
            f"resources); {what} not enqueued{partial}",
            refused=True,
        )
    detail = _safe(str(exc)) or type(exc).__name__
    uncertain = "not enqueued" if count == 1 else "not enqueued, or only in part"
    return SubmitError(
        f"broker {masked(broker_url)} unreachable while publishing to {where} "
        f"({type(exc).__name__}: {detail}); {what} {uncertain}",
        refused=False,
    )

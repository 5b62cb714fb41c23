"""Snapshots to and from JSON, so a plan can be reproduced offline (``fleet plan --snapshot``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet.autoscaler.model import (
    ErrorKind,
    Instance,
    InstanceState,
    Interruption,
    OfferRef,
    PoolHistory,
    ProviderError,
    QueueObservation,
    Snapshot,
    WorkerObservation,
)


def snapshot_from_dict(data: dict[str, Any]) -> Snapshot:
    """Rebuild a Snapshot from ``Snapshot.to_dict()`` output.

    Raises:
        ValueError: a field is missing or of the wrong shape (the message names it).

    """
    try:
        return Snapshot(
            taken_at=float(data["taken_at"]),
            queues={k: QueueObservation(**v) for k, v in data.get("queues", {}).items()},
            instances=tuple(
                Instance(
                    **{
                        **i,
                        "offer": OfferRef(**i["offer"]),
                        "state": InstanceState(i["state"]),
                        "workers": tuple(i.get("workers", ())),
                    }
                )
                for i in data.get("instances", ())
            ),
            workers=tuple(
                WorkerObservation(**{**w, "queues": tuple(w.get("queues", ()))})
                for w in data.get("workers", ())
            ),
            errors=tuple(
                ProviderError(
                    **{
                        **e,
                        "offer": OfferRef(**e["offer"]) if e.get("offer") else None,
                        "kind": ErrorKind(e["kind"]),
                    }
                )
                for e in data.get("errors", ())
            ),
            history={k: PoolHistory(**v) for k, v in data.get("history", {}).items()},
            interruptions=tuple(
                Interruption(**{**i, "offer": OfferRef(**i["offer"])})
                for i in data.get("interruptions", ())
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a fleet snapshot: {exc}") from None


def load_snapshot(path: Path) -> Snapshot:
    """Read a snapshot file."""
    return snapshot_from_dict(json.loads(path.read_text()))


def save_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Write a snapshot file."""
    path.write_text(json.dumps(snapshot.to_dict(), indent=2, default=str) + "\n")

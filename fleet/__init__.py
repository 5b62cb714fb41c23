"""fleet: typed AI tasks routed to per-accelerator queues, served by chip-aware workers.

``from fleet import Fleet, TaskSpec`` is the client API; see ``fleet.client``.
"""

from fleet.client import Fleet, TaskHandle
from fleet.placement import ContextError, NoPlacementError, Placement, Policy
from fleet.spec import SpecError, TaskSpec, parse_spec

__all__ = [
    "ContextError",
    "Fleet",
    "NoPlacementError",
    "Placement",
    "Policy",
    "SpecError",
    "TaskHandle",
    "TaskSpec",
    "parse_spec",
]
__version__ = "0.1.0"

"""Pure-Python evaluator of per-host desired state: what `explain` runs and what the kernel must equal."""

from omniwall.sim.evaluate import (
    ConnectionVerdict,
    Endpoint,
    HopVerdict,
    Network,
    PathVerdict,
    judge_connection,
    judge_hop,
    judge_path,
    network_of,
)
from omniwall.sim.packet import Packet

__all__ = [
    "ConnectionVerdict",
    "Endpoint",
    "HopVerdict",
    "Network",
    "Packet",
    "PathVerdict",
    "judge_connection",
    "judge_hop",
    "judge_path",
    "network_of",
]

"""The network-namespace lab: hosts and workloads as namespaces on one machine (DESIGN.md §9, docs/lab.md).

Imports are lazy so that `python -m omniwall.lab.responder` (one process per workload) starts fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Lab", "LabError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from omniwall.lab import lab

        return getattr(lab, name)
    raise AttributeError(name)

"""How policy gets into the lab's host kernels: the seam between the lab and the control plane.

`Standalone` compiles the resources in this process (`compile_catalog`) and programs each host
namespace with the nftables backend directly (`NftBackend(netns=...).sync(state)`); no manager, no
agent. `Managed` (lab/control.py) implements the same `PolicyDriver` protocol by starting a manager and
an agent per host namespace instead. `NoPolicy` leaves the hosts open (everything allowed), for topology
tests. Which driver a lab uses: lab/drivers.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from typing import Protocol

from omniwall.lab.plan import LabPlan
from omniwall.model.catalog import Catalog


class PolicyDriver(Protocol):
    mode: str  # recorded in the state file: none | standalone | managed

    def start(self, plan: LabPlan, catalog: Catalog, hosts: Sequence[str] | None = None) -> None:
        """Program every host of `plan` (or only `hosts`) with `catalog`'s policy; called before
        workloads get traffic, and again after a change (e.g. a workload moved)."""

    def stop(self, plan: LabPlan) -> None:
        """Undo `start` (best effort: deleting the namespaces removes everything anyway)."""


class NoPolicy:
    mode = "none"

    def start(self, plan: LabPlan, catalog: Catalog, hosts: Sequence[str] | None = None) -> None:
        return None

    def stop(self, plan: LabPlan) -> None:
        return None


class Standalone:
    mode = "standalone"

    def start(self, plan: LabPlan, catalog: Catalog, hosts: Sequence[str] | None = None) -> None:
        from omniwall.compiler.build import compile_catalog
        from omniwall.dataplane.nft.backend import NftBackend

        states = compile_catalog(catalog)
        for h in plan.hosts:
            if hosts is not None and h.name not in hosts:
                continue
            backend = NftBackend(netns=h.netns)
            try:
                backend.sync(states[h.name])
            finally:
                _close(backend)

    def stop(self, plan: LabPlan) -> None:
        from omniwall.dataplane.nft.backend import NftBackend

        for h in plan.hosts:
            with contextlib.suppress(Exception):
                backend = NftBackend(netns=h.netns)
                try:
                    backend.teardown()
                finally:
                    _close(backend)


def _close(backend: object) -> None:
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def standalone_available() -> bool:
    """Are the compiler and the nftables backend present (both are built by other work items)?"""
    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("omniwall.compiler.build", "omniwall.dataplane.nft.backend")
        )
    except ModuleNotFoundError:
        return False

"""The managed lab as one object: `managed_lab(...)`, a lab of network namespaces whose policy comes
from a real manager and agents (lab/control.py), with the lab's hypervisor moving vNICs when the manager
migrates a workload. The control plane's names are re-exported here for the tests, the demo and the
benchmarks (`from omniwall.lab.managed import ControlPlane, managed_lab`).

The layering: lab/control.py knows nothing of `Lab`; lab/lab.py uses it through lab/drivers.py; this
module sits above both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from omniwall.lab.control import (
    ControlPlane,
    Managed,
    ManagedError,
    Record,
    control_dir,
    live_expected,
    stop_control_plane,
)
from omniwall.lab.lab import Lab


@contextlib.contextmanager
def managed_lab(
    source: Any, *, managers: int = 1, etcd: int = 0, **lab_options: Any
) -> Iterator[tuple[Lab, ControlPlane]]:
    """`with managed_lab(["examples/three-tier"]) as (lab, cp):` a lab whose policy comes from a real
    manager and agents (`managers=3, etcd=3`: three managers on a three-member etcd cluster, docs/ha.md).
    The control plane is stopped before the lab's namespaces go, whatever happens."""
    driver = Managed(managers=managers, etcd=etcd)
    lab = Lab.up(source, policy=driver, **lab_options)
    try:
        with lab:
            assert driver.control is not None
            try:
                yield lab, driver.control
            finally:
                driver.stop(lab.plan)
    finally:
        stop_control_plane(lab.prefix)  # no-op when already stopped


__all__ = [
    "ControlPlane",
    "Managed",
    "ManagedError",
    "Record",
    "control_dir",
    "live_expected",
    "managed_lab",
    "stop_control_plane",
]

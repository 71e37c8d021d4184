"""Which `PolicyDriver` a lab uses: the one its state file names (`lab down`/`move` in a later process),
or the default. Apart from lab/standalone.py so that the drivers sit below the `Lab` that uses them:
lab.py -> drivers.py -> standalone.py, control.py (the managed driver)."""

from __future__ import annotations

from omniwall.lab.control import Managed
from omniwall.lab.standalone import NoPolicy, PolicyDriver, Standalone, standalone_available


def driver_for(mode: str) -> PolicyDriver:
    """The driver a lab's state file names."""
    if mode == "standalone":
        return Standalone()
    if mode == "managed":
        return Managed()
    return NoPolicy()


def default_driver() -> PolicyDriver:
    return Standalone() if standalone_available() else NoPolicy()


__all__ = ["default_driver", "driver_for"]

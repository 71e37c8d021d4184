"""A VM workload's guest as the lab's other modules see it: its run directory, whether a lab
"namespace" name is a guest, and running a command inside it over its command channel (vm/channel.py).

Below netns.py and probe.py (which send a guest's commands and probes here) and vm.py (which starts and
stops guests): it imports none of them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from omniwall.lab import state as lab_state
from omniwall.vm import channel


def vm_dir() -> Path:
    return lab_state.STATE_DIR / "vm"


def rundir(name: str) -> Path:
    """A VM workload's run directory, by its `WorkloadPlan.netns` name."""
    return vm_dir() / name


def is_guest(name: str) -> bool:
    return (rundir(name) / "guest.json").is_file()


def exec_in_guest(
    name: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30
) -> subprocess.CompletedProcess[str]:
    """`lab exec` for a VM: run argv in the guest's busybox shell; its output (stdout and stderr
    together) is returned as stdout, or printed when not captured."""
    res = channel.run(rundir(name) / "ctl.sock", shlex.join(argv), timeout=timeout or 30)
    if not capture:
        sys.stdout.write(res.output + ("\n" if res.output and not res.output.endswith("\n") else ""))
        sys.stdout.flush()
        return subprocess.CompletedProcess(list(argv), res.returncode, None, None)
    return subprocess.CompletedProcess(list(argv), res.returncode, res.output, "")


__all__ = ["exec_in_guest", "is_guest", "rundir", "vm_dir"]

"""VM workloads' lifecycle in the lab: QEMU is killed by PID on `lab down`, and also when `lab up` fails
after the guests started (docs/vms.md)."""

from __future__ import annotations

import os
import shutil

import pytest

from labhelpers import netns_list, pid_alive
from omniwall.lab import Lab
from omniwall.lab import guest as lab_guest
from omniwall.lab.lab import new_prefix
from omniwall.lab.responder import ResponderError
from omniwall.vm import image, qemu

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, QEMU taps)"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 missing (make install)"),
]

ONE_VM = """
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: vm-a, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.79.0.1]}]
  lab: {kind: vm, servers: [tcp/80]}
"""

# A namespace workload whose responder cannot start (the same port twice): `lab up` fails after the
# guest was started, and must not leave it running.
BROKEN = """
---
kind: Workload
metadata: {name: ns-b, tenant: t1}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.79.0.2]}]
  lab: {servers: [tcp/80, tcp/80]}
"""


@pytest.fixture(autouse=True)
def _image() -> None:
    try:
        image.load()
    except image.VmImageError as e:
        pytest.skip(str(e))


def test_down_kills_guests_by_pid() -> None:
    lab = Lab.up(ONE_VM, policy=False)
    prefix = lab.prefix
    try:
        w = lab.plan.workload("vm-a")
        pid = qemu.pid_of(lab_guest.rundir(w.netns))
        assert pid is not None and pid_alive(pid)
        assert lab.exec("vm-a", ["true"]).returncode == 0  # the command channel answers
    finally:
        lab.down()
    assert not pid_alive(pid)
    assert not lab_guest.rundir(w.netns).exists()
    assert not qemu.find(str(lab_guest.vm_dir() / prefix))
    assert not {n for n in netns_list() if n.startswith(prefix)}


def test_failed_up_kills_the_guests_it_started() -> None:
    prefix = new_prefix()
    with pytest.raises(ResponderError):
        Lab.up(ONE_VM + BROKEN, policy=False, prefix=prefix)
    assert not qemu.find(str(lab_guest.vm_dir() / prefix))
    assert not list(lab_guest.vm_dir().glob(f"{prefix}*"))
    assert not {n for n in netns_list() if n.startswith(prefix)}

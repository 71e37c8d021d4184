"""Differential test with VM workloads: random policies judged by the kernel (a lab in which some
workloads are QEMU guests on taps) and by the sim agree, verdict for verdict (docs/design/differential.md,
docs/vms.md). The same generator and harness as tests/kernel/test_differential.py, on a small inventory
in which two workloads become guests. CI runs one round (about 150 probes, half of them from guests,
which are slow under TCG); OMNIWALL_VM_FUZZ_ROUNDS=N runs N, cycling through the programming modes.

Guests answer TCP and ICMP only (busybox), so UDP cases to or from a guest are left out, and a guest
sends from its first address only (the cases from its further addresses are left out too).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from omniwall.fuzz.generate import SERVERS, Inventory, generate_inventory, generate_policy
from omniwall.model.resources import WorkloadLab
from omniwall.vm import image, qemu

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, QEMU taps)"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 missing (make install)"),
]

SEED = int(os.environ.get("OMNIWALL_FUZZ_SEED", "20261207"))
MODES = ("fresh", "sync", "delta")
ROUNDS = int(os.environ.get("OMNIWALL_VM_FUZZ_ROUNDS", "1"))
GUESTS = 2


def vm_inventory(seed: int) -> tuple[Inventory, list[Any], set[str]]:
    """`generate_inventory`'s hosts and workloads, with up to GUESTS single-vNIC, single-address-pair
    workloads (on different hosts where possible) turned into VMs."""
    inv = generate_inventory(seed, workloads=4, hosts=2, outside=False)
    single = [w for w in inv.workloads if len(w.ips) == 2]
    one_per_host = list({w.host: w for w in reversed(single)}.values())
    vms = {w.key for w in [*one_per_host, *single][:GUESTS]} if single else set()
    tcp = [s for s in SERVERS if s.startswith("tcp/")]
    out = []
    for r in inv.resources:
        if r.kind == "Workload" and f"{r.tenant}/{r.name}" in vms:
            r = r.model_copy(
                update={"spec": r.spec.model_copy(update={"lab": WorkloadLab(kind="vm", servers=tcp)})}
            )
        out.append(r)
    return inv, out, vms


def test_kernel_and_sim_agree_with_vm_workloads() -> None:
    try:
        image.load()
    except image.VmImageError as e:
        pytest.skip(str(e))
    from omniwall.fuzz.runner import FuzzLab, all_cases

    inv, resources, vms = vm_inventory(SEED)
    assert vms, "the inventory has no single-vNIC workload to make a VM of"
    with FuzzLab(resources) as fl:
        assert {w.key for w in fl.plan.workloads if w.kind == "vm"} == vms
        cases = [
            c
            for c in all_cases(fl.plan, ipv6=fl.has_ipv6)
            if not (c.proto == "udp" and (c.src in vms or c.dst in vms))
            and not (c.src in vms and c.src_index)
        ]
        assert any(c.src in vms for c in cases) and any(c.dst in vms for c in cases)
        total = 0
        for rnd in range(ROUNDS):
            mode = MODES[rnd % len(MODES)]
            result = fl.round(generate_policy(inv, rnd), cases, mode=mode)
            total += len(result.outcomes)
            confirmed = [o for o in result.outcomes if o.confirmed]
            assert not confirmed, "\n".join(
                f"round {rnd} ({mode}): {o.case} kernel {o.kernel} ({o.detail}), retry {o.retry} "
                f"({o.retry_detail}), sim {o.sim.verdict}"
                for o in confirmed
            )
            assert not result.drift
        assert total >= 100 * ROUNDS

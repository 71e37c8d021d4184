"""Pure parts of VM workloads (docs/vms.md): the lab plan's checks, the guest's kernel command line and
QEMU arguments, the initramfs archive, the probes a guest runs and how their output is judged."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from omniwall.lab import probe as lab_probe
from omniwall.lab.inputs import load_catalog
from omniwall.lab.plan import LabPlan, PlanError, plan_lab
from omniwall.lab.probe import Probe
from omniwall.model.errors import ValidationError
from omniwall.vm import channel, qemu
from omniwall.vm.image import Cpio, GuestImage, VmImageError, extract_vmlinux

HOST = "kind: Host\nmetadata: {name: h1}\n---\n"


def _workload(lab: str, vnics: str = "[{name: eth0, ips: [10.5.0.1]}]") -> str:
    spec = f"spec:\n  host: h1\n  vnics: {vnics}\n  lab: {lab}\n"
    return HOST + "kind: Workload\nmetadata: {name: v, tenant: t}\n" + spec


def test_plan_marks_vm_workloads_and_round_trips() -> None:
    catalog, _ = load_catalog(_workload("{kind: vm, servers: [tcp/80]}"))
    plan = plan_lab(catalog, "owtst-")
    (w,) = plan.workloads
    assert w.kind == "vm" and w.servers == ("tcp/80",)
    assert LabPlan.from_json(plan.to_json()) == plan
    catalog, _ = load_catalog(_workload("{servers: [tcp/80]}"))
    assert plan_lab(catalog, "owtst-").workloads[0].kind == "netns"


def test_plan_refuses_what_a_lab_guest_cannot_do() -> None:
    catalog, _ = load_catalog(_workload("{kind: vm, servers: [tcp/80, udp/53]}"))
    with pytest.raises(PlanError, match=r"t/v: spec.lab.servers\[1\]: 'udp/53': VM guests serve only tcp"):
        plan_lab(catalog, "owtst-")
    two = "[{name: eth0, ips: [10.5.0.1]}, {name: eth1, ips: [10.5.0.2]}]"
    catalog, _ = load_catalog(_workload("{kind: vm}", two))
    with pytest.raises(PlanError, match="exactly one vNIC"):
        plan_lab(catalog, "owtst-")


def test_unknown_lab_kind_is_refused_naming_the_field() -> None:
    with pytest.raises((ValidationError, ValueError), match="kind"):
        load_catalog(_workload("{kind: container}"))


def test_kernel_cmdline_and_qemu_argv() -> None:
    spec = qemu.GuestSpec("t/web", "owabc", "52:54:00:01:02:03", ("10.1.0.1",), ("fd00::1",), ("tcp/80",))
    line = qemu.kernel_cmdline(spec)
    assert "ow.name=t/web" in line and "ow.ip4=10.1.0.1" in line and "ow.ip6=fd00::1" in line
    assert "ow.srv=tcp/80" in line and "console=ttyS0" in line
    rundir = Path("/run/x/vm/owabc-w-t-web")
    argv = qemu.qemu_argv(spec, GuestImage(Path("/k"), Path("/i"), "6.1"), rundir)
    joined = " ".join(argv)
    assert "-daemonize" in argv and f"-pidfile {rundir}/pid" in joined
    assert f"unix:{rundir}/qmp.sock,server=on,wait=off" in joined
    assert "tap,id=n0,ifname=owabc,script=no,downscript=no" in joined
    assert "mac=52:54:00:01:02:03" in joined and "-accel tcg" in joined
    assert qemu.guest_mac("t/web") == qemu.guest_mac("t/web") != qemu.guest_mac("t/db")


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, at = {}, 0
    while True:
        assert data[at : at + 6] == b"070701"
        f = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_at = at + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body = name_at + namesize + (-(name_at + namesize) % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[body : body + size])
        at = body + size + (-(body + size) % 4)


def test_cpio_is_newc_the_kernel_can_unpack() -> None:
    c = Cpio()
    c.add("bin", stat.S_IFDIR | 0o755)
    c.add("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    c.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    data = c.finish()
    assert len(data) % 4 == 0
    files = _parse_cpio(data)
    assert files["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert stat.S_ISCHR(files["dev/console"][0]) and stat.S_ISDIR(files["bin"][0])


def test_extract_vmlinux_finds_the_xz_elf() -> None:
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 8
    blob = b"MZ header" + b"\xfd7zXZ\x00 not a stream" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    assert extract_vmlinux(blob) == elf
    with pytest.raises(VmImageError, match="no xz-compressed ELF"):
        extract_vmlinux(b"MZ" + lzma.compress(b"not elf", format=lzma.FORMAT_XZ))


def test_guest_probe_scripts_and_verdicts() -> None:
    tcp = Probe("ns", "10.1.0.2", "tcp", 80, "t/a", "t/b", "10.1.0.1", "t/b")
    assert lab_probe.probe_command(tcp, 1.0) == "nc -w 2 10.1.0.2 80 </dev/null"
    ok = channel.Result(0, "omniwall-lab t/b tcp/80\n")
    assert lab_probe.judge_guest(tcp, "x", ok) == (True, "ok")
    other = channel.Result(0, "omniwall-lab t/c tcp/80\n")
    assert lab_probe.judge_guest(tcp, "x", other) == (False, "answered by t/c")
    refused = channel.Result(1, "nc: can't connect to remote host (10.1.0.2): Connection refused")
    assert lab_probe.judge_guest(tcp, "x", refused) == (False, "refused")
    assert lab_probe.judge_guest(tcp, "x", channel.Result(1, "")) == (False, "timeout")
    assert lab_probe.judge_guest(tcp, "x", channel.Result(-1, "")) == (False, "timeout")
    ping6 = Probe("ns", "fd00::2", "icmp")
    assert lab_probe.probe_command(ping6, 2.0).startswith("ping6 -c 1 -W 3 fd00::2")
    udp = Probe("ns", "10.1.0.2", "udp", 53)
    assert lab_probe.probe_command(udp, 1.0) == ""
    assert lab_probe.judge_guest(udp, "", channel.Result(0, "")) == (False, "udp not available in the guest")
    script = lab_probe.batch_script([tcp, udp, ping6], 1.0)
    assert "nc -w 2 10.1.0.2 80 </dev/null >/tmp/p0 2>&1 & p0=$!" in script
    assert "p1=" not in script and 'echo "2 $r $l"' in script and "kill $p0 $p2" in script


def test_channel_refuses_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(channel.ChannelError, match="command channel"):
        channel.run(tmp_path / "ctl.sock", "true", timeout=1)

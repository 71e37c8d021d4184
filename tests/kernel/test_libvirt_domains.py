"""libvirt integration (docs/vms.md): libvirtd running inside a lab host's namespace, with Omniwall's
QEMU hook installed by `omniwall libvirt install-hook`, and `type='qemu'` domains booting the lab's
guest image on taps wired like the lab's (routed /32, proxy ARP, gateway MAC).

- a domain with Omniwall metadata: `virsh create` -> the hook registers it (tenant, labels, attributes,
  tap, MAC, addresses) and waits until the host's agent realized it, then QEMU starts: policy enforced
  (the allowed client reaches the guest, another workload does not); `virsh destroy` -> the Workload is
  gone from the manager and its rules from the kernel;
- metadata naming a tenant the host's hook may not use: libvirt refuses to start the domain, with the
  hook's message on virsh's error and in the hook's log; nothing registered;
- a domain without metadata (host config `unannotated: ignore`): left alone by the hook; its tap
  matches the host's `vnicInterfaces`, so the agent drops its traffic (closed, never open).

libvirtd gets a private mount namespace (tmpfs over /run, /var/lib, /var/log, /var/cache; the test's
directories bound onto libvirt's paths, and a passwd/group with libvirt's `libvirt-qemu` user), so it
shares nothing with any other libvirtd on the machine; it is stopped by PID, its QEMUs too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labhelpers import CLIENTS_TO_WEB, LAB_MARKS, closed_tenants, hosts, yaml_docs
from omniwall.vm import qemu

LIBVIRTD = "/usr/sbin/libvirtd"
pytestmark = [
    *LAB_MARKS,
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 missing (make install)"),
    pytest.mark.skipif(
        not (Path(LIBVIRTD).exists() and shutil.which("virsh")),
        reason="libvirt-daemon-driver-qemu / libvirt-clients missing (make install)",
    ),
]

PEERS = """
kind: Workload
metadata: {name: peer, tenant: t1, labels: {app: client}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.93.0.1]}]}
---
kind: Workload
metadata: {name: bad, tenant: t1, labels: {app: other}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.93.0.3]}]}
"""
LAB = yaml_docs(closed_tenants("t1", "t2"), hosts("h1"), PEERS, CLIENTS_TO_WEB)

QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
swtpm_user = "root"
swtpm_group = "root"
stdio_handler = "file"
"""
LIBVIRTD_CONF = """auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
PRIVATE = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")


class Libvirtd:
    """libvirtd in host namespace `netns`, all its state under `root`."""

    def __init__(self, root: Path, netns: str) -> None:
        self.root, self.netns = root, netns
        (root / "etc/libvirt").mkdir(parents=True, exist_ok=True)
        (root / "etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        (root / "etc/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF)
        for d in PRIVATE:
            (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        # libvirt resolves its compiled-in QEMU user before reading qemu.conf: give it one, privately.
        ids = root / "ids"
        ids.mkdir(exist_ok=True)
        (ids / "passwd").write_text(
            Path("/etc/passwd").read_text()
            + "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n"
        )
        groups = Path("/etc/group").read_text()
        (ids / "group").write_text(groups + "".join(f"{g}:x:{n}:\n" for g, n in (("libvirt-qemu", 64055),)))
        self.pid: int | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.root}/run/libvirt/libvirt-sock"

    def start(self) -> None:
        r = self.root
        script = "set -e\n"
        script += "for d in /run /var/lib /var/log /var/cache; do mount -t tmpfs tmpfs $d; done\n"
        for d in PRIVATE:
            script += f"mkdir -p {d}; mount --bind {r}{d} {d}\n"
        script += f"mount --bind {r}/etc/libvirt /etc/libvirt\n"
        script += f"mount --bind {r}/ids/passwd /etc/passwd; mount --bind {r}/ids/group /etc/group\n"
        script += f"exec {LIBVIRTD} -d -p {r}/libvirtd.pid\n"
        argv = [
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
        ]
        subprocess.run(argv, check=True, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int((r / "libvirtd.pid").read_text())
            if self.pid and self.virsh("version").returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"libvirtd did not come up: {self.log()[-2000:]}")

    def virsh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout
        )

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "var/log/libvirt/libvirtd.log").read_text()
        return ""

    def stop(self) -> None:
        """Domains destroyed, libvirtd ended by PID; any QEMU still running our domains ended by PID."""
        if self.pid and self.virsh("version").returncode == 0:
            for name in self.virsh("list", "--name").stdout.split():
                self.virsh("destroy", name)
        if self.pid and _runs(self.pid, LIBVIRTD):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _runs(self.pid, LIBVIRTD) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _runs(self.pid, LIBVIRTD):
                os.kill(self.pid, signal.SIGKILL)
        for pid in _qemus_under(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _runs(pid: int, exe: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == exe
    except OSError:
        return False


def _qemus_under(root: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (p / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(qemu.QEMU.encode()) and any(str(root).encode() in a for a in argv):
                out.append(int(p.name))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from omniwall.lab.managed import managed_lab
    from omniwall.vm import image

    try:
        img = image.load()
    except image.VmImageError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("libvirt")
    with managed_lab(LAB, ipv6=False) as (lab, cp):
        token = root / "hook.token"
        token.write_text(cp.admin_token)
        token.chmod(0o600)
        exe = Path(sys.executable).with_name("omniwall")
        argv = [str(exe), "libvirt", "install-hook", "--root", str(root), "--server", cp.url]
        argv += ["--token-file", str(token), "--host", "h1", "--tenant", "t1", "--timeout", "90"]
        # The lab's manager listens on the root namespace's loopback; the hook runs in h1's namespace
        # (libvirtd's): it enters this handle of the root network namespace to call the manager.
        netns_file = root / "manager.netns"
        netns_file.touch()
        subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(netns_file)], check=True)
        argv += ["--log", str(root / "hook.log"), "--manager-netns", str(netns_file)]
        if cp.ca_file:  # a copy: libvirtd's mount namespace has its own /run
            shutil.copy(cp.ca_file, root / "ca.crt")
            argv += ["--ca", str(root / "ca.crt")]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (root / "etc/libvirt/hooks/qemu").stat().st_mode & 0o111
        daemon = Libvirtd(root, lab.host_netns("h1"))
        try:
            daemon.start()
            yield {"lab": lab, "cp": cp, "root": root, "virsh": daemon.virsh, "image": img, "daemon": daemon}
        finally:
            daemon.stop()
            subprocess.run(["umount", str(netns_file)], check=False)


def _tap(lab: Any, name: str, ip: str) -> None:
    """A tap in h1 wired like the lab's (what a routed hypervisor host does for its guests)."""
    for argv in (
        ["ip", "tuntap", "add", "dev", name, "mode", "tap"],
        ["ip", "link", "set", name, "address", "ee:ee:ee:ee:ee:ee", "up"],
        ["sysctl", "-qw", f"net.ipv4.conf.{name}.proxy_arp=1"],
        ["ip", "route", "replace", f"{ip}/32", "dev", name, "scope", "link"],
    ):
        res = lab.exec_host("h1", argv)
        assert res.returncode == 0, (argv, res.stderr)


def _domain(site: dict[str, Any], name: str, tap: str, mac: str, ip: str, metadata: str) -> Path:
    img, root = site["image"], site["root"]
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{img.kernel}</kernel>
    <initrd>{img.initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet ow.name=t1/{name} ow.ip4={ip} ow.srv=tcp/80</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/{qemu.QEMU}</emulator>
    <interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{root}/{name}.serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
    path = root / f"{name}.xml"
    path.write_text(xml)
    return path


def _meta(tenant: str, name: str, mac: str, ip: str) -> str:
    return (
        f'<ow:workload xmlns:ow="https://omniwall.io/xmlns/libvirt/v1" tenant="{tenant}" name="{name}">'
        '<ow:label key="app" value="web"/><ow:attribute key="owner" value="lab"/>'
        f'<ow:vnic mac="{mac}" name="eth0" ips="{ip}"/></ow:workload>'
    )


def _tcp(lab: Any, src: str, ip: str, expect: str | None) -> bool:
    from omniwall.lab.probe import Probe, run_probes

    (r,) = run_probes([Probe(lab.workload_netns(src), ip, "tcp", 80, expect_name=expect)], timeout=3)
    return r.allowed


def _ready(site: dict[str, Any], name: str, timeout: float = 240) -> None:
    log = site["root"] / f"{name}.serial.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if b"omniwall-guest ready" in log.read_bytes():
                return
        time.sleep(0.2)
    raise AssertionError(f"guest {name} did not boot: {log.read_text(errors='replace')[-1000:]}")


def _ruleset(lab: Any) -> str:
    return lab.exec_host("h1", ["nft", "list", "table", "inet", "omniwall"]).stdout


def test_start_registers_and_enforces_destroy_removes(site: dict[str, Any]) -> None:
    lab, cp, virsh = site["lab"], site["cp"], site["virsh"]
    tap, mac, ip = f"ow{lab.prefix[:6]}lv1", "52:54:00:93:00:02", "10.93.0.2"
    _tap(lab, tap, ip)
    xml = _domain(site, "web", tap, mac, ip, _meta("t1", "web", mac, ip))
    out = virsh("create", str(xml))
    assert out.returncode == 0, out.stderr + site["daemon"].log()[-3000:]
    # Registered before QEMU ran (the hook waited for the agent): the tap is in the kernel's rules now.
    wl = cp.api("GET", "/v1/workloads/web", params={"tenant": "t1"})
    assert wl["spec"]["host"] == "h1" and wl["metadata"]["labels"] == {"app": "web"}
    assert wl["spec"]["vnics"] == [{"name": "eth0", "mac": mac, "ips": [ip], "hostIfname": tap}]
    assert wl["spec"]["attributes"]["libvirt.domain"] == "web" and wl["spec"]["attributes"]["owner"] == "lab"
    assert tap in _ruleset(lab)
    _ready(site, "web")
    deadline = time.monotonic() + 60  # the responder starts right after the ready line
    while not _tcp(lab, "t1/peer", ip, "t1/web") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tcp(lab, "t1/peer", ip, "t1/web")  # allowed: clients -> web tcp/80
    assert not _tcp(lab, "t1/bad", ip, None)  # not a client: dropped
    log = (site["root"] / "hook.log").read_text()
    assert "web: start: t1/web registered on h1" in log, log

    out = virsh("destroy", "web")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while tap in _ruleset(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tap not in _ruleset(lab)  # rules gone from the kernel
    from omniwall.client import ClientError

    with pytest.raises(ClientError) as gone:
        cp.api_client().get("workload", "web", tenant="t1")
    assert gone.value.status == 404
    assert "t1/web removed from the manager" in (site["root"] / "hook.log").read_text()
    lab.exec_host("h1", ["ip", "link", "del", tap])


def test_a_tenant_the_host_may_not_use_is_refused(site: dict[str, Any]) -> None:
    lab, cp, virsh = site["lab"], site["cp"], site["virsh"]
    tap, mac, ip = f"ow{lab.prefix[:6]}lv2", "52:54:00:93:00:04", "10.93.0.4"
    _tap(lab, tap, ip)
    xml = _domain(site, "intruder", tap, mac, ip, _meta("t2", "intruder", mac, ip))
    out = virsh("create", str(xml))
    assert out.returncode != 0
    assert "tenant 't2' in the domain's metadata may not be used on host h1" in out.stderr, out.stderr
    assert "intruder" not in virsh("list", "--all", "--name").stdout  # never started: closed
    log = (site["root"] / "hook.log").read_text()
    assert "intruder: prepare: REFUSED: tenant 't2'" in log, log
    assert cp.api("GET", "/v1/workloads", params={"tenant": "t2"})["items"] == []
    lab.exec_host("h1", ["ip", "link", "del", tap])


def test_a_domain_without_metadata_is_left_alone_and_stays_closed(site: dict[str, Any]) -> None:
    lab, cp, virsh = site["lab"], site["cp"], site["virsh"]
    tap, mac, ip = f"ow{lab.prefix[:6]}lv3", "52:54:00:93:00:05", "10.93.0.5"
    _tap(lab, tap, ip)
    xml = _domain(site, "plain", tap, mac, ip, "")
    out = virsh("create", str(xml))
    assert out.returncode == 0, out.stderr
    try:
        _ready(site, "plain")
        assert "plain: prepare: no Omniwall metadata: left alone" in (site["root"] / "hook.log").read_text()
        time.sleep(2)  # its responder is up: what stops the probe is the firewall
        assert not _tcp(lab, "t1/peer", ip, None)  # an unknown `ow*` tap: the agent drops its traffic
        names = [w["metadata"]["name"] for w in cp.api_client().list("workload")]
        assert "plain" not in names
    finally:
        virsh("destroy", "plain")
        lab.exec_host("h1", ["ip", "link", "del", tap])

"""The `omniwall` CNI plugin under a real container runtime: podman 4.3 (Debian 12) with its CNI backend
(docs/containers.md "Podman"). podman runs inside a managed lab's host namespace (`ip netns exec`), so
the plugin it executes does its host-side work there (veth, proxy ARP, /32 route) and the lab's agent on
that host enforces the container's rules; the plugin reaches the manager, which listens on the root
namespace's loopback, through `managerNetns` (as the libvirt hook does).

Nothing of the machine's own podman or CNI state is used: a private CONTAINERS_CONF (CNI backend, the
test's network config and plugin directories, cgroupfs, file events), private storage (--root,
--runroot, vfs), a cgroup parent named after the lab's prefix, and an image made here with
`podman import` from busybox-static (no registry).

- `podman run -d --network <net>` -> the container is a Workload named after it, labels from its
  `key=value` network aliases and from CNI_ARGS (`--label` does not reach CNI plugins in podman 4.3),
  and its rules are realized before its process starts: the process's first packet, a single ping to
  a peer the policy lets it reach, gets its answer;
- policy holds with real traffic: a client reaches the container's server on tcp/80, another workload
  is dropped and the drop is a denied flow record at the manager;
- `podman rm -f` -> the Workload is gone from the manager, the veth and the chains from the host;
- a container name another host's container holds in the tenant: refused with the plugin's message,
  the other Workload left alone (also by podman's DEL after the failed ADD), nothing left here;
- a container whose process exits is no Workload any more (conmon's cleanup calls DEL).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cni import install_plugin, plugin_conf

from labhelpers import CLIENTS_TO_WEB, LAB_MARKS, closed_tenants, hosts, yaml_docs
from omniwall.cni.net import host_ifname
from omniwall.lab.control import ManagedError
from omniwall.lab.probe import Probe, run_probes

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static


def _podman_4() -> bool:
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.split()
    return bool(out) and out[-1].startswith("4.")  # "podman version 4.3.1"


pytestmark = [
    *LAB_MARKS,
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman missing (make install)"),
    pytest.mark.skipif(
        shutil.which("podman") is not None and not _podman_4(), reason="podman 4 needed (the CNI backend)"
    ),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc missing (make install)"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static missing (make install)"),
]

PEERS = """
kind: Workload
metadata: {name: peer, tenant: t1, labels: {app: client}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.94.0.1]}]
  lab: {servers: [tcp/80]}
---
kind: Workload
metadata: {name: other, tenant: t1, labels: {app: other}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.94.0.2]}]
  lab: {servers: [tcp/80]}
---
kind: Policy
metadata: {name: web-pings-clients, tenant: t1}
spec:
  rules:
    - {name: ping, sources: [web], destinations: [clients], services: [icmp], action: allow}
"""
LAB = yaml_docs(closed_tenants("t1"), hosts("h1"), PEERS, CLIENTS_TO_WEB)
PEER_IP, OTHER_IP = "10.94.0.1", "10.94.0.2"

# The container's entry point: its first packet is one ping (no retransmission) to `peer`; then a
# server on tcp/80 answering like the lab's responders (`omniwall-lab <name>`), one process a connection.
START = f"""#!/bin/sh
ping -c 1 -W 3 {PEER_IP} > /out/first 2>&1
echo "rc=$?" >> /out/first
exec nc -ll -p 80 -e /bin/answer
"""


HOLDER = "mount -t tmpfs -o mode=0755 owpodman /run && mount -t tmpfs -o mode=0755 owpodman /var/lib && \
echo ready && exec sleep infinity"


def _image_tar(d: Path, name: str) -> Path:
    """A root filesystem of busybox-static, its applets, and the two scripts, as a tarball."""
    root = d / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "out").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "nc", "ping", "echo", "cat", "sleep", "ip"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "bin" / "start").write_text(START)
    (root / "bin" / "answer").write_text(f"#!/bin/sh\necho omniwall-lab {name}\n")
    for script in ("start", "answer"):
        (root / "bin" / script).chmod(0o755)
    tar = d / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    return tar


class Podman:
    """podman with everything private, run in a lab host's network namespace."""

    def __init__(self, d: Path, host_ns: str, network: dict[str, Any], cgroup_parent: str) -> None:
        self.d, self.host_ns, self.cgroup_parent = d, host_ns, cgroup_parent
        netdir, self.plugins = d / "net.d", d / "cni-bin"
        netdir.mkdir()
        # The runtime execs CNI_PATH/omniwall: here a shim around the plugin that, when ADD succeeded,
        # saves the host's ruleset as podman gets the answer, before it starts the container.
        real = install_plugin(d / "plugin-bin")
        self.plugins.mkdir()
        shim = self.plugins / "omniwall"
        shim.write_text(
            f'#!/bin/sh\nout=$({real} "$@")\nrc=$?\nif [ "$CNI_COMMAND" = ADD ] && [ $rc = 0 ]; then\n'
            f"  nft list table inet omniwall > {d}/ruleset-at-add.$CNI_CONTAINERID 2>&1\nfi\n"
            'printf "%s\\n" "$out"\nexit $rc\n'
        )
        shim.chmod(0o755)
        self.network = network["name"]
        (netdir / f"{self.network}.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": self.network, "plugins": [network]})
        )
        (d / "tmp").mkdir()
        self.holder: subprocess.Popen[str] | None = None
        (d / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{d}/events.log"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{d}/tmp"\n'
            f'image_copy_tmp_dir = "{d}/tmp"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{netdir}"\n'
            f'cni_plugin_dirs = ["{self.plugins}"]\n'
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{d}/runroot"\ngraphroot = "{d}/root"\n'
        )
        (d / "registries.conf").write_text("")

    def start(self) -> None:
        """podman's mount namespace, held by a sleeper: a copy of the machine's (slave: none of its
        mounts leave it) with empty tmpfs over /run and /var/lib, so the state podman keeps at fixed
        paths (libcni's cache in /var/lib/cni, containers/image's in /var/lib/containers, runc's in
        /run/runc, the containers' network namespaces in /run/netns) is private and goes with it."""
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", HOLDER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "ready"

    def env(self, **more: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.d),
            "CONTAINERS_CONF": str(self.d / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.d / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.d / "registries.conf"),
            **more,
        }

    def argv(self, *args: str) -> list[str]:
        return [
            "nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--net=/run/netns/{self.host_ns}",
            "podman", "--root", f"{self.d}/root", "--runroot", f"{self.d}/runroot", "--storage-driver", "vfs",
            *args,
        ]  # fmt: skip

    def __call__(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv(*args), env=self.env(**env), capture_output=True, text=True, timeout=120
        )
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {res.returncode}\n{res.stderr}")
        return res

    def run_args(self) -> list[str]:
        """What every `podman run` here adds: no rlimit above this process's own (podman's defaults
        need CAP_SYS_RESOURCE, which this machine's root lacks), and the lab's cgroup parent."""
        return [
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--cgroup-parent", self.cgroup_parent,
        ]  # fmt: skip

    def cleanup(self) -> None:
        """After a failure too: our containers removed, then whatever is left killed by PID: the
        processes of podman's mount namespace (conmon, podman) and of our cgroup parent (the
        containers' own), all ours by construction; the holder last; then our cgroups removed."""
        if self.holder is None:
            return
        self("rm", "-a", "-f", "-t", "0", check=False)
        cgroups = [c / self.cgroup_parent.lstrip("/") for c in Path("/sys/fs/cgroup").iterdir()]
        for pid in _pids_in_mount_ns(self.holder.pid) | _pids_in_cgroups(cgroups):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.holder.kill()
        self.holder.wait()
        deadline = time.monotonic() + 5  # killed processes leave their cgroups once reaped
        for top in cgroups:
            while top.is_dir():
                for sub in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def _pids_in_mount_ns(holder: int) -> set[int]:
    """The processes sharing the holder's mount namespace, the holder excepted."""
    target = os.readlink(f"/proc/{holder}/ns/mnt")
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != holder:
            with contextlib.suppress(OSError):
                if os.readlink(p / "ns" / "mnt") == target:
                    out.add(int(p.name))
    return out


def _pids_in_cgroups(tops: list[Path]) -> set[int]:
    out = set()
    for top in tops:
        for procs in top.rglob("cgroup.procs") if top.is_dir() else []:
            with contextlib.suppress(OSError):
                out.update(int(x) for x in procs.read_text().split())
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from omniwall.lab.managed import managed_lab

    d = tmp_path_factory.mktemp("podman")
    with managed_lab(LAB) as (lab, cp):
        network = {
            **plugin_conf(d, cp, "10.94.1.0/24"),
            "name": f"{lab.prefix}net",
            # the manager listens on the root namespace's loopback; podman (and the plugin) run in h1's
            "managerNetns": f"/proc/{os.getpid()}/ns/net",
            "capabilities": {"aliases": True},
        }
        if cp.ca_file:  # the lab's control directory is under /run, which podman's mounts hide
            network["caFile"] = str(shutil.copy(cp.ca_file, d / "ca.crt"))
        pm = Podman(d, lab.host_netns("h1"), network, f"/{lab.prefix}podman")
        try:
            pm.start()
            name = f"{lab.prefix}web"
            image = f"localhost/{lab.prefix}bb:1"
            pm("import", str(_image_tar(d, f"t1/{name}")), image)
            yield {"lab": lab, "cp": cp, "podman": pm, "image": image, "name": name, "dir": d}
        finally:
            pm.cleanup()


def _tcp(src_ns: str, dst: str, expect: str | None = None) -> bool:
    (r,) = run_probes([Probe(src_ns, dst, "tcp", 80, expect_name=expect)], timeout=1.5)
    return r.allowed


def _registered(cp: Any, name: str) -> bool:
    try:
        cp.api("GET", f"/v1/workloads/{name}", params={"tenant": "t1"})
    except Exception as e:
        if "404" in str(e):
            return False
        raise
    return True


def _ruleset(lab: Any) -> str:
    return str(lab.exec_host("h1", ["nft", "list", "table", "inet", "omniwall"]).stdout)


def test_podman_run_protects_the_container_and_rm_removes_it(site: dict[str, Any]) -> None:
    lab, cp, pm, name = site["lab"], site["cp"], site["podman"], site["name"]
    out = site["dir"] / "out"
    out.mkdir()
    argv = pm.argv(
        "run", "-d", "--name", name, "--network", pm.network,
        "--network-alias", "app=web", "--label", "role=not-passed",
        "--cap-add", "NET_RAW", "-v", f"{out}:/out", *pm.run_args(),
        site["image"], "/bin/start",
    )  # fmt: skip
    # The host's agent paused (SIGSTOP, by its PID) while podman runs the container: the plugin has
    # registered the Workload but the rules cannot be realized, so ADD must not answer and podman must
    # not start the container's process; once the agent resumes, ADD answers and the container starts.
    agent = cp.record.agents["h1"]
    os.kill(agent, signal.SIGSTOP)
    try:
        run = subprocess.Popen(
            argv, env=pm.env(CNI_ARGS="OMNIWALL_LABELS=tier=front"), stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 20
        while not _registered(cp, name):
            assert time.monotonic() < deadline and run.poll() is None, "the plugin registered nothing"
            time.sleep(0.1)
        time.sleep(1.5)
        assert run.poll() is None, "podman run returned while the host's agent could not realize the rules"
        assert not (out / "first").exists(), "the container's process started before its rules were realized"
    finally:
        os.kill(agent, signal.SIGCONT)
    stdout, _ = run.communicate(timeout=90)
    assert run.returncode == 0, stdout
    cid = stdout.strip().splitlines()[-1]
    info = json.loads(pm("inspect", name).stdout)[0]
    ip = info["NetworkSettings"]["Networks"][pm.network]["IPAddress"]
    host_if = host_ifname(cid, "eth0")

    # The Workload: named after the container (podman's K8S_POD_NAME), labels from the aliases and
    # CNI_ARGS, never from --label; its veth and address as podman reports them.
    wl = cp.api("GET", f"/v1/workloads/{name}", params={"tenant": "t1"})
    assert wl["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert wl["spec"]["attributes"]["container.id"] == cid
    assert wl["spec"]["vnics"][0]["hostIfname"] == host_if and wl["spec"]["vnics"][0]["ips"] == [ip]
    # The veth landed in the lab host, not in the root namespace.
    assert host_if in lab.exec_host("h1", ["ip", "link"]).stdout
    assert host_if not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert host_if in _ruleset(lab)

    # Realized before the container's process started: the chains were in h1's ruleset when ADD
    # answered podman (which starts the process only then), and the process's very first packet was
    # answered (until the rules are in, the agent drops an unknown ow* interface's traffic, and
    # ping -c 1 sends only one).
    assert host_if in (site["dir"] / f"ruleset-at-add.{cid}").read_text()
    deadline = time.monotonic() + 10
    while "rc=" not in ((out / "first").read_text() if (out / "first").exists() else ""):
        assert time.monotonic() < deadline, "the container's start script did not run"
        time.sleep(0.1)
    first = (out / "first").read_text()
    assert "rc=0" in first and "1 packets received" in first, first

    # Policy with real traffic: clients -> web on tcp/80 allowed, answered by the container; `other`
    # (app=other) dropped, and the drop is a denied flow record at the manager.
    assert _tcp(lab.workload_netns("peer"), ip, f"t1/{name}")
    assert not _tcp(lab.workload_netns("other"), ip)
    deadline = time.monotonic() + 20
    while True:
        page = cp.api("GET", "/v1/flows", params={"verdict": "denied", "workload": f"t1/{name}"})
        if any(r.get("src") == OTHER_IP and r.get("dport") == 80 for r in page["items"]):
            break
        assert time.monotonic() < deadline, f"no denied flow record from {OTHER_IP}: {page['items']}"
        time.sleep(0.5)

    # podman rm -f: the plugin's DEL removes the Workload, the veth; the agent then the chains.
    pm("rm", "-f", "-t", "0", name)
    with pytest.raises(Exception, match="404"):
        cp.api("GET", f"/v1/workloads/{name}", params={"tenant": "t1"})
    assert host_if not in lab.exec_host("h1", ["ip", "link"]).stdout
    assert f"{ip} " not in lab.exec_host("h1", ["ip", "route"]).stdout
    deadline = time.monotonic() + 30
    while host_if in _ruleset(lab):
        assert time.monotonic() < deadline, "the container's chains stayed in the kernel"
        time.sleep(0.2)


def test_a_name_another_hosts_container_holds_is_refused_and_left_alone(site: dict[str, Any]) -> None:
    """podman names containers, so two hosts may both run one name in a tenant: the plugin refuses the
    name (podman shows its message), podman's DEL after the failed ADD leaves the other host's
    Workload alone, and nothing of the container is left on this host."""
    lab, cp, pm = site["lab"], site["cp"], site["podman"]
    name = f"{lab.prefix}dup"
    theirs = [
        {"kind": "Host", "metadata": {"name": "h2"}},
        {
            "kind": "Workload",
            "metadata": {"name": name, "tenant": "t1"},
            "spec": {
                "host": "h2",
                "vnics": [{"name": "eth0", "ips": ["10.94.2.1"]}],
                "attributes": {"container.id": "0123456789ab"},
            },
        },
    ]
    cp.apply(theirs)
    links = lab.exec_host("h1", ["ip", "link"]).stdout
    try:
        res = pm(
            "run", "-d", "--name", name, "--network", pm.network, *pm.run_args(),
            site["image"], "/bin/start", check=False,
        )  # fmt: skip
        assert res.returncode != 0
        assert "already registered for container 0123456789ab on host h2" in res.stderr, res.stderr
        wl = cp.api("GET", f"/v1/workloads/{name}", params={"tenant": "t1"})
        assert wl["spec"]["host"] == "h2" and wl["spec"]["attributes"]["container.id"] == "0123456789ab"
        assert lab.exec_host("h1", ["ip", "link"]).stdout == links  # no veth left
        assert not list((site["dir"] / "ipam").glob("*/*"))  # no address left
    finally:
        pm("rm", "-f", "-t", "0", name, check=False)
        with contextlib.suppress(ManagedError):  # gone already when the test failed
            cp.api("DELETE", f"/v1/workloads/{name}", params={"tenant": "t1"})


def test_a_container_that_exits_is_no_workload(site: dict[str, Any]) -> None:
    """The container's process exits: conmon runs podman's cleanup, which calls DEL."""
    lab, cp, pm = site["lab"], site["cp"], site["podman"]
    name = f"{lab.prefix}brief"
    res = pm(
        "run", "-d", "--name", name, "--network", pm.network, "--network-alias", "app=web",
        *pm.run_args(), site["image"], "/bin/sleep", "1",
    )  # fmt: skip
    host_if = host_ifname(res.stdout.strip().splitlines()[-1], "eth0")
    assert _registered(cp, name)
    try:
        deadline = time.monotonic() + 20
        while _registered(cp, name) or host_if in lab.exec_host("h1", ["ip", "link"]).stdout:
            assert time.monotonic() < deadline, "the exited container is still a Workload, or its veth stayed"
            time.sleep(0.2)
    finally:
        pm("rm", "-f", "-t", "0", name, check=False)

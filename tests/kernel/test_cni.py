"""The `omniwall` CNI plugin, invoked as a container runtime does (docs/containers.md): the executable
`omniwall` found in CNI_PATH, CNI_* in the environment, the network config on stdin, a network
namespace per container. The host is a managed lab's host namespace with its agent; like the agent, the
plugin process runs where the manager's loopback address is and does its host-side netlink in that
namespace (`hostNetns` in the config).

ADD registers the container as a Workload (labels from `args.cni.labels`) and returns only once the
host's agent realized its rules: policy holds at once, both ways. CHECK passes; DEL removes the Workload
from the manager, the veth and the rules from the kernel; a repeated DEL is fine; bad input is a CNI
error naming the field; VERSION lists the versions spoken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labhelpers import CLIENTS_TO_WEB, LAB_MARKS, closed_tenants, hosts, yaml_docs
from omniwall.cni.net import host_ifname
from omniwall.lab import netns, responder
from omniwall.lab.probe import Probe, run_probes

pytestmark = [*LAB_MARKS, pytest.mark.e2e]

PEER = """
kind: Workload
metadata: {name: peer, tenant: t1, labels: {app: client}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.92.0.1]}]
  lab: {servers: [tcp/80]}
"""
LAB = yaml_docs(closed_tenants("t1"), hosts("h1"), PEER, CLIENTS_TO_WEB)


def install_plugin(bindir: Path) -> Path:
    """`<bindir>/omniwall`, what a runtime finds in CNI_PATH (also tests/kernel/test_cni_podman.py)."""
    bindir.mkdir(parents=True, exist_ok=True)
    plugin = bindir / "omniwall"
    plugin.write_text(f'#!/bin/sh\nexec {sys.executable} -m omniwall.cni "$@"\n')
    plugin.chmod(0o755)
    return plugin


def plugin_conf(d: Path, cp: Any, subnet: str, **more: Any) -> dict[str, Any]:
    """The plugin's network config for host h1, tenant t1 of a managed lab (token file under `d`)."""
    token = d / "token"
    token.write_text(cp.admin_token)
    return {
        "cniVersion": "1.0.0",
        "name": "omniwall-test",
        "type": "omniwall",
        "server": cp.url,
        "tokenFile": str(token),
        "caFile": str(cp.ca_file) if cp.ca_file else None,
        "host": "h1",
        "tenant": "t1",
        "subnet": subnet,
        "dataDir": str(d / "ipam"),
        **more,
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from omniwall.lab.managed import managed_lab

    d = tmp_path_factory.mktemp("cni")
    bindir = install_plugin(d / "bin").parent
    with managed_lab(LAB) as (lab, cp):
        conf = plugin_conf(d, cp, "10.92.1.0/24", hostNetns=lab.host_netns("h1"))
        yield {"lab": lab, "cp": cp, "bin": bindir, "conf": conf, "prefix": lab.prefix}


def invoke(
    site: dict[str, Any], command: str, cid: str, ns: str, conf: dict[str, Any]
) -> tuple[int, Any, str]:
    """The plugin as a runtime runs it: exec CNI_PATH/<type>."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": f"/run/netns/{ns}" if ns else "",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(site["bin"]),
    }
    res = subprocess.run(
        [str(site["bin"] / conf["type"])],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None, res.stderr


def _conf(site: dict[str, Any], **labels: str) -> dict[str, Any]:
    conf = dict(site["conf"])
    conf["args"] = {"cni": {"labels": [{"key": k, "value": v} for k, v in labels.items()]}}
    return conf


def _container(site: dict[str, Any], name: str) -> str:
    ns = f"{site['prefix']}c-{name}"
    netns.create(ns)
    return ns


def _tcp(src_ns: str, dst: str, expect: str | None = None) -> bool:
    (r,) = run_probes([Probe(src_ns, dst, "tcp", 80, expect_name=expect)], timeout=1.5)
    return r.allowed


def test_version(site: dict[str, Any]) -> None:
    code, out, _ = invoke(site, "VERSION", "", "", site["conf"])
    assert code == 0 and "1.0.0" in out["supportedVersions"]


def test_add_protects_the_container_before_returning_then_check_and_del(site: dict[str, Any]) -> None:
    lab, cp = site["lab"], site["cp"]
    peer_ns = lab.workload_netns("peer")
    ns = _container(site, "web")
    pids: dict[str, int] = {}
    try:
        code, out, err = invoke(site, "ADD", "cweb0001", ns, _conf(site, app="web"))
        assert code == 0, (out, err)
        ip = out["ips"][0]["address"].split("/")[0]
        assert out["ips"][0]["address"] == f"{ip}/32" and out["routes"][0]["gw"] == "169.254.1.1"
        host_if = host_ifname("cweb0001", "eth0")
        assert out["interfaces"][0]["name"] == host_if
        wl = cp.api("GET", "/v1/workloads/c-cweb0001", params={"tenant": "t1"})
        assert wl["metadata"]["labels"] == {"app": "web"}
        assert wl["spec"]["vnics"][0]["hostIfname"] == host_if and wl["spec"]["vnics"][0]["ips"] == [ip]
        # Realized before ADD returned: the host's table already has the container's chains.
        assert host_if in lab.exec_host("h1", ["nft", "list", "table", "inet", "omniwall"]).stdout
        pids = responder.start_many([responder.ResponderSpec(ns, "t1/c-cweb0001", (ip,), ("tcp/80",))])
        assert _tcp(peer_ns, ip, "t1/c-cweb0001")  # clients -> web: allowed
        assert not _tcp(ns, "10.92.0.1")  # web -> client: no rule, dropped at the container's egress
        code, out, err = invoke(site, "CHECK", "cweb0001", ns, _conf(site, app="web"))
        assert code == 0, (out, err)
        code, out, err = invoke(site, "DEL", "cweb0001", ns, _conf(site, app="web"))
        assert code == 0, (out, err)
        with pytest.raises(Exception, match="404"):
            cp.api("GET", "/v1/workloads/c-cweb0001", params={"tenant": "t1"})
        assert host_if not in lab.exec_host("h1", ["ip", "link"]).stdout
        deadline = time.monotonic() + 30
        while host_if in lab.exec_host("h1", ["nft", "list", "table", "inet", "omniwall"]).stdout:
            assert time.monotonic() < deadline, "the container's chains stayed in the kernel"
            time.sleep(0.2)
        # DEL again (the runtime may repeat it): still fine.
        code, out, err = invoke(site, "DEL", "cweb0001", ns, _conf(site, app="web"))
        assert code == 0, (out, err)
    finally:
        responder.stop_many([(pid, ns) for pid in pids.values()])
        netns.delete(ns)


def test_labels_decide_the_policy(site: dict[str, Any]) -> None:
    lab = site["lab"]
    ns = _container(site, "other")
    pids: dict[str, int] = {}
    try:
        code, out, err = invoke(site, "ADD", "coth0001", ns, _conf(site, app="other"))
        assert code == 0, (out, err)
        ip = out["ips"][0]["address"].split("/")[0]
        pids = responder.start_many([responder.ResponderSpec(ns, "t1/c-coth0001", (ip,), ("tcp/80",))])
        assert not _tcp(lab.workload_netns("peer"), ip)  # not labelled web: the default drop
    finally:
        responder.stop_many([(pid, ns) for pid in pids.values()])
        invoke(site, "DEL", "coth0001", ns, site["conf"])
        netns.delete(ns)


def test_bad_input_is_a_cni_error_naming_the_field(site: dict[str, Any]) -> None:
    ns = _container(site, "bad")
    try:
        conf = dict(site["conf"])
        del conf["host"]
        code, out, _ = invoke(site, "ADD", "cbad0001", ns, conf)
        assert code != 0 and out["code"] == 7 and "host" in out["msg"]
        code, out, _ = invoke(site, "ADD", "cbad0001", ns, {**site["conf"], "subnet": "10.92.1.0/33"})
        assert code != 0 and out["code"] == 7 and "subnet" in out["msg"]
        code, out, _ = invoke(site, "ADD", "cbad0001", ns, {**site["conf"], "cniVersion": "9.9.9"})
        assert code != 0 and out["code"] == 1
        # The manager refuses the Workload (a tenant name it cannot have): a clear error, nothing left.
        code, out, _ = invoke(site, "ADD", "cbad0001", ns, {**site["conf"], "tenant": "Not A Name"})
        assert code != 0 and "manager refused" in out["msg"] and "tenant" in out["details"]
        assert host_ifname("cbad0001", "eth0") not in site["lab"].exec_host("h1", ["ip", "link"]).stdout
        assert not list(Path(site["conf"]["dataDir"]).glob("*/*"))
    finally:
        invoke(site, "DEL", "cbad0001", ns, site["conf"])
        netns.delete(ns)

"""Live migration end to end (docs/design/migration.md): a managed lab (manager + one agent per host
namespace), real TCP/UDP flows through the migrating workload, a denied-flow prober running the whole
time, the vNIC moved by `lab.migrate`. Needs root; skipped, visibly, otherwise.

One lab serves the module; each test leaves `srv` somewhere and reads where it is from the plan.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from labhelpers import NEEDS_ROOT

pytestmark = NEEDS_ROOT


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab
    from omniwall.lab.streams import MOBILITY
    from omniwall.manager.migration import FAULTS_ENV

    old = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = "1"  # the manager process inherits it: `failAt` for the rollback test
    try:
        with managed_lab(MOBILITY, ipv6=False) as (lab, cp):
            yield lab, cp
    finally:
        if old is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = old


def _ruleset(lab: Any, host: str) -> str:
    out = lab.exec_host(host, ["nft", "list", "table", "inet", "omniwall"])
    return out.stdout if out.returncode == 0 else ""


def _entries(lab: Any, host: str, ip: str) -> list[Any]:
    from omniwall.dataplane.conntrack import ConntrackTable

    ct = ConntrackTable(lab.host_netns(host))
    try:
        return ct.matching([ip])
    finally:
        ct.close()


def _other(lab: Any, workload: str, avoid: str = "") -> str:
    here = lab.plan.workload(workload).host
    return next(h.name for h in lab.plan.hosts if h.name not in (here, avoid))


class Traffic:
    """Echo servers, two TCP streams (to and from srv), a UDP flow, three denied probers (two into
    srv, one out of it)."""

    def __init__(self, lab: Any) -> None:
        from omniwall.lab.streams import Flow, wait_port

        cli, srv, bad = (lab.plan.workload(f"t1/{n}") for n in ("cli", "srv", "bad"))
        self.servers = [
            Flow("tcp-echo", srv.netns, ("5001",)).start(),
            Flow("udp-echo", srv.netns, ("5002",)).start(),
            Flow("tcp-echo", cli.netns, ("5011",)).start(),
            Flow("tcp-echo", bad.netns, ("6000",)).start(),
        ]
        srv_ip, cli_ip = srv.vnics[0].ips[0], cli.vnics[0].ips[0]
        wait_port(cli.netns, srv_ip, 5001)
        self.flows = {
            "to-srv": Flow("tcp-stream", cli.netns, (srv_ip, "5001")).start(),
            "from-srv": Flow("tcp-stream", srv.netns, (cli_ip, "5011")).start(),
            "udp": Flow("udp-flow", cli.netns, (srv_ip, "5002")).start(),
            "intruder": Flow("tcp-prober", bad.netns, (srv_ip, "5001")).start(),
            "wrong-port": Flow("tcp-prober", cli.netns, (srv_ip, "7001")).start(),
            "egress": Flow("tcp-prober", srv.netns, (bad.vnics[0].ips[0], "6000")).start(),
        }

    def stop(self) -> dict[str, dict[str, Any]]:
        out = {k: f.stop() for k, f in self.flows.items()}
        for s in self.servers:
            s.stop(timeout=5)
        return out


def test_tcp_and_udp_survive_and_denied_probe_never_succeeds(managed: tuple[Any, Any]) -> None:
    from omniwall.lab.migrate import migrate

    lab, cp = managed
    srv = lab.plan.workload("t1/srv")
    ifname, ip = srv.vnics[0].host_ifname, srv.vnics[0].ips[0]
    src, dst = srv.host, _other(lab, "t1/srv", avoid=lab.plan.workload("t1/cli").host)
    seen_on_dst_before_move: list[bool] = []

    def on_phase(phase: str) -> None:
        if phase == "switching":  # before the vNIC moves: the destination already enforces its policy
            seen_on_dst_before_move.append(ifname in _ruleset(lab, dst))

    traffic = Traffic(lab)
    try:
        import time

        time.sleep(1.0)
        rec = migrate(lab, "t1/srv", dst, on_phase=on_phase)
        time.sleep(1.5)
    finally:
        res = traffic.stop()
    assert rec["result"] == "succeeded", rec
    assert rec["stats"]["imported"] >= 3, rec  # two TCP streams + the UDP flow at least
    assert seen_on_dst_before_move == [True]
    for k in ("to-srv", "from-srv"):
        assert res[k]["ok"], (k, res[k])  # no reset, every byte back, in order
        assert res[k]["sent"] > 1_000_000, res[k]
    assert res["udp"]["replies"] > 100 and res["udp"]["lastReplyAgoMs"] < 500, res["udp"]  # resumed
    for k in ("intruder", "wrong-port", "egress"):
        assert res[k]["attempts"] > 20 and res[k]["successes"] == 0, (k, res[k])
    # the policy is on the destination, nothing of it on the source
    assert lab.plan.workload("t1/srv").host == dst
    assert ifname in _ruleset(lab, dst) and ifname not in _ruleset(lab, src)
    assert _entries(lab, src, ip) == []
    wl = cp.api("GET", "/v1/workloads/srv", params={"tenant": "t1"})
    assert wl["spec"]["host"] == dst and wl["status"]["migration"]["result"] == "succeeded"
    audit = cp.api("GET", "/v1/audit", params={"name": "srv", "kind": "Workload"})["items"]
    phases = [e["extra"].get("phase") for e in audit if e["action"] == "migrate" and e.get("extra")]
    assert phases[0] == "prepare" and phases[-1] == "done"


def test_failed_import_rolls_back_and_keeps_the_workload_protected(managed: tuple[Any, Any]) -> None:
    from omniwall.lab.lab import LabError
    from omniwall.lab.migrate import migrate

    lab, cp = managed
    srv = lab.plan.workload("t1/srv")
    ifname, ip = srv.vnics[0].host_ifname, srv.vnics[0].ips[0]
    src = srv.host
    dst = _other(lab, "t1/srv", avoid=lab.plan.workload("t1/cli").host)
    traffic = Traffic(lab)
    try:
        with pytest.raises(LabError, match="failed before the move"):
            migrate(lab, "t1/srv", dst, api_options={"failAt": "import"})
    finally:
        res = traffic.stop()
    rec = cp.api("GET", "/v1/workloads/srv/migration", params={"tenant": "t1"})
    assert rec["result"] == "failed" and rec["phases"][-1]["phase"] == "rolled-back", rec
    assert rec["stats"]["imported"] >= 3  # entries were on the destination, and are gone again:
    assert _entries(lab, dst, ip) == []
    assert ifname not in _ruleset(lab, dst) and ifname in _ruleset(lab, src)
    assert lab.plan.workload("t1/srv").host == src
    assert cp.api("GET", "/v1/workloads/srv", params={"tenant": "t1"})["spec"]["host"] == src
    for k in ("to-srv", "from-srv"):
        assert res[k]["ok"], (k, res[k])
    for k in ("intruder", "wrong-port", "egress"):
        assert res[k]["successes"] == 0, (k, res[k])


def test_stateless_policy_needs_no_import(managed: tuple[Any, Any]) -> None:
    from omniwall.lab.migrate import migrate
    from omniwall.lab.streams import Flow, wait_port

    lab, _ = managed
    cli, sls = lab.plan.workload("t1/cli"), lab.plan.workload("t1/sls")
    ip = sls.vnics[0].ips[0]
    server = Flow("tcp-echo", sls.netns, ("5101",)).start()
    try:
        wait_port(cli.netns, ip, 5101)
        stream = Flow("tcp-stream", cli.netns, (ip, "5101")).start()
        try:
            import time

            time.sleep(0.5)
            rec = migrate(lab, "t1/sls", _other(lab, "t1/sls", avoid=cli.host))
            time.sleep(1.0)
        finally:
            res = stream.stop()
    finally:
        server.stop(timeout=5)
    assert rec["result"] == "succeeded" and rec["stats"].get("exported", 0) == 0, rec  # untracked
    assert res["ok"] and res["sent"] > 500_000, res
    src_rules = _ruleset(lab, sls.host)
    assert not re.search(rf"\b{sls.vnics[0].host_ifname}\b", src_rules)

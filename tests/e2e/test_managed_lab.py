"""The managed lab end to end: manager + one agent per host namespace, the three-tier example applied
through the API, judged with real traffic against the sim's expectation.

Needs root (network namespaces, nftables); skipped, visibly, otherwise. One lab serves the module; the
tests that stop an agent or the manager start it again before they end, so the order does not matter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labhelpers import NEEDS_ROOT, TWO_HOSTS, pid_alive

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-tier"

pytestmark = NEEDS_ROOT


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab.managed import managed_lab

    with managed_lab([EXAMPLE]) as (lab, cp):
        yield lab, cp


def _disagreements(lab: Any, catalog: Any = None) -> list[str]:
    """Matrix entries where real traffic differs from the sim's verdict for `catalog` (default: the
    lab's own)."""
    if catalog is None:
        return [e.json_line() for e in lab.matrix(expect=True) if not e.agrees]
    from omniwall.lab.expect import expected
    from omniwall.lab.matrix import matrix_probes, served_targets
    from omniwall.lab.probe import run_probes

    probes = matrix_probes(lab.plan)
    served = {w.key: {(t.proto, t.port) for t in served_targets(w)} for w in lab.plan.workloads}
    want = [
        ok and (p.proto, p.port) in served[p.dst]
        for p, ok in zip(probes, expected(catalog, probes), strict=True)
    ]
    got = run_probes(probes)
    return [
        f"{r.probe.src} -> {r.probe.dst} {r.probe.proto}/{r.probe.port}: measured {r.allowed}, expected {w}"
        for r, w in zip(got, want, strict=True)
        if r.allowed != w
    ]


def _ruleset(lab: Any, host: str) -> str:
    out = lab.exec_host(host, ["nft", "list", "table", "inet", "omniwall"])
    assert out.returncode == 0, out.stderr
    return re.sub(r"counter packets \d+ bytes \d+", "counter", out.stdout)


def _kernel_revision(lab: Any, host: str) -> int | None:
    """The revision the host namespace's table holds, read back by the nftables backend."""
    from omniwall.dataplane.nft.backend import NftBackend

    backend = NftBackend(netns=lab.host_netns(host))
    try:
        realized = backend.realized()
        return None if realized is None else realized.revision
    finally:
        backend.close()


def _set_tier(cp: Any, tenant: str, name: str, tier: str) -> int:
    obj = cp.api("GET", f"/v1/workloads/{name}", params={"tenant": tenant})
    obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), "tier": tier}
    out = cp.api("PUT", f"/v1/workloads/{name}", params={"tenant": tenant}, json=obj)
    return int(out["metadata"]["revision"])


def test_every_host_in_sync_and_matrix_equals_expectation(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    status = cp.status()
    assert sorted(status["hosts"]) == ["host-1", "host-2", "host-3"]
    for h, s in status["hosts"].items():
        assert s["connected"] and s["inSync"] and s["realizedRevision"] > 0, (h, s)
        # the agent realized it in that host's kernel, not somewhere else
        assert _kernel_revision(lab, h) == s["realizedRevision"]
    assert _disagreements(lab) == []
    assert lab.probe("tenant-a/web-1", "tenant-a/app-1", "tcp", 8080)
    assert not lab.probe("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432)


def test_label_change_through_the_api_reaches_the_kernel(managed: tuple[Any, Any]) -> None:
    from omniwall.lab.inputs import catalog_from_dump
    from omniwall.model.catalog import Catalog

    lab, cp = managed
    assert not lab.probe("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432)
    revision = _set_tier(cp, "tenant-a", "web-1", "app")  # web-1 joins the app tier: may reach the db
    try:
        cp.wait_in_sync(revision=revision, timeout=20)
        assert lab.probe("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432)
        changed = Catalog.of(lab.catalog)
        wl = changed.workloads[("tenant-a", "web-1")]
        changed.workloads[("tenant-a", "web-1")] = wl.model_copy(
            update={"metadata": wl.metadata.model_copy(update={"labels": {"tier": "app"}})}
        )
        assert _disagreements(lab, catalog_from_dump([r.model_dump(mode="json") for r in changed])) == []
    finally:
        revision = _set_tier(cp, "tenant-a", "web-1", "web")
        cp.wait_in_sync(revision=revision, timeout=20)
    assert not lab.probe("tenant-a/web-1", "tenant-a/db-1", "tcp", 5432)


def test_killed_agent_leaves_the_kernel_enforcing(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    before = _ruleset(lab, "host-1")
    pid = cp.record.agents["host-1"]
    cp.kill_agent("host-1", sig=signal.SIGKILL)
    try:
        assert not pid_alive(pid)
        time.sleep(0.5)
        assert _ruleset(lab, "host-1") == before  # nothing flushed
        assert _disagreements(lab) == []  # web-1, dns-1 on host-1 still judged as before
    finally:
        cp.start_agent("host-1")
        cp.wait_in_sync(timeout=30)
    # the new agent adopted the table: same rules
    assert _ruleset(lab, "host-1") == before


def test_manager_down_agents_keep_enforcing(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    before = {h.name: _ruleset(lab, h.name) for h in lab.plan.hosts}
    agents = dict(cp.record.agents)
    cp.stop_manager(sig=signal.SIGKILL)
    try:
        time.sleep(1.0)  # the agents notice: their feeds broke
        assert all(pid_alive(pid) for pid in agents.values())
        assert {h: _ruleset(lab, h) for h in before} == before
        assert _disagreements(lab) == []
    finally:
        cp.start_manager()
    cp.wait_in_sync(timeout=60)  # the same agents came back (backoff <= 30 s)
    assert cp.record.agents == agents and all(pid_alive(pid) for pid in agents.values())
    assert {h: _ruleset(lab, h) for h in before} == before


def test_sigterm_stops_a_manager_whose_agents_are_attached(managed: tuple[Any, Any]) -> None:
    """`systemctl stop` sends SIGTERM. uvicorn then waits for open requests, and the agents' feeds and
    status streams never end by themselves: the manager used to run on until SIGKILL. It now ends
    them cleanly (api/server.py `EndStreams`) and exits at once; the agents keep enforcing."""
    lab, cp = managed
    before = {h.name: _ruleset(lab, h.name) for h in lab.plan.hosts}
    pid = cp.record.manager_pid
    assert pid is not None and pid_alive(pid)
    log = cp.dir / "manager.log"
    offset = log.stat().st_size
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 4.0  # below the lab's own SIGKILL grace (5 s)
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), "the manager still runs 4 s after SIGTERM"
        with open(log, errors="replace") as f:
            f.seek(offset)
            tail = f.read()
        # ended, not cancelled mid-request (uvicorn may still wait up to its grace for TLS closes)
        assert "Finished server process" in tail and "Exception in ASGI application" not in tail, tail
        assert {h: _ruleset(lab, h) for h in before} == before
    finally:
        cp.stop_manager()  # records it as stopped (SIGKILLs it if the assertion above failed)
        cp.start_manager()
    cp.wait_in_sync(timeout=60)
    assert _disagreements(lab) == []


def test_move_goes_through_the_api(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    try:
        lab.move("tenant-a/web-1", "host-2")
        web = cp.api("GET", "/v1/workloads/web-1", params={"tenant": "tenant-a"})
        assert web["spec"]["host"] == "host-2"
        assert all(s["inSync"] for s in cp.status()["hosts"].values())
        assert _disagreements(lab) == []  # lab.catalog follows the move, so does the expectation
    finally:
        lab.move("tenant-a/web-1", "host-1")
    assert _disagreements(lab) == []


def _readme_command(start: str) -> str:
    """The README's command line that starts with `start`, without its comment."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(start):
            return line.split("#", 1)[0].strip()
    raise AssertionError(f"no line starting with {start!r} in README.md")


def test_readme_migrate_moves_the_workload_with_a_live_tcp_connection(managed: tuple[Any, Any]) -> None:
    """`omniwall migrate tenant-a/app-1 --to host-3` as the README has it: the manager orders the move,
    the lab's hypervisor moves the vNIC, and a TCP stream web-1 -> app-1 goes on without a reset and
    loses no byte."""
    from omniwall.lab.streams import live_tcp

    lab, cp = managed
    command = _readme_command("omniwall migrate ")
    assert command == "omniwall migrate tenant-a/app-1 --to host-3", command
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "OMNIWALL_SERVER": cp.url,
        "OMNIWALL_TOKEN": cp.admin_token,
        "OMNIWALL_CA": str(cp.ca_file),
    }
    assert lab.plan.workload("tenant-a/app-1").host == "host-2"
    try:
        with live_tcp(lab, "tenant-a/web-1", "tenant-a/app-1", 8080) as stream:
            time.sleep(0.5)
            out = subprocess.run(
                ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=180
            )
            time.sleep(0.5)
            res = stream.stop()
        assert out.returncode == 0, out.stdout + out.stderr
        assert "switching" in out.stdout and out.stdout.rstrip().endswith("succeeded"), out.stdout
        assert res["ok"] and res["error"] is None and res["sent"] > 100_000, res
        lab.reload()  # the hypervisor recorded the move in the lab's state file
        assert lab.plan.workload("tenant-a/app-1").host == "host-3"
        wl = cp.api("GET", "/v1/workloads/app-1", params={"tenant": "tenant-a"})
        assert wl["spec"]["host"] == "host-3" and wl["status"]["migration"]["result"] == "succeeded"
        assert _disagreements(lab) == []
    finally:
        lab.reload()
        if lab.plan.workload("tenant-a/app-1").host != "host-2":  # back where the example has it
            back = command.replace("host-3", "host-2")
            subprocess.run(["bash", "-c", back], env=env, capture_output=True, text=True, timeout=180)
            lab.reload()
    assert lab.plan.workload("tenant-a/app-1").host == "host-2"


def test_a_switch_order_read_late_moves_nothing(managed: tuple[Any, Any]) -> None:
    """The hypervisor reads `switching` orders from the audit stream, which replays entries after a
    reconnection, and may lag behind migrations driven by another process. An order whose migration
    has ended must not move the vNIC: here app-1 went to host-3 and back, and the first migration's
    order, read late, would put app-1 on host-3 again, where no policy holds it (the churn soak's
    black-holed streams and 422 refusals)."""
    from omniwall.lab.hypervisor import Hypervisor
    from omniwall.lab.managed import control_dir
    from omniwall.lab.migrate import migrate

    lab, cp = managed
    assert lab.plan.workload("tenant-a/app-1").host == "host-2"
    there = migrate(lab, "tenant-a/app-1", "host-3")
    back = migrate(lab, "tenant-a/app-1", "host-2")
    hv_log = (cp.dir / "hypervisor.log").read_text()[-3000:]
    # the way back is to the host app-1 just left, whose agent may still list its vNIC: only a report
    # after the move may count as the switch (manager/migration.py `_wait_switch`)
    assert there["id"] != back["id"] and lab.plan.workload("tenant-a/app-1").host == "host-2", hv_log
    late = {"id": there["id"], "tenant": "tenant-a", "name": "app-1", "destination": "host-3"}
    Hypervisor(control_dir(lab.prefix)).switch(late)
    lab.reload()
    assert lab.plan.workload("tenant-a/app-1").host == "host-2"
    wl = cp.api("GET", "/v1/workloads/app-1", params={"tenant": "tenant-a"})
    assert wl["spec"]["host"] == "host-2" and wl["status"]["migration"]["id"] == back["id"]
    assert _disagreements(lab) == []


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    from omniwall.lab import netns
    from omniwall.lab.managed import control_dir, managed_lab

    with managed_lab(TWO_HOSTS) as (lab, cp):
        prefix = lab.prefix
        pids = [cp.record.manager_pid, cp.record.hypervisor_pid, *cp.record.agents.values()]
        assert len(pids) == 4 and all(p and pid_alive(p) for p in pids)
        assert lab.probe("t1/a", "t1/b", "tcp", 80) is not None
    assert not any(pid_alive(p) for p in pids if p)
    assert netns.list_names(prefix) == []
    assert not control_dir(prefix).exists()


def test_cli_lab_up_managed_then_down_from_another_process(tmp_path: Path) -> None:
    from omniwall.lab import netns
    from omniwall.lab.managed import ControlPlane, control_dir

    (tmp_path / "lab.yaml").write_text(TWO_HOSTS)
    name = f"e2e-managed-{os.getpid()}"
    cli = [sys.executable, "-m", "omniwall.cli.main", "lab"]
    up = subprocess.run(
        [*cli, "up", "--managed", "--name", name, "-f", str(tmp_path / "lab.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    prefix = re.search(r"prefix (\S+)", up.stdout)
    pids: list[int | None] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "policy: managed" in up.stdout and prefix is not None
        cp = ControlPlane(prefix.group(1))
        pids = [cp.record.manager_pid, *cp.record.agents.values()]
        assert len(pids) == 3 and all(p and pid_alive(p) for p in pids)  # they outlived `lab up`
        # The printed export line works as shown (the token read from its file, as `$(sudo cat ...)`).
        export = re.search(
            r"export (OMNIWALL_SERVER=\S+) (OMNIWALL_CA=\S+) OMNIWALL_TOKEN=\$\(sudo cat (\S+)\)", up.stdout
        )
        assert export is not None, up.stdout
        env = dict(kv.split("=", 1) for kv in export.groups()[:2])
        env["OMNIWALL_TOKEN"] = Path(export.group(3)).read_text().strip()
        st = subprocess.run(
            [sys.executable, "-m", "omniwall.cli.main", "status", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert st.returncode == 0 and sorted(json.loads(st.stdout)["hosts"]) == ["h1", "h2"], st.stderr
        m = subprocess.run(
            [*cli, "matrix", "--name", name, "--expect"], capture_output=True, text=True, timeout=60
        )
        assert m.returncode == 0, m.stdout + m.stderr
    finally:
        down = subprocess.run([*cli, "down", "--name", name], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids if p)
    assert prefix is not None
    assert netns.list_names(prefix.group(1)) == []
    assert not control_dir(prefix.group(1)).exists()

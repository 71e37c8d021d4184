"""`omniwall lab` end to end through the command line: up, refusal to go up twice, status, matrix JSON
lines, exec exit codes, down (twice), nothing left behind."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labhelpers import LAB_MARKS, TWO_HOSTS, netns_list, pid_alive
from omniwall.lab import state as lab_state

pytestmark = LAB_MARKS


def ow(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omniwall.cli.main", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def lab_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d: Path = tmp_path_factory.mktemp("lab")
    # Two files, passed the way a shell expands `-f dir/*.yaml`.
    docs = TWO_HOSTS.split("---")
    (d / "hosts.yaml").write_text("---".join(docs[:2]))
    (d / "workloads.yaml").write_text("---".join(docs[2:]))
    name = f"test-{secrets.token_hex(3)}"
    res = ow("up", "--name", name, "--no-policy", "-f", str(d / "hosts.yaml"), str(d / "workloads.yaml"))
    assert res.returncode == 0, res.stderr
    assert "3 workloads" in res.stdout
    try:
        yield name
    finally:
        ow("down", "--name", name)


def test_second_up_is_refused(lab_name: str, tmp_path: Path) -> None:
    f = tmp_path / "lab.yaml"
    f.write_text(TWO_HOSTS)
    before = lab_state.load(lab_name)
    res = ow("up", "--name", lab_name, "--no-policy", "-f", str(f))
    assert res.returncode == 1
    assert "already up" in res.stderr
    assert "Traceback" not in res.stderr
    assert lab_state.load(lab_name).prefix == before.prefix  # the running lab is untouched


def test_status_lists_the_lab(lab_name: str) -> None:
    res = ow("status")
    assert res.returncode == 0
    assert any(line.startswith(f"{lab_name}: up") for line in res.stdout.splitlines())
    detail = ow("status", "--name", lab_name).stdout
    assert "workload t1/c on h2" in detail and "running" in detail


def test_matrix_json_lines(lab_name: str) -> None:
    res = ow("matrix", "--name", lab_name, "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 10
    for d in lines:
        assert list(d) == ["from", "to", "proto", "port", "result"]
        assert d["result"] == "allowed"
    assert {"from": "t1/c", "to": "t1/a", "proto": "udp", "port": 53, "result": "allowed"} in lines


def test_matrix_explicit_ports_and_table(lab_name: str) -> None:
    res = ow("matrix", "--name", lab_name, "--ports", "tcp/80,udp/53,icmp", "--json")
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 18
    assert {"from": "t1/a", "to": "t1/b", "proto": "udp", "port": 53, "result": "denied"} in lines
    assert {"from": "t1/a", "to": "t1/b", "proto": "icmp", "port": None, "result": "allowed"} in lines
    table = ow("matrix", "--name", lab_name)
    assert table.returncode == 0
    assert "from \\ to" in table.stdout and "allow" in table.stdout


def test_matrix_rejects_bad_ports(lab_name: str) -> None:
    res = ow("matrix", "--name", lab_name, "--ports", "tcp/eighty")
    assert res.returncode == 1
    assert "tcp/eighty" in res.stderr and "Traceback" not in res.stderr


def test_exec_passes_exit_code_and_output(lab_name: str) -> None:
    assert ow("exec", "--name", lab_name, "a", "--", "sh", "-c", "exit 5").returncode == 5
    res = ow("exec", "--name", lab_name, "t1/c", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert res.returncode == 0 and "10.77.0.3/32" in res.stdout
    res = ow("exec", "--name", lab_name, "--host", "h2", "--", "cat", "/proc/sys/net/ipv4/ip_forward")
    assert res.stdout.strip() == "1"
    bad = ow("exec", "--name", lab_name, "nope", "--", "true")
    assert bad.returncode == 1 and "no workload 'nope'" in bad.stderr


def test_down_is_idempotent_and_complete(tmp_path: Path) -> None:
    f = tmp_path / "lab.yaml"
    f.write_text(TWO_HOSTS)
    name = f"test-{secrets.token_hex(3)}"
    assert ow("up", "--name", name, "--no-policy", "-f", str(f)).returncode == 0
    st = lab_state.load(name)
    assert {n for n in netns_list() if n.startswith(st.prefix)}
    res = ow("down", "--name", name)
    assert res.returncode == 0 and "6 namespaces deleted" in res.stdout
    assert not {n for n in netns_list() if n.startswith(st.prefix)}
    assert not any(pid_alive(p) for p in st.responders.values())
    again = ow("down", "--name", name)
    assert again.returncode == 0 and "not up" in again.stdout


def test_down_cleans_a_half_built_lab() -> None:
    # A lab whose `up` died after claiming its name and creating one namespace (no plan saved yet).
    name = f"test-{secrets.token_hex(3)}"
    prefix = f"owhb{secrets.token_hex(2)}-"
    lab_state.claim(lab_state.LabState(name=name, prefix=prefix))
    subprocess.run(["ip", "netns", "add", f"{prefix}fabric"], check=True)
    res = ow("down", "--name", name)
    assert res.returncode == 0, res.stderr
    assert f"{prefix}fabric" not in netns_list()
    assert not lab_state.path_of(name).exists()

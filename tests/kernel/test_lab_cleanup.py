"""The lab always cleans up: normal exit, an exception, a failing step while building, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from labhelpers import LAB_MARKS, TWO_HOSTS, netns_list, pid_alive
from omniwall.lab import Lab
from omniwall.lab import state as lab_state
from omniwall.lab.plan import LabPlan, PlanError
from omniwall.model.catalog import Catalog

pytestmark = LAB_MARKS


def _ours(prefix: str) -> set[str]:
    return {n for n in netns_list() if n.startswith(prefix)}


def test_teardown_leaves_nothing() -> None:
    with Lab.up(TWO_HOSTS, policy=False) as lab:
        prefix, pids = lab.prefix, list(lab.state.responders.values())
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        assert len(_ours(prefix)) == 6  # fabric, 2 hosts, 3 workloads
        assert lab_state.path_of(lab.name).exists()
    assert not _ours(prefix)  # other suites may create namespaces meanwhile: look at ours only
    assert not any(pid_alive(p) for p in pids)
    assert not lab_state.path_of(lab.name).exists()


def test_exception_in_the_block_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab.up(TWO_HOSTS, policy=False) as lab:
        prefix = lab.prefix
        raise RuntimeError("boom")
    assert not _ours(prefix)


class _FailingPolicy:
    mode = "test"

    def start(self, plan: LabPlan, catalog: Catalog) -> None:
        raise RuntimeError("policy step failed")

    def stop(self, plan: LabPlan) -> None:
        return None


def test_failure_while_building_removes_the_half_built_lab() -> None:
    prefix = "owfail-"
    with pytest.raises(RuntimeError, match="policy step failed"):
        Lab.up(TWO_HOSTS, prefix=prefix, policy=_FailingPolicy())  # type: ignore[arg-type]
    assert not _ours(prefix)
    assert not lab_state.path_of("owfail").exists()


def test_bad_input_builds_nothing() -> None:
    bad = TWO_HOSTS.replace("servers: [tcp/80]}", "servers: [tcp/99999]}")
    with pytest.raises(PlanError, match=r"t1/b: spec.lab.servers\[0\]"):
        Lab.up(bad, prefix="owbad-", policy=False)
    assert not _ours("owbad-")
    assert not lab_state.path_of("owbad").exists()


def test_second_lab_with_the_same_name_is_refused() -> None:
    with Lab.up(TWO_HOSTS, policy=False, responders=False) as lab:
        with pytest.raises(lab_state.LabStateError, match="already up"):
            Lab.up(TWO_HOSTS, name=lab.name, policy=False)
        assert all(os.path.exists(f"/run/netns/{n}") for n in lab.namespaces())  # untouched


def test_sigterm_cleans_up(tmp_path: object) -> None:
    code = (
        "import sys, time\n"
        "from omniwall.lab import Lab\n"
        f"TWO_HOSTS = {TWO_HOSTS!r}\n"
        "with Lab.up(TWO_HOSTS, policy=False) as lab:\n"
        "    print(lab.prefix, *lab.state.responders.values(), flush=True)\n"
        "    time.sleep(60)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert p.stdout is not None
        prefix, *pids = p.stdout.readline().split()
        assert _ours(prefix)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not _ours(prefix)
    deadline = time.monotonic() + 2
    while any(pid_alive(int(x)) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(int(x)) for x in pids)

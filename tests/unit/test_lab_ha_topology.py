"""The managed lab's HA options without root: what is refused, and what a record of several managers and
etcd members says (no process started here; tests/e2e/test_ha_*.py run the real thing)."""

from __future__ import annotations

import pytest

from omniwall.lab import control, etcd
from omniwall.lab.control import ControlPlane, Managed, ManagedError, check_topology


def test_several_managers_need_etcd() -> None:
    with pytest.raises(ManagedError, match=r"--managers 3: .*SQLite is single-manager.*--etcd 3"):
        check_topology(3, 0)
    with pytest.raises(ManagedError, match="--managers 3"):
        Managed(managers=3)
    with pytest.raises(ManagedError, match="--managers: 0"):
        check_topology(0, 3)
    check_topology(1, 0)
    check_topology(1, 1)
    check_topology(3, 3)


def test_record_of_an_ha_control_plane(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(control.lab_state, "STATE_DIR", tmp_path)
    cp = ControlPlane("owt1-", tls=True, managers=3, etcd=3)
    assert cp.managers == 3 and len(cp.etcd_members) == 3
    cp.record.port = 1001
    cp.record.replicas = [{"port": 1002, "pid": None}, {"port": 1003, "pid": None}]
    for i, m in enumerate(cp.record.etcd):
        m["client_port"], m["peer_port"] = 2001 + 2 * i, 2002 + 2 * i
    cp.save()
    again = ControlPlane("owt1-")  # what `lab down` / `lab status` see
    assert again.urls == ["https://127.0.0.1:1001", "https://127.0.0.1:1002", "https://127.0.0.1:1003"]
    assert again.store_spec == "etcd://127.0.0.1:2001,127.0.0.1:2003,127.0.0.1:2005"
    assert again.admin_token_file == tmp_path / "owt1-managed" / "manager-1" / "omniwall.admin-token"
    assert not any(again.manager_alive(i) for i in range(3))
    assert not any(again.etcd_alive(i) for i in range(3))
    # every member's command line names its data dir in the control directory (the PID check's marker)
    argv = etcd.member_argv(again.etcd_members[1], again.etcd_members, again.etcd_data_dir(1), "owt1-etcd")
    assert str(again.dir) in " ".join(argv)
    assert "owt1-etcd1=http://127.0.0.1:2002" in argv[argv.index("--initial-cluster") + 1]
    # one manager on SQLite keeps the old layout
    single = ControlPlane("owt2-")
    assert single.managers == 1 and single.store_spec is None
    assert single.admin_token_file.name == "omniwall.db.admin-token"

"""A migrated guest's run directories (lab/vm.py): the destination QEMU's `<name>.m<N>/`, the guest's
lab name becoming a symlink to it, and `lab down` finding and removing both. QEMU itself migrating:
tests/kernel/test_vm_migration.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniwall.lab import guest, state
from omniwall.lab import vm as lab_vm


@pytest.fixture
def vmdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    (tmp_path / "vm").mkdir()
    return tmp_path / "vm"


def test_run_directory_follows_the_guest(vmdir: Path) -> None:
    canonical = guest.rundir("owx-w-t1-srv")
    canonical.mkdir()
    (canonical / "guest.json").write_text("{}")
    first = lab_vm._next_rundir("owx-w-t1-srv")
    assert first == vmdir / "owx-w-t1-srv.m1"
    first.mkdir()
    (first / "guest.json").write_text("{}")
    lab_vm._point_rundir(canonical, canonical, first)  # first migration: the source ran in `canonical`
    assert canonical.is_symlink() and canonical.resolve() == first and guest.is_guest("owx-w-t1-srv")
    second = lab_vm._next_rundir("owx-w-t1-srv")
    assert second == vmdir / "owx-w-t1-srv.m2"
    second.mkdir()
    lab_vm._point_rundir(canonical, first, second)  # and back: the old destination goes
    assert canonical.resolve() == second and not first.exists()
    assert sorted(p.name for p in vmdir.iterdir()) == ["owx-w-t1-srv", "owx-w-t1-srv.m2"]


def test_lab_down_removes_symlink_and_target(vmdir: Path) -> None:
    target = vmdir / "owx-w-t1-srv.m3"
    target.mkdir()
    (vmdir / "owx-w-t1-srv").symlink_to(target.name)
    assert lab_vm.stop_guests(None, "owx-") == []  # no QEMU runs there
    assert list(vmdir.iterdir()) == []

"""The agent's decision logic against the strict in-memory backend: which writes, in which cases."""

from __future__ import annotations

import dataclasses

import pytest

from omniwall.agent.reconciler import Reconciler
from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch, diff
from omniwall.dataplane.memory_backend import MemoryBackend, MemoryBackendError

HOST = "h1"


def state(
    revision: int, web_ips: tuple[str, ...] = ("10.0.0.1",), extra_vnic: bool = False
) -> HostDesiredState:
    rules = (
        IRRule(
            id=101,
            tenant="t",
            policy="p",
            rule="web",
            category="application",
            action="allow",
            src_set="s-any-web",
            dst_set="s-web",
            services=(ServiceMatch("tcp", ((80, 80),)),),
        ),
    )
    vnics = [IRVnic(ifname="ow-web", workload="t/web", tenant="t", addresses=web_ips, ingress=(101,))]
    if extra_vnic:
        vnics.append(IRVnic(ifname="ow-db", workload="t/db", tenant="t", addresses=("10.0.0.9",)))
    sets = (IRSet("s-any-web", addresses=("10.0.0.5",)), IRSet("s-web", addresses=web_ips))
    vnics.sort(key=lambda v: v.ifname)  # the IR keeps vNICs sorted
    return HostDesiredState(host=HOST, revision=revision, vnics=tuple(vnics), rules=rules, sets=sets)


def fresh() -> tuple[MemoryBackend, Reconciler]:
    be = MemoryBackend(HOST)
    rec = Reconciler(be, HOST)
    rec.adopt()
    return be, rec


def test_first_snapshot_is_synced_and_acked() -> None:
    be, rec = fresh()
    assert rec.resume_revision == 0
    out = rec.on_snapshot(state(5))
    assert out.kind == "synced" and out.realized_revision == 5
    assert be.realized() == state(5)
    assert be.calls == [("sync", 5)]
    assert rec.resume_revision == 5 and rec.error is None


def test_deltas_in_order_are_applied_incrementally() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    s6 = state(6, web_ips=("10.0.0.1", "10.0.0.2"))
    s7 = state(7, web_ips=("10.0.0.2",), extra_vnic=True)
    assert rec.on_delta(diff(state(5), s6)).kind == "applied"
    out = rec.on_delta(diff(s6, s7))
    assert out.kind == "applied" and out.realized_revision == 7
    assert be.realized() == s7
    assert be.calls == [("sync", 5), ("apply", 5, 6), ("apply", 6, 7)]


def test_replayed_delta_is_skipped_without_writes() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    s6 = state(6, web_ips=("10.0.0.2",))
    rec.on_delta(diff(state(5), s6))
    before = list(be.calls)
    assert rec.on_delta(diff(state(5), s6)).kind == "skipped"
    assert be.calls == before and be.realized() == s6


def test_gap_asks_for_a_snapshot_then_syncs() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    s8 = state(8, web_ips=("10.0.0.3",))
    out = rec.on_delta(diff(state(7), s8))  # we never saw 6 and 7
    assert out.kind == "resync" and out.realized_revision == 5
    assert be.realized() == state(5) and be.calls == [("sync", 5)]  # untouched until the snapshot
    out = rec.on_snapshot(s8)
    assert out.kind == "synced" and be.realized() == s8


def test_failed_apply_retries_with_a_full_sync() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    s6 = state(6, web_ips=("10.0.0.4",))
    be.fail_next(1, "nft: transaction refused")
    out = rec.on_delta(diff(state(5), s6))
    assert out.kind == "synced" and be.realized() == s6
    assert be.calls[-2:] == [("apply", 5, 6), ("sync", 6)]


def test_failure_is_reported_state_kept_and_retried() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    s6 = state(6, web_ips=("10.0.0.4",))
    be.fail_next(2, "nft: out of memory")  # the apply and the sync after it
    out = rec.on_delta(diff(state(5), s6))
    assert out.kind == "failed" and out.realized_revision == 5
    assert out.error is not None and "out of memory" in out.error and rec.error == out.error
    assert be.realized() == state(5)  # old state enforced
    assert not rec.in_sync and rec.resume_revision == 6  # the feed goes on from what the manager sent
    # the next delta builds on the desired state and lands with a full sync
    s7 = state(7, web_ips=("10.0.0.4", "10.0.0.7"))
    out = rec.on_delta(diff(s6, s7))
    assert out.kind == "synced" and be.realized() == s7 and rec.error is None
    assert be.calls[-1] == ("sync", 7)


def test_retry_after_failed_sync() -> None:
    be, rec = fresh()
    be.fail_next(1)
    out = rec.on_snapshot(state(5))
    assert out.kind == "failed" and be.realized() is None and out.realized_revision == 0
    assert rec.retry().kind == "synced" and be.realized() == state(5)
    assert rec.retry().kind == "unchanged"


def test_identical_snapshot_after_restart_writes_nothing(tmp_path) -> None:
    path = tmp_path / "sim.json"
    first = MemoryBackend(HOST, state_file=path)
    rec = Reconciler(first, HOST)
    rec.adopt()
    rec.on_snapshot(state(5, extra_vnic=True))
    # "restart": a new backend object reads the persisted state, a new reconciler adopts it
    be = MemoryBackend(HOST, state_file=path)
    rec = Reconciler(be, HOST)
    assert rec.adopt() == state(5, extra_vnic=True)
    assert rec.resume_revision == 5
    out = rec.on_snapshot(state(5, extra_vnic=True))
    assert out.kind == "unchanged" and out.realized_revision == 5
    assert be.calls == [] and be.writes == 0


def test_changed_snapshot_after_restart_syncs() -> None:
    be, rec = fresh()
    rec.on_snapshot(state(5))
    out = rec.on_snapshot(state(9, extra_vnic=True))
    assert out.kind == "synced" and be.realized() == state(9, extra_vnic=True)


def test_wrong_host_is_refused_and_nothing_written() -> None:
    be, rec = fresh()
    other = dataclasses.replace(state(5), host="h2")
    out = rec.on_snapshot(other)
    assert out.kind == "failed" and "h2" in (out.error or "")
    assert be.calls == [] and be.realized() is None


def test_memory_backend_is_strict() -> None:
    be = MemoryBackend(HOST)
    broken = dataclasses.replace(state(1), sets=())  # the rule names sets that are not there
    with pytest.raises(MemoryBackendError, match="s-any-web"):
        be.sync(broken)
    assert be.realized() is None
    be.sync(state(1))
    with pytest.raises(MemoryBackendError, match="revision"):
        be.apply(state(3), diff(state(3), state(4)), state(4))
    assert be.realized() == state(1)


def test_unreadable_kernel_state_means_wait_for_snapshot() -> None:
    class Unreadable(MemoryBackend):
        def realized(self) -> HostDesiredState | None:
            raise RuntimeError("table from IR version 99")

    rec = Reconciler(Unreadable(HOST), HOST)
    assert rec.adopt() is None and rec.resume_revision == 0


def test_snapshot_equal_up_to_set_member_order_writes_nothing() -> None:
    be, rec = fresh()
    s = state(5, web_ips=("10.0.0.1", "10.0.0.2"))
    rec.on_snapshot(s)
    # the kernel reads a hash set back in its own order
    shuffled = dataclasses.replace(
        s, sets=tuple(dataclasses.replace(x, addresses=tuple(reversed(x.addresses))) for x in s.sets)
    )
    be._state = shuffled
    rec = Reconciler(be, HOST)
    rec.adopt()
    assert rec.on_snapshot(s).kind == "unchanged"
    assert be.calls == [("sync", 5)]

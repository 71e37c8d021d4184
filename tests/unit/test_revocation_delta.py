"""Revocation after a delta takes the affected vNICs from the delta (`delta_vnics`), not from a
comparison of two whole states, and cuts exactly what the whole-state comparison cuts."""

from __future__ import annotations

from dataclasses import replace

from omniwall.compiler.ir import (
    HostDelta,
    HostDesiredState,
    IRRule,
    IRSet,
    IRVnic,
    RuleUpdate,
    ServiceMatch,
    VnicRemove,
    apply_delta,
    diff,
)
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.memory_backend import MemoryBackend
from omniwall.dataplane.revocation import Revoker, delta_vnics

WEB, APP, DB, OTHER = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.9.9"


def rule(rid: int, src_set: str, port: int) -> IRRule:
    svc = (ServiceMatch("tcp", ((port, port),)),)
    return IRRule(rid, "t", "p", f"r{rid}", "application", "allow", src_set, None, svc)


def state() -> HostDesiredState:
    vnics = (
        IRVnic("app0", "t/app", "t", (APP,), (), (1,), "drop"),
        IRVnic("db0", "t/db", "t", (DB,), (), (2,), "drop"),
    )
    rules = (rule(1, "web", 80), rule(2, "apps", 5432))
    sets = (IRSet("apps", (APP,)), IRSet("web", (OTHER, WEB)))
    return HostDesiredState("h", 1, vnics, rules, sets)


def conn(src: str, dst: str, dport: int) -> ConnEntry:
    return ConnEntry(2, 6, src, dst, 40000, dport, dst, src, dport, 40000, state="ESTABLISHED")


def test_delta_vnics_names_what_the_delta_can_change_and_nothing_else() -> None:
    s = state()
    # a rule change: the vNIC naming it
    d = HostDelta(
        "h",
        1,
        2,
        rule_updates=(
            RuleUpdate(
                replace(s.rules[0], services=()),
            ),
        ),
    )
    assert delta_vnics(s, d, apply_delta(s, d)) == {"app0"}
    # a set's members: the vNICs whose rules use the set (db0's rule 2 uses "apps")
    t = replace(s, revision=2, sets=(IRSet("apps", (APP, WEB)), s.sets[1]))
    d = diff(s, t)
    assert delta_vnics(s, d, t) == {"db0"}
    # a vNIC that leaves
    d = HostDelta("h", 1, 2, vnic_removes=(VnicRemove("db0"),))
    assert delta_vnics(s, d, apply_delta(s, d)) == {"db0"}


def test_after_change_from_the_delta_cuts_what_the_whole_state_comparison_cuts() -> None:
    s = state()
    t = replace(s, revision=2, rules=(rule(1, "web", 443), s.rules[1]))  # app0 now only takes 443
    # OTHER -> db0 is refused by the state, but no change touches db0: neither way re-judges it
    entries = [conn(WEB, APP, 80), conn(WEB, APP, 443), conn(OTHER, DB, 5432)]
    cut: list[list[ConnEntry]] = []
    for vnics in (None, delta_vnics(s, diff(s, t), t)):
        be = MemoryBackend("h")
        be.sync(s)
        be.import_connections(entries)
        rv = Revoker(be.ct)
        cut.append(rv.after_change(s, t, vnics))
    assert cut[0] == cut[1] == [conn(WEB, APP, 80)]

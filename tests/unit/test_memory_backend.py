"""MemoryBackend revokes like the kernel backend: the same `Revoker` judges the connections it tracks
under every new state (docs/semantics.md §6), so `capabilities.conntrack` holds."""

from __future__ import annotations

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch, diff
from omniwall.dataplane.backend import ConnEntry
from omniwall.dataplane.memory_backend import MemoryBackend

WEB, APP, OTHER = "10.0.0.1", "10.0.0.2", "10.0.9.9"


def state(rev: int, web: tuple[str, ...], port: int = 80) -> HostDesiredState:
    rules = (
        IRRule(
            1, "t", "p", "r1", "application", "allow", "web", None, (ServiceMatch("tcp", ((port, port),)),)
        ),
    )
    vnics = (IRVnic("app0", "t/app", "t", (APP,), (), (1,), "drop"),)
    return HostDesiredState("h", rev, vnics, rules, (IRSet("web", web),))


def conn(src: str, dport: int = 80) -> ConnEntry:
    return ConnEntry(2, 6, src, APP, 40000, dport, APP, src, dport, 40000, state="ESTABLISHED")


def test_capabilities_claim_conntrack_and_revocation_cuts_what_the_new_state_refuses() -> None:
    be = MemoryBackend("h")
    assert be.capabilities.conntrack
    s1 = state(1, (WEB, OTHER))
    be.sync(s1)
    assert be.import_connections([conn(WEB), conn(OTHER)]) == 2
    # a member leaves: its connection is cut (the delta path), web's stays
    s2 = state(2, (WEB,))
    be.apply(s1, diff(s1, s2), s2)
    assert [e.src for e in be.last_revoked] == [OTHER]
    assert be.connections() == [conn(WEB)]
    # the port changes (a full sync): web's connection on 80 is refused now, a new one on 443 is not
    be.track([conn(WEB, 443)])
    s3 = state(3, (WEB,), port=443)
    be.sync(s3)
    assert [(e.src, e.dport) for e in be.last_revoked] == [(WEB, 80)]
    assert be.connections() == [conn(WEB, 443)]


def test_a_vnic_that_leaves_takes_its_connections_and_flush_and_export_see_the_table() -> None:
    be = MemoryBackend("h")
    s1 = state(1, (WEB,))
    be.sync(s1)
    be.track([conn(WEB)])
    assert be.export_connections([APP]) == [conn(WEB)]
    assert be.connections("app0") == [conn(WEB)]
    gone = HostDesiredState("h", 2, (), s1.rules, s1.sets)
    be.sync(gone)
    assert be.last_revoked == [conn(WEB)] and be.connections() == []
    be.track([conn(WEB)])
    assert be.flush_connections([conn(WEB)]) == 1 and be.flush_connections([conn(WEB)]) == 0

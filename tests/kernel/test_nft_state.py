"""Backend state handling: convergence, incremental apply, atomicity, adoption, revocation, attribution."""

from __future__ import annotations

import dataclasses

import pytest
from topo import (
    nsexec,
    open_stream,
    rule,
    state,
    stream_alive,
    tcp,
    tcp_connect,
    vnic,
)

from omniwall.compiler.ir import IRSet, diff
from omniwall.dataplane.backend import Backend
from omniwall.dataplane.conntrack import ConntrackTable
from omniwall.dataplane.netns import NetnsError
from omniwall.dataplane.nflog import NflogReader
from omniwall.dataplane.nft.backend import normalized
from omniwall.dataplane.nft.libnft import Nft, NftError

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


@pytest.fixture
def trio(one_host):
    """One host; workloads a, b, c; echo servers on b:8080 and b:9090."""
    return one_host("a", "b", "c", serve=(("b", 8080), ("b", 9090)))


def web_state(rev, a, b, c, members):
    """b accepts tcp/8080 from set 'web'; a and c may send anything."""
    rules = [rule(1, "allow"), rule(2, "allow", src="web", services=(tcp(8080),))]
    vnics = [vnic(a, egress=(1,)), vnic(c, egress=(1,)), vnic(b, ingress=(2,))]
    return state(rev, vnics, rules, [IRSet("web", tuple(sorted(members)))])


def test_convergence_second_sync_is_noop(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = web_state(1, a, b, c, a.addresses)
    be.sync(s1)
    assert be.nft.writes == 1
    be.sync(s1)
    assert be.nft.writes == 1  # Neutron's convergence test: a second apply writes nothing
    assert normalized(be.realized()) == normalized(s1)


def test_incremental_set_element_is_one_small_transaction(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = web_state(1, a, b, c, a.addresses)
    be.sync(s1)
    assert tcp_connect(c.ns, b.ip4, 8080) == "timeout"
    s2 = web_state(2, a, b, c, (*a.addresses, c.ip4))
    be.apply(s1, diff(s1, s2), s2)
    batch = be.nft.last_batch
    elems = [cmd for cmd in batch if "element" in cmd.get("add", {})]
    # the member, and its ipcache entry (the hop index: c now has web's identity)
    assert len(elems) == 2 and elems[0]["add"]["element"]["elem"] == [c.ip4]
    assert elems[1]["add"]["element"]["name"].startswith("ipc_")
    # nothing else but the revision bookkeeping (quota `_rev` updated in place), sent without libnftables
    others = [cmd for cmd in batch if cmd not in elems]
    assert [o["add"]["quota"]["name"] for o in others] == ["_rev"]
    assert len(batch) == 3 and be.nft.element_writes == 1
    assert tcp_connect(c.ns, b.ip4, 8080) == "open"
    writes = be.nft.writes
    be.sync(s2)
    assert be.nft.writes == writes  # converged
    # a rule change replaces only the chains of the vNICs that use it
    s3 = dataclasses.replace(
        s2, revision=3, rules=(s2.rules[0], dataclasses.replace(s2.rules[1], services=(tcp(8080, 9090),)))
    )
    be.apply(s2, diff(s2, s3), s3)
    touched = {next(iter(cmd.values()))["chain"]["name"] for cmd in be.nft.last_batch if "flush" in cmd}
    touched = {n for n in touched if not n.startswith("_state")}  # the stored IR: header, buckets
    assert touched and all("tapb" in name for name in touched)
    assert not any("delete" in cmd and "table" in cmd["delete"] for cmd in be.nft.last_batch)
    assert tcp_connect(a.ns, b.ip4, 9090) == "open"


def test_atomic_failure_leaves_old_table(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = web_state(1, a, b, c, a.addresses)
    be.sync(s1)
    bad = web_state(2, a, b, c, (*a.addresses, "10.0.0.300"))  # not an address: the kernel batch fails
    with pytest.raises(NftError):
        be.apply(s1, diff(s1, bad), bad)
    with pytest.raises(NftError):
        be.sync(bad)
    assert normalized(be.realized()) == normalized(s1)
    assert tcp_connect(a.ns, b.ip4, 8080) == "open"
    assert tcp_connect(c.ns, b.ip4, 8080) == "timeout"
    # a fresh table that fails to build leaves nothing half-made either
    be.teardown()
    with pytest.raises(NftError):
        be.sync(bad)
    assert be.nft.list_table("inet", "omniwall") is None


def test_restart_adopts_without_writes_and_keeps_stream(trio, backends):
    h, a, b, c = trio
    s1 = web_state(1, a, b, c, a.addresses)
    first = backends(h)
    first.sync(s1)
    stream = open_stream(a.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream)
        first.close()  # the agent dies; the table stays
        second = backends(h)
        assert normalized(second.realized()) == normalized(s1)
        second.sync(s1)
        assert second.nft.writes == 0  # adopted: nothing written
        assert stream_alive(stream)
        # the restarted agent then catches up with a newer state: only the difference is written
        s2 = web_state(2, a, b, c, (*a.addresses, c.ip4))
        second.sync(s2)
        assert second.nft.writes == 1
        assert len(second.nft.last_batch) == 3  # the element, its ipcache entry, the revision
        assert stream_alive(stream)
        assert tcp_connect(c.ns, b.ip4, 8080) == "open"
    finally:
        stream.close()


def test_revocation_cuts_only_refused_connections(trio, backends):
    h, a, b, _c = trio
    be = backends(h)
    r8080 = rule(2, "allow", services=(tcp(8080),))
    r9090 = rule(3, "allow", services=(tcp(9090),))
    s1 = state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2, 3))], [rule(1, "allow"), r8080, r9090])
    be.sync(s1)
    s8080, s9090 = open_stream(a.ns, b.ip4, 8080), open_stream(a.ns, b.ip4, 9090)
    try:
        assert stream_alive(s8080) and stream_alive(s9090)
        s2 = state(2, [vnic(a, egress=(1,)), vnic(b, ingress=(3,))], [rule(1, "allow"), r9090])
        be.apply(s1, diff(s1, s2), s2)
        assert [e.dport for e in be.last_revoked] == [8080]
        assert not stream_alive(s8080, timeout=1.0)  # cut: its entry is gone, new packets are judged
        assert stream_alive(s9090)  # still allowed: untouched
        assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"
    finally:
        s8080.close()
        s9090.close()


def test_vnic_removal_keeps_peer_hops_and_revokes_orphans(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = web_state(1, a, b, c, a.addresses)
    be.sync(s1)
    stream = open_stream(a.ns, b.ip4, 8080)
    try:
        # b leaves this host (deleted or migrated): a's egress hop is still here and still allows
        s2 = state(2, [vnic(a, egress=(1,)), vnic(c, egress=(1,))], [rule(1, "allow")])
        be.apply(s1, diff(s1, s2), s2)
        names = {o["chain"]["name"] for o in be.nft.list_table("inet", "omniwall") if "chain" in o}
        assert not any("tapb" in n for n in names)
        assert be.last_revoked == []
        assert stream_alive(stream)
        assert normalized(be.realized()) == normalized(s2)
        # a leaves too: no hop on this host is part of the connection any more -> its entry goes
        s3 = state(3, [vnic(c, egress=(1,))], [rule(1, "allow")])
        be.apply(s2, diff(s2, s3), s3)
        assert [(e.src, e.dport) for e in be.last_revoked] == [(a.ip4, 8080)]
    finally:
        stream.close()
    be.teardown()
    assert be.nft.list_table("inet", "omniwall") is None


def test_ct_mark_and_counters_name_the_rule(trio, backends):
    h, a, b, _c = trio
    be = backends(h)
    be.sync(state(1, [vnic(a, egress=(11,)), vnic(b, ingress=(12,))], [rule(11, "allow"), rule(12, "allow")]))
    stream = open_stream(a.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream)
        conns = [e for e in be.connections(b.ifname) if e.dport == 8080 and e.src == a.ip4]
        assert len(conns) == 1
        assert conns[0].mark == 12  # the last hop judged on this host (b's ingress)
        assert conns[0].state == "ESTABLISHED"
        counters = {x.rule_id: x for x in be.counters()}
        assert counters[11].packets == 1 and counters[12].packets == 1  # only the first packet judged
        assert counters[12].bytes > 0
    finally:
        stream.close()


def test_nflog_drop_and_monitor_records(trio, backends):
    h, a, b, _c = trio
    be = backends(h, log_group=5)
    rules = [
        rule(1, "allow"),
        rule(7, "drop", services=(tcp(9090),), log=True),
        rule(8, "drop", services=(tcp(8080),), monitor=True),
    ]
    be.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(7, 8))], rules))
    with NflogReader(5, netns=h) as reader:
        assert tcp_connect(a.ns, b.ip4, 9090, timeout=0.5) == "timeout"
        recs = reader.read(timeout=2)
        assert recs, "no NFLOG record for a logged drop"
        r = recs[0]
        assert (r.rule_id, r.action) == (7, "drop")
        assert (r.src, r.dst, r.protocol, r.dport) == (a.ip4, b.ip4, 6, 9090)
        assert tcp_connect(a.ns, b.ip4, 8080) == "open"  # monitor: would drop, passes
        recs = reader.read(timeout=2)
        assert [(x.rule_id, x.action, x.dport) for x in recs[:1]] == [(8, "would-drop", 8080)]
    # default action in monitor mode
    be.sync(state(2, [vnic(a, egress=(1,)), vnic(b, monitor=True)], [rule(1, "allow")]))
    with NflogReader(5, netns=h) as reader:
        assert tcp_connect(a.ns, b.ip6, 9090) == "open"
        recs = reader.read(timeout=2)
        assert [(x.rule_id, x.action, x.dst) for x in recs[:1]] == [(0, "would-drop", b.ip6)]


def test_conntrack_export_import_keeps_stream(topo, backends, servers):
    """Migration primitive: entries exported, deleted, re-imported (liberal, confirmed, with mark) keep a
    live stream alive even though the new policy would refuse a new connection."""
    h = topo.add_host("h1")
    h2 = topo.add_host("h2")
    a, b = topo.add_workload(h, "a", 1), topo.add_workload(h, "b", 2)
    servers(b.ns, 8080)
    be = backends(h, revoke=False)
    s1 = state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2,))], [rule(1, "allow"), rule(2, "allow")])
    be.sync(s1)
    stream = open_stream(a.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream, b"x" * 100_000)
        exported = [e for e in be.export_connections([b.ip4]) if e.dport == 8080]
        assert len(exported) == 1 and exported[0].mark == 2
        be.sync(state(2, [vnic(a, egress=(1,)), vnic(b)], [rule(1, "allow")]))  # new conns refused
        assert be.flush_connections(exported) == 1
        assert be.import_connections(exported) == 1
        assert stream_alive(stream, b"y" * 100_000)  # the imported entry carries the stream
        assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"
        back = [e for e in be.connections() if e.dport == 8080 and e.src == a.ip4]
        assert back[0].mark == 2 and back[0].state == "ESTABLISHED"
        # the same entries import into another namespace (the destination host of a migration)
        ct2 = ConntrackTable(h2)
        try:
            assert ct2.import_entries(exported) == 1
            listed = nsexec(h2, ["conntrack", "-L", "-p", "tcp", "--dport", "8080"]).stdout
            assert "mark=2" in listed and "ESTABLISHED" in listed and "ASSURED" in listed
            got = [e for e in ct2.list() if e.dport == 8080]
            assert got[0].extra["tcp_flags_orig"] & 0x08 and got[0].extra["tcp_flags_reply"] & 0x08
        finally:
            ct2.close()
    finally:
        stream.close()


def test_backend_protocol_and_root_guard(topo, backends):
    h = topo.add_host("h1")
    assert isinstance(backends(h), Backend)
    # the test process runs in the initial namespace: a context there must refuse to write. The command
    # would fail harmlessly even if the guard were broken (the table does not exist).
    nft = Nft(None)
    try:
        with pytest.raises(NetnsError):
            nft.transact([{"delete": {"table": {"family": "inet", "name": "owt_guard_probe_nonexistent"}}}])
        assert nft.writes == 0
    finally:
        nft.close()

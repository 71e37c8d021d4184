"""DESIGN §8 with the backend's primitives: a workload's vNIC moves to another host while a TCP stream
runs through it; the destination imports the conntrack entries first, so the stream survives even
though the destination's policy would refuse the connection as new."""

from __future__ import annotations

import pytest
from topo import nsexec, open_stream, rule, state, stream_alive, tcp, tcp_connect, vnic

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


def _move_vnic(w, src_host: str, dst_host: str) -> None:
    """What the hypervisor does: the host end of the veth goes to the other host, routes follow."""
    nsexec(src_host, ["ip", "link", "set", w.ifname, "netns", dst_host])
    nsexec(dst_host, ["sysctl", "-q", "-w", f"net.ipv4.conf.{w.ifname}.proxy_arp=1"])
    nsexec(dst_host, ["ip", "addr", "add", "fe80::1/64", "dev", w.ifname, "nodad"])
    nsexec(dst_host, ["ip", "link", "set", w.ifname, "up"])
    nsexec(dst_host, ["ip", "route", "replace", f"{w.ip4}/32", "dev", w.ifname])
    nsexec(dst_host, ["ip", "-6", "route", "replace", f"{w.ip6}/128", "dev", w.ifname])
    nsexec(src_host, ["ip", "route", "replace", f"{w.ip4}/32", "via", "192.168.255.2"])
    nsexec(src_host, ["ip", "-6", "route", "replace", f"{w.ip6}/128", "via", "fd99::2"])
    w.host = dst_host


@pytest.mark.parametrize("copy_entries", [True, False], ids=["with-import", "without-import"])
def test_migration_keeps_stream_only_with_imported_entries(topo, backends, servers, copy_entries):
    h1, h2 = topo.add_host("h1"), topo.add_host("h2")
    topo.link_hosts(h1, h2)
    a, b = topo.add_workload(h1, "a", 1), topo.add_workload(h1, "b", 2)
    servers(b.ns, 8080)
    be1, be2 = backends(h1), backends(h2)
    out, into = rule(1, "allow"), rule(2, "allow", services=(tcp(8080),))
    be1.sync(state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2,))], [out, into], host="h1"))
    be2.sync(state(1, [], [], host="h2"))
    stream = open_stream(a.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream, b"x" * 50_000)
        # (1) the destination gets the workload's desired state first (here deliberately one that refuses
        #     the connection as new, so only an imported entry can carry the stream)
        be2.sync(state(2, [vnic(b)], [], host="h2"))
        # (2) + (3): export from the source, import at the destination
        entries = be1.export_connections(list(b.addresses))
        assert any(e.dport == 8080 and e.mark == 2 for e in entries)
        if copy_entries:
            assert be2.import_connections(entries) == len(entries)
        # (4) the vNIC moves; (5) the source drops the workload's chains (a's hop stays and still allows)
        _move_vnic(b, h1, h2)
        be1.sync(state(2, [vnic(a, egress=(1,))], [out], host="h1"))
        assert be1.last_revoked == []
        alive = stream_alive(stream, b"y" * 50_000, timeout=2.0)
        assert alive is copy_entries
        if copy_entries:
            moved = [e for e in be2.connections(b.ifname) if e.dport == 8080]
            assert moved and moved[0].mark == 2  # the mark travelled with the entry
        assert tcp_connect(a.ns, b.ip4, 8080, timeout=0.5) == "timeout"  # new connections: h2's policy
    finally:
        stream.close()

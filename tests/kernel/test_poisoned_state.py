"""Issue 9, findings 1 and 2, in the kernel: a desired state carrying a vNIC on the host's own `lo`, or a set
element nftables cannot load, must neither cut the host off nor stop the rest of the host from converging.

The manager refuses both (tests/unit/test_host_interfaces.py); this is the agent's own line of defence,
fed the poisoned state directly, as a buggy or hostile manager would send it.
"""

from __future__ import annotations

import pytest
from topo import Topo, nsexec, ping, rule, state, tcp, tcp_connect, vnic

from omniwall.agent.reconciler import Reconciler
from omniwall.compiler.ir import HostDelta, IRSet, IRVnic, SetUpdate, VnicUpdate

pytestmark = pytest.mark.kernel
PORT = 7443


def test_poisoned_objects_fail_closed_and_the_host_converges(topo: Topo, backends, servers) -> None:
    host = topo.add_host()
    a = topo.add_workload(host, "a", 1)
    b = topo.add_workload(host, "b", 2)
    c = topo.add_workload(host, "c", 3)
    servers(b.ns, PORT)
    sets = [IRSet("a", a.addresses), IRSet("b", b.addresses), IRSet("c", c.addresses)]
    rules = [rule(1, "allow", None, "b", (tcp(PORT),)), rule(2, "allow", None, None, (tcp(PORT),))]
    # vNIC on the host's loopback, as the hostile Workload of finding 1 would have it
    evil = IRVnic("lo", "t/evil", "t", ("10.9.0.8",), (1,), ())
    s1 = state(1, [vnic(a, egress=(1,)), vnic(b, ingress=(2,)), evil], rules, sets)

    rec = Reconciler(backends(host), "h")
    out = rec.on_snapshot(s1)
    assert out.kind == "synced" and out.realized_revision == 1
    assert rec.error is not None and "lo" in rec.error and "not attached" in rec.error
    assert ping(host, "127.0.0.1") == "open"  # the host's own loopback still works
    table = nsexec(host, ["nft", "list", "table", "inet", "omniwall"]).stdout
    assert '"lo"' not in table and " lo " not in table
    assert tcp_connect(a.ns, b.ip4, PORT) == "open"

    # finding 2: an address with a zone id reaches a set that c's rule uses
    zone_b = IRSet("b", (*b.addresses, "fe80::1%eth0"))
    d2 = HostDelta(
        "h",
        1,
        2,
        set_updates=(SetUpdate(zone_b.name, added_addresses=("fe80::1%eth0",)),),
        rule_updates=(),
        vnic_updates=(VnicUpdate(vnic(c, egress=(1,))),),
    )
    out = rec.on_delta(d2)
    assert out.kind == "synced" and out.realized_revision == 2, out
    assert "fails closed" in (rec.error or "")
    assert tcp_connect(c.ns, b.ip4, PORT) != "open"  # fails closed, never open
    assert tcp_connect(a.ns, b.ip4, PORT) != "open"  # a's rule uses the tainted set too: closed as well

    # the poison goes away: the host converges fully, every later change is realized
    d3 = HostDelta("h", 2, 3, set_updates=(SetUpdate("b", removed_addresses=("fe80::1%eth0",)),))
    out = rec.on_delta(d3)
    assert out.realized_revision == 3
    assert tcp_connect(a.ns, b.ip4, PORT) == "open"
    assert tcp_connect(c.ns, b.ip4, PORT) == "open"
    assert rec.error is not None and "lo" in rec.error  # still refused, still reported
    assert rec.realized is not None and "lo" not in rec.realized.vnic_map()

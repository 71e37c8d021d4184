"""Incremental transactions against the real kernel: after every random change, the table built by
`apply(delta)` equals a table built from scratch, and the read-back IR equals the desired IR."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
from nftcheck import canonical_any_chain_order, mutate
from topo import rule, state

from omniwall.compiler.ir import HostDesiredState, IRSet, IRVnic, ServiceMatch, diff
from omniwall.dataplane.nft.backend import normalized

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


def _vnic(name: str, n: int, egress=(), ingress=()) -> IRVnic:
    return IRVnic(name, f"t/{name}", "t", (f"10.0.0.{n}", f"fd00::{n:x}"), egress, ingress)


def _start() -> HostDesiredState:
    rules = [
        rule(1, "allow", dst="web", services=(ServiceMatch("tcp", ((80, 80),)),)),
        rule(2, "drop", src="bad", log=True, category="emergency"),
        rule(3, "reject", stateful=False),
    ]
    sets = [IRSet("web", ("10.0.0.1",)), IRSet("bad", ("10.9.9.9",), ("10.8.0.0/16",))]
    return state(1, [_vnic("tapa", 1, (2, 1), (2, 3)), _vnic("tapb", 2, (), (1,))], rules, sets)


def test_incremental_apply_matches_full_build(topo, backends):
    inc_ns, full_ns = topo.add_host("inc"), topo.add_host("full")
    inc, ref = backends(inc_ns), backends(full_ns)
    rnd = random.Random(1234)
    s = _start()
    inc.sync(s)
    for step in range(25):
        n = mutate(s, rnd)
        inc.apply(s, diff(s, n), n)
        ref.teardown()
        ref.sync(n)
        got = canonical_any_chain_order(inc.nft.list_table("inet", "omniwall"))
        want = canonical_any_chain_order(ref.nft.list_table("inet", "omniwall"))
        assert got == want, f"step {step}: incremental table differs from a full build"
        assert normalized(inc.realized()) == normalized(n)
        s = n


def test_drift_is_repaired_by_sync(topo, backends):
    h = topo.add_host("h1")
    be = backends(h)
    s = _start()
    be.sync(s)
    writes = be.nft.writes
    be.nft.transact([{"flush": {"chain": {"family": "inet", "table": "omniwall", "name": "i_tapb"}}}])
    assert be.realized() is None  # the kernel no longer matches what it claims to hold
    be.sync(s)
    assert be.nft.writes == writes + 2  # our manual flush + one rebuild
    assert normalized(be.realized()) == normalized(s)


def test_one_element_change_on_a_big_set_is_fast(topo, backends):
    """DESIGN §6: host addresses live in hash sets; one IP joining a 20k-member group is one small
    transaction, well under a millisecond of kernel work plus our rendering."""
    h = topo.add_host("h1")
    be = backends(h)
    members = tuple(sorted(f"10.{i // 65536 + 64}.{i // 256 % 256}.{i % 256}" for i in range(20_000)))
    s = state(1, [_vnic("tapa", 1, (), (1,))], [rule(1, "allow", src="big")], [IRSet("big", members)])
    be.sync(s)
    timings = []
    for i in range(20):
        n = replace(s, revision=s.revision + 1, sets=(IRSet("big", (*members, f"10.200.0.{i}")),))
        d = diff(s, n)
        t0 = time.perf_counter()
        be.apply(s, d, n)
        timings.append(time.perf_counter() - t0)
        s, members = n, n.sets[0].addresses
        # the element, its ipcache entry (the hop index: the address takes big's identity), the revision
        assert len(be.nft.last_batch) == 3
        assert be.nft.last_batch[1]["add"]["element"]["name"].startswith("ipc_")
    timings.sort()
    assert timings[len(timings) // 2] < 0.05, f"median apply {timings[len(timings) // 2] * 1000:.1f} ms"

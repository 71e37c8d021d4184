"""Incremental transactions against the real kernel: after every random change, the table built by
`apply(delta)` equals a table built from scratch, and the read-back IR equals the desired IR."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from typing import Any

import pytest
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


def _mutate(s: HostDesiredState, rnd: random.Random) -> HostDesiredState:
    sets, rules, vnics = (
        {x.name: x for x in s.sets},
        {r.id: r for r in s.rules},
        {v.ifname: v for v in s.vnics},
    )
    k = rnd.randrange(6)
    if k == 0:
        name = rnd.choice(sorted(sets))
        addrs = {f"10.1.{rnd.randrange(3)}.{rnd.randrange(200)}" for _ in range(rnd.randrange(4))}
        sets[name] = replace(sets[name], addresses=tuple(sorted(addrs | {"fd00:1::1"})))
    elif k == 1:
        name = rnd.choice(sorted(sets))
        cidrs = rnd.choice(
            [(), ("10.8.0.0/16",), ("fd00:8::/64", "10.8.0.0/16"), ("10.8.0.0/16", "10.8.1.0/24")]
        )
        sets[name] = replace(sets[name], cidrs=tuple(sorted(cidrs)))
    elif k == 2:
        rid = rnd.choice(sorted(rules))
        rules[rid] = replace(rules[rid], action=rnd.choice(["allow", "drop", "reject", "pass"]))
    elif k == 3:
        n = rnd.randrange(3, 6)
        vnics[f"tapx{n}"] = _vnic(f"tapx{n}", n, tuple(rnd.sample(sorted(rules), 1)), ())
    elif k == 4 and len(vnics) > 1:
        del vnics[rnd.choice(sorted(vnics))]
    else:
        name = rnd.choice(sorted(vnics))
        ids = sorted(rules)
        vnics[name] = replace(vnics[name], ingress=tuple(rnd.sample(ids, rnd.randint(0, len(ids)))))
    used = {i for v in vnics.values() for i in (*v.egress, *v.ingress)}
    rules = {i: r for i, r in rules.items() if i in used}
    used_sets = {x for r in rules.values() for x in (r.src_set, r.dst_set) if x}
    return state(s.revision + 1, list(vnics.values()), list(rules.values()), [sets[x] for x in used_sets])


def _canonical(listing: list[dict[str, Any]]) -> list[str]:
    """A listing without handles, with set elements sorted (hash order differs between builds)."""
    out = []
    for obj in listing:
        ((kind, body),) = obj.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        out.append(json.dumps({kind: body}, sort_keys=True))
    # rules keep their order within a chain; chains may be listed in any order
    rules = sorted((o for o in out if o.startswith('{"rule"')), key=lambda o: json.loads(o)["rule"]["chain"])
    return sorted(o for o in out if not o.startswith('{"rule"')) + rules


def test_incremental_apply_matches_full_build(topo, backends):
    inc_ns, full_ns = topo.add_host("inc"), topo.add_host("full")
    inc, ref = backends(inc_ns), backends(full_ns)
    rnd = random.Random(1234)
    s = _start()
    inc.sync(s)
    for step in range(25):
        n = _mutate(s, rnd)
        inc.apply(s, diff(s, n), n)
        ref.teardown()
        ref.sync(n)
        got = _canonical(inc.nft.list_table("inet", "omniwall"))
        want = _canonical(ref.nft.list_table("inet", "omniwall"))
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

"""What the nft kernel tests share: a random change to a host state, and a table listing made
comparable (tests/kernel/test_nft_incremental.py, tests/kernel/test_nft_raw_netns.py)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

from topo import state

from omniwall.compiler.ir import HostDesiredState, IRVnic, ServiceMatch


def mutate(s: HostDesiredState, rnd: random.Random) -> HostDesiredState:
    """The next revision of `s` with one random change: a set's addresses or networks, a rule's action or
    service, a vNIC added, removed or given other ingress rules. Rules and sets no vNIC uses are dropped,
    as the compiler drops them."""
    sets, rules, vnics = (
        {x.name: x for x in s.sets},
        {r.id: r for r in s.rules},
        {v.ifname: v for v in s.vnics},
    )
    k = rnd.randrange(7)
    if k == 0 and sets:
        name = rnd.choice(sorted(sets))
        addrs = {f"10.1.{rnd.randrange(3)}.{rnd.randrange(200)}" for _ in range(rnd.randrange(4))}
        sets[name] = replace(sets[name], addresses=tuple(sorted(addrs | {"fd00:1::1"})))
    elif k == 1 and sets:
        name = rnd.choice(sorted(sets))
        cidrs = rnd.choice(
            [(), ("10.8.0.0/16",), ("fd00:8::/64", "10.8.0.0/16"), ("10.8.0.0/16", "10.9.1.0/24")]
        )
        sets[name] = replace(sets[name], cidrs=tuple(sorted(cidrs)))
    elif k == 2 and rules:
        rid = rnd.choice(sorted(rules))
        rules[rid] = replace(rules[rid], action=rnd.choice(["allow", "drop", "reject", "pass"]))
    elif k == 3 and rules:
        rid = rnd.choice(sorted(rules))
        port = rnd.randrange(1, 60000)
        svc = rnd.choice(
            [ServiceMatch("tcp", ((port, port),)), ServiceMatch("udp", ((port, port + 9), (9, 9)))]
        )
        rules[rid] = replace(rules[rid], services=(svc,))
    elif k == 4:
        n = rnd.randrange(3, 6)
        ids = tuple(rnd.sample(sorted(rules), min(2, len(rules))))
        vnics[f"owx{n}"] = IRVnic(f"owx{n}", f"t/x{n}", "t", (f"10.0.9.{n}", f"fd00:9::{n:x}"), ids, ids[:1])
    elif k == 5 and len(vnics) > 1:
        del vnics[rnd.choice(sorted(vnics))]
    else:
        name = rnd.choice(sorted(vnics))
        ids = sorted(rules)
        vnics[name] = replace(vnics[name], ingress=tuple(rnd.sample(ids, rnd.randint(0, len(ids)))))
    used = {i for v in vnics.values() for i in (*v.egress, *v.ingress)}
    rules = {i: r for i, r in rules.items() if i in used}
    used_sets = {x for r in rules.values() for x in (r.src_set, r.dst_set) if x}
    return state(s.revision + 1, list(vnics.values()), list(rules.values()), [sets[x] for x in used_sets])


def canonical(listing: list[dict[str, Any]]) -> list[str]:
    """A JSON listing without handles, set elements sorted (hash order is not ours); objects in the
    kernel's order."""
    out = []
    for obj in listing:
        ((kind, body),) = obj.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        out.append(json.dumps({kind: body}, sort_keys=True))
    return out


def canonical_any_chain_order(listing: list[dict[str, Any]]) -> list[str]:
    """`canonical`, for tables built in different orders: rules keep their order within a chain, but
    chains and other objects may be listed in any order."""
    out = canonical(listing)
    rules = sorted((o for o in out if o.startswith('{"rule"')), key=lambda o: json.loads(o)["rule"]["chain"])
    return sorted(o for o in out if not o.startswith('{"rule"')) + rules

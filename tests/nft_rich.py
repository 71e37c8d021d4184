"""The nft tests' "rich" host state: every shape the renderer has, and the expression kinds it emits
(tests/kernel/test_nft_raw_netns.py, tests/unit/test_nft_raw.py)."""

from __future__ import annotations

from typing import Any

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch


def R(
    rid: int, action: str = "allow", src: str | None = None, dst: str | None = None, services=(), **kw: Any
):
    return IRRule(
        rid, "t", "p", f"r{rid}", kw.pop("category", "application"), action, src, dst, services, **kw
    )


def rich_state(revision: int = 3) -> HostDesiredState:
    """Every shape the renderer has: all actions, log, monitor, stateless (notrack, raw ingress
    dispatch), icmp type/code, port lists/ranges/one port/full range, interval sets (adjacent, at the
    address space's ends), several own addresses (anonymous sets, v4 and v6), none, connection
    limits, the hop index (identities, concatenated maps with ranges, network ipcache)."""
    tcp80 = ServiceMatch("tcp", ((80, 80), (8000, 8080)))
    rules = [
        R(1, "allow", None, "web", (tcp80,)),
        R(2, "drop", "bad", None, log=True, category="emergency"),
        R(3, "pass", None, None, (ServiceMatch("icmp", (), 8),), category="emergency"),
        R(4, "reject"),
        R(
            5,
            "allow",
            "web",
            "nets",
            (ServiceMatch("udp", ((53, 53),)),),
            stateful=False,
            category="environment",
        ),
        R(6, "drop", None, "web", (ServiceMatch("tcp", ((22, 22),)),), monitor=True),
        R(
            7,
            "reject",
            "nets",
            None,
            (ServiceMatch("tcp", ((1000, 2000),)), ServiceMatch("icmpv6", (), 128, 0)),
            log=True,
        ),
        R(8, "allow", "web", None, (ServiceMatch("udp"), ServiceMatch("tcp", ((443, 443),))), stateful=False),
        R(9, "reject", None, "bad", (ServiceMatch("icmp", (), 3, 4),)),
        R(10, "allow", "far", None, (ServiceMatch("tcp", ((5000, 5010), (6000, 6000))),)),
        R(11, "allow", "adj", None, (ServiceMatch("tcp", ((0, 65535),)),)),
        R(12, "drop", None, "edge", (ServiceMatch("udp", ((1, 1), (65535, 65535))),)),
        R(
            13,
            "allow",
            "nets",
            None,
            (ServiceMatch("tcp", ((7000, 7000),)), ServiceMatch("udp", ((7000, 7001),))),
            stateful=False,
        ),
    ]
    sets = [
        IRSet(
            "adj",
            ("10.5.0.9",),
            ("10.3.1.0/24", "10.3.2.0/24", "10.2.0.0/16", "fd00:3::/64", "fd00:3:0:1::/64"),
        ),
        IRSet("bad", ("10.9.9.9", "fd00::99")),
        IRSet("edge", (), ("255.255.255.0/24", "0.0.0.0/8")),
        IRSet("far", ("10.7.0.1", "10.7.0.2", "fd00:7::1")),
        IRSet("nets", ("10.0.0.5",), ("10.1.0.0/16", "fd00:1::/64")),
        IRSet("web", ("10.0.0.1", "fd00::1")),
    ]
    vnics = [
        IRVnic(
            "owa",
            "t/a",
            "t",
            ("10.0.0.1", "fd00::1"),
            egress=(2, 3, 5, 1, 10),
            ingress=(2, 1, 4, 8),
            conn_limit=100,
            conn_rate=50,
        ),
        IRVnic(
            "owb",
            "t/b",
            "t",
            ("10.0.0.2",),
            ingress=(5, 6, 7, 9, 10),
            egress=(10, 6),
            default_action="reject",
        ),
        IRVnic(
            "owc",
            "t/c",
            "t",
            ("10.0.0.3", "10.0.0.4"),
            egress=(1, 10),
            ingress=(10,),
            default_action="drop",
            default_monitor=True,
            conn_limit=5,
        ),
        IRVnic("owd", "t/d", "t", (), egress=(7,), default_action="allow"),
        IRVnic(
            "owe",
            "t/e",
            "t",
            ("10.0.5.1", "10.0.5.2", "fd00:e::1", "fd00:e::2"),
            egress=(11, 12, 1),
            ingress=(11, 13, 12),
        ),
    ]
    return HostDesiredState("h", revision, tuple(vnics), tuple(rules), tuple(sets))


# what the renderer emits (statement kinds, and match left-hand sides and right-hand forms)
ALL_KINDS = {
    "stmt:accept", "stmt:counter", "stmt:counter:named", "stmt:ct count", "stmt:continue", "stmt:drop",
    "stmt:goto", "stmt:jump", "stmt:limit", "stmt:log", "stmt:mangle", "stmt:notrack", "stmt:reject:icmpx",
    "stmt:reject:tcp reset", "stmt:return", "stmt:vmap:concat", "stmt:vmap:meta", "stmt:vmap:payload",
    "match:ct:list", "match:meta:value", "match:meta:prefix", "match:payload:value", "match:payload:range",
    "match:payload:@set", "match:payload:set", "match:payload:merged icmp",
    "set:ipv4_addr", "set:ipv6_addr", "set:ifname", "set:inet_service:interval", "set:ipv4_addr:interval",
    "set:ipv6_addr:interval", "map:ifname", "map:ipv4_addr", "map:ipv6_addr", "map:ipv4_addr:interval",
    "map:ipv6_addr:interval", "map:ifname.inet_proto.inet_service", "map:ifname.inet_proto",
    "map:ifname.inet_proto.inet_service:interval", "obj:counter", "obj:quota",
}  # fmt: skip


def kinds(commands: list[dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for cmd in commands:
        ((verb, obj),) = cmd.items()
        ((kind, body),) = obj.items()
        if verb == "add" and kind in ("set", "map"):
            typ = body["type"]
            name = ".".join(typ) if isinstance(typ, list) else typ
            out.add(f"{kind}:{name}" + (":interval" if "interval" in body.get("flags", []) else ""))
        elif verb == "add" and kind in ("counter", "quota"):
            out.add(f"obj:{kind}")
        elif verb == "add" and kind == "rule":
            exprs = body["expr"]
            for e in exprs:
                ((k, v),) = e.items()
                if k == "match":
                    left = next(iter(v["left"]))
                    r = v["right"]
                    if left == "payload" and v["left"]["payload"]["field"] == "code":
                        out.add("match:payload:merged icmp")
                        continue
                    form = (
                        "@set" if isinstance(r, str) and r.startswith("@")
                        else "prefix" if isinstance(r, str) and r.endswith("*")
                        else "list" if isinstance(r, list)
                        else next(iter(r)) if isinstance(r, dict)
                        else "value"
                    )  # fmt: skip
                    out.add(f"match:{left}:{form}")
                elif k == "vmap":
                    out.add(f"stmt:vmap:{next(iter(v['key']))}")
                elif k == "reject":
                    out.add(f"stmt:reject:{v['type']}")
                elif k == "counter":
                    out.add("stmt:counter" + (":named" if v else ""))
                else:
                    out.add(f"stmt:{k}")
    return out

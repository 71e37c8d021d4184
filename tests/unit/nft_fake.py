"""A strict fake of `table inet omniwall` (Faucet's fake-OF-table idea): what the kernel does with a
libnftables batch or a raw netlink element batch, refusing what the kernel refuses (a reference to a
missing set or chain, deleting something still referenced or a missing element, an element op on a
missing set); a refused batch leaves the table unchanged. `listing()` gives the table back in the shape
of `nft -j list table` (what the planner's read-back parses).
"""

from __future__ import annotations

import json
from typing import Any

from omniwall.dataplane.nft.nlbatch import Op


class FakeTable:
    """What the kernel does with a batch, strictly; a failed batch leaves the table unchanged."""

    def __init__(self) -> None:
        self.t: dict[str, Any] | None = None

    def apply(self, cmds: list[dict[str, Any]]) -> None:
        work = json.loads(json.dumps(self.t))
        for cmd in cmds:
            work = self._one(work, cmd)
        self.t = work

    @staticmethod
    def _refs(rule: dict[str, Any]) -> tuple[set[str], set[str]]:
        sets: set[str] = set()
        chains: set[str] = set()

        def walk(x: Any) -> None:
            if isinstance(x, str) and x.startswith("@"):
                sets.add(x[1:])
            elif isinstance(x, list):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for k, v in x.items():
                    if k in ("goto", "jump"):
                        chains.add(v["target"])
                    else:
                        walk(v)

        walk(rule["expr"])
        return sets, chains

    def _referenced(self, t: dict[str, Any]) -> tuple[set[str], set[str]]:
        sets: set[str] = set()
        chains: set[str] = set()
        for rules in t["chains"].values():
            for r in rules:
                s, c = self._refs(r)
                sets |= s
                chains |= c
        for elems in t["sets"].values():
            for v in elems.values():
                if isinstance(v, dict):
                    chains.add((v.get("jump") or v["goto"])["target"])
        return sets, chains

    def _one(self, t: dict[str, Any] | None, cmd: dict[str, Any]) -> dict[str, Any] | None:
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        if kind == "table":
            if verb == "add":
                return t or {"chains": {}, "sets": {}}
            assert t is not None, "delete of a missing table"
            return None
        assert t is not None, f"{verb} {kind}: no table"
        name = obj.get("name") or obj.get("chain")
        if kind == "chain":
            if verb == "add":
                t["chains"].setdefault(name, [])
            elif verb == "flush":
                assert name in t["chains"], f"flush of missing chain {name}"
                t["chains"][name] = []
            else:
                assert t["chains"].get(name) == [], f"delete of missing or non-empty chain {name}"
                del t["chains"][name]
                assert name not in self._referenced(t)[1], f"chain {name} deleted while referenced"
        elif kind == "quota":
            assert verb == "add", f"{verb} quota"
            t.setdefault("quotas", {})[name] = obj["bytes"]  # add = create or update in place
        elif kind in ("set", "map"):
            if verb == "add":
                t["sets"].setdefault(name, {})
            elif verb == "flush":
                assert name in t["sets"], f"flush of missing set {name}"
                t["sets"][name] = {}
            else:
                assert name in t["sets"], f"delete of missing set {name}"
                del t["sets"][name]
                assert name not in self._referenced(t)[0], f"set {name} deleted while referenced"
        elif kind == "element":
            assert name in t["sets"], f"element op on missing set {name}"
            for e in obj["elem"]:
                if isinstance(e, list):  # map element: [key, verdict]
                    key, val = e[0], e[1]
                    if not isinstance(key, str):
                        key = json.dumps(key, sort_keys=True)
                else:
                    key, val = (e if isinstance(e, str) else json.dumps(e, sort_keys=True)), True
                if verb == "add":
                    if isinstance(val, dict):
                        target = (val.get("jump") or val["goto"])["target"]
                        assert target in t["chains"], f"map jump to missing chain {val}"
                    t["sets"][name][key] = val
                else:
                    assert key in t["sets"][name], f"delete of missing element {key} in {name}"
                    del t["sets"][name][key]
        elif kind == "rule":
            assert obj["chain"] in t["chains"], f"rule in missing chain {obj['chain']}"
            sets, chains = self._refs(obj)
            assert sets <= t["sets"].keys(), f"rule references missing sets {sets - t['sets'].keys()}"
            assert chains <= t["chains"].keys(), (
                f"rule references missing chains {chains - t['chains'].keys()}"
            )
            t["chains"][obj["chain"]].append({"expr": obj["expr"], "comment": obj.get("comment")})
        return t

    def ops(self, ops: list[Op]) -> None:
        """A raw netlink batch (nlbatch.py): all or nothing, like the kernel's transaction."""
        self.apply([op.as_json("inet", "omniwall") for op in ops if op.sends])

    def listing(self) -> list[dict[str, Any]]:
        """The table as libnftables lists it: sets (with elements), maps, quotas, rules (with comments)."""
        assert self.t is not None, "no table"
        out: list[dict[str, Any]] = []
        for name, elems in self.t["sets"].items():
            if any(isinstance(v, dict) for v in elems.values()):
                out.append({"map": {"name": name}})
            else:
                out.append({"set": {"name": name, "elem": [k for k in elems if not k.startswith("{")]}})
        for name, value in self.t.get("quotas", {}).items():
            out.append({"quota": {"name": name, "bytes": value}})
        for chain, rules in self.t["chains"].items():
            out += [
                {"rule": {"chain": chain, **({"comment": r["comment"]} if r["comment"] else {})}}
                for r in rules
            ]
        return out

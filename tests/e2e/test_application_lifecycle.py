"""Application lifecycle end to end: deleting an Application through the API deletes every Group, Service
and Policy it owns in one audited store txn, and every host's kernel drops exactly the corresponding
rules and sets; nothing else changes, and other applications' and tenants' flows keep working (an open
connection of theirs included).

examples/vdi in the managed lab (manager + one agent per host namespace, nftables backend). The kernel
tables are read back through libnftables' JSON API (`omniwall.dataplane.nft.libnft.Nft`) in each host
namespace. Needs root; skipped, visibly, otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# the helpers of the identity/posture e2e tests (pytest puts this directory on sys.path, as tests/kernel
# does for topo.py)
from test_identity_posture import Source, identity, stream

from labhelpers import NEEDS_ROOT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vdi"
OWNED = {("Group", "hr-users"), ("Group", "hr-app"), ("Service", "hr-web"), ("Policy", "hr")}

pytestmark = NEEDS_ROOT


@pytest.fixture(scope="module")
def managed() -> Iterator[tuple[Any, Any]]:
    from omniwall.lab import netns
    from omniwall.lab.managed import control_dir, managed_lab

    with managed_lab([EXAMPLE], ipv6=False) as (lab, cp):
        yield lab, cp
    assert netns.list_names(lab.prefix) == [], "the lab's namespaces outlived it"
    assert not control_dir(lab.prefix).exists(), "the lab's manager/agents directory outlived it"


# ------------------------------------------------------------------------------------------ kernel view


def _strip_counters(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: ({} if k == "counter" else _strip_counters(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [_strip_counters(v) for v in x]
    return x


class Table:
    """One host's `table inet omniwall` as libnftables lists it: rules per chain (without handles and
    counter values), set elements, and the chains that exist. The agent's own bookkeeping chains (the
    realized state and revision) are left out: they change with every revision by design."""

    def __init__(self, listing: list[dict[str, Any]]) -> None:
        from omniwall.dataplane.nft.names import REV_CHAIN, STATE_CHAIN

        self.chains: set[str] = set()
        self.rules: dict[str, list[tuple[str, str]]] = {}  # chain -> [(comment, expr json)]
        self.sets: dict[str, list[str]] = {}  # set or map name -> elements (json)
        for obj in listing:
            if "chain" in obj:
                self.chains.add(obj["chain"]["name"])
            elif "rule" in obj:
                r = obj["rule"]
                if r["chain"] in (STATE_CHAIN, REV_CHAIN):
                    continue
                expr = json.dumps(_strip_counters(r.get("expr", [])), sort_keys=True)
                self.rules.setdefault(r["chain"], []).append((str(r.get("comment", "")), expr))
            elif "set" in obj or "map" in obj:
                s = obj.get("set") or obj["map"]
                self.sets[s["name"]] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))

    def rule_ids(self) -> Counter[str]:
        """Policy rules are the ones whose comment is their numeric rule id."""
        return Counter(c for rules in self.rules.values() for c, _ in rules if c.isdigit())

    def policy_rules(self) -> Counter[tuple[str, str]]:
        return Counter((c, e) for rules in self.rules.values() for c, e in rules if c.isdigit())


def is_index(name: str) -> bool:
    """Objects of the nft hop index (dataplane/nft/render_index.py)."""
    return name.startswith(("ipc", "mx", "m_any_", "xe_", "xi_", "px_"))


def read_table(lab: Any, host: str) -> Table:
    from omniwall.dataplane.nft.libnft import Nft
    from omniwall.dataplane.nft.names import FAMILY, TABLE

    nft = Nft(lab.host_netns(host))
    try:
        listing = nft.list_table(FAMILY, TABLE)
    finally:
        nft.close()
    assert listing is not None, f"no table on {host}"
    return Table(listing)


def kernel_set_names(ir_set: str) -> set[str]:
    from omniwall.dataplane.nft.names import addr_set, cidr_set

    return {addr_set(ir_set, 4), addr_set(ir_set, 6), cidr_set(ir_set, 4), cidr_set(ir_set, 6)}


def owned_by_hr(cp: Any, host: str) -> tuple[set[str], set[str], set[str]]:
    """From the host's desired state: the hr policy's rule ids, the kernel sets only those rules use,
    and the host-side interfaces whose chains carry an hr rule."""
    st = cp.api("GET", f"/v1/hosts/{host}/desired")
    rules = st["rules"]
    hr = {r["id"] for r in rules if r["tenant"] == "corp" and r["policy"] == "hr"}
    used_by_hr = {r[k] for r in rules if r["id"] in hr for k in ("src_set", "dst_set") if r[k]}
    used_by_others = {r[k] for r in rules if r["id"] not in hr for k in ("src_set", "dst_set") if r[k]}
    sets = set().union(*(kernel_set_names(s) for s in used_by_hr - used_by_others)) if used_by_hr else set()
    sets |= _port_sets_only_of(st, hr)
    ifnames = {v["ifname"] for v in st["vnics"] if hr & set(v["egress"]) | hr & set(v["ingress"])}
    return {str(i) for i in hr}, sets, ifnames


def _port_sets_only_of(state_json: dict[str, Any], ids: set[int]) -> set[str]:
    """Named port sets (shared by every rule with the same port list) that only `ids` use."""
    from dataclasses import replace

    from omniwall.compiler.ir import HostDesiredState
    from omniwall.dataplane.nft.render import port_sets

    st = HostDesiredState.from_json(state_json)
    mine = replace(st, rules=tuple(r for r in st.rules if r.id in ids))
    others = replace(st, rules=tuple(r for r in st.rules if r.id not in ids))
    return set(port_sets(mine)) - set(port_sets(others))


# ------------------------------------------------------------------------------------------ the test


def test_deleting_an_application_cascades_to_every_kernel(managed: tuple[Any, Any]) -> None:
    lab, cp = managed
    hosts = [h.name for h in lab.plan.hosts]
    idp = Source(cp, "identity-source")
    try:
        identity(idp, "corp/vdi-7", "alice", "login")  # the hr policy is now on both hosts
    finally:
        idp.close()
    assert lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443)

    owned = {h: owned_by_hr(cp, h) for h in hosts}
    before = {h: read_table(lab, h) for h in hosts}
    for h in hosts:
        ids, sets, ifnames = owned[h]
        assert ids and ifnames, f"{h}: the hr policy should be realized here"
        assert set(before[h].rule_ids()) >= ids
        assert sets & set(before[h].sets), f"{h}: the hr sets should be in the kernel"

    with stream(lab, "corp/vdi-8", "corp/wiki-1", 8080) as wiki:
        assert wiki.delivering()
        out = cp.api("DELETE", "/v1/applications/hr", params={"tenant": "corp"})
        cp.wait_in_sync(revision=out["revision"], timeout=30)

        # the store: one txn, one audited request, everything the Application owned
        deleted = {(d["kind"], d["name"]) for d in out["deleted"]}
        assert deleted == {("Application", "hr"), *OWNED}
        entries = [
            e
            for e in cp.api("GET", "/v1/audit", params={"tenant": "corp"})["items"]
            if e["revision"] == out["revision"]
        ]
        assert {(e["kind"], e["name"]) for e in entries} == deleted
        assert len({e["request"] for e in entries}) == 1 and {e["action"] for e in entries} == {"delete"}
        assert all(e.get("extra", {}).get("cascade") for e in entries if e["kind"] != "Application")
        for kind, name in OWNED:
            plural = {"Group": "groups", "Service": "services", "Policy": "policies"}[kind]
            r = cp.client().get(f"/v1/{plural}/{name}", params={"tenant": "corp"})
            assert r.status_code == 404, (kind, name, r.status_code)
        assert cp.api("GET", "/v1/applications/wiki", params={"tenant": "corp"})["metadata"]["name"] == "wiki"

        # every kernel: the hr rules and sets are gone, nothing else changed
        after = {h: read_table(lab, h) for h in hosts}
        for h in hosts:
            ids, sets, ifnames = owned[h]
            b, a = before[h], after[h]
            assert not ids & set(a.rule_ids()), f"{h}: hr rules left in the kernel"
            assert not sets & set(a.sets), f"{h}: hr sets left in the kernel: {sets & set(a.sets)}"
            left = b.policy_rules() - Counter({k: v for k, v in b.policy_rules().items() if k[0] in ids})
            assert a.policy_rules() == left, f"{h}: other policy rules changed"
            # the hop index (ipcache, per-identity maps and chains, path chains) follows the rules: it
            # may change where hr's rules were; everything else must not
            assert {n: e for n, e in a.sets.items() if not is_index(n)} == {
                n: e for n, e in b.sets.items() if n not in sets and not is_index(n)
            }, f"{h}: other sets or dispatch maps changed"
            untouched = {
                c
                for c in b.chains
                if not any(i in c for i in ifnames) and not is_index(c) and not c.startswith("_state")
            }  # _state*: the stored IR (header and buckets), bookkeeping that follows every change
            assert {c: a.rules.get(c) for c in untouched} == {c: b.rules.get(c) for c in untouched}, (
                f"{h}: chains of vNICs the hr policy never touched changed"
            )

        # flows: hr is gone, the rest works, an open connection of the wiki app survived
        assert wiki.delivering(), f"{wiki.name} was cut: {wiki.errors}"
    assert not lab.probe("corp/vdi-7", "corp/hr-app-1", "tcp", 443, timeout=0.5)
    assert lab.probe("corp/vdi-7", "corp/wiki-1", "tcp", 80)
    assert lab.probe("corp/vdi-8", "corp/wiki-1", "tcp", 80)
    assert lab.probe("partner/web-1", "partner/db-1", "tcp", 5432)
    assert not lab.probe("partner/web-1", "corp/wiki-1", "tcp", 80, timeout=0.5)

"""Issue 9, findings 1 and 2 (High): a tenant could attach its chains to any host interface, and one
address nftables cannot load (an IPv6 zone id) blocked every later change on the host.

Defence in depth, each layer tested here: the schema (strict address grammar, `lo` never a vNIC), the
manager's validation (only the Host's `spec.vnicInterfaces` patterns), the API (a tenant admin's writes are
refused with the field named, nothing stored), and the agent's guard (refuses what slipped through; the
rest of the host converges).
"""

from __future__ import annotations

import dataclasses

import pytest
from apihelpers import auth, blank_client, issue_tokens, seeded_manager, use_manager, yaml_docs
from fastapi.testclient import TestClient

from omniwall.agent.guard import Guard
from omniwall.agent.reconciler import Reconciler
from omniwall.compiler.ir import HostDelta, IRRule, IRSet, IRVnic, SetUpdate, VnicUpdate
from omniwall.dataplane.memory_backend import MemoryBackend
from omniwall.model.errors import ValidationError
from omniwall.model.inet import kernel_address_ok, kernel_network_ok, parse_ip
from omniwall.model.interfaces import check_pattern, interface_allowed
from omniwall.model.loader import load_text
from omniwall.model.validate import validate
from omniwall.store.memory import MemoryStore

WORLD = """
kind: Tenant
metadata: {name: tenant-a}
---
kind: Host
metadata: {name: host-1}
---
kind: Host
metadata: {name: host-2}
spec: {vnicInterfaces: ["cali*"]}
"""


def errors_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as ei:
        validate(load_text(text, "t.yaml"))
    return [(e.path, e.message) for e in ei.value.errors]


def workload(vnic: str, host: str = "host-1") -> str:
    return yaml_docs(
        WORLD,
        f"kind: Workload\nmetadata: {{name: w, tenant: tenant-a}}\nspec: {{host: {host}, vnics: [{vnic}]}}",
    )


# ------------------------------------------------------------------------------------ schema and model


@pytest.mark.parametrize(
    "vnic, path",
    [
        ("{name: eth0, ips: [10.9.0.8], hostIfname: eth0}", "spec.vnics[0].hostIfname"),
        ("{name: eth0, ips: [10.9.0.8], hostIfname: br0}", "spec.vnics[0].hostIfname"),
        ("{name: eth0, ips: [10.9.0.8], hostIfname: lo}", "spec.vnics[0].hostIfname"),
        ("{name: eth0, ips: ['fe80::1%eth0']}", "spec.vnics[0].ips"),
    ],
)
def test_a_tenant_cannot_attach_to_host_interfaces_or_load_zone_ids(vnic: str, path: str) -> None:
    errs = errors_of(workload(vnic))
    assert [p for p, _ in errs] == [path]


def test_interface_errors_say_why() -> None:
    [(_, msg)] = errors_of(workload("{name: eth0, ips: [10.9.0.8], hostIfname: eth0}"))
    assert "not one host 'host-1' allows for vNICs" in msg and "tap*" in msg
    [(_, msg)] = errors_of(workload("{name: eth0, ips: [10.9.0.8], hostIfname: lo}"))
    assert "host's own interface" in msg
    [(_, msg)] = errors_of(workload("{name: eth0, ips: ['fe80::1%eth0']}"))
    assert "zone ids" in msg


def test_host_patterns_are_the_providers_choice() -> None:
    ok = workload("{name: eth0, ips: [10.9.0.8], hostIfname: cali123}", host="host-2")
    validate(load_text(ok, "t.yaml"))
    # the default patterns do not hold on a host that declared its own
    [(path, _)] = errors_of(workload("{name: eth0, ips: [10.9.0.8], hostIfname: tap1}", host="host-2"))
    assert path == "spec.vnics[0].hostIfname"
    # a derived name (ow + hash) is outside cali*: the provider must allow it explicitly
    [(path, _)] = errors_of(workload("{name: eth0, ips: [10.9.0.8]}", host="host-2"))
    assert path == "spec.vnics[0].name"


@pytest.mark.parametrize("pattern", ["*", "?*", "", "eth0 ", "a/b", "x" * 16])
def test_patterns_that_match_everything_or_nothing_sane_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_pattern(pattern)


@pytest.mark.parametrize(
    "doc, path",
    [
        ("kind: Group\nmetadata: {name: g, tenant: tenant-a}\nspec: {cidrs: ['fe80::%1/64']}", "spec.cidrs"),
        (
            "kind: Policy\nmetadata: {name: p, tenant: tenant-a}\nspec:\n  rules:\n"
            "  - {name: r, sources: ['fe80::1%eth0'], action: allow}",
            "spec.rules[0].sources",
        ),
        ("kind: Host\nmetadata: {name: h9}\nspec: {address: 'fe80::1%eth0'}", "spec.address"),
    ],
)
def test_zone_ids_are_refused_everywhere_an_address_goes(doc: str, path: str) -> None:
    errs = errors_of(yaml_docs(WORLD, doc))
    assert [p for p, _ in errs] == [path]
    assert "zone ids" in errs[0][1]


def test_narrowing_a_hosts_patterns_cannot_strand_its_workloads() -> None:
    world = workload("{name: eth0, ips: [10.9.0.8], hostIfname: tap1}")
    existing = validate(load_text(world, "t.yaml"))
    narrowed = load_text("kind: Host\nmetadata: {name: host-1}\nspec: {vnicInterfaces: [vnet*]}", "h.yaml")
    with pytest.raises(ValidationError) as ei:
        validate(narrowed, existing=existing)
    [e] = ei.value.errors
    assert e.path == "spec.vnicInterfaces" and "tap1" in e.message


def test_kernel_grammar_checks() -> None:
    assert kernel_address_ok("10.0.0.1") and kernel_address_ok("2001:db8::1")
    for bad in ("fe80::1%eth0", "10.0.0.01", "1.2.3", "host-1", "", "10.0.0.1 "):
        assert not kernel_address_ok(bad), bad
    assert kernel_network_ok("10.0.0.0/8") and kernel_network_ok("2001:db8::/32")
    for bad in ("10.0.0.0/33", "fe80::%1/64", "10.0.0.0", "10.0.0.0/x", "::/129"):
        assert not kernel_network_ok(bad), bad
    with pytest.raises(ValueError, match="zone ids"):
        parse_ip("fe80::1%eth0")
    assert interface_allowed("tap7", ("tap*",)) and not interface_allowed("lo", ("l*",))


# ------------------------------------------------------------------------------------------------- API


API_WORLD = yaml_docs(WORLD)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return blank_client()


@pytest.mark.parametrize(
    "vnic, field",
    [
        ({"name": "eth0", "ips": ["10.9.0.8"], "hostIfname": "lo"}, "hostIfname"),
        ({"name": "eth0", "ips": ["10.9.0.8"], "hostIfname": "eth0"}, "hostIfname"),
        ({"name": "eth0", "ips": ["fe80::1%eth0"]}, "ips"),
    ],
)
def test_api_refuses_a_tenant_admin_and_stores_nothing(client: TestClient, vnic: dict, field: str) -> None:
    m = seeded_manager(MemoryStore(), API_WORLD)
    use_manager(client, m)
    tokens = issue_tokens(m, {"ta": ("tenant-admin", {"tenant": "tenant-a"})})
    before = m.store.revision
    body = {
        "kind": "Workload",
        "metadata": {"name": "evil", "tenant": "tenant-a"},
        "spec": {"host": "host-1", "vnics": [vnic]},
    }
    r = client.post("/v1/workloads", json=body, headers=auth(tokens["ta"]))
    assert r.status_code == 422, r.text
    assert field in r.text
    assert m.store.revision == before


# ----------------------------------------------------------------------------------------- agent guard


def _rule(rid: int, src: str | None) -> IRRule:
    return IRRule(rid, "t", "p", f"r{rid}", "application", "allow", src, None)


def _vnic(ifname: str, addresses: tuple[str, ...], egress: tuple[int, ...] = ()) -> IRVnic:
    return IRVnic(ifname, f"t/{ifname}", "t", addresses, egress, ())


def _state(vnics: list[IRVnic], rules: list[IRRule], sets: list[IRSet], rev: int = 1):
    from omniwall.compiler.ir import HostDesiredState

    return HostDesiredState(
        "h",
        rev,
        tuple(sorted(vnics, key=lambda v: v.ifname)),
        tuple(sorted(rules, key=lambda r: r.id)),
        tuple(sorted(sets, key=lambda s: s.name)),
    )


GOOD = _vnic("ow-good", ("10.0.0.1",), (1,))
OK_SET = IRSet("ok", ("10.0.0.9",))


def test_guard_leaves_a_clean_state_alone() -> None:
    s = _state([GOOD], [_rule(1, "ok")], [OK_SET])
    g = Guard().check(s)
    assert g.clean and g.state is s


def test_guard_does_not_attach_a_host_interface() -> None:
    s = _state([GOOD, _vnic("lo", ("10.9.0.8",), (2,))], [_rule(1, "ok"), _rule(2, None)], [OK_SET])
    g = Guard().check(s)
    assert [v.ifname for v in g.state.vnics] == ["ow-good"]
    assert [r.id for r in g.state.rules] == [1]
    [ref] = g.refusals
    assert ref.ifname == "lo" and ref.action == "not attached"


def test_guard_fails_closed_on_what_the_kernel_cannot_load() -> None:
    bad_set = IRSet("bad", ("10.0.0.7", "fe80::1%eth0"))
    s = _state(
        [GOOD, _vnic("ow-bad", ("10.0.0.2",), (3,)), _vnic("ow-zone", ("fe80::2%eth0",), (1,))],
        [_rule(1, "ok"), _rule(3, "bad")],
        [OK_SET, bad_set],
    )
    g = Guard().check(s)
    by = g.state.vnic_map()
    assert by["ow-good"] == GOOD  # the rest of the host converges
    for name in ("ow-bad", "ow-zone"):
        v = by[name]
        assert (v.addresses, v.egress, v.ingress, v.default_action) == ((), (), (), "drop")
    assert {r.ifname for r in g.refusals} == {"ow-bad", "ow-zone"}
    assert "bad" not in g.state.set_map()  # no rule left uses it
    assert all(kernel_address_ok(a) for x in g.state.sets for a in x.addresses)


def test_guard_checks_what_a_delta_adds() -> None:
    guard = Guard()
    clean = HostDelta("h", 1, 2, set_updates=(SetUpdate(OK_SET.name, added_addresses=("10.0.0.9",)),))
    assert guard.delta_clean(clean)
    zone = HostDelta("h", 1, 2, set_updates=(SetUpdate(OK_SET.name, added_addresses=("fe80::1%eth0",)),))
    assert not guard.delta_clean(zone)
    eth0 = HostDelta("h", 1, 2, vnic_updates=(VnicUpdate(_vnic("eth0", ("10.0.0.3",))),))
    assert not guard.delta_clean(eth0)


def test_reconciler_keeps_converging_past_a_poisoned_object() -> None:
    be = MemoryBackend(host="h")
    rec = Reconciler(be, "h")
    s1 = _state([GOOD], [_rule(1, "ok")], [OK_SET])
    assert rec.on_snapshot(s1).kind == "synced" and rec.error is None
    # a poisoned vNIC arrives: the rest is realized, the poisoned one is refused and reported
    evil = _vnic("eth0", ("10.9.0.8",))
    d2 = HostDelta("h", 1, 2, vnic_updates=(VnicUpdate(evil),))
    out = rec.on_delta(d2)
    assert out.kind == "synced" and out.realized_revision == 2
    assert "eth0" not in be.realized().vnic_map()  # type: ignore[union-attr]
    assert rec.error is not None and "eth0" in rec.error and rec.in_sync
    # later changes for everyone else still reach the data plane
    grown = dataclasses.replace(OK_SET, addresses=("10.0.0.10", "10.0.0.9"))  # sorted, as the IR keeps them
    d3 = HostDelta("h", 2, 3, set_updates=(SetUpdate(grown.name, added_addresses=("10.0.0.10",)),))
    assert rec.on_delta(d3).realized_revision == 3
    assert be.realized().set_map()["ok"] == grown  # type: ignore[union-attr]
    # the poisoned vNIC goes away: the error clears, deltas take the incremental path again
    from omniwall.compiler.ir import VnicRemove

    assert rec.on_delta(HostDelta("h", 3, 4, vnic_removes=(VnicRemove("eth0"),))).kind == "synced"
    assert rec.error is None
    d5 = HostDelta("h", 4, 5, set_updates=(SetUpdate(OK_SET.name, removed_addresses=("10.0.0.10",)),))
    assert rec.on_delta(d5).kind == "applied"

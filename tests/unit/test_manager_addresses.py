"""Addresses follow the workload (manager/addresses.py): an agent's address report re-addresses the
Workload in one audited txn; other hosts get set-element deltas only; bad or partial reports change
nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apihelpers import (
    ACME_TWO_HOSTS,
    ADMIN_AND_AGENTS,
    WEB_TO_DB_SQL,
    issue_tokens,
    seeded_manager,
    yaml_docs,
)
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.manager.addresses import merged, observed_ips
from omniwall.manager.service import Manager
from omniwall.model.resources import Workload, vnic_ifname
from omniwall.store.sqlite import SqliteStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = yaml_docs(
    ACME_TWO_HOSTS,
    """
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}, {name: eth1, ips: [10.9.0.1]}]}
---
kind: Workload
metadata: {name: db1, tenant: acme, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
---
kind: Workload
metadata: {name: web2, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.2]}]}
""",
    WEB_TO_DB_SQL,
)

Env = tuple[TestClient, Manager, dict[str, str]]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = SqliteStore(tmp_path / "m.db")
    m = seeded_manager(store, WORLD)
    tokens = issue_tokens(m, {**ADMIN_AND_AGENTS, "h1": ("agent", {"host": "h1", "name": "lab-h1"})})
    m.sync()  # the model's revision includes the token writes: revisions below compare exactly
    headers = {k: f"Bearer {v}" for k, v in tokens.items()}
    yield TestClient(create_app(m, watch=False)), m, headers
    store.close()


def _web1(m: Manager, name: str = "web1") -> Workload:
    w = m.get("Workload", "acme", name)
    assert isinstance(w, Workload)
    return w


def _ifname(m: Manager, vnic: int = 0, name: str = "web1") -> str:
    w = _web1(m, name)
    return vnic_ifname(w, w.spec.vnics[vnic])


def _report(c: TestClient, h: dict[str, str], host: str, addresses: Any, realized: int = 0) -> Any:
    r = c.post(
        f"/v1/hosts/{host}/status",
        json={"realized_revision": realized, "addresses": addresses},
        headers={"Authorization": h[host]},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _set(m: Manager, host: str, name: str) -> tuple[str, ...]:
    st = m.desired_state(host)
    assert st is not None
    return next(s.addresses for s in st.sets if s.name == name)


def _web_set_name(m: Manager) -> str:
    """The set db1's ingress rule reads its sources from (on h2)."""
    st = m.desired_state("h2")
    assert st is not None
    (rule,) = [r for r in st.rules if r.policy == "web-db"]
    assert rule.src_set is not None
    return rule.src_set


def test_changed_address_rewrites_the_workload_and_moves_set_elements(env: Env) -> None:
    c, m, h = env
    set_name = _web_set_name(m)
    assert "10.0.0.1" in _set(m, "h2", set_name)
    h2_before = m.desired_state("h2")
    h1_before = m.desired_state("h1")
    assert h2_before is not None and h1_before is not None
    before = m.revision

    _report(c, h, "h1", {_ifname(m): ["10.0.0.7"], _ifname(m, 1): ["10.9.0.1"]})

    assert m.revision == before + 1  # one txn
    assert _web1(m).spec.vnics[0].ips == ["10.0.0.7"]
    assert _web1(m).spec.vnics[1].ips == ["10.9.0.1"]  # unchanged vNIC stays
    web_set = _set(m, "h2", set_name)
    assert "10.0.0.7" in web_set and "10.0.0.1" not in web_set  # the old IP stops matching
    # h2 (a remote host that references web): set elements only, no rule or vNIC change
    (delta,) = m.desired.deltas_since("h2", h2_before.revision) or []
    assert delta.set_updates and not delta.rule_updates and not delta.rule_removes
    assert not delta.vnic_updates and not delta.vnic_removes
    assert delta.set_updates[0].added_addresses == ("10.0.0.7",)
    assert delta.set_updates[0].removed_addresses == ("10.0.0.1",)
    # h1: web1's vNIC may now send from its new address only (anti-spoofing), rules untouched
    h1_after = m.desired_state("h1")
    assert h1_after is not None
    vnic = next(v for v in h1_after.vnics if v.ifname == _ifname(m))
    assert vnic.addresses == ("10.0.0.7",)
    assert h1_after.rules == h1_before.rules

    # audited as the agent of h1, once, naming the field
    audit = c.get(
        "/v1/audit", params={"kind": "Workload", "name": "web1"}, headers={"Authorization": h["admin"]}
    )
    entries = [e for e in audit.json()["items"] if e["action"] == "update"]
    assert len(entries) == 1
    assert entries[0]["actor"] == "agent:h1" and entries[0]["role"] == "agent"
    assert entries[0]["changed"] == ["spec.vnics"]


def test_absent_empty_or_invalid_reports_change_nothing(env: Env) -> None:
    c, m, h = env
    before = m.revision
    for addresses in (
        {},
        {_ifname(m): []},
        {_ifname(m): None},
        {_ifname(m): "10.0.0.7"},
        {_ifname(m): ["not-an-ip", 7]},
        {"ow-unknown": ["10.0.0.7"]},
        {_ifname(m): ["10.0.0.1"]},  # same as the model
    ):
        _report(c, h, "h1", addresses)
    assert m.revision == before
    assert _web1(m).spec.vnics[0].ips == ["10.0.0.1"]


def test_only_the_workloads_own_host_may_readdress_it(env: Env) -> None:
    c, m, h = env
    before = m.revision
    _report(c, h, "h2", {_ifname(m): ["10.0.0.66"]})  # h2 sees a route to web1's ifname? not web1's host
    assert m.revision == before and _web1(m).spec.vnics[0].ips == ["10.0.0.1"]


def test_same_addresses_in_another_order_write_nothing(env: Env) -> None:
    c, m, h = env
    _report(c, h, "h1", {_ifname(m): ["10.0.0.1", "10.0.0.3"]})
    assert _web1(m).spec.vnics[0].ips == ["10.0.0.1", "10.0.0.3"]  # kept first, new one after
    before = m.revision
    _report(c, h, "h1", {_ifname(m): ["10.0.0.3", "10.0.0.1"]})
    assert m.revision == before


def test_an_address_of_another_workload_is_refused_but_the_ack_lands(env: Env) -> None:
    c, m, h = env
    before = m.revision
    out = _report(c, h, "h1", {_ifname(m): ["10.0.1.1"]}, realized=m.desired.revision("h1"))  # db1's IP
    assert out["realizedRevision"] == m.desired.revision("h1")
    assert m.revision == before and _web1(m).spec.vnics[0].ips == ["10.0.0.1"]
    # ...while a good entry in the same report for another workload still lands
    _report(c, h, "h1", {_ifname(m): ["10.0.1.1"], _ifname(m, name="web2"): ["10.0.0.22"]})
    assert _web1(m, "web2").spec.vnics[0].ips == ["10.0.0.22"]
    assert _web1(m).spec.vnics[0].ips == ["10.0.0.1"]


def test_helpers() -> None:
    assert observed_ips(["10.0.0.1", " 10.0.0.1", "fd00::0001"]) == ["10.0.0.1", "fd00::1"]
    assert observed_ips([]) is None and observed_ips("10.0.0.1") is None and observed_ips(["x"]) is None
    assert merged(["10.0.0.2", "10.0.0.1"], ["fd00::1", "10.0.0.1", "10.0.0.3"]) == [
        "10.0.0.1",
        "10.0.0.3",
        "fd00::1",
    ]

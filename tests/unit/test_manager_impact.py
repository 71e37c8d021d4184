"""The dry run's impact comes from the compiler's deltas (`Manager.preview`: apply to the incremental
compiler, take back): it must equal the impact of a full compile of the plan's catalog, for the
provider's and a tenant's view, and leave the compiler exactly where it was (later deltas still equal
a fresh compile)."""

from __future__ import annotations

from pathlib import Path

from apihelpers import ACME_TWO_HOSTS, WEB1_DB1, WEB_TO_DB_SQL, seeded_manager, yaml_docs

from omniwall.api.impact import impact, tenant_impact
from omniwall.compiler.build import compile_catalog
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.sqlite import SqliteStore

WORLD = yaml_docs(
    ACME_TWO_HOSTS,
    WEB1_DB1,
    """
kind: Tenant
metadata: {name: beta}
---
kind: Workload
metadata: {name: b1, tenant: beta, labels: {tier: web}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.2.1]}]}
""",
    WEB_TO_DB_SQL,
)

CHANGES = [
    # a member joins (set elements only)
    "kind: Workload\nmetadata: {name: web2, tenant: acme, labels: {tier: web}}\n"
    "spec: {host: h2, vnics: [{name: eth0, ips: [10.0.0.2]}]}",
    # a rule changes, a rule is added
    "kind: Policy\nmetadata: {name: web-db, tenant: acme}\nspec:\n  rules:\n"
    "  - {name: sql, sources: [web], destinations: [db], services: [tcp/5433], action: allow}\n"
    "  - {name: ssh, sources: [any], destinations: [web], services: [tcp/22], action: drop}",
    # a new host with a workload, another tenant's policy
    "kind: Host\nmetadata: {name: h3}\n---\n"
    "kind: Workload\nmetadata: {name: b2, tenant: beta, labels: {tier: db}}\n"
    "spec: {host: h3, vnics: [{name: eth0, ips: [10.0.2.2]}]}\n---\n"
    "kind: Policy\nmetadata: {name: p, tenant: beta}\nspec:\n  rules:\n"
    "  - {name: r, sources: [any], destinations: [any], action: allow}",
]


def _full_manager(tmp_path: Path, name: str) -> Manager:
    """A manager whose compile is the whole-catalog one (the previous dry-run path)."""

    def compile_fn(catalog, revision):  # type: ignore[no-untyped-def]
        return compile_catalog(catalog, revision)

    return Manager(SqliteStore(tmp_path / name), compile_fn=compile_fn)


def test_impact_from_deltas_equals_impact_of_a_full_compile(tmp_path: Path) -> None:
    m = Manager(SqliteStore(tmp_path / "inc.db"))
    ref = _full_manager(tmp_path, "full.db")
    for mm in (m, ref):
        mm.commit(mm.plan_apply(load_documents(WORLD, "world")), SYSTEM)
    for text in CHANGES:
        plan, ref_plan = (x.plan_apply(load_documents(text, "change")) for x in (m, ref))
        got, want = impact(m, plan), impact(ref, ref_plan)
        assert got == want and got["hosts"], text
        for tenant in ("acme", "beta"):
            assert tenant_impact(m, plan, tenant) == tenant_impact(ref, ref_plan, tenant), (text, tenant)
        # the preview left the compiler where it was: committing gives a fresh compile's states
        for x, p in ((m, plan), (ref, ref_plan)):
            x.commit(p, SYSTEM)
        fresh = compile_catalog(m.catalog, m.revision)
        assert {h: s.vnics for h, s in m.desired.all().items()} == {h: s.vnics for h, s in fresh.items()}
        assert {h: (s.rules, s.sets) for h, s in m.desired.all().items()} == {
            h: (s.rules, s.sets) for h, s in fresh.items()
        }


def test_a_preview_sends_nothing_to_the_feeds(tmp_path: Path) -> None:
    m = seeded_manager(SqliteStore(tmp_path / "m.db"), WORLD)
    revs = m.desired.revisions()
    assert impact(m, m.plan_apply(load_documents(CHANGES[1], "c")))["hosts"]
    assert m.desired.revisions() == revs
    assert all(m.desired.deltas_since(h, r) == [] for h, r in revs.items())

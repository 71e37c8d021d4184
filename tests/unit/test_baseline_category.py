"""The provider `baseline` category (docs/semantics.md §1, §4): after the tenant's own rules, before its
default action; provider only; no `pass`. Validated, compiled and judged by the real code paths."""

from __future__ import annotations

import json

import pytest
from apihelpers import auth, blank_client, issue_tokens, seeded_manager, use_manager

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import CATEGORIES, HostDesiredState
from omniwall.model.errors import ValidationError
from omniwall.model.loader import load_text
from omniwall.model.resources import CATEGORY_ORDER, PROVIDER_CATEGORIES, Category
from omniwall.model.validate import validate
from omniwall.sim.evaluate import judge_connection
from omniwall.sim.packet import Packet
from omniwall.store.memory import MemoryStore

INVENTORY = """
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Tenant
metadata: {name: t}
spec: {defaultAction: DEFAULT}
---
kind: Workload
metadata: {name: a, tenant: t, labels: {role: a}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: b, tenant: t, labels: {role: b}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.0.2]}]}
---
kind: Group
metadata: {name: b, tenant: t}
spec: {selector: 'role == "b"'}
---
kind: Group
metadata: {name: all-b}
spec: {selector: 'role == "b"'}
"""

BASELINE_DROP = """
kind: Policy
metadata: {name: base}
spec:
  category: baseline
  rules:
    - {name: no-b, destinations: [all-b], services: [tcp/80], action: drop}
"""


def states(*extra: str, default: str = "allow") -> dict[str, HostDesiredState]:
    text = "\n---\n".join([INVENTORY.replace("DEFAULT", default), *extra])
    return compile_catalog(validate(load_text(text, "test.yaml")))


def a_to_b(s: dict[str, HostDesiredState], port: int = 80) -> tuple[str, str | None]:
    """(verdict, deciding rule label or 'default') of the connection a -> b."""
    v = judge_connection(s, Packet("10.0.0.1", "10.0.0.2", "tcp", sport=40000, dport=port))
    hop = v.request.denied_at or v.request.hops[-1]
    return v.verdict, hop.rule.label if hop.rule else "default"


def test_category_order_and_provider_ownership() -> None:
    assert CATEGORIES[-1] == "baseline" and [c.value for c in CATEGORY_ORDER] == list(CATEGORIES)
    assert Category.BASELINE in PROVIDER_CATEGORIES


def test_baseline_applies_when_the_tenant_says_nothing() -> None:
    s = states(BASELINE_DROP)
    assert a_to_b(s) == ("drop", "infra/base/no-b")
    assert a_to_b(s, 81) == ("allow", "default")  # the baseline does not match: the tenant default


def test_a_tenant_allow_overrides_the_baseline() -> None:
    allow = """
kind: Policy
metadata: {name: app, tenant: t}
spec:
  rules: [{name: web, destinations: [b], services: [tcp/80], action: allow}]
"""
    s = states(BASELINE_DROP, allow)
    assert a_to_b(s) == ("allow", "t/app/web")


def test_baseline_allow_comes_before_a_drop_default() -> None:
    text = """
kind: Policy
metadata: {name: base}
spec:
  category: baseline
  rules: [{name: ok, destinations: [all-b], services: [tcp/80], action: allow}]
"""
    s = states(text, default="drop")
    assert a_to_b(s) == ("allow", "infra/base/ok")
    assert a_to_b(s, 81) == ("drop", "default")


def test_pass_in_application_falls_through_to_baseline() -> None:
    passing = """
kind: Policy
metadata: {name: app, tenant: t}
spec:
  rules:
    - {name: hand-down, destinations: [b], action: pass}
    - {name: never, destinations: [b], action: allow}
"""
    s = states(BASELINE_DROP, passing)
    assert a_to_b(s) == ("drop", "infra/base/no-b")
    assert a_to_b(s, 81) == ("allow", "default")


def test_infrastructure_pass_reaches_the_tenant_then_the_baseline() -> None:
    infra_pass = """
kind: Policy
metadata: {name: infra-pass}
spec:
  category: infrastructure
  rules: [{name: to-tenant, destinations: [all-b], action: pass}]
"""
    s = states(BASELINE_DROP, infra_pass)
    assert a_to_b(s) == ("drop", "infra/base/no-b")


def test_compiled_order_puts_baseline_after_application_rules() -> None:
    rules = """
kind: Policy
metadata: {name: app, tenant: t}
spec:
  priority: 5000
  rules: [{name: late, destinations: [b], services: [tcp/9], action: allow}]
---
kind: Policy
metadata: {name: early}
spec:
  category: infrastructure
  rules: [{name: i, destinations: [all-b], services: [tcp/7], action: allow}]
"""
    # The baseline policy has the lowest priority of all and still comes last.
    base = BASELINE_DROP.replace("category: baseline", "category: baseline\n  priority: 0")
    s = states(base, rules)
    h2 = s["h2"]
    v = next(iter(h2.vnics))
    rule_map = h2.rule_map()
    assert [rule_map[i].category for i in v.ingress] == ["infrastructure", "application", "baseline"]


def test_baseline_pass_is_refused_naming_the_action() -> None:
    bad = BASELINE_DROP.replace("action: drop", "action: pass")
    with pytest.raises(ValidationError) as exc:
        states(bad)
    text = str(exc.value)
    assert "spec.rules[0].action" in text and "baseline" in text


def test_a_tenant_cannot_write_baseline() -> None:
    bad = """
kind: Policy
metadata: {name: mine, tenant: t}
spec:
  category: baseline
  rules: [{name: x, destinations: [b], action: drop}]
"""
    with pytest.raises(ValidationError) as exc:
        states(bad)
    assert "spec.category" in str(exc.value) and "baseline" in str(exc.value)


def test_the_api_refuses_baseline_policies_from_a_tenant() -> None:
    """`api/auth.py` reads PROVIDER_CATEGORIES: a tenant admin gets 403 naming the permission."""
    client = blank_client()
    m = seeded_manager(MemoryStore(), INVENTORY.replace("DEFAULT", "allow"))
    use_manager(client, m)
    tokens = issue_tokens(m, {"tenant": ("tenant-admin", {"tenant": "t"}), "admin": ("provider-admin", {})})
    mine = {
        "kind": "Policy",
        "metadata": {"name": "mine", "tenant": "t"},
        "spec": {"category": "baseline", "rules": [{"name": "x", "action": "drop"}]},
    }
    r = client.post("/v1/apply", content=json.dumps(mine), headers=auth(tokens["tenant"]))
    assert r.status_code == 403 and "baseline" in r.json()["message"]
    provider = {**mine, "metadata": {"name": "base", "tenant": "infra"}}
    r = client.post("/v1/apply", content=json.dumps(provider), headers=auth(tokens["admin"]))
    assert r.status_code == 200, r.text
    bad = {**provider, "spec": {"category": "baseline", "rules": [{"name": "x", "action": "pass"}]}}
    r = client.post("/v1/apply", content=json.dumps(bad), headers=auth(tokens["admin"]))
    assert r.status_code == 422 and "spec.rules[0].action" in r.text

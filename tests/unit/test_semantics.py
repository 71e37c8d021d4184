"""docs/semantics.md end to end, without a kernel: YAML -> validate -> compile_catalog -> sim.

Each test states one clause of the contract (DESIGN §4, docs/semantics.md §3-6) with the smallest YAML
that shows it, and checks the verdict of every hop and the rule that decided it.

World: tenants `a` and `b` (plus the provider `infra`), hosts h1 and h2.
  a/web 10.1.0.1 (h1)   a/app 10.1.0.2 (h2)   a/db 10.1.0.3 (h2)
  b/web 10.2.0.1 (h1)   b/app 10.2.0.2 (h2)
Groups `web`, `app`, `db` (by tier label) in each tenant; `infra/everyone` selects every workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from omniwall.compiler.build import compile_catalog
from omniwall.compiler.ir import IRVnic
from omniwall.model.catalog import Catalog
from omniwall.model.errors import ValidationError
from omniwall.model.loader import load_text
from omniwall.model.validate import validate
from omniwall.sim import Packet, judge_connection
from omniwall.sim.evaluate import Network, PathVerdict

OUTSIDE = "203.0.113.7"

IPS = {
    "a/web": "10.1.0.1",
    "a/app": "10.1.0.2",
    "a/db": "10.1.0.3",
    "b/web": "10.2.0.1",
    "b/app": "10.2.0.2",
}


def base(a_spec: str, b_spec: str) -> str:
    docs = [
        "kind: Tenant\nmetadata: {name: infra}",
        f"kind: Tenant\nmetadata: {{name: a}}\nspec: {a_spec}",
        f"kind: Tenant\nmetadata: {{name: b}}\nspec: {b_spec}",
        "kind: Host\nmetadata: {name: h1}",
        "kind: Host\nmetadata: {name: h2}",
        "kind: Group\nmetadata: {name: everyone, tenant: infra}\nspec: {selector: 'all()', shareWith: ['*']}",
    ]
    hosts = {"web": "h1", "app": "h2", "db": "h2"}
    for ref, ip in IPS.items():
        tenant, name = ref.split("/")
        docs.append(
            f"kind: Workload\nmetadata: {{name: {name}, tenant: {tenant}, labels: {{tier: {name}}}}}\n"
            f"spec: {{host: {hosts[name]}, vnics: [{{name: eth0, ips: ['{ip}']}}]}}"
        )
    for tenant in ("a", "b"):
        for tier in ("web", "app", "db"):
            docs.append(
                f"kind: Group\nmetadata: {{name: {tier}, tenant: {tenant}}}\n"
                f"spec: {{selector: 'tier == \"{tier}\"'}}"
            )
    return "\n---\n".join(docs)


@dataclass
class World:
    catalog: Catalog
    net: Network

    def path(
        self, src: str, dst: str, proto: str = "tcp", port: int = 80, sender: str | None = None
    ) -> PathVerdict:
        s, d = IPS.get(src, src), IPS.get(dst, dst)
        p = Packet(s, d, proto, sport=40000, dport=port) if proto in ("tcp", "udp") else Packet(s, d, proto)
        return self.net.judge_path(p, sender=self.where(sender) if sender else None)

    def where(self, workload: str) -> tuple[str, str]:
        for host, st in self.net.states.items():
            for v in st.vnics:
                if v.workload == workload:
                    return host, v.ifname
        raise KeyError(workload)

    def vnic(self, workload: str) -> IRVnic:
        host, ifname = self.where(workload)
        return self.net.states[host].vnic_map()[ifname]


def world(policies: str = "", a_spec: str = "{}", b_spec: str = "{}") -> World:
    text = base(a_spec, b_spec) + ("\n---\n" + policies if policies.strip() else "")
    catalog = validate(load_text(text, "test.yaml"))
    return World(catalog, Network(compile_catalog(catalog)))


def decided(pv: PathVerdict) -> list[tuple[str, str, str]]:
    """(direction, verdict, deciding rule label or 'default') per hop."""
    return [(h.direction, h.verdict, h.rule.label if h.rule else "default") for h in pv.hops]


def policy(name: str, rules: str, tenant: str = "a", **spec: str) -> str:
    extra = "".join(f"  {k}: {v}\n" for k, v in spec.items())
    return f"kind: Policy\nmetadata: {{name: {name}, tenant: {tenant}}}\nspec:\n{extra}  rules:\n{rules}"


WEB_TO_APP = """\
    - {name: web-to-app, sources: [web], destinations: [app], services: [tcp/80], action: allow}
"""

# ------------------------------------------------------------------------------------ §5 a whole path


def test_default_drop_everywhere_without_policy() -> None:
    w = world()
    assert decided(w.path("a/web", "a/app")) == [
        ("egress", "drop", "default"),
        ("ingress", "drop", "default"),
    ]


def test_rule_spans_source_egress_and_destination_ingress() -> None:
    w = world(policy("p", WEB_TO_APP))
    pv = w.path("a/web", "a/app")
    assert pv.allowed
    assert decided(pv) == [("egress", "allow", "a/p/web-to-app"), ("ingress", "allow", "a/p/web-to-app")]
    assert [h.host for h in pv.hops] == ["h1", "h2"]
    # Only the listed service, only this direction.
    assert not w.path("a/web", "a/app", port=81).allowed
    assert not w.path("a/app", "a/web").allowed


def test_both_hops_must_allow() -> None:
    # Egress allowed at web only (direction out): app's ingress default drops it.
    rules = "    - {name: out-only, sources: [web], destinations: [app], action: allow, direction: out}\n"
    pv = world(policy("p", rules)).path("a/web", "a/app")
    assert decided(pv) == [("egress", "allow", "a/p/out-only"), ("ingress", "drop", "default")]
    rules = "    - {name: in-only, sources: [web], destinations: [app], action: allow, direction: in}\n"
    pv = world(policy("p", rules)).path("a/web", "a/app")
    assert decided(pv) == [("egress", "drop", "default"), ("ingress", "allow", "a/p/in-only")]
    assert pv.hops[1].reached is False


def test_same_host_path_has_both_hops() -> None:
    w = world(policy("p", "    - {name: app-db, sources: [app], destinations: [db], action: allow}\n"))
    pv = w.path("a/app", "a/db")
    assert pv.allowed and [h.host for h in pv.hops] == ["h2", "h2"]


def test_outside_inventory_is_judged_only_at_the_inventory_side() -> None:
    rules = (
        "    - {name: out, sources: [web], destinations: ['203.0.113.0/24'], services: [tcp/443],"
        " action: allow}\n"
        "    - {name: in, sources: ['198.51.100.0/24'], destinations: [web], services: [tcp/80],"
        " action: allow}\n"
    )
    w = world(policy("p", rules))
    pv = w.path("a/web", OUTSIDE, port=443)
    assert decided(pv) == [("egress", "allow", "a/p/out")] and pv.dst is None
    pv = w.path("198.51.100.5", "a/web", port=80)
    assert decided(pv) == [("ingress", "allow", "a/p/in")] and pv.src is None
    assert not w.path("198.51.100.5", "a/web", port=81).allowed
    assert not w.path("a/web", "198.51.100.5", port=443).allowed
    assert w.path("198.51.100.5", OUTSIDE).hops == ()  # not ours


# ------------------------------------------------------------------------------------- §4 evaluation


def test_first_match_wins_within_a_policy() -> None:
    rules = (
        "    - {name: deny-80, sources: [web], destinations: [app], services: [tcp/80], action: drop}\n"
        "    - {name: allow-all, sources: [web], destinations: [app], action: allow}\n"
    )
    w = world(policy("p", rules))
    assert decided(w.path("a/web", "a/app", port=80))[0] == ("egress", "drop", "a/p/deny-80")
    assert decided(w.path("a/web", "a/app", port=22)) == [
        ("egress", "allow", "a/p/allow-all"),
        ("ingress", "allow", "a/p/allow-all"),
    ]


def test_categories_in_order_environment_before_application() -> None:
    env = policy(
        "env",
        "    - {name: no-web-app, sources: [web], destinations: [app], action: drop}\n",
        category="environment",
        priority="5000",
    )
    app = policy("app", WEB_TO_APP, priority="1")
    pv = world(env + "\n---\n" + app).path("a/web", "a/app")
    assert decided(pv)[0] == ("egress", "drop", "a/env/no-web-app")


def test_provider_emergency_first_and_not_overridable_by_tenant() -> None:
    infra = policy(
        "lockdown",
        "    - {name: no-db, sources: [any], destinations: [everyone], services: [tcp/5432], action: drop}\n",
        tenant="infra",
        category="emergency",
    )
    tenant_rules = (
        "    - {name: app-db, sources: [app], destinations: [db], services: [tcp/5432], action: allow}\n"
    )
    w = world(infra + "\n---\n" + policy("p", tenant_rules, priority="0"))
    pv = w.path("a/app", "a/db", port=5432)
    assert decided(pv)[0] == ("egress", "drop", "infra/lockdown/no-db")
    # A tenant cannot write emergency or infrastructure policies.
    with pytest.raises(ValidationError) as e:
        world(policy("mine", tenant_rules, category="emergency"))
    assert any("category" in fe.path for fe in e.value.errors)


def test_priority_then_name_orders_policies() -> None:
    drop = "    - {name: d, sources: [web], destinations: [app], action: drop}\n"
    allow = "    - {name: a, sources: [web], destinations: [app], action: allow}\n"
    # Lower priority first.
    w = world(policy("zz-drop", drop, priority="10") + "\n---\n" + policy("aa-allow", allow, priority="20"))
    assert decided(w.path("a/web", "a/app"))[0] == ("egress", "drop", "a/zz-drop/d")
    w = world(policy("zz-drop", drop, priority="30") + "\n---\n" + policy("aa-allow", allow, priority="20"))
    assert decided(w.path("a/web", "a/app"))[0] == ("egress", "allow", "a/aa-allow/a")
    # Equal priority: by name.
    w = world(policy("bb-drop", drop, priority="10") + "\n---\n" + policy("aa-allow", allow, priority="10"))
    assert decided(w.path("a/web", "a/app"))[0] == ("egress", "allow", "a/aa-allow/a")
    w = world(policy("aa-drop", drop, priority="10") + "\n---\n" + policy("bb-allow", allow, priority="10"))
    assert decided(w.path("a/web", "a/app"))[0] == ("egress", "drop", "a/aa-drop/d")


def test_pass_skips_to_next_category() -> None:
    infra = policy(
        "infra",
        "    - {name: pass-web, sources: [everyone], destinations: [any], services: [tcp/80], action: pass}\n"
        "    - {name: drop-rest, sources: [any], destinations: [any], action: drop}\n",
        tenant="infra",
        category="infrastructure",
    )
    w = world(infra + "\n---\n" + policy("p", WEB_TO_APP))
    assert decided(w.path("a/web", "a/app", port=80)) == [
        ("egress", "allow", "a/p/web-to-app"),
        ("ingress", "allow", "a/p/web-to-app"),
    ]
    assert decided(w.path("a/web", "a/app", port=22))[0] == ("egress", "drop", "infra/infra/drop-rest")


def test_pass_with_nothing_after_falls_to_default() -> None:
    infra = policy(
        "infra",
        "    - {name: pass-all, sources: [any], destinations: [any], action: pass}\n"
        "    - {name: allow-all, sources: [any], destinations: [any], action: allow}\n",
        tenant="infra",
        category="infrastructure",
    )
    pv = world(infra).path("a/web", "a/app")
    assert decided(pv) == [("egress", "drop", "default"), ("ingress", "drop", "default")]


def test_default_action_is_the_vnic_tenants() -> None:
    w = world(a_spec="{defaultAction: drop}", b_spec="{defaultAction: allow}")
    assert decided(w.path("b/web", OUTSIDE)) == [("egress", "allow", "default")]
    assert decided(w.path("a/web", OUTSIDE)) == [("egress", "drop", "default")]
    # b -> a: b's egress default allows, a's ingress default drops.
    assert decided(w.path("b/web", "a/app")) == [
        ("egress", "allow", "default"),
        ("ingress", "drop", "default"),
    ]
    assert w.path("b/web", "a/app").hops[1].tenant == "a"
    w = world(a_spec="{defaultAction: reject}")
    assert w.path("a/web", OUTSIDE).verdict == "reject"


def test_cross_tenant_traffic_needs_both_tenants() -> None:
    # a lets its web reach b's app by address; b has no rule: b's ingress default drops.
    rules = "    - {name: to-b, sources: [web], destinations: ['10.2.0.2'], action: allow}\n"
    w = world(policy("p", rules))
    assert decided(w.path("a/web", "b/app")) == [
        ("egress", "allow", "a/p/to-b"),
        ("ingress", "drop", "default"),
    ]
    # A tenant rule naming another tenant's addresses never lands on that tenant's vNICs.
    assert w.vnic("b/app").ingress == ()


# ------------------------------------------------------------------------------------------ §3 span


def test_span_with_policy_applied_to() -> None:
    rules = "    - {name: from-web, sources: [web], destinations: [any], action: allow}\n"
    w = world(policy("p", rules, appliedTo="[app]"))
    # Installed at app (egress and ingress), not at web's egress.
    assert w.vnic("a/web").egress == ()
    assert decided(w.path("a/web", "a/app")) == [
        ("egress", "drop", "default"),
        ("ingress", "allow", "a/p/from-web"),
    ]
    assert w.vnic("a/app").egress != ()


def test_rule_applied_to_overrides_policy_applied_to() -> None:
    rules = "    - {name: r, sources: [web], destinations: [app], action: allow, appliedTo: [web]}\n"
    w = world(policy("p", rules, appliedTo="[db]"))
    assert w.vnic("a/db").egress == () and w.vnic("a/db").ingress == ()
    assert decided(w.path("a/web", "a/app")) == [("egress", "allow", "a/p/r"), ("ingress", "drop", "default")]


def test_applied_to_with_direction() -> None:
    rules = "    - {name: r, sources: [any], destinations: [any], action: allow, direction: in}\n"
    w = world(policy("p", rules, appliedTo="[app]"))
    assert w.vnic("a/app").egress == () and len(w.vnic("a/app").ingress) == 1


def test_any_spans_the_tenants_vnics_only() -> None:
    rules = "    - {name: to-web, sources: [any], destinations: [web], services: [tcp/80], action: allow}\n"
    w = world(policy("p", rules))
    assert w.path("a/app", "a/web").allowed  # a/app's egress has the rule (sources: any = every a vNIC)
    assert decided(w.path("b/app", "a/web")) == [
        ("egress", "drop", "default"),
        ("ingress", "allow", "a/p/to-web"),
    ]
    assert w.vnic("b/app").egress == ()


def test_provider_any_spans_every_vnic() -> None:
    infra = policy(
        "infra",
        "    - {name: web-in, sources: [any], destinations: [any], services: [tcp/80], action: allow}\n",
        tenant="infra",
        category="infrastructure",
    )
    w = world(infra)
    for src, dst in [("a/web", "b/app"), ("b/web", "a/db"), ("b/app", "a/web")]:
        assert decided(w.path(src, dst)) == [
            ("egress", "allow", "infra/infra/web-in"),
            ("ingress", "allow", "infra/infra/web-in"),
        ], (src, dst)


def test_disabled_rules_are_not_installed() -> None:
    rules = "    - {name: turned-off, sources: [web], destinations: [app], action: allow, disabled: true}\n"
    w = world(policy("p", rules))
    assert w.vnic("a/web").egress == ()
    assert decided(w.path("a/web", "a/app")) == [
        ("egress", "drop", "default"),
        ("ingress", "drop", "default"),
    ]


# ---------------------------------------------------------------------------------------- §4.6 monitor


def test_monitor_mode_logs_would_drop_and_allows() -> None:
    rules = "    - {name: no-ssh, sources: [any], destinations: [app], services: [tcp/22], action: drop}\n"
    w = world(policy("p", rules), a_spec="{mode: monitor}")
    pv = w.path("a/web", "a/app", port=22)
    assert pv.allowed
    assert [(h.monitored, h.would, h.rule.label if h.rule else "default") for h in pv.hops] == [
        (True, "drop", "a/p/no-ssh"),  # sources: any = every vNIC of a, so web's egress too
        (True, "drop", "a/p/no-ssh"),
    ]


def test_monitor_tenant_never_weakens_provider_policy() -> None:
    infra = policy(
        "lockdown",
        "    - {name: no-ssh, sources: [any], destinations: [any], services: [tcp/22], action: drop}\n",
        tenant="infra",
        category="emergency",
    )
    w = world(infra, a_spec="{mode: monitor}")
    pv = w.path("a/web", "a/app", port=22)
    assert decided(pv)[0] == ("egress", "drop", "infra/lockdown/no-ssh") and not pv.hops[0].monitored


# ------------------------------------------------------------------------------------------- §6 state


def test_stateful_reply_needs_no_rule() -> None:
    w = world(policy("p", WEB_TO_APP))
    cv = judge_connection(w.net, Packet(IPS["a/web"], IPS["a/app"], "tcp", sport=40000, dport=80))
    assert cv.allowed and cv.reply is not None and all(h.established for h in cv.reply.hops)


def test_stateless_policy_untracks_and_needs_reply_rule() -> None:
    w = world(policy("p", WEB_TO_APP, stateful="false"))
    pv = w.path("a/web", "a/app")
    assert pv.allowed and [h.tracked for h in pv.hops] == [False, False]
    cv = judge_connection(w.net, Packet(IPS["a/web"], IPS["a/app"], "tcp", sport=40000, dport=80))
    assert cv.request.allowed and not cv.allowed
    reply_rules = (
        WEB_TO_APP
        + "    - {name: app-to-web, sources: [app], destinations: [web], services: [tcp/1024-65535],"
        " action: allow}\n"
    )
    w = world(policy("p", reply_rules, stateful="false"))
    cv = judge_connection(w.net, Packet(IPS["a/web"], IPS["a/app"], "tcp", sport=40000, dport=80))
    assert cv.allowed and cv.reply is not None
    assert [h.rule.label if h.rule else None for h in cv.reply.hops] == ["a/p/app-to-web"] * 2


def test_stateless_rule_untracks_even_when_it_does_not_decide() -> None:
    stateless = policy(
        "sl",
        "    - {name: mark, sources: [web], destinations: [app], action: drop}\n",
        stateful="false",
        priority="2000",
    )
    w = world(policy("p", WEB_TO_APP, priority="1") + "\n---\n" + stateless)
    pv = w.path("a/web", "a/app")
    assert decided(pv)[0] == ("egress", "allow", "a/p/web-to-app")
    assert not pv.hops[0].tracked


# -------------------------------------------------------------------------------------- anti-spoofing


def test_anti_spoofing_before_any_rule() -> None:
    infra = policy(
        "open",
        "    - {name: all, sources: [any], destinations: [any], action: allow}\n",
        tenant="infra",
        category="emergency",
    )
    w = world(infra)
    assert w.path("a/web", "a/app").allowed
    pv = w.path(IPS["a/db"], "a/app", sender="a/web")  # web sends with db's address
    assert (pv.verdict, pv.hops[0].antispoof, pv.hops[0].rule) == ("drop", True, None)
    pv = w.path(OUTSIDE, "a/app", sender="a/web")
    assert pv.hops[0].antispoof and not pv.allowed


# ---------------------------------------------------------------------------------------- services


def test_services_by_reference_inline_ranges_and_icmp() -> None:
    docs = (
        "kind: Service\nmetadata: {name: web-ports, tenant: a}\n"
        "spec: {protocol: tcp, ports: [80, '8000-8080']}\n"
        "---\n"
        + policy(
            "p",
            "    - {name: tcp, sources: [web], destinations: [app], services: [web-ports], action: allow}\n"
            "    - {name: ping, sources: [web], destinations: [app], services: [icmp/8], action: allow}\n"
            "    - {name: dns, sources: [web], destinations: [app], services: ['udp/53,5353'],"
            " action: allow}\n",
        )
    )
    w = world(docs)
    for proto, port, ok in [
        ("tcp", 80, True),
        ("tcp", 8000, True),
        ("tcp", 8080, True),
        ("tcp", 8081, False),
        ("udp", 80, False),
        ("udp", 53, True),
        ("udp", 5353, True),
    ]:
        assert w.path("a/web", "a/app", proto, port).allowed is ok, (proto, port)
    assert w.path("a/web", "a/app", "icmp").allowed
    pv = w.net.judge_path(Packet(IPS["a/web"], IPS["a/app"], "icmp", icmp_type=13))
    assert not pv.allowed


def test_cidr_peers_match_by_prefix() -> None:
    rules = "    - {name: lan, sources: ['10.2.0.0/16'], destinations: [app], action: allow}\n"
    w = world(policy("p", rules))
    assert decided(w.path("10.2.99.1", "a/app")) == [("ingress", "allow", "a/p/lan")]
    assert not w.path("10.3.0.1", "a/app").allowed

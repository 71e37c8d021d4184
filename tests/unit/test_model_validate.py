"""Whole-set validation: every error class names the object, the field path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniwall.model.catalog import Catalog
from omniwall.model.errors import FieldError, ValidationError
from omniwall.model.loader import load_files, load_text
from omniwall.model.validate import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "three-tier"

BASE = """
kind: Host
metadata: {name: host-1}
---
kind: Host
metadata: {name: host-2}
---
kind: Group
metadata: {name: dns, tenant: infra}
spec: {workloads: [dns-1], shareWith: [tenant-a]}
---
kind: Group
metadata: {name: private, tenant: infra}
spec: {cidrs: [10.0.0.0/8]}
---
kind: Service
metadata: {name: dns, tenant: infra}
spec: {protocol: udp, ports: [53]}
---
kind: Workload
metadata: {name: dns-1, tenant: infra}
spec: {host: host-1, vnics: [{ips: [10.0.0.1]}]}
---
kind: Application
metadata: {name: shop, tenant: tenant-a}
---
kind: Group
metadata: {name: web, tenant: tenant-a, application: shop}
spec: {selector: 'tier == "web"'}
---
kind: Service
metadata: {name: http, tenant: tenant-a}
spec: {ports: [80]}
---
kind: Workload
metadata: {name: web-1, tenant: tenant-a, labels: {tier: web}}
spec: {host: host-1, vnics: [{ips: [10.1.0.1]}]}
---
kind: Group
metadata: {name: web, tenant: tenant-b}
spec: {selector: 'tier == "web"'}
"""


def base() -> list:
    return load_text(BASE, "base.yaml")


def errors_for(extra: str, *, existing: Catalog | None = None) -> list[FieldError]:
    resources = ([] if existing else base()) + load_text(extra, "new.yaml")
    with pytest.raises(ValidationError) as info:
        validate(resources, existing=existing)
    return info.value.errors


def only_error(extra: str, **kw: Catalog) -> FieldError:
    errs = errors_for(extra, **kw)
    assert len(errs) == 1, [str(e) for e in errs]
    return errs[0]


def policy(tenant: str, rule: str, *, category: str = "application", applied: str = "[]") -> str:
    return (
        f"kind: Policy\nmetadata: {{name: p, tenant: {tenant}}}\n"
        f"spec: {{category: {category}, appliedTo: {applied}, rules: [{rule}]}}"
    )


def test_base_is_valid() -> None:
    c = validate(base())
    assert isinstance(c, Catalog)
    assert ("tenant-a", "web") in c.groups and "host-1" in c.hosts


def test_examples_validate_cleanly() -> None:
    rs = load_files([EXAMPLES])
    c = validate(rs)
    assert len(c) == len(rs)
    assert set(c.tenants) == {"infra", "tenant-a", "tenant-b"}
    assert set(c.hosts) == {"host-1", "host-2", "host-3"}


def test_duplicate_object() -> None:
    e = only_error("kind: Group\nmetadata: {name: web, tenant: tenant-a}\nspec: {selector: all()}")
    assert (e.document, e.resource, e.path) == ("new.yaml#1", "Group/tenant-a/web", "metadata.name")
    assert e.message == "duplicate Group 'web' (also in base.yaml#8)"


@pytest.mark.parametrize(
    ("rule", "path", "message"),
    [
        (
            "{name: r, destinations: [wbe], action: allow}",
            "spec.rules[0].destinations[0]",
            "unknown group 'wbe' (did you mean 'web'?)",
        ),
        (
            "{name: r, sources: [web], destinations: [any], services: [htp], action: allow}",
            "spec.rules[0].services[0]",
            "unknown service 'htp' (did you mean 'http'?)",
        ),
        (
            "{name: r, sources: [tenant-b/web], action: allow}",
            "spec.rules[0].sources[0]",
            "'tenant-b/web' is a group of tenant 'tenant-b'; tenant 'tenant-a' may not reference it",
        ),
        (
            "{name: r, destinations: [infra/private], action: allow}",
            "spec.rules[0].destinations[0]",
            "unknown group 'infra/private'",  # unshared: as unknown as a missing group (finding 4)
        ),
        (
            "{name: r, destinations: [dns], action: allow}",
            "spec.rules[0].destinations[0]",
            "unknown group 'dns' (did you mean 'infra/dns'?)",
        ),
        (
            "{name: r, services: [tenant-b/http], action: allow}",
            "spec.rules[0].services[0]",
            "'tenant-b/http' is a service of tenant 'tenant-b'; use your own or the provider's services",
        ),
        (
            "{name: r, appliedTo: [any], action: allow}",
            "spec.rules[0].appliedTo[0]",
            "'any' is not a group here; name a group",
        ),
        (
            "{name: r, appliedTo: [10.0.0.0/8], action: allow}",
            "spec.rules[0].appliedTo[0]",
            "'10.0.0.0/8' is an address; name a group here",
        ),
    ],
)
def test_rule_references(rule: str, path: str, message: str) -> None:
    e = only_error(policy("tenant-a", rule))
    assert (e.document, e.resource, e.path, e.message) == ("new.yaml#1", "Policy/tenant-a/p", path, message)


def test_valid_references() -> None:
    rule = (
        "{name: r, sources: [web, 10.9.0.0/16], destinations: [infra/dns, tenant-a/web],"
        " services: [http, infra/dns, tcp/8080], action: allow}"
    )
    validate([*base(), *load_text(policy("tenant-a", rule, applied="[web]"))])
    # the provider may reference any tenant's groups
    validate([*base(), *load_text(policy("infra", "{name: r, sources: [tenant-b/web], action: drop}"))])


def test_policy_applied_to() -> None:
    e = only_error(policy("tenant-a", "{name: r, action: allow}", applied="[nope]"))
    assert (e.path, e.message) == ("spec.appliedTo[0]", "unknown group 'nope'")


@pytest.mark.parametrize("category", ["emergency", "infrastructure"])
def test_provider_categories(category: str) -> None:
    e = only_error(policy("tenant-a", "{name: r, action: drop}", category=category))
    assert e.path == "spec.category"
    assert e.message == f"only the provider tenant 'infra' may write {category} policies"
    validate([*base(), *load_text(policy("infra", "{name: r, action: drop}", category=category))])


def test_host_must_be_in_infra() -> None:
    e = only_error("kind: Host\nmetadata: {name: host-9, tenant: tenant-a}")
    assert (e.resource, e.path) == ("Host/host-9", "metadata.tenant")
    assert e.message == "Host objects belong to the provider tenant 'infra'"


def test_unknown_host() -> None:
    e = only_error("kind: Workload\nmetadata: {name: w, tenant: tenant-a}\nspec: {host: host-3}")
    assert (e.resource, e.path, e.message) == (
        "Workload/tenant-a/w",
        "spec.host",
        "unknown host 'host-3'",  # no suggestion: Hosts do not exist for tenants (finding 4)
    )


def test_unknown_host_suggests_to_the_provider_only() -> None:
    e = only_error("kind: Workload\nmetadata: {name: w, tenant: infra}\nspec: {host: host-3}")
    assert e.message == "unknown host 'host-3' (did you mean 'host-2'?)"


def test_unknown_application() -> None:
    e = only_error(
        "kind: Service\nmetadata: {name: s, tenant: tenant-b, application: shop}\nspec: {ports: [1]}"
    )
    assert (e.resource, e.path, e.message) == (
        "Service/tenant-b/s",
        "metadata.application",
        "unknown application 'shop'",
    )


def test_application_cannot_own_a_tenant() -> None:
    e = only_error("kind: Tenant\nmetadata: {name: t, application: shop}")
    assert (e.path, e.message) == ("metadata.application", "a Tenant cannot belong to an Application")


def test_share_with_only_on_provider_groups() -> None:
    e = only_error("kind: Group\nmetadata: {name: g, tenant: tenant-a}\nspec: {shareWith: ['*']}")
    assert (e.resource, e.path, e.message) == (
        "Group/tenant-a/g",
        "spec.shareWith",
        "only provider ('infra') groups can be shared",
    )


def test_group_members() -> None:
    errs = errors_for(
        "kind: Group\nmetadata: {name: g, tenant: tenant-a}\n"
        "spec: {workloads: [web-1, web-2, infra/dns-1], groups: [web, tenant-b/web, infra/dns]}"
    )
    assert [(e.path, e.message) for e in errs] == [
        ("spec.workloads[1]", "unknown workload 'web-2' (did you mean 'web-1'?)"),
        ("spec.workloads[2]", "'infra/dns-1': name a workload of the group's own tenant (no '/')"),
        (
            "spec.groups[1]",
            "'tenant-b/web' is a group of tenant 'tenant-b'; tenant 'tenant-a' may not reference it",
        ),
    ]


def test_group_cycle_is_named() -> None:
    text = """
kind: Group
metadata: {name: a, tenant: tenant-a}
spec: {groups: [b]}
---
kind: Group
metadata: {name: b, tenant: tenant-a}
spec: {groups: [web, c]}
---
kind: Group
metadata: {name: c, tenant: tenant-a}
spec: {groups: [a]}
---
kind: Group
metadata: {name: self, tenant: tenant-b}
spec: {groups: [self]}
"""
    errs = errors_for(text)
    assert [(e.resource, e.path, e.message) for e in errs] == [
        ("Group/tenant-a/c", "spec.groups[0]", "group cycle: a -> b -> c -> a"),
        ("Group/tenant-b/self", "spec.groups[0]", "group cycle: self -> self"),
    ]


def test_group_cycle_across_tenants() -> None:
    text = """
kind: Group
metadata: {name: x, tenant: infra}
spec: {groups: [tenant-a/y], shareWith: [tenant-a]}
---
kind: Group
metadata: {name: y, tenant: tenant-a}
spec: {groups: [infra/x]}
"""
    (e,) = errors_for(text)
    assert e.message == "group cycle: infra/x -> tenant-a/y -> infra/x"


def test_duplicate_ip() -> None:
    text = (
        "kind: Workload\nmetadata: {name: w2, tenant: tenant-b}\n"
        "spec: {host: host-2, vnics: [{name: eth0, ips: [10.2.0.1]}, {name: eth1, ips: [10.1.0.1]}]}"
    )
    e = only_error(text)
    assert (e.resource, e.path) == ("Workload/tenant-b/w2", "spec.vnics[1].ips[0]")
    assert e.message == "address 10.1.0.1 is already in use"  # the other tenant's workload is not named


def test_duplicate_ip_within_one_workload() -> None:
    text = (
        "kind: Workload\nmetadata: {name: w2, tenant: tenant-b}\n"
        "spec: {host: host-2, vnics: [{name: eth0, ips: [10.2.0.1]}, {name: eth1, ips: [10.2.0.1]}]}"
    )
    e = only_error(text)
    assert e.message == "address 10.2.0.1 is already used by this workload (spec.vnics[0].ips[0])"


def test_duplicate_host_interface() -> None:
    text = """
kind: Workload
metadata: {name: a, tenant: tenant-b}
spec: {host: host-2, vnics: [{name: eth0, hostIfname: tap1}]}
---
kind: Workload
metadata: {name: b, tenant: tenant-b}
spec: {host: host-2, vnics: [{name: eth0, hostIfname: tap1}]}
---
kind: Workload
metadata: {name: c, tenant: tenant-b}
spec: {host: host-1, vnics: [{name: eth0, hostIfname: tap1}]}
"""
    e = only_error(text)
    assert (e.resource, e.path) == ("Workload/tenant-b/b", "spec.vnics[0].hostIfname")
    assert (
        e.message == "host interface 'tap1' on host 'host-2' is already used by Workload/tenant-b/a"
        " (spec.vnics[0].hostIfname)"
    )


def test_all_errors_collected_and_nothing_returned() -> None:
    text = policy("tenant-a", "{name: r, sources: [x], destinations: [y], services: [z], action: allow}")
    errs = errors_for(text)
    assert [e.path for e in errs] == [
        "spec.rules[0].sources[0]",
        "spec.rules[0].destinations[0]",
        "spec.rules[0].services[0]",
    ]


def test_existing_catalog_refs_and_replacement() -> None:
    stored = validate(base())
    # a change may reference stored objects and replace one
    change = load_text(
        policy("tenant-a", "{name: r, destinations: [web], services: [http], action: allow}")
        + "\n---\nkind: Workload\nmetadata: {name: web-1, tenant: tenant-a, labels: {tier: web}}\n"
        "spec: {host: host-2, vnics: [{ips: [10.1.0.1]}]}"
    )
    merged = validate(change, existing=stored)
    assert merged.workloads[("tenant-a", "web-1")].spec.host == "host-2"
    assert ("tenant-a", "p") in merged.policies
    assert stored.workloads[("tenant-a", "web-1")].spec.host == "host-1"  # existing untouched


def test_existing_catalog_change_that_breaks_a_stored_object() -> None:
    stored = validate(
        [*base(), *load_text(policy("tenant-a", "{name: r, destinations: [infra/dns], action: allow}"))]
    )
    unshare = "kind: Group\nmetadata: {name: dns, tenant: infra}\nspec: {workloads: [dns-1]}"
    e = only_error(unshare, existing=stored)
    # reported against the stored policy, which keeps the document it was loaded from
    assert (e.document, e.resource, e.path) == (
        "<stdin>#1",
        "Policy/tenant-a/p",
        "spec.rules[0].destinations[0]",
    )
    assert e.message == "unknown group 'infra/dns'"


def test_existing_errors_do_not_block_unrelated_changes() -> None:
    broken = Catalog.of(
        [*base(), *load_text("kind: Workload\nmetadata: {name: w, tenant: tenant-b}\nspec: {host: gone}")]
    )
    merged = validate(load_text("kind: Tenant\nmetadata: {name: tenant-c}"), existing=broken)
    assert "tenant-c" in merged.tenants
    e = only_error(
        "kind: Workload\nmetadata: {name: v, tenant: tenant-b}\nspec: {host: gone2}", existing=broken
    )
    assert e.resource == "Workload/tenant-b/v"


def test_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    stored = validate(base())
    before = list(stored)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: Workload\nmetadata: {name: web-1, tenant: tenant-a}\n"
        "spec: {host: host-2, vnics: [{ips: [10.0.0.1]}]}\n"
        "---\n" + policy("tenant-a", "{name: r, destinations: [nope], action: allow}")
    )
    with pytest.raises(ValidationError) as info:
        validate(load_files([bad]), existing=stored)
    assert [e.document for e in info.value.errors] == [f"{bad}#1", f"{bad}#2"]
    assert list(stored) == before
    assert stored.workloads[("tenant-a", "web-1")].spec.host == "host-1"
    assert ("tenant-a", "p") not in stored.policies


def test_existing_catalog_change_that_closes_a_cycle() -> None:
    stored = validate(
        [*base(), *load_text("kind: Group\nmetadata: {name: outer, tenant: tenant-a}\nspec: {groups: [web]}")]
    )
    e = only_error(
        "kind: Group\nmetadata: {name: web, tenant: tenant-a}\nspec: {groups: [outer]}", existing=stored
    )
    assert e.message == "group cycle: outer -> web -> outer"
    assert e.path == "spec.groups[0]"


def test_existing_catalog_change_checks_addresses_and_interfaces() -> None:
    stored = validate(base())
    errs = errors_for(
        "kind: Workload\nmetadata: {name: x, tenant: tenant-b}\n"
        "spec: {host: host-1, vnics: [{name: eth0, ips: [10.1.0.1], hostIfname: tap9},"
        " {name: eth1, hostIfname: tap9}]}",
        existing=stored,
    )
    assert [(e.resource, e.path) for e in errs] == [
        ("Workload/tenant-b/x", "spec.vnics[0].ips[0]"),
        ("Workload/tenant-b/x", "spec.vnics[1].hostIfname"),
    ]
    assert errs[0].message == "address 10.1.0.1 is already in use"
    assert "already used by this workload (spec.vnics[0].hostIfname)" in errs[1].message


def test_a_change_is_judged_on_the_addresses_and_interfaces_it_brings() -> None:
    """Stored clashes (two workloads on one address and one host interface) do not block a change that
    touches no workload, nor a workload change on other addresses; a changed workload that wants a taken
    address, or one address twice, is still refused."""
    clash = (
        "kind: Workload\nmetadata: {name: c1, tenant: tenant-b}\n"
        "spec: {host: host-1, vnics: [{name: eth0, ips: [10.9.0.1], hostIfname: tapc}]}\n---\n"
        "kind: Workload\nmetadata: {name: c2, tenant: tenant-b}\n"
        "spec: {host: host-1, vnics: [{name: eth0, ips: [10.9.0.1], hostIfname: tapc}]}"
    )
    stored = Catalog.of([*base(), *load_text(clash)])
    merged = validate(
        load_text(policy("tenant-a", "{name: r, destinations: [web], action: allow}")), existing=stored
    )
    assert ("tenant-a", "p") in merged.policies
    merged = validate(
        load_text(
            "kind: Workload\nmetadata: {name: n, tenant: tenant-b}\n"
            "spec: {host: host-1, vnics: [{ips: [10.9.0.7]}]}"
        ),
        existing=stored,
    )
    assert ("tenant-b", "n") in merged.workloads
    errs = errors_for(
        "kind: Workload\nmetadata: {name: m, tenant: tenant-b}\n"
        "spec: {host: host-1, vnics: [{name: eth0, ips: [10.9.0.1]},"
        " {name: eth1, ips: [10.9.0.8, 10.9.0.8]}]}",
        existing=stored,
    )
    assert [(e.resource, e.path) for e in errs] == [
        ("Workload/tenant-b/m", "spec.vnics[0].ips[0]"),
        ("Workload/tenant-b/m", "spec.vnics[1].ips[1]"),
    ]
    assert "already used by Workload/tenant-b/c1" in errs[0].message

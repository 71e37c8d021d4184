"""Authorization matrix: every role x every route of the app x own / foreign tenant (or host).

The caller's tenant is `acme` (tenant roles) and its host `h1` (agent). "Foreign" objects belong to
tenant `other` / host `h2`. For each row the expected answer per role is: 2xx where the role has the
permission and the object is in scope; 404 for objects of another tenant (never 403: they do not exist
for the caller); 403 naming the missing permission otherwise; 401 without a valid token.

`test_every_route_has_a_row` enumerates the FastAPI app's routes and fails, naming them, for any route
that no row exercises (rows are mapped to routes the way the router dispatches them), and for any route
without both an own-scope and a foreign-scope row unless it is listed in `UNSCOPED`.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from apihelpers import auth, use_manager
from fastapi import FastAPI
from fastapi.testclient import TestClient

from omniwall.api.app import create_app
from omniwall.api.auth_guard import AuthGuard
from omniwall.manager.contracts import load_documents
from omniwall.manager.flows import FlowService, to_rows
from omniwall.manager.flowstore import SqliteFlowStore
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORLD = """
kind: Tenant
metadata: {name: acme}
---
kind: Tenant
metadata: {name: other}
---
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Host
metadata: {name: h3}
---
kind: Workload
metadata: {name: web1, tenant: acme, labels: {tier: web}}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.1]}]}
---
kind: Workload
metadata: {name: web2, tenant: acme}
spec: {host: h1, vnics: [{name: eth0, ips: [10.0.0.2]}]}
---
kind: Workload
metadata: {name: db1, tenant: other, labels: {tier: db}}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.1]}]}
---
kind: Workload
metadata: {name: db2, tenant: other}
spec: {host: h2, vnics: [{name: eth0, ips: [10.0.1.2]}]}
---
kind: Group
metadata: {name: g, tenant: acme}
spec: {cidrs: [10.7.0.0/16]}
---
kind: Group
metadata: {name: g, tenant: other}
spec: {cidrs: [10.6.0.0/16]}
---
kind: Group
metadata: {name: shared, tenant: infra}
spec: {cidrs: [10.8.0.0/16], shareWith: [acme]}
---
kind: Group
metadata: {name: private, tenant: infra}
spec: {cidrs: [10.9.0.0/16]}
---
kind: Service
metadata: {name: s, tenant: acme}
spec: {protocol: tcp, ports: [8080]}
---
kind: Service
metadata: {name: s, tenant: other}
spec: {protocol: tcp, ports: [8081]}
---
kind: Service
metadata: {name: https, tenant: infra}
spec: {protocol: tcp, ports: [443]}
---
kind: Application
metadata: {name: shop, tenant: acme}
---
kind: Application
metadata: {name: shop, tenant: other}
---
kind: Policy
metadata: {name: p, tenant: acme}
spec: {rules: [{name: r, action: allow, services: [tcp/80]}]}
---
kind: Policy
metadata: {name: p, tenant: other}
spec: {rules: [{name: r, action: allow, services: [tcp/80]}]}
---
kind: Policy
metadata: {name: open, tenant: other}
spec: {stateful: false, rules: [{name: any, action: allow}]}
---
kind: Policy
metadata: {name: base, tenant: infra}
spec: {category: infrastructure, rules: [{name: ssh, action: allow, services: [tcp/22]}]}
"""
WORLD_REVISION = 1  # the world is the store's first write: rollback rows go back to it

PROVIDER_ADMIN = "provider-admin"
TENANT_ADMIN = "tenant-admin"
TENANT_VIEWER = "tenant-viewer"
AUDITOR = "auditor"
AGENT = "agent"
IDENTITY_SOURCE = "identity-source"
POSTURE_SOURCE = "posture-source"
ROLES = (PROVIDER_ADMIN, TENANT_ADMIN, TENANT_VIEWER, AUDITOR, AGENT, IDENTITY_SOURCE, POSTURE_SOURCE)
# Callers without a valid token: no Authorization header, a made-up token, a revoked one.
UNAUTHENTICATED = ("no-token", "bad-token", "revoked-token")
CALLERS = ROLES + UNAUTHENTICATED
SCOPE = {TENANT_ADMIN: {"tenant": "acme"}, TENANT_VIEWER: {"tenant": "acme"}, AGENT: {"host": "h1"}}

READERS = frozenset({PROVIDER_ADMIN, TENANT_ADMIN, TENANT_VIEWER, AUDITOR})
PROVIDER_READERS = frozenset({PROVIDER_ADMIN, AUDITOR})
WRITERS = frozenset({PROVIDER_ADMIN, TENANT_ADMIN})
TENANT_ROLES = frozenset({TENANT_ADMIN, TENANT_VIEWER})
ONLY_PROVIDER = frozenset({PROVIDER_ADMIN})
NOBODY: frozenset[str] = frozenset()

# Strings that name the foreign tenant's things: a 2xx answer to a tenant role must contain none of them.
FOREIGN_MARKERS = ('"other"', '"other/', '"db1"', '"db2"', '"h2"')

# Routes that address nothing tenant- or host-owned (or create cluster objects, which have no owner):
# they need no own/foreign pair of rows. Every other route needs both.
UNSCOPED = frozenset(
    {
        "GET /openapi.json",
        "GET /docs",
        "GET /docs/oauth2-redirect",
        "GET /redoc",
        "GET /ui",
        "GET /ui/",
        "GET /ui/{asset:path}",
        "GET /healthz",
        "GET /v1/whoami",
        "GET /v1/status",
        "GET /v1/tokens",
        "POST /v1/tokens",
        "DELETE /v1/tokens/{token_id}",
        "POST /v1/tokens/{token_id}/rotate",
        "GET /v1/audit/verify",
        "POST /v1/compact",
        "POST /v1/tenants",
        "POST /v1/hosts",
        # flow counters and rule hits address no object; what a tenant gets back is still checked
        # for foreign markers (the world has flows between acme and other, decided by both)
        "GET /v1/flows/hits",
        "GET /v1/flows/unused",
        "GET /v1/flows/stats",
        # managers only (flows across managers): no role may call it, whatever it names
        "POST /v1/flows/peer",
    }
)


@dataclass(frozen=True)
class Case:
    """One row: a request and who may make it.

    Per caller: `ok` roles get `status`; `hidden` roles get 404; other roles get 403 naming
    `permission_for.get(role, permission)`; callers without a valid token get 401 (unless `public`).
    Paths may hold `{ids}` of the world (`spare_token`, `mig_own`, `mig_foreign`, `cmd_h1`, `cmd_h2`).
    """

    name: str
    method: str
    path: str
    ok: frozenset[str]
    permission: str | None
    scope: str | None = None  # "own" / "foreign": whose object the row addresses
    status: int = 200
    hidden: frozenset[str] = NOBODY
    permission_for: Mapping[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    body: Any = None
    content: str | None = None
    public: bool = False
    migrations: bool = False  # the world has a migration in flight for web1 and db1

    def expected(self, caller: str) -> int:
        if caller in UNAUTHENTICATED:
            return self.status if self.public else 401
        if caller in self.ok:
            return self.status
        return 404 if caller in self.hidden else 403

    def expected_permission(self, role: str) -> str | None:
        return self.permission_for.get(role, self.permission)


def _docs() -> dict[tuple[str, str], dict[str, Any]]:
    """The world's documents by (kind, name) for tenant `acme`/`other` objects keyed (kind, tenant/name)."""
    out = {}
    for d in yaml.safe_load_all(WORLD):
        md = d["metadata"]
        out[(d["kind"], f"{md.get('tenant', 'infra')}/{md['name']}")] = d
    return out


DOCS = _docs()
# (kind, plural, own name, foreign name, tenant-scoped?)
KINDS = (
    ("Tenant", "tenants", "acme", "other", False),
    ("Host", "hosts", "h1", "h2", False),
    ("Workload", "workloads", "web1", "db1", True),
    ("Group", "groups", "g", "g", True),
    ("Service", "services", "s", "s", True),
    ("Application", "applications", "shop", "shop", True),
    ("Policy", "policies", "p", "p", True),
)


def _doc(kind: str, tenant: str, name: str) -> dict[str, Any]:
    key = (kind, f"{'infra' if kind in ('Tenant', 'Host') else tenant}/{name}")
    return copy.deepcopy(DOCS[key])


def _touched(doc: dict[str, Any]) -> dict[str, Any]:
    doc["metadata"].setdefault("labels", {})["touched"] = "yes"
    return doc


def _new(kind: str, tenant: str, name: str) -> dict[str, Any]:
    doc = _doc(kind, tenant, name)
    doc["metadata"]["name"] = f"{name}-new"
    if kind == "Workload":
        doc["spec"]["vnics"][0]["ips"] = ["10.0.0.99" if tenant == "acme" else "10.0.1.99"]
        doc["metadata"].pop("labels", None)
    return doc


def policy(tenant: str, name: str = "p", category: str = "application", port: int = 81) -> dict[str, Any]:
    return {
        "kind": "Policy",
        "metadata": {"name": name, "tenant": tenant},
        "spec": {
            "category": category,
            "rules": [{"name": "r", "action": "allow", "services": [f"tcp/{port}"]}],
        },
    }


def _resource_rows() -> list[Case]:
    """The seven generated routes of every kind, for an own and a foreign object."""
    cases: list[Case] = []
    read, write = "resources.read", "resources.write"
    for kind, plural, own_name, foreign_name, scoped in KINDS:
        cluster = {} if scoped else {TENANT_ADMIN: "provider.write"}
        for scope, tenant, name in (("own", "acme", own_name), ("foreign", "other", foreign_name)):
            own = scope == "own"
            q = {"tenant": tenant} if scoped else None
            if kind == "Host":  # Hosts do not exist for tenants, not even the one their workloads run on
                readable, read_hidden = PROVIDER_READERS, TENANT_ROLES
            else:
                readable, read_hidden = (READERS, NOBODY) if own else (PROVIDER_READERS, TENANT_ROLES)
            if not scoped:
                writable, write_hidden = ONLY_PROVIDER, NOBODY
            else:
                writable, write_hidden = (
                    (WRITERS, NOBODY) if own else (ONLY_PROVIDER, frozenset({TENANT_ADMIN}))
                )
            item = f"/v1/{plural}/{name}"
            cases += [
                # A list is allowed to every reader; what a tenant gets back is checked for foreign markers.
                Case(
                    f"list {plural} {scope}",
                    "GET",
                    f"/v1/{plural}",
                    READERS,
                    read,
                    scope,
                    params={"tenant": tenant},
                ),
                Case(f"get {kind} {scope}", "GET", item, readable, read, scope, hidden=read_hidden, params=q),
                Case(
                    f"history {kind} {scope}",
                    "GET",
                    f"{item}/history",
                    readable,
                    read,
                    scope,
                    hidden=read_hidden,
                    params=q,
                ),
                Case(
                    f"replace {kind} {scope}",
                    "PUT",
                    item,
                    writable,
                    write,
                    scope,
                    hidden=write_hidden,
                    permission_for=cluster,
                    params=q,
                    body=_touched(_doc(kind, tenant, name)),
                ),
                Case(
                    f"delete {kind} {scope}",
                    "DELETE",
                    item,
                    writable,
                    write,
                    scope,
                    hidden=write_hidden,
                    permission_for=cluster,
                    params=q,
                ),
                Case(
                    f"rollback {kind} {scope}",
                    "POST",
                    f"{item}/rollback",
                    writable,
                    write,
                    scope,
                    hidden=write_hidden,
                    permission_for=cluster,
                    params=q,
                    body={"revision": WORLD_REVISION},
                ),
            ]
            if scoped:
                cases.append(
                    Case(
                        f"create {kind} {scope}",
                        "POST",
                        f"/v1/{plural}",
                        writable,
                        write,
                        scope,
                        hidden=write_hidden,
                        body=_new(kind, tenant, name),
                    )
                )
        if not scoped:  # cluster objects belong to no tenant: one row
            cases.append(
                Case(
                    f"create {kind}",
                    "POST",
                    f"/v1/{plural}",
                    ONLY_PROVIDER,
                    write,
                    permission_for=cluster,
                    body={"kind": kind, "metadata": {"name": f"{own_name}9"}},
                )
            )
    return cases


def _provider_object_rows() -> list[Case]:
    """Provider objects: shared with the caller's tenant (visible), not shared, or provider-category."""
    read = "resources.read"
    return [
        Case(
            "get shared provider group", "GET", "/v1/groups/shared", READERS, read, params={"tenant": "infra"}
        ),
        Case(
            "get unshared provider group",
            "GET",
            "/v1/groups/private",
            PROVIDER_READERS,
            read,
            hidden=TENANT_ROLES,
            params={"tenant": "infra"},
        ),
        Case("get provider service", "GET", "/v1/services/https", READERS, read, params={"tenant": "infra"}),
        Case(
            "get provider policy",
            "GET",
            "/v1/policies/base",
            PROVIDER_READERS,
            read,
            hidden=TENANT_ROLES,
            params={"tenant": "infra"},
        ),
        Case(
            "write shared provider group",
            "PUT",
            "/v1/groups/shared",
            ONLY_PROVIDER,
            "resources.write",
            hidden=frozenset({TENANT_ADMIN}),
            params={"tenant": "infra"},
            body={
                "kind": "Group",
                "metadata": {"name": "shared", "tenant": "infra"},
                "spec": {"cidrs": ["10.8.0.0/16"], "shareWith": ["acme", "other"]},
            },
        ),
        # Even the provider may not put an emergency policy into a tenant: the validator refuses it (422).
        Case(
            "provider-category policy in own tenant",
            "POST",
            "/v1/policies",
            ONLY_PROVIDER,
            "resources.write",
            status=422,
            permission_for={TENANT_ADMIN: "policy.provider-category"},
            body=policy("acme", "emerg", "emergency"),
        ),
    ]


def _claimed_user(tenant: str) -> dict[str, Any]:
    doc = _new("Workload", tenant, "web1" if tenant == "acme" else "db1")
    doc["metadata"]["name"] = "claims-alice"
    doc["spec"]["attributes"] = {"user": ["alice"]}
    return doc


def _identity_claim_rows() -> list[Case]:
    """A create takes a Workload's attributes as given: a `user` in it is an identity claim, which needs
    `identity.write` (tenant admins may create workloads, not claim who uses them)."""
    cases: list[Case] = []
    for scope, tenant in (("own", "acme"), ("foreign", "other")):
        hidden = NOBODY if scope == "own" else frozenset({TENANT_ADMIN})
        tenant_admin = {TENANT_ADMIN: "identity.write"} if scope == "own" else {}
        doc = _claimed_user(tenant)
        cases += [
            Case(
                f"create Workload claiming a user {scope}",
                "POST",
                "/v1/workloads",
                ONLY_PROVIDER,
                "resources.write",
                scope,
                hidden=hidden,
                permission_for=tenant_admin,
                body=doc,
            ),
            Case(
                f"apply Workload claiming a user {scope}",
                "POST",
                "/v1/apply",
                ONLY_PROVIDER,
                "resources.write",
                scope,
                hidden=hidden,
                permission_for=tenant_admin,
                content=json.dumps(doc),
            ),
        ]
    return cases


def _apply_rows() -> list[Case]:
    write = "resources.write"
    cases: list[Case] = []
    for scope, tenant in (("own", "acme"), ("foreign", "other")):
        own = scope == "own"
        ok, hidden = (WRITERS, NOBODY) if own else (ONLY_PROVIDER, frozenset({TENANT_ADMIN}))
        doc = json.dumps(policy(tenant, "applied"))
        cases += [
            Case(f"apply {scope}", "POST", "/v1/apply", ok, write, scope, hidden=hidden, content=doc),
            Case(
                f"dry-run apply {scope}",
                "POST",
                "/v1/apply",
                ok,
                write,
                scope,
                hidden=hidden,
                params={"dryRun": "true"},
                content=doc,
            ),
        ]
    # All or nothing: one foreign document among own ones refuses the whole request.
    mixed = "\n---\n".join(
        yaml.safe_dump(d) for d in (policy("acme", "a1"), _new("Group", "acme", "g"), policy("other", "a2"))
    )
    cases += [
        Case(
            "apply own and foreign documents",
            "POST",
            "/v1/apply",
            ONLY_PROVIDER,
            write,
            "foreign",
            hidden=frozenset({TENANT_ADMIN}),
            content=mixed,
        ),
        Case(
            "apply a Host",
            "POST",
            "/v1/apply",
            ONLY_PROVIDER,
            write,
            permission_for={TENANT_ADMIN: "provider.write"},
            content=json.dumps({"kind": "Host", "metadata": {"name": "h9"}}),
        ),
    ]
    return cases


def _admin_rows() -> list[Case]:
    everyone = frozenset(ROLES)
    return [
        *(
            Case(f"public {p}", "GET", p, everyone, None, public=True)
            for p in ("/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
        ),
        # the web console's assets: no data, no token (every datum comes from /v1 with the user's token)
        *(Case(f"console {p}", "GET", p, everyone, None, public=True) for p in ("/ui", "/ui/", "/ui/app.js")),
        Case("whoami", "GET", "/v1/whoami", everyone, None),
        Case("status", "GET", "/v1/status", READERS, "resources.read"),
        Case("list tokens", "GET", "/v1/tokens", ONLY_PROVIDER, "tokens.admin"),
        Case("create token", "POST", "/v1/tokens", ONLY_PROVIDER, "tokens.admin", body={"role": "auditor"}),
        Case("revoke token", "DELETE", "/v1/tokens/{spare_token}", ONLY_PROVIDER, "tokens.admin"),
        Case("rotate token", "POST", "/v1/tokens/{spare_token}/rotate", ONLY_PROVIDER, "tokens.admin"),
        Case("verify audit chain", "GET", "/v1/audit/verify", PROVIDER_READERS, "audit.verify"),
        Case("compact", "POST", "/v1/compact", ONLY_PROVIDER, "store.compact", body={"revision": 1}),
        # A tenant asking for another tenant's audit entries gets an empty list (checked: no markers).
        Case("audit own", "GET", "/v1/audit", READERS, "audit.read", "own", params={"tenant": "acme"}),
        Case(
            "audit foreign", "GET", "/v1/audit", READERS, "audit.read", "foreign", params={"tenant": "other"}
        ),
    ]


def _insight_rows() -> list[Case]:
    read = "resources.read"
    cases: list[Case] = []
    for scope, tenant in (("own", "acme"), ("foreign", "other")):
        ok, hidden = (READERS, NOBODY) if scope == "own" else (PROVIDER_READERS, TENANT_ROLES)
        q = {"tenant": tenant}
        cases += [
            Case(
                f"group members {scope}",
                "GET",
                "/v1/groups/g/members",
                ok,
                read,
                scope,
                hidden=hidden,
                params=q,
            ),
            Case(
                f"policy realization {scope}",
                "GET",
                "/v1/policies/p/realization",
                ok,
                read,
                scope,
                hidden=hidden,
                params=q,
            ),
            Case(
                f"policy stats {scope}",
                "GET",
                "/v1/policies/p/stats",
                ok,
                read,
                scope,
                hidden=hidden,
                params=q,
            ),
        ]
    infra = {"tenant": "infra"}
    cases += [
        Case(
            "members of a shared provider group",
            "GET",
            "/v1/groups/shared/members",
            READERS,
            read,
            params=infra,
        ),
        Case(
            "members of an unshared provider group",
            "GET",
            "/v1/groups/private/members",
            PROVIDER_READERS,
            read,
            hidden=TENANT_ROLES,
            params=infra,
        ),
        Case(
            "realization of a provider policy",
            "GET",
            "/v1/policies/base/realization",
            PROVIDER_READERS,
            read,
            hidden=TENANT_ROLES,
            params=infra,
        ),
        Case(
            "stats of a provider policy",
            "GET",
            "/v1/policies/base/stats",
            PROVIDER_READERS,
            read,
            hidden=TENANT_ROLES,
            params=infra,
        ),
        # explain: a tenant names its own workloads (or addresses); hops at other tenants' vNICs are
        # redacted and no host is named (the foreign markers check covers both).
        Case(
            "explain own workloads",
            "GET",
            "/v1/explain",
            READERS,
            read,
            "own",
            params={"from": "web1", "to": "web2", "proto": "tcp", "port": 80},
        ),
        Case(
            "explain to a foreign workload's address",
            "GET",
            "/v1/explain",
            READERS,
            read,
            "own",
            params={"from": "acme/web1", "to": "10.0.1.1", "proto": "tcp", "port": 80},
        ),
        Case(
            "explain from a foreign workload",
            "GET",
            "/v1/explain",
            PROVIDER_READERS,
            read,
            "foreign",
            hidden=TENANT_ROLES,
            params={"from": "other/db1", "to": "10.0.0.1", "proto": "tcp", "port": 80},
        ),
    ]
    return cases


def _source_rows() -> list[Case]:
    """Identity and posture sources are provider-wide: any tenant's workload, nothing else."""
    cases: list[Case] = []
    for scope, tenant, wl in (("own", "acme", "web1"), ("foreign", "other", "db1")):
        cases += [
            Case(
                f"identity event {scope}",
                "POST",
                "/v1/identity/events",
                frozenset({PROVIDER_ADMIN, IDENTITY_SOURCE}),
                "identity.write",
                scope,
                body={"workload": wl, "tenant": tenant, "user": "alice", "action": "login"},
            ),
            Case(
                f"posture report {scope}",
                "POST",
                "/v1/posture/reports",
                frozenset({PROVIDER_ADMIN, POSTURE_SOURCE}),
                "posture.write",
                scope,
                body={"workload": wl, "tenant": tenant, "av.status": "clean"},
            ),
        ]
    return cases


def _host_rows() -> list[Case]:
    """Per-host routes: the agent's own host `h1` vs another host `h2`."""
    feed_readers = frozenset({PROVIDER_ADMIN, AUDITOR, AGENT})
    cases: list[Case] = []
    for scope, host in (("own", "h1"), ("foreign", "h2")):
        own = scope == "own"
        readers = feed_readers if own else PROVIDER_READERS
        agent = frozenset({AGENT}) if own else NOBODY
        cases += [
            Case(
                f"feed {scope} host",
                "GET",
                f"/v1/hosts/{host}/feed",
                readers,
                "hosts.feed.read",
                scope,
                params={"follow": "false"},
            ),
            Case(
                f"desired {scope} host", "GET", f"/v1/hosts/{host}/desired", readers, "hosts.feed.read", scope
            ),
            Case(
                f"status report {scope} host",
                "POST",
                f"/v1/hosts/{host}/status",
                agent,
                "hosts.status.write",
                scope,
                body={"realized_revision": 1},
            ),
            Case(
                f"command result {scope} host",
                "POST",
                f"/v1/hosts/{host}/commands/{{cmd_{host}}}",
                agent,
                "hosts.status.write",
                scope,
                body={"error": None},
            ),
        ]
    return cases


def _migration_rows() -> list[Case]:
    """Migrating is writing the workload; a role without `resources.read` is refused that first."""
    no_read = {r: "resources.read" for r in (AGENT, IDENTITY_SOURCE, POSTURE_SOURCE)}
    cases: list[Case] = []
    for scope, tenant, idle, moving in (("own", "acme", "web2", "web1"), ("foreign", "other", "db2", "db1")):
        own = scope == "own"
        readable, read_hidden = (READERS, NOBODY) if own else (PROVIDER_READERS, TENANT_ROLES)
        writable, write_hidden = (WRITERS, NOBODY) if own else (ONLY_PROVIDER, TENANT_ROLES)
        q = {"tenant": tenant}
        cases += [
            Case(
                f"start migration {scope}",
                "POST",
                f"/v1/workloads/{idle}/migrate",
                writable,
                "resources.write",
                scope,
                status=202,
                hidden=write_hidden,
                permission_for=no_read,
                params=q,
                body={"to": "h3"},
            ),
            Case(
                f"read migration {scope}",
                "GET",
                f"/v1/workloads/{moving}/migration",
                readable,
                "resources.read",
                scope,
                hidden=read_hidden,
                params=q,
                migrations=True,
            ),
            Case(
                f"migration switched {scope}",
                "POST",
                f"/v1/workloads/{moving}/migrate/{{mig_{scope}}}/switched",
                writable,
                "resources.write",
                scope,
                hidden=write_hidden,
                permission_for=no_read,
                params=q,
                migrations=True,
            ),
        ]
    return cases


def flow_record(host: str, hop: str, workload: str, rule_tenant: str, **kw: Any) -> dict[str, Any]:
    """A flow between acme/web1 (10.0.0.1) and other/db1 (10.0.1.1), decided at `host`."""
    now = time.time()
    rec = {
        "start": now - 1,
        "end": now,
        "host": host,
        "hop": hop,
        "ifname": "ow" + host,
        "workload": workload,
        "verdict": "denied",
        "rule_id": 11 if rule_tenant == "acme" else 12,
        "rule_tenant": rule_tenant,
        "policy": "p",
        "rule": "r",
        "category": "application",
        "revision": WORLD_REVISION,
        "proto": "tcp",
        "src": "10.0.0.1",
        "dst": "10.0.1.1",
        "dport": 80,
    }
    return {**rec, **kw}


def _flow_rows() -> list[Case]:
    """Flows: agents post for their own host only; readers see flows touching their own workloads."""
    read = "resources.read"
    cases: list[Case] = []
    for scope, host, wl, tenant in (
        ("own", "h1", "acme/web1", "acme"),
        ("foreign", "h2", "other/db1", "other"),
    ):
        own = scope == "own"
        ok, hidden = (READERS, NOBODY) if own else (PROVIDER_READERS, TENANT_ROLES)
        hop = "egress" if own else "ingress"
        batch = {"host": host, "records": [flow_record(host, hop, wl, tenant)], "dropped": {"kernel": 1}}
        q = {"workload": wl}
        cases += [
            Case(
                f"post flows {scope} host",
                "POST",
                f"/v1/hosts/{host}/flows",
                frozenset({AGENT}) if own else NOBODY,
                "hosts.status.write",
                scope,
                status=202,
                body=batch,
            ),
            Case(f"flows {scope}", "GET", "/v1/flows", ok, read, scope, hidden=hidden, params=q),
            Case(
                f"watch flows {scope}",
                "GET",
                "/v1/flows/watch",
                ok,
                read,
                scope,
                hidden=hidden,
                params={**q, "since": "1h", "limit": 2},
            ),
            Case(f"flow graph {scope}", "GET", "/v1/flows/graph", ok, read, scope, hidden=hidden, params=q),
            Case(
                f"flow graph by group {scope}",
                "GET",
                "/v1/flows/graph",
                ok,
                read,
                scope,
                hidden=hidden,
                params={**q, "by": "group"},
            ),
            # A tenant asking for another tenant's audit entries gets an empty stream (ended at once).
            Case(
                f"watch audit {scope}",
                "GET",
                "/v1/audit/watch",
                READERS,
                "audit.read",
                scope,
                params={"tenant": tenant, "since": "1h", "limit": 1},
            ),
        ]
    cases += [
        Case("flows unfiltered", "GET", "/v1/flows", READERS, read),
        Case("flows of another tenant", "GET", "/v1/flows", READERS, read, params={"tenant": "other"}),
        Case("flow graph unfiltered", "GET", "/v1/flows/graph", READERS, read, params={"by": "group"}),
        Case("rule hits", "GET", "/v1/flows/hits", READERS, read),
        Case("unused rules", "GET", "/v1/flows/unused", READERS, read),
        Case("flow stats", "GET", "/v1/flows/stats", READERS, read),
        Case("flow peer call", "POST", "/v1/flows/peer", NOBODY, "flows.peer", body={"op": "hits"}),
    ]
    return cases


def _cases() -> list[Case]:
    return [
        *_resource_rows(),
        *_provider_object_rows(),
        *_apply_rows(),
        *_identity_claim_rows(),
        *_admin_rows(),
        *_insight_rows(),
        *_source_rows(),
        *_host_rows(),
        *_migration_rows(),
        *_flow_rows(),
    ]


CASES = _cases()
ID_NAMES = ("spare_token", "mig_own", "mig_foreign", "cmd_h1", "cmd_h2")


# ---------------------------------------------------------------------------------------------- routes


def app_routes(app: FastAPI) -> list[tuple[str, str, re.Pattern[str]]]:
    """(method, path template, path regex) of every route, in the order the router tries them.
    HEAD is left out: Starlette answers it with the GET handler."""
    try:  # FastAPI >= 0.16x keeps included routers as a tree; this walks it in dispatch order
        from fastapi.routing import iter_route_contexts

        routes: list[Any] = list(iter_route_contexts(app.routes))
    except ImportError:  # pragma: no cover - older FastAPI flattens included routers into app.routes
        routes = list(app.routes)
    out = []
    for r in routes:
        path, methods, regex = (
            getattr(r, "path", None),
            getattr(r, "methods", None),
            getattr(r, "path_regex", None),
        )
        assert path and methods and regex is not None, f"route the matrix cannot classify: {r!r}"
        out += [(m, path, regex) for m in sorted(methods) if m != "HEAD"]
    return out


def route_of(routes: list[tuple[str, str, re.Pattern[str]]], method: str, path: str) -> str | None:
    """The route a request lands on: the first whose method and path match, as the router does."""
    for m, template, regex in routes:
        if m == method and regex.match(path):
            return f"{m} {template}"
    return None


def _routing_path(case: Case) -> str:
    return case.path.format(**dict.fromkeys(ID_NAMES, "x"))


# ---------------------------------------------------------------------------------------------- world


@dataclass
class World:
    manager: Manager
    headers: dict[str, dict[str, str]]  # caller -> request headers
    ids: dict[str, str]
    flows: FlowService

    def finish_migrations(self) -> None:
        """Play every agent so that migrations started by the row end (no thread outlives the test)."""
        m = self.manager
        names = (("acme", "web1"), ("acme", "web2"), ("other", "db1"), ("other", "db2"))
        if all(m.migrations.get(t, n) is None for t, n in names):
            return
        for h in m.host_names():
            m.hosts.report(h, m.now_iso(), 10**9, None, None, None)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            running = [mig for t, n in names if (mig := m.migrations.get(t, n)) and mig.result == "running"]
            if not running:
                return
            for mig in running:
                m.migrations.switched(mig.tenant, mig.name, mig.id)
            for h in m.host_names():
                for cmd in m.migrations.commands.take(h):
                    m.migrations.commands.resolve(h, cmd["id"], {})
            time.sleep(0.01)
        pytest.fail(f"migrations still running: {running}")


def build_world(*, migrations: bool) -> World:
    m = Manager(MemoryStore())
    assert m.commit(m.plan_apply(load_documents(WORLD, "world.yaml")), SYSTEM) == WORLD_REVISION
    headers: dict[str, dict[str, str]] = {
        "no-token": {},
        "bad-token": {"Authorization": "Bearer ow.0123abcd.nope"},
    }
    for role in ROLES:
        token, _ = m.tokens.create(role, **SCOPE.get(role, {}))
        headers[role] = auth(token)
    revoked, rec = m.tokens.create(AUDITOR, name="revoked")
    m.tokens.revoke(rec.id)
    headers["revoked-token"] = auth(revoked)
    _, spare = m.tokens.create(AUDITOR, name="spare")
    ids = {
        "spare_token": spare.id,
        # pending agent commands (as a migration sends them on the feed)
        "cmd_h1": m.migrations.commands.send("h1", "noop", {}),
        "cmd_h2": m.migrations.commands.send("h2", "noop", {}),
    }
    if migrations:
        ids["mig_own"] = m.migrations.start("acme", "web1", "h3", SYSTEM).id
        ids["mig_foreign"] = m.migrations.start("other", "db1", "h3", SYSTEM).id
    return World(m, headers, ids, seeded_flows(m))


def seeded_flows(m: Manager) -> FlowService:
    """One connection from acme/web1 to other/db1, seen at both hops: allowed by acme's rule on h1,
    denied by other's on h2 (so every flow route has foreign names, rules and hosts to hide)."""
    svc = FlowService(SqliteFlowStore(":memory:"))
    book = svc.address_book(m)
    for host, hop, wl, tenant, verdict in (
        ("h1", "egress", "acme/web1", "acme", "allowed"),
        ("h2", "ingress", "other/db1", "other", "denied"),
    ):
        rec = flow_record(host, hop, wl, tenant, verdict=verdict, packets=1, bytes=60)
        svc.submit(host, to_rows(host, [rec], book), {"kernel": 3})
    assert svc.flush(10)
    return svc


def use_world(client: TestClient, world: World) -> None:
    use_manager(client, world.manager)
    client.app.state.flows = world.flows  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def app() -> FastAPI:
    a = create_app(Manager(MemoryStore()), watch=False)
    # The matrix sends hundreds of bad tokens from one address and compares store revisions: no rate
    # limit and no failure audit here (both have their own tests, test_tokens_audit_chain.py).
    a.state.auth_guard = AuthGuard(max_failures=10**9, audit=False)
    return a


@pytest.fixture(scope="module")
def client(app: FastAPI) -> TestClient:
    # Building the app takes a while (route analysis); each world swaps in its own manager instead.
    return TestClient(app)


# ---------------------------------------------------------------------------------------------- tests


def test_every_route_has_a_row(app: FastAPI) -> None:
    routes = app_routes(app)
    rows: dict[str, set[str | None]] = {}
    unrouted = []
    for c in CASES:
        r = route_of(routes, c.method, _routing_path(c))
        if r is None:
            unrouted.append(f"{c.name}: {c.method} {c.path}")
        else:
            rows.setdefault(r, set()).add(c.scope)
    assert not unrouted, "rows that match no route of the app:\n  " + "\n  ".join(unrouted)
    every = {f"{m} {t}" for m, t, _ in routes}
    missing = sorted(every - set(rows))
    assert not missing, (
        f"{len(missing)} route(s) of the app have no row in the authorization matrix; add rows "
        "(every role x own/foreign) to tests/unit/test_api_authz.py:\n  " + "\n  ".join(missing)
    )
    unpaired = sorted(r for r in every - UNSCOPED if not {"own", "foreign"} <= rows[r])
    assert not unpaired, (
        "routes without both an own-scope and a foreign-scope row (or list them in UNSCOPED):\n  "
        + "\n  ".join(f"{r} (has: {sorted(map(str, rows[r]))})" for r in unpaired)
    )
    assert every >= UNSCOPED, f"stale UNSCOPED entries: {sorted(UNSCOPED - every)}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_authorization_matrix(client: TestClient, case: Case) -> None:
    """Every caller against one row. A world is rebuilt after each call that may have changed it."""
    wrong: list[str] = []
    world: World | None = None
    try:
        for caller in CALLERS:
            if world is None:
                world = build_world(migrations=case.migrations)
                use_world(client, world)
            m = world.manager
            before = m.store.revision()
            kw: dict[str, Any] = {"params": case.params, "headers": world.headers[caller]}
            if case.body is not None:
                kw["json"] = case.body
            if case.content is not None:
                kw["content"] = case.content
            r = client.request(case.method, case.path.format(**world.ids), **kw)
            want = case.expected(caller)
            if r.status_code != want:
                wrong.append(f"{caller}: got {r.status_code}, want {want}: {r.text[:300]}")
                continue
            if want == 403:
                got, perm = r.json().get("permission"), case.expected_permission(caller)
                if got != perm:
                    wrong.append(f"{caller}: 403 names permission {got!r}, want {perm!r}")
            reads = want >= 400 or case.method == "GET" or (case.params or {}).get("dryRun")
            if reads and m.store.revision() != before:
                wrong.append(f"{caller}: a {want} / read wrote to the store")
            if caller in TENANT_ROLES and want < 300:
                leaked = [s for s in FOREIGN_MARKERS if s in r.text]
                if leaked:
                    wrong.append(f"{caller}: answer names foreign things {leaked}: {r.text[:300]}")
            if case.method != "GET" and want < 300:
                world.finish_migrations()
                world = None
    finally:
        if world is not None:
            world.finish_migrations()
    assert not wrong, f"{case.name} ({case.method} {case.path}):\n  " + "\n  ".join(wrong)


@pytest.fixture
def world(client: TestClient) -> Iterator[tuple[TestClient, Manager, dict[str, dict[str, str]]]]:
    w = build_world(migrations=False)
    use_world(client, w)
    yield client, w.manager, w.headers


def test_tenant_lists_show_only_their_objects(
    world: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    client, _, headers = world
    h = headers[TENANT_VIEWER]
    wls = client.get("/v1/workloads", headers=h).json()["items"]
    assert [(w["metadata"]["tenant"], w["metadata"]["name"]) for w in wls] == [
        ("acme", "web1"),
        ("acme", "web2"),
    ]
    groups = client.get("/v1/groups", headers=h).json()["items"]
    assert sorted((g["metadata"]["tenant"], g["metadata"]["name"]) for g in groups) == [
        ("acme", "g"),
        ("infra", "shared"),
    ]
    assert client.get("/v1/hosts", headers=h).json()["items"] == []
    tenants = client.get("/v1/tenants", headers=h).json()["items"]
    assert [t["metadata"]["name"] for t in tenants] == ["acme"]
    audit = client.get("/v1/audit", headers=h).json()["items"]
    assert audit and {e["tenant"] for e in audit} == {"acme"}
    assert client.get("/v1/audit", params={"tenant": "other"}, headers=h).json()["items"] == []


def test_tenant_documents_default_to_the_token_tenant(
    world: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    client, m, headers = world
    text = "kind: Group\nmetadata: {name: mine}\nspec: {cidrs: [10.5.0.0/16]}\n"
    r = client.post("/v1/apply", content=text, headers=headers[TENANT_ADMIN])
    assert r.status_code == 200, r.text
    assert m.get("Group", "acme", "mine") is not None


def test_provider_category_403_names_the_permission(
    world: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    client, _, headers = world
    r = client.post(
        "/v1/apply", content=json.dumps(policy("acme", "e", "infrastructure")), headers=headers[TENANT_ADMIN]
    )
    assert r.status_code == 403
    assert r.json()["permission"] == "policy.provider-category"
    assert "infrastructure" in r.json()["message"]


def test_explain_hides_untracked_hosts_from_tenants(
    world: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    """`other/open` is stateless, so the request is untracked on h2: a tenant must not learn that host."""
    client, _, headers = world
    q = {"from": "web1", "to": "10.0.1.1", "proto": "tcp", "port": 80}
    full = client.get("/v1/explain", params=q, headers=headers[AUDITOR]).json()
    assert "h2" in full["request"]["untracked_hosts"]  # the row is meaningful: the auditor sees it
    scoped = client.get("/v1/explain", params=q, headers=headers[TENANT_VIEWER]).json()
    for section in ("request", "reply", "ack"):
        if scoped.get(section):
            assert scoped[section]["untracked_hosts"] == []
            assert all(h["host"] is None for h in scoped[section]["hops"])


def test_rollback_cannot_bring_back_a_logged_out_identity(
    world: tuple[TestClient, Manager, dict[str, dict[str, str]]],
) -> None:
    """Delete a workload, roll it back to a revision where the IdP had logged alice in: for a tenant admin
    that would claim alice's identity after her logout. 403 `identity.write`; the provider admin may."""
    client, m, headers = world
    event = {"workload": "web1", "tenant": "acme", "user": "alice", "action": "login"}
    assert client.post("/v1/identity/events", json=event, headers=headers[IDENTITY_SOURCE]).status_code == 200
    logged_in = m.store.revision()
    event["action"] = "logout"
    assert client.post("/v1/identity/events", json=event, headers=headers[IDENTITY_SOURCE]).status_code == 200
    q = {"tenant": "acme"}
    assert client.delete("/v1/workloads/web1", params=q, headers=headers[TENANT_ADMIN]).status_code == 200
    before = m.store.revision()
    r = client.post(
        "/v1/workloads/web1/rollback", params=q, json={"revision": logged_in}, headers=headers[TENANT_ADMIN]
    )
    assert r.status_code == 403, r.text
    assert r.json()["permission"] == "identity.write"
    assert m.store.revision() == before and m.get("Workload", "acme", "web1") is None
    r = client.post(
        "/v1/workloads/web1/rollback", params=q, json={"revision": logged_in}, headers=headers[PROVIDER_ADMIN]
    )
    assert r.status_code == 200, r.text
    assert m.get("Workload", "acme", "web1").spec.attributes["user"] == ["alice"]  # type: ignore[union-attr]

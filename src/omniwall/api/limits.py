"""Input limits and per-tenant quotas (docs/api.md "Input limits and quotas").

- Request bodies are bounded while they are read: a `Content-Length` above the route's limit answers 413
  before a byte is read, and a body that streams past it (chunked, or a lying header) is cut off at the
  limit with 413 (`BodyLimit`, an ASGI middleware; `/v1/apply` used to read 16 MiB before checking).
- JSON and YAML nesting is bounded before the recursive parsers run (`check_json_depth`; the YAML loader
  bounds its own composer).
- Quotas per tenant (`check_quotas`), judged on the model as a write would leave it: objects per tenant,
  and the rule expansion (each rule counted once per vNIC it may land on plus once per address it
  matches), so one apply cannot make a host state of many megabytes. A write that does not grow a
  tenant's count is never refused, so a tenant over a lowered quota can still delete.

Every limit has a default and an environment variable (read when the app is built); tests and embedders
set `app.state.limits`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniwall import PROVIDER_TENANT
from omniwall.manager.contracts import InvalidResources, Problem
from omniwall.manager.service import Manager, Plan
from omniwall.model.catalog import Catalog, is_address_literal, split_ref
from omniwall.model.loader import MAX_DEPTH
from omniwall.selectors import Selector, SelectorError, facts_of, parse
from omniwall.selectors.ast import In, fact_values

from .auth import ROLE_PERMS, Perm, Principal
from .errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_apply_bytes: int = 16 * MIB  # POST /v1/apply, and agents' reports under /v1/hosts/
    max_body_bytes: int = 1 * MIB  # every other request body (one resource, a report)
    max_objects_per_tenant: int = 10_000  # Workloads, Groups, Services, Applications, Policies
    max_rule_expansion: int = 500_000  # per tenant: rule installations + set elements (upper bound)

    ENV = {
        "max_apply_bytes": "OMNIWALL_MAX_APPLY_BYTES",
        "max_body_bytes": "OMNIWALL_MAX_BODY_BYTES",
        "max_objects_per_tenant": "OMNIWALL_MAX_OBJECTS_PER_TENANT",
        "max_rule_expansion": "OMNIWALL_MAX_RULE_EXPANSION",
    }

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for f in fields(cls):
            raw = env.get(cls.ENV[f.name])
            if raw is not None:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{cls.ENV[f.name]}={raw!r} is not an integer") from None
                if values[f.name] < 1:
                    raise ValueError(f"{cls.ENV[f.name]} must be at least 1")
        return cls(**values)


def install(app: FastAPI) -> None:
    """The body limit on every route (called once by create_app); limits already in `app.state` win."""
    if not isinstance(getattr(app.state, "limits", None), Limits):
        app.state.limits = Limits.from_env()
    app.add_middleware(BodyLimit, limits=lambda: app.state.limits)  # type: ignore[arg-type]


def limits_of(request: Request) -> Limits:
    found = getattr(request.app.state, "limits", None)
    return found if isinstance(found, Limits) else Limits()


# ------------------------------------------------------------------------------------------ body size


class BodyLimit:
    """Bounds every request body: 413 by `Content-Length`, or as soon as the stream passes the limit."""

    def __init__(self, app: ASGIApp, limits: Callable[[], Limits]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lim = self.limits()
        path = str(scope.get("path", ""))
        # Agents' reports (counters of every rule, conntrack exports of a migration) grow with the host.
        large = path == "/v1/apply" or path.startswith("/v1/hosts/")
        limit = lim.max_apply_bytes if large else lim.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # the server rejects a malformed header itself
            if too_large:
                await _send_413(send, limit)
                return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(limit)
            return message

        try:
            await self.app(scope, bounded, send)
        except TooLarge as err:  # raised where the route reads; nothing was written
            await _send_413(send, err.limit)


class TooLarge(StarletteHTTPException):
    """Raised by the bounded `receive` where a route reads its body; an HTTPException so FastAPI's own
    body parsing passes it on (it turns other exceptions into 400) and the app answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
        self.limit = limit


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body larger than {limit} bytes",
        errors=[{"document": "request", "path": "body", "reason": f"at most {limit} bytes"}],
    )


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(too_large(limit).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ JSON depth


def check_json_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """422 naming the body when JSON nests deeper than `max_depth` (scanned before `json.loads`, whose
    C parser recurses per level)."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidResources(
                    [
                        Problem(
                            "request body",
                            "body",
                            f"nested deeper than {max_depth} levels (at character {i})",
                        )
                    ]
                )
        elif ch in "]}":
            depth -= 1


async def read_json(request: Request) -> Any:
    """The request body as JSON: bounded (BodyLimit), UTF-8, nesting bounded; 400/422 naming the body."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(
            400, "body is not UTF-8", errors=[{"document": "request", "path": "body", "reason": "not UTF-8"}]
        ) from None
    check_json_depth(text)
    try:
        return json.loads(text)
    except ValueError as err:
        raise ApiError(
            400,
            "body is not JSON",
            errors=[{"document": "request", "path": "body", "reason": f"invalid JSON: {err}"}],
        ) from None


# ---------------------------------------------------------------------------------------------- quotas

TENANT_KINDS = ("workloads", "groups", "services", "applications", "policies")


def object_count(c: Catalog, tenant: str) -> int:
    return sum(1 for table in TENANT_KINDS for (t, _n) in getattr(c, table) if t == tenant)


class _Expansion:
    """The rule expansion of one tenant: an upper bound of what its rules put into host states, i.e. rule
    installations (each rule once per vNIC it may land on) plus set elements (each group or address its
    rules match, once)."""

    def __init__(self, c: Catalog, tenant: str) -> None:
        self.c = c
        self.tenant = tenant
        own = [(key, w) for key, w in c.workloads.items() if key[0] == tenant]
        self.vnics = {key: len(w.spec.vnics) for key, w in own}
        self.addresses = {key: sum(len(v.ips) for v in w.spec.vnics) for key, w in c.workloads.items()}
        self._facts: dict[tuple[str, str], dict[str, object]] = {}
        self._members: dict[tuple[str, str], frozenset[tuple[str, str]]] = {}
        self._index: dict[str, dict[str, set[tuple[str, str]]]] = {}

    def facts(self, key: tuple[str, str]) -> dict[str, object]:
        f = self._facts.get(key)
        if f is None:
            w = self.c.workloads[key]
            f = self._facts[key] = facts_of(w.metadata.labels, w.spec.attributes)
        return f

    def select(self, sel: Selector) -> Iterable[tuple[str, str]]:
        """Workloads a selector matches; `key == v` / `key in {...}` through an index of fact values
        (most selectors; matching each workload would cost groups x workloads)."""
        e = sel.expr
        if isinstance(e, In) and not e.negated:
            index = self._index.get(e.key)
            if index is None:
                index = self._index[e.key] = {}
                for wkey in self.c.workloads:
                    for v in fact_values(self.facts(wkey), e.key) or ():
                        index.setdefault(v, set()).add(wkey)
            return {w for v in e.values for w in index.get(v, ())}
        return [w for w in self.c.workloads if sel.matches(self.facts(w))]

    def members(self, key: tuple[str, str], seen: frozenset[tuple[str, str]] = frozenset()) -> frozenset:  # type: ignore[type-arg]
        if key in self._members:
            return self._members[key]
        g = self.c.groups.get(key)
        if g is None or key in seen:
            return frozenset()
        out: set[tuple[str, str]] = set()
        if g.spec.selector:
            try:
                sel = parse(g.spec.selector)
            except SelectorError:
                sel = None
            if sel is not None:
                out.update(w for w in self.select(sel) if key[0] == PROVIDER_TENANT or w[0] == key[0])
        out.update((key[0], n) for n in g.spec.workloads)
        for ref in g.spec.groups:
            out |= self.members(split_ref(ref, key[0]), seen | {key})
        self._members[key] = frozen = frozenset(out)
        return frozen

    def span(self, refs: list[str]) -> int:
        """vNICs of the tenant one side of a rule may be installed at."""
        if refs == ["any"]:
            return sum(self.vnics.values())
        return sum(
            self.vnics.get(w, 0)
            for ref in refs
            if not is_address_literal(ref)
            for w in self.members(split_ref(ref, self.tenant))
        )

    def rules(self) -> list[tuple[Any, Any]]:
        return [
            (pol, rule)
            for (t, _name), pol in self.c.policies.items()
            if t == self.tenant
            for rule in pol.spec.rules
            if not rule.disabled
        ]

    def bound(self) -> int:
        """A cheap upper bound of `total()` (every rule everywhere, every address in every set)."""
        refs = {r for _p, rule in self.rules() for r in (*rule.sources, *rule.destinations)}
        return len(self.rules()) * 2 * sum(self.vnics.values()) + len(refs) * sum(self.addresses.values())

    def total(self) -> int:
        n = 0
        peers: set[str] = set()
        for pol, rule in self.rules():
            applied = rule.appliedTo or pol.spec.appliedTo
            n += self.span(applied) if applied else self.span(rule.sources) + self.span(rule.destinations)
            peers.update(r for r in (*rule.sources, *rule.destinations) if r != "any")
        for ref in peers:  # one set per group on a host: its addresses count once, not once per rule
            if is_address_literal(ref):
                n += 1
            else:
                n += sum(self.addresses.get(w, 0) for w in self.members(split_ref(ref, self.tenant)))
        return n


def rule_expansion(c: Catalog, tenant: str, limit: int | None = None) -> int:
    """The tenant's rule expansion; with `limit`, a cheap bound when that bound is within the limit."""
    x = _Expansion(c, tenant)
    if limit is not None:
        b = x.bound()
        if b <= limit:
            return b
    return x.total()


def check_quotas(
    limits: Limits, before: Catalog, after: Catalog, tenants: set[str], *, expansion_may_grow: bool = True
) -> None:
    """422 naming the quota when a write grows a (non-provider) tenant past one."""
    problems: list[Problem] = []
    for t in sorted(tenants - {PROVIDER_TENANT}):
        n = object_count(after, t)
        if n > limits.max_objects_per_tenant and n > object_count(before, t):
            problems.append(
                Problem(
                    f"Tenant/{t}",
                    "metadata.tenant",
                    f"quota: tenant {t!r} would own {n} objects; at most {limits.max_objects_per_tenant}",
                )
            )
        if not expansion_may_grow:
            continue
        x = rule_expansion(after, t, limits.max_rule_expansion)
        if x > limits.max_rule_expansion and x > rule_expansion(before, t):
            problems.append(
                Problem(
                    f"Tenant/{t}",
                    "spec.rules",
                    f"quota: tenant {t!r}'s rules would expand to {x} rule and address entries "
                    f"(rules x the vNICs and addresses they match); at most {limits.max_rule_expansion}",
                )
            )
    if problems:
        raise InvalidResources(problems)


def check_plan_quotas(request: Request, m: Manager, plan: Plan) -> None:
    """`check_quotas` for the tenants a plan writes to, against the model it was planned on."""
    tenants = {c.tenant for c in plan.writes if c.new is not None}
    if tenants - {PROVIDER_TENANT}:
        # Services and Applications add no rule installations nor set elements
        grows = any(c.kind in ("Workload", "Group", "Policy") for c in plan.writes if c.new is not None)
        check_quotas(limits_of(request), m.catalog, plan.catalog, tenants, expansion_may_grow=grows)


def may_seed_posture(p: Principal) -> bool:
    """Posture attributes on a created Workload are taken as written only from a caller that may post
    posture reports; anyone else's are replaced by the posture recorded for the name."""
    return Perm.POSTURE_WRITE in ROLE_PERMS.get(p.role, frozenset())

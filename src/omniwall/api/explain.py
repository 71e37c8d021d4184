"""`explain` against the live manager: would this connection be allowed, hop by hop, right now?

    GET /v1/explain?from=&to=&proto=tcp&port=

`from`/`to`: a workload (`name` or `tenant/name`) or an IP address. The sim (`omniwall.sim.explain`)
judges the connection over the manager's current desired states — the same states the agents realize —
so the answer is what the kernels do (the differential test keeps sim and kernel equal).

The reply is `sim.explain.explanation_json` plus, per path, `description` (the packet in words) and, at
the top, `expectsReply` and the model `revision`: enough for `omniwall explain` to print exactly what it
prints offline.

RBAC (`resources.read`): provider roles and auditors see everything. A tenant names its own workloads
only (a bare name is its own; another tenant's `t/name` answers 404, as a GET would) or an address, and
at least one end must be its own (a workload, or an address of one of its vNICs): otherwise 422, the same
answer whether the addresses belong to another tenant or to nobody. The connection is judged over the
tenant's view of the desired states (`impact.tenant_view`: its own vNICs only), so another tenant's
address is judged like an address outside the inventory, at the tenant's own hops only: the answer says
nothing about other tenants' vNICs or policies (it used to give their verdict, which mapped their
reachability). Hops show no host names (Hosts do not exist for tenants).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from omniwall.manager.contracts import Problem
from omniwall.model.catalog import Catalog
from omniwall.sim.explain import PROTOCOLS, explain, explanation_json, resolve_workload

from .auth import Perm, Principal, authenticate, manager_of, require
from .errors import ApiError, invalid, not_found
from .impact import tenant_view

REDACTED = "hidden (another tenant's vNIC)"


def _problem(param: str, reason: str) -> ApiError:
    return invalid([Problem("request", param, reason)], f"{param}: {reason}")


def resolve(p: Principal, catalog: Catalog, ref: str, param: str) -> str:
    """A peer reference -> `tenant/name` or the address itself, as the caller may see it."""
    ref = ref.strip()
    if not ref:
        raise _problem(param, "required: a workload (name or tenant/name) or an IP address")
    try:
        return str(ipaddress.ip_address(ref))
    except ValueError:
        pass
    if p.tenant_scoped:
        tenant, _, name = ref.rpartition("/")
        tenant = tenant or (p.tenant or "")
        if tenant != p.tenant or (tenant, name) not in catalog.workloads:
            raise not_found(f"Workload/{tenant}/{name}")
        return f"{tenant}/{name}"
    try:
        w = resolve_workload(catalog, ref)
    except KeyError as err:
        message = str(err.args[0]) if err.args else f"unknown workload {ref!r}"
        if "ambiguous" in message:
            raise _problem(param, message) from None
        raise ApiError(404, message) from None
    return f"{w.metadata.tenant}/{w.metadata.name}"


def _redact_hop(hop: dict[str, Any], tenant: str) -> dict[str, Any]:
    owner = str(hop.get("workload") or "").partition("/")[0]
    if owner == tenant:
        return {**hop, "host": None}
    return {
        **{k: None for k in hop},
        "direction": hop["direction"],
        "verdict": hop["verdict"],
        "reached": hop["reached"],
        "tracked": True,
        "monitored": False,
        "antispoof": False,
        "established": hop["established"],
        "invalid": False,
        "default": False,
        "reason": "hidden",
        "decision": REDACTED,
        "redacted": True,
    }


def scoped(body: dict[str, Any], tenant: str) -> dict[str, Any]:
    """The explanation as tenant `tenant` may see it."""
    out = dict(body)
    for section in ("request", "reply", "ack"):
        path = out.get(section)
        if path is not None:
            # untracked_hosts names hosts (other tenants' too): Hosts do not exist for a tenant
            hops = [_redact_hop(h, tenant) for h in path["hops"]]
            out[section] = {**path, "hops": hops, "untracked_hosts": []}
    return out


def router() -> APIRouter:
    r = APIRouter(tags=["Explain"])

    @r.get("/v1/explain", summary="would this connection be allowed now? each hop, its verdict and rule")
    def explain_route(
        request: Request,
        from_: str = Query(..., alias="from", description="workload (name or tenant/name) or IP"),
        to: str = Query(..., description="workload (name or tenant/name) or IP"),
        proto: str = Query("tcp", description="tcp, udp, icmp or icmpv6"),
        port: int | None = Query(None, description="destination port (tcp/udp)"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        require(p, Perm.READ)
        m = manager_of(request)
        if proto.lower() not in PROTOCOLS:
            raise _problem("proto", f"{proto!r}: use one of {', '.join(PROTOCOLS)}")
        catalog, revision = m.snapshot_catalog()
        src = resolve(p, catalog, from_, "from")
        dst = resolve(p, catalog, to, "to")
        states = m.desired.all()
        if p.tenant_scoped and p.tenant is not None:
            states = {h: tenant_view(st, p.tenant) for h, st in states.items()}
            own = {a for st in states.values() for v in st.vnics for a in v.addresses}
            if not any(end in own or "/" in end for end in (src, dst)):
                raise _problem(
                    "from",
                    "one end of the connection must be one of your workloads or one of their addresses",
                )
        try:
            e = explain(catalog, states, src, dst, proto, port)
        except ValueError as err:
            text = str(err)
            raise _problem("port" if "port" in text else "from", text) from None
        body = explanation_json(e)
        c = e.connection
        for section, pv in (("request", c.request), ("reply", c.reply), ("ack", c.ack)):
            if pv is not None:
                body[section]["description"] = pv.packet.describe()
        body["expectsReply"] = c.expects_reply
        body["revision"] = revision
        if p.tenant_scoped and p.tenant is not None:
            body = scoped(body, p.tenant)
        return body

    return r


__all__ = ["resolve", "router", "scoped"]

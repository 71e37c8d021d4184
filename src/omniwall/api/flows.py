"""Flow records: agents post them, readers search, stream, graph and count them.

    POST /v1/hosts/{host}/flows   agent (own host only): a FlowBatch; 202 {accepted, dropped} once written
    GET  /v1/flows                filtered, newest first, `limit` + `continue`
    GET  /v1/flows/watch          Server-Sent Events: `flow` events (same filters), `stats` every few s
    GET  /v1/flows/graph          nodes and edges (by workload or group) with counts per verdict
    GET  /v1/flows/hits           per rule and verdict: records over the window, last hit
    GET  /v1/flows/unused         rules of the compiled model with no record over the window
    GET  /v1/flows/stats          stored rows; offered, stored, dropped by place; per host (this manager)

With several managers (etcd), each stores what its own agents ship; the reads above but `stats` ask the
live peers too and merge (api/flowrelay.py, manager/flowpeers.py; docs/ha.md "Flows across managers").
An answer that lacks a manager's store says so: `partial: true` and `errors` naming it.

Reads need `resources.read`. Scoping (docs/flows.md): a tenant role sees the rows with one end among its
own workloads; the other end is an address unless it is theirs too; rules of other tenants (and the
provider) read "(other tenant)"; host and interface names are hidden (Hosts do not exist for tenants).
Filters naming another tenant's workload, group or policy answer 404, as a GET of that object does.
Unknown query fields answer 422 naming them. Logic lives in manager/flows.py and manager/flowstore.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NotRequired

import msgspec
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from omniwall.flows.record import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, VERDICTS
from omniwall.manager import insight
from omniwall.manager.flowgraph import build_graph
from omniwall.manager.flowpeers import (
    EXHAUSTED,
    SourceError,
    decode_cursor,
    encode_cursor,
    merge_aggregate,
    merge_hits,
    merge_page,
)
from omniwall.manager.flows import FlowService, Subscription, rows_of
from omniwall.manager.flowstore import COLUMNS, FlowQuery, Hit, Row
from omniwall.manager.service import Manager

from . import flowrelay
from .auth import Perm, Principal, authenticate, check_visible, manager_of, read_tenant, require
from .errors import ApiError, not_found

OTHER_TENANT = "(other tenant)"
SSE = "text/event-stream"
MAX_LIMIT = 1000
NAME = 253  # longest name we accept in a record's text fields

# ---------------------------------------------------------------------------------------------- models

Text = Annotated[str, Field(max_length=NAME)]
Count = Annotated[int, Field(ge=0)]


class FlowRecordIn(TypedDict):
    """One FlowRecord as posted (omniwall/flows/record.py is the contract). A TypedDict, not a model:
    validated straight into dicts, which halves the parse cost of a batch. Unknown fields (a newer
    agent's) are ignored."""

    start: float
    end: float
    host: Text
    hop: Literal["egress", "ingress"]
    ifname: Text
    workload: Text
    verdict: Literal["allowed", "denied", "rejected", "would-deny"]
    rule_id: Count
    rule_tenant: Text
    policy: Text
    rule: Text
    category: Text
    revision: Count
    proto: Annotated[str, Field(max_length=16)]
    src: Annotated[str, Field(max_length=64)]
    dst: Annotated[str, Field(max_length=64)]
    sport: NotRequired[Annotated[int, Field(ge=0, le=65535)]]  # absent: 0
    dport: NotRequired[Annotated[int, Field(ge=0, le=65535)]]  # absent: 0
    packets: NotRequired[Count]  # absent: 0
    bytes: NotRequired[Count]  # absent: 0
    count: NotRequired[Annotated[int, Field(ge=0)]]  # absent: 1; 0: a connection's completion (record.py)
    final: NotRequired[bool]  # absent: true


class FlowBatchIn(TypedDict):
    host: Text
    records: NotRequired[Annotated[list[FlowRecordIn], Field(max_length=MAX_BATCH_RECORDS)]]
    dropped: NotRequired[Annotated[dict[Annotated[str, Field(max_length=64)], Count], Field(max_length=32)]]


BATCH = TypeAdapter(FlowBatchIn)  # the published schema (OpenAPI); parsing is by the decoder below


# The decoder of the ingest route: the same fields and bounds as FlowRecordIn/FlowBatchIn (a unit test
# compares them), parsed by msgspec straight into structs. pydantic's validate_json cost 6.6 us a record,
# msgspec 1.4 (bench/flows.py): the parse is serial under the GIL, in the same process as the writer.
_MText = Annotated[str, msgspec.Meta(max_length=NAME)]
_MCount = Annotated[int, msgspec.Meta(ge=0)]
_MPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class _RecordIn(msgspec.Struct, gc=False):
    """Field order is FlowRecord's (and flowstore.COLUMNS'): `astuple` gives `rows_of` its input."""

    start: float
    end: float
    host: _MText
    hop: Literal["egress", "ingress"]
    ifname: _MText
    workload: _MText
    verdict: Literal["allowed", "denied", "rejected", "would-deny"]
    rule_id: _MCount
    rule_tenant: _MText
    policy: _MText
    rule: _MText
    category: _MText
    revision: _MCount
    proto: Annotated[str, msgspec.Meta(max_length=16)]
    src: Annotated[str, msgspec.Meta(max_length=64)]
    dst: Annotated[str, msgspec.Meta(max_length=64)]
    sport: _MPort = 0
    dport: _MPort = 0
    packets: _MCount = 0
    bytes: _MCount = 0
    count: _MCount = 1
    final: bool = True


class _BatchIn(msgspec.Struct, gc=False):
    host: _MText
    records: Annotated[list[_RecordIn], msgspec.Meta(max_length=MAX_BATCH_RECORDS)] = []
    dropped: Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=64)], _MCount], msgspec.Meta(max_length=32)
    ] = {}


_DECODE = msgspec.json.Decoder(_BatchIn)
_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.S)
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")


def _problem(err: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's message → (path "records.3.dport", reason)."""
    text = str(err)
    m = _AT.match(text)
    reason, at = (m.group(1), m.group(2)) if m else (text, "")
    path = re.sub(r"\[(\d+)\]", r".\1", at).lstrip(".")
    missing = _MISSING.match(reason)
    if missing:
        path = f"{path}.{missing.group(1)}".lstrip(".")
        reason = "field required"
    return path, reason


class IngestResult(BaseModel):
    host: str
    accepted: int = Field(description="records queued for storage")
    dropped: int = Field(description="records dropped (manager queue full), counted in /v1/flows/stats")


class Flow(BaseModel):
    """A stored record as a reader sees it. `None`: hidden from this reader (or unknown to the model)."""

    id: int | None = Field(None, description="insertion order; None on live events not yet stored")
    start: float
    end: float
    host: str | None
    hop: str
    ifname: str | None
    workload: str | None = Field(description="the local vNIC's workload (tenant/name)")
    verdict: str
    rule_id: int
    rule_tenant: str
    policy: str
    rule: str
    category: str
    revision: int
    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    packets: int
    bytes: int
    count: int
    final: bool
    src_workload: str | None
    src_tenant: str | None
    dst_workload: str | None
    dst_tenant: str | None
    store: str | None = Field(
        None, description="the flow store holding it (several managers: ids are per store)"
    )


class SourceProblem(BaseModel):
    manager: str = Field(description="the manager's id ('' when unknown)")
    url: str
    store: str = Field(description="its flow store's id")
    error: str


class Partial(BaseModel):
    """With several managers: whether a store's rows are missing from the answer, and why."""

    partial: bool = Field(False, description="true: the rows of the stores in `errors` are not in the answer")
    errors: list[SourceProblem] = Field(default_factory=list)
    managers: int = Field(1, description="managers whose stores answered")


class FlowPage(Partial):
    model_config = ConfigDict(populate_by_name=True)

    items: list[Flow]
    continue_: str | None = Field(None, alias="continue", description="pass as `continue` for the next page")


class Node(BaseModel):
    id: str = Field(description='"workload:t/n", "group:t/n" or "address:ip"')
    kind: Literal["workload", "group", "address"]
    name: str


class Edge(BaseModel):
    source: str
    target: str
    verdicts: dict[str, int] = Field(description="records per verdict")
    total: int


class Graph(Partial):
    window: str
    by: Literal["workload", "group"]
    nodes: list[Node]
    edges: list[Edge]


class RuleHits(BaseModel):
    rule_id: int
    rule_tenant: str
    policy: str
    rule: str
    category: str
    verdicts: dict[str, int]
    total: int
    last_hit: str = Field(description="RFC 3339, UTC")


class HitList(Partial):
    window: str
    rules: list[RuleHits]


class RuleRef(BaseModel):
    rule_id: int
    rule_tenant: str
    policy: str
    rule: str
    category: str


class UnusedList(Partial):
    window: str
    rules: list[RuleRef]


class FlowStats(BaseModel):
    rows: int = Field(description="records in the store now")
    offered: int = Field(description="records agents posted in accepted batches since the manager started")
    stored: int
    pending: int = Field(description="accepted, not yet written")
    pruned: int = Field(description="deleted by retention")
    dropped: dict[str, int] = Field(description="records lost in the manager, by place")
    refusedBatches: dict[str, int] = Field(description="batches refused whole, by reason")
    deferredBatches: int = Field(
        0, description="batches answered 429 (queue full): kept by the agent, retried"
    )
    hosts: dict[str, dict[str, Any]] = Field(description="per host: received, batches, agentDropped")
    watchDropped: int = Field(description="records live readers fell too far behind to receive")
    writeSeconds: float = Field(0.0, description="wall seconds the writer spent storing (store throughput)")


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid token"},
    403: {"description": "the role lacks the permission named in the body"},
    404: {"description": "a filter names an object the caller cannot see"},
    422: {"description": "an unknown or invalid query field (named in the body)"},
}

# ---------------------------------------------------------------------------------------------- parsing

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _bad(field: str, reason: str, status: int = 422) -> ApiError:
    return ApiError(
        status,
        f"{field}: {reason}",
        errors=[{"document": "request", "path": f"query.{field}", "reason": reason}],
    )


def parse_duration(text: str, field: str) -> float:
    """`90s`, `5m`, `1h`, `2d`, `250ms` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise _bad(field, f"{text!r} is not a duration like 30s, 5m, 1h or 2d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_time(text: str | None, field: str, now: float) -> float | None:
    """RFC 3339 (`2026-12-06T21:00:00Z`), a relative duration back from now (`5m`), or epoch seconds."""
    if text is None or text == "":
        return None
    t = text.strip()
    if _DURATION.match(t):
        return now - parse_duration(t, field)
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise _bad(field, f"{text!r} is neither RFC 3339 time nor a duration like 5m") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def only(*allowed: str) -> Callable[[Request], None]:
    """A dependency refusing query fields outside `allowed` (422 naming them)."""
    names = frozenset(allowed)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - names)
        if unknown:
            raise ApiError(
                422,
                f"unknown query field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}",
                errors=[
                    {"document": "request", "path": f"query.{u}", "reason": "unknown field"} for u in unknown
                ],
            )

    return check


FILTERS = (
    "tenant",
    "workload",
    "group",
    "policy",
    "rule",
    "verdict",
    "host",
    "proto",
    "port",
    "since",
    "until",
)


class Filters(BaseModel):
    tenant: str | None = None
    workload: str | None = None
    group: str | None = None
    policy: str | None = None
    rule: str | None = None
    verdict: str | None = None
    host: str | None = None
    proto: str | None = None
    port: int | None = None
    since: str | None = None
    until: str | None = None


def filters(
    tenant: str | None = Query(None, description="rows touching this tenant's workloads"),
    workload: str | None = Query(None, description="tenant/name (or name: the caller's tenant): either end"),
    group: str | None = Query(None, description="tenant/name: either end is a current member"),
    policy: str | None = Query(None, description="tenant/name of the deciding policy"),
    rule: str | None = Query(None, description="a rule id, or tenant/policy/rule"),
    verdict: Literal["allowed", "denied", "rejected", "would-deny"] | None = Query(None),
    host: str | None = Query(None, description="the reporting host (not for tenant roles)"),
    proto: str | None = Query(None, description="tcp, udp, icmp, ..."),
    port: int | None = Query(None, ge=0, le=65535, description="destination port (ICMP: type)"),
    since: str | None = Query(None, description="RFC 3339 or relative (5m, 1h): records ending at or after"),
    until: str | None = Query(None, description="RFC 3339 or relative: records ending before"),
) -> Filters:
    return Filters(
        tenant=tenant,
        workload=workload,
        group=group,
        policy=policy,
        rule=rule,
        verdict=verdict,
        host=host,
        proto=proto,
        port=port,
        since=since,
        until=until,
    )


def _key(p: Principal, ref: str, field: str) -> tuple[str, str]:
    tenant, sep, name = ref.rpartition("/")
    if not name or "/" in tenant:
        raise _bad(field, f"{ref!r}: expected tenant/name or name")
    return read_tenant(p, tenant if sep else None), name


def resolve(p: Principal, m: Manager, f: Filters, now: float) -> FlowQuery | None:
    """The store query for these filters as `p` may ask them; None: nothing can match (empty answer)."""
    require(p, Perm.READ)
    scope = p.tenant if p.tenant_scoped else None
    if scope is not None and f.tenant not in (None, scope):
        return None  # like the audit log: another tenant's rows are simply not there
    if scope is not None and f.host is not None:
        raise not_found(f"host {f.host}")  # Hosts do not exist for tenants
    catalog = m.catalog
    workloads: tuple[str, ...] | None = None
    addresses: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()
    if f.workload is not None:
        t, n = _key(p, f.workload, "workload")
        check_visible(p, catalog.workloads.get((t, n)), catalog, f"Workload/{t}/{n}")
        workloads = (f"{t}/{n}",)
    if f.group is not None:
        if f.workload is not None:
            raise _bad("group", "give workload or group, not both")
        t, n = _key(p, f.group, "group")
        check_visible(p, catalog.groups.get((t, n)), catalog, f"Group/{t}/{n}")
        members = insight.group_members(catalog, t, n)
        wls = tuple(w["workload"] for w in members["workloads"])
        workloads = wls
        addresses = tuple(members["addresses"])
        cidrs = tuple(c for c in members["cidrs"] if ipaddress.ip_network(c).num_addresses > 1)
    rule_tenant = policy = rule = None
    rule_id: int | None = None
    if f.policy is not None:
        rule_tenant, policy = _key(p, f.policy, "policy")
        check_visible(p, m.get("Policy", rule_tenant, policy), catalog, f"Policy/{rule_tenant}/{policy}")
    if f.rule is not None:
        if f.rule.isdigit():
            rule_id = int(f.rule)
            if scope is not None:
                rule_tenant = scope  # a tenant may only ask for its own rules by id
        else:
            parts = f.rule.split("/")
            if len(parts) != 3 or not all(parts):
                raise _bad("rule", f"{f.rule!r}: expected a rule id or tenant/policy/rule")
            rule_tenant, policy, rule = parts
            check_visible(p, m.get("Policy", rule_tenant, policy), catalog, f"Policy/{rule_tenant}/{policy}")
    since = parse_time(f.since, "since", now)
    until = parse_time(f.until, "until", now)
    return FlowQuery(
        scope_tenant=scope,
        tenant=f.tenant if scope is None else None,
        workloads=workloads,
        addresses=addresses,
        cidrs=cidrs,
        rule_tenant=rule_tenant,
        policy=policy,
        rule=rule,
        rule_id=rule_id,
        verdict=f.verdict,
        host=f.host,
        proto=f.proto,
        port=f.port,
        since=since,
        until=until,
    )


def present(row: Row, row_id: int | None, scope: str | None) -> dict[str, Any]:
    """A row as JSON for a reader; `scope` (a tenant role's tenant) redacts what is not theirs."""
    d: dict[str, Any] = dict(zip(COLUMNS, row, strict=True))
    d["end"] = d.pop("t")
    d["final"] = bool(d["final"])
    d["id"] = row_id
    if scope is not None:
        d["host"] = d["ifname"] = None
        if d["src_tenant"] != scope:
            d["src_workload"] = d["src_tenant"] = None
        if d["dst_tenant"] != scope:
            d["dst_workload"] = d["dst_tenant"] = None
        if not str(d["workload"]).startswith(scope + "/"):
            d["workload"] = None
        if d["rule_tenant"] != scope:
            d["rule_tenant"] = d["policy"] = d["rule"] = OTHER_TENANT
            d["rule_id"] = 0
    return d


def flows_of(request: Request) -> FlowService:
    return request.app.state.flows  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- ingest


def _batch_schema() -> dict[str, Any]:
    """FlowBatchIn's JSON schema with its definitions inlined (the body is read by hand, bounded)."""
    s = BATCH.json_schema()
    defs = s.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(s)  # type: ignore[no-any-return]


async def read_bounded(request: Request, svc: FlowService) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed MAX_BATCH_BYTES (header or stream)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            svc.refuse("malformed")
            raise ApiError(400, f"Content-Length {length!r} is not a number")
        if int(length) > MAX_BATCH_BYTES:
            svc.refuse("oversized")
            raise ApiError(
                413,
                f"body of {length} bytes exceeds MAX_BATCH_BYTES ({MAX_BATCH_BYTES})",
                limit=MAX_BATCH_BYTES,
            )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > MAX_BATCH_BYTES:
            svc.refuse("oversized")
            raise ApiError(413, f"body exceeds MAX_BATCH_BYTES ({MAX_BATCH_BYTES})", limit=MAX_BATCH_BYTES)
    return bytes(buf)


def parse_batch(body: bytes, host: str, svc: FlowService) -> _BatchIn:
    try:
        batch = _DECODE.decode(body)
    except msgspec.ValidationError as err:
        path, reason = _problem(err)
        if path == "records" and "length <=" in reason:
            svc.refuse("oversized")
            raise ApiError(
                413,
                f"records: more than MAX_BATCH_RECORDS ({MAX_BATCH_RECORDS}) in one batch",
                limit=MAX_BATCH_RECORDS,
                errors=[{"document": "request body", "path": "records", "reason": "too many records"}],
            ) from None
        svc.refuse("malformed")
        raise ApiError(
            422,
            f"invalid flow batch: {path or 'body'}: {reason}",
            errors=[{"document": "request body", "path": path or "body", "reason": reason}],
        ) from None
    except msgspec.DecodeError as err:
        svc.refuse("malformed")
        raise ApiError(
            422,
            f"invalid flow batch: body: {err}",
            errors=[{"document": "request body", "path": "body", "reason": str(err)}],
        ) from None
    if batch.host != host:
        svc.refuse("wrong-host")
        raise ApiError(
            422,
            f"host: the batch names host {batch.host!r}, posted for {host!r}",
            errors=[{"document": "request body", "path": "host", "reason": f"must be {host!r}"}],
        )
    for i, r in enumerate(batch.records):
        if r.host != host:
            svc.refuse("wrong-host")
            raise ApiError(
                422,
                f"records.{i}.host: {r.host!r} is not the posting host {host!r}",
                errors=[
                    {"document": "request body", "path": f"records.{i}.host", "reason": f"must be {host!r}"}
                ],
            )
    return batch


# ---------------------------------------------------------------------------------------------- routes


def router() -> APIRouter:
    r = APIRouter(tags=["Flows"])

    @r.post(
        "/v1/hosts/{host}/flows",
        status_code=202,
        summary="agent: post a batch of flow records (FlowBatch JSON)",
        response_model=IngestResult,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": _batch_schema()}}}
        },
        responses={
            400: {"description": "unreadable Content-Length"},
            403: {"description": "not an agent, or an agent of another host"},
            404: {"description": "unknown host"},
            413: {"description": f"more than {MAX_BATCH_RECORDS} records or {MAX_BATCH_BYTES} bytes"},
            429: {"description": "the flow queue is full: keep the batch, retry later (Retry-After)"},
            422: {"description": "malformed batch: each problem names its field"},
            503: {"description": "the flow store failed to write the batch: keep it, retry (Retry-After)"},
        },
    )
    async def ingest(request: Request, host: str, p: Principal = Depends(authenticate)) -> IngestResult:
        m = manager_of(request)
        svc = flows_of(request)
        require(p, Perm.STATUS_WRITE)
        if p.host is not None and p.host != host:
            svc.refuse("wrong-host")
            raise ApiError(
                403, f"this token is scoped to host {p.host}, not {host}", permission=Perm.STATUS_WRITE.value
            )
        if not m.host_known(host):
            raise not_found(f"host {host}")
        if svc.busy(MAX_BATCH_RECORDS):
            # the writer is behind: refuse before reading and parsing (that work would be thrown away);
            # the agent keeps the batch and retries with its backoff, so overload is not loss
            raise ApiError(
                429,
                f"flow queue full ({svc.queue_records} records wait to be written); retry later",
                headers={"Retry-After": "1"},
            )
        body = await read_bounded(request, svc)

        def parse() -> tuple[list[Row], dict[str, int]]:
            batch = parse_batch(body, host, svc)
            astuple = msgspec.structs.astuple
            return rows_of(host, map(astuple, batch.records), svc.address_book(m)), batch.dropped

        rows, agent_dropped = await run_in_threadpool(parse)
        # Acknowledge only what is committed: a manager that dies with records in its queue has not
        # said 202 for them, so the agent still holds them and sends them again (at least once).
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[bool] = loop.create_future()

        def on_stored(ok: bool) -> None:
            loop.call_soon_threadsafe(lambda: stored.done() or stored.set_result(ok))

        accepted, dropped = svc.submit(host, rows, agent_dropped, on_stored)
        if accepted and not await stored:
            raise ApiError(
                503, "the flow store failed to write this batch; retry", headers={"Retry-After": "1"}
            )
        return IngestResult(host=host, accepted=accepted, dropped=dropped)

    @r.get(
        "/v1/flows",
        summary="flow records, newest first, filtered",
        response_model=FlowPage,
        response_model_by_alias=True,
        responses=ERRORS,
        dependencies=[Depends(only(*FILTERS, "limit", "continue"))],
    )
    async def list_flows(
        request: Request,
        f: Filters = Depends(filters),
        limit: int = Query(100, ge=1, le=MAX_LIMIT),
        continue_: str | None = Query(None, alias="continue", description="from the previous page"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        q = await run_in_threadpool(resolve, p, m, f, time.time())
        if q is None:
            return {"items": [], "continue": None}
        return await page(request, q, limit, continue_)

    @r.get(
        "/v1/flows/watch",
        summary="Server-Sent Events: `flow` events as records arrive (same filters), `stats` periodically",
        response_class=StreamingResponse,
        responses={200: {"content": {SSE: {}}}, 503: {"description": "too many live readers"}, **ERRORS},
        dependencies=[Depends(only(*FILTERS, "limit", "stats", "heartbeat"))],
    )
    async def watch(
        request: Request,
        f: Filters = Depends(filters),
        limit: int | None = Query(None, ge=1, description="end the stream after this many flow events"),
        stats: float = Query(5.0, ge=0.1, le=300, description="seconds between `stats` events"),
        heartbeat: float = Query(15.0, ge=0.1, le=300, description="seconds of silence between comments"),
        p: Principal = Depends(authenticate),
    ) -> StreamingResponse:
        m = manager_of(request)
        svc = flows_of(request)
        q = await run_in_threadpool(resolve, p, m, f, time.time())
        try:
            sub = svc.subscribe()  # before the response starts: a refusal can still be a 503
        except LookupError as err:
            raise ApiError(503, str(err)) from None
        return StreamingResponse(
            _watch_events(request, svc, sub, q, limit=limit, stats_every=stats, heartbeat=heartbeat),
            background=BackgroundTask(svc.unsubscribe, sub),  # also when the stream never started
            media_type=SSE,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @r.get(
        "/v1/flows/graph",
        summary="traffic graph over a window: nodes and edges with record counts per verdict",
        response_model=Graph,
        responses=ERRORS,
        dependencies=[Depends(only(*FILTERS, "window", "by"))],
    )
    async def graph(
        request: Request,
        f: Filters = Depends(filters),
        window: str = Query("1h", description="how far back: 5m, 1h, 1d"),
        by: Literal["workload", "group"] = Query("workload"),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        now = time.time()
        span = parse_duration(window, "window")
        q = await run_in_threadpool(resolve, p, m, f, now)
        if q is None:
            return {"window": window, "by": by, "nodes": [], "edges": []}
        if q.since is None or q.since < now - span:
            q = _with(q, since=now - span)
        cols = ("src", "src_workload", "src_tenant", "dst", "dst_workload", "dst_tenant", "verdict")
        local = run_in_threadpool(flows_of(request).store.aggregate, q, cols)
        body = {"op": "aggregate", "query": asdict(q), "columns": list(cols)}
        answers, extra = await fan_out(request, local, body)
        rows = merge_aggregate(a if isinstance(a, list) else a["rows"] for a in answers)
        catalog, _ = m.snapshot_catalog()
        out = {"window": window, "by": by, **build_graph(rows, by, q.scope_tenant, catalog)}
        return {**out, **extra}

    @r.get(
        "/v1/flows/hits",
        summary="per rule: records per verdict over the window and the last hit",
        response_model=HitList,
        responses=ERRORS,
        dependencies=[Depends(only("window"))],
    )
    async def hits(
        request: Request, window: str = Query("1h"), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        require(p, Perm.READ)
        span = parse_duration(window, "window")
        scope = p.tenant if p.tenant_scoped else None
        found, extra = await all_hits(request, time.time() - span)
        by_rule: dict[int, dict[str, Any]] = {}
        for h in found:
            if scope is not None and h.rule_tenant != scope:
                continue
            e = by_rule.setdefault(
                h.rule_id,
                {
                    "rule_id": h.rule_id,
                    "rule_tenant": h.rule_tenant,
                    "policy": h.policy,
                    "rule": h.rule,
                    "category": h.category,
                    "verdicts": {},
                    "total": 0,
                    "last": 0.0,
                },
            )
            e["verdicts"][h.verdict] = e["verdicts"].get(h.verdict, 0) + h.count
            e["total"] += h.count
            e["last"] = max(e["last"], h.last)
        rules = sorted(by_rule.values(), key=lambda e: (-e["total"], e["rule_id"]))
        for e in rules:
            e["last_hit"] = rfc3339(e.pop("last"))
        return {"window": window, "rules": rules, **extra}

    @r.get(
        "/v1/flows/unused",
        summary="rules of the compiled model with no flow record over the window",
        response_model=UnusedList,
        responses=ERRORS,
        dependencies=[Depends(only("window"))],
    )
    async def unused(
        request: Request, window: str = Query("1h"), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        require(p, Perm.READ)
        span = parse_duration(window, "window")
        scope = p.tenant if p.tenant_scoped else None
        found, extra = await all_hits(request, time.time() - span)
        hit = {h.rule_id for h in found}
        rules: dict[int, dict[str, Any]] = {}
        for st in manager_of(request).desired.all().values():
            for ru in st.rules:
                if ru.id in hit or ru.id in rules or (scope is not None and ru.tenant != scope):
                    continue
                rules[ru.id] = {
                    "rule_id": ru.id,
                    "rule_tenant": ru.tenant,
                    "policy": ru.policy,
                    "rule": ru.rule,
                    "category": ru.category,
                }
        out = sorted(rules.values(), key=lambda e: (e["rule_tenant"], e["policy"], e["rule"]))
        # a rule is unused only if no store that answered has a hit: a partial answer may overstate it
        return {"window": window, "rules": out, **extra}

    @r.get(
        "/v1/flows/stats",
        summary="stored rows, records offered/stored/dropped by place, per host",
        response_model=FlowStats,
        responses=ERRORS,
        dependencies=[Depends(only())],
    )
    def flow_stats(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
        require(p, Perm.READ)
        svc = flows_of(request)
        out = {"rows": svc.store.rows(), **svc.stats()}
        if p.tenant_scoped:
            out["hosts"] = {}  # host names do not exist for tenants; the totals are cluster-wide
        return out

    r.include_router(flowrelay.router())  # POST /v1/flows/peer: managers only
    return r


# ---------------------------------------------------------------------------------------------- fan-out


def _extra(errors: list[SourceError], answered: int) -> dict[str, Any]:
    return {"partial": bool(errors), "errors": [e.to_json() for e in errors], "managers": answered}


async def fan_out(
    request: Request, local: Awaitable[Any], body: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """This manager's answer (`local`, awaited) and every live peer's to `body`: (answers, the partial
    marker fields). Without peers: the local answer alone, complete."""
    reg, peers, missing = await flowrelay.sources(request)
    theirs = flowrelay.call_peers(request, reg, peers, body)
    mine, (answers, errors) = await asyncio.gather(local, theirs)
    errors = missing + errors
    return [mine, *answers.values()], _extra(errors, 1 + len(answers))


async def all_hits(request: Request, since: float) -> tuple[list[Hit], dict[str, Any]]:
    local = run_in_threadpool(flows_of(request).store.hits, since)
    answers, extra = await fan_out(request, local, {"op": "hits", "since": since})
    return merge_hits(a if isinstance(a, list) else flowrelay.hits_of(a) for a in answers), extra


async def page(request: Request, q: FlowQuery, limit: int, continue_: str | None) -> dict[str, Any]:
    """One page of `q` over every live manager's store, newest first (manager/flowpeers.py). With one
    manager (no peer, no missing store) the cursor stays a plain row id, as before."""
    store = flows_of(request).store
    reg, peers, missing = await flowrelay.sources(request)
    scope = q.scope_tenant
    if not peers and not missing and (continue_ is None or continue_.isdigit()):
        if continue_ is not None:
            q = _with(q, before_id=int(continue_))
        found = await run_in_threadpool(store.query, q, limit)
        items = [{**present(row, rid, scope), "store": store.store_id} for rid, row in found]
        more = str(found[-1][0]) if len(found) == limit else None
        return {"items": items, "continue": more}
    try:
        cursor = decode_cursor(continue_, store.store_id) if continue_ else {}
    except ValueError as err:
        raise _bad("continue", str(err)) from None

    def below(sid: str) -> FlowQuery:
        pos = cursor.get(sid)
        return q if pos is None else _with(q, before_id=pos)

    async def local() -> list[tuple[int, Row]]:
        if cursor.get(store.store_id) == EXHAUSTED:
            return []
        return await run_in_threadpool(store.query, below(store.store_id), limit)

    asked = [pr for pr in peers if cursor.get(pr.store) != EXHAUSTED]
    # each peer gets the query below its own position (one body per peer: positions differ)
    results = await asyncio.gather(
        local(),
        *(
            flowrelay.call_peers(request, reg, [pr], flowrelay.query_body(below(pr.store), limit))
            for pr in asked
        ),
    )
    answers = {store.store_id: results[0]}
    errors = list(missing)
    for got, errs in results[1:]:
        errors += errs
        for a in got.values():
            answers[str(a["store"])] = flowrelay.found_of(a)
    failed = [e.store for e in errors if e.store]
    rows, nxt = merge_page(answers, limit, cursor, failed)
    items = [{**present(row, rid, scope), "store": sid} for sid, rid, row in rows]
    done = 1 + sum(1 for pr in asked if pr.store in answers) + sum(1 for pr in peers if pr not in asked)
    return {
        "items": items,
        "continue": encode_cursor(nxt) if nxt is not None else None,
        **_extra(errors, done),
    }


def _with(q: FlowQuery, **changes: Any) -> FlowQuery:
    from dataclasses import replace

    return replace(q, **changes)


async def _watch_events(
    request: Request,
    svc: FlowService,
    sub: Subscription,
    q: FlowQuery | None,
    *,
    limit: int | None,
    stats_every: float,
    heartbeat: float,
) -> AsyncIterator[bytes]:
    """Catch-up (stored rows since `since`, oldest first) when asked, then live rows as they arrive.
    With several managers, every live peer's rows too (`PeerFeeds`), and a `peers` event whenever the
    set of managers streaming changes: {"managers", "errors", "partial"} (partial: some store's rows are
    not in this stream)."""
    sent = 0
    scope = q.scope_tenant if q is not None else None
    feeds: flowrelay.PeerFeeds | None = None
    try:
        yield b": omniwall flows\n\n"
        reg = flowrelay.registry_of(request)
        if reg.clustered and q is not None:
            feeds = flowrelay.PeerFeeds(request, reg, sub, q)
            feeds.start()  # before the catch-up: a row stored meanwhile is streamed, not lost
        if q is not None and q.since is not None:
            stored = await page(request, q, limit or MAX_LIMIT, None)
            for item in reversed(stored["items"]):
                yield _event("flow", item)
                sent += 1
                if limit is not None and sent >= limit:
                    return
        last_stats = last_out = time.monotonic()
        while True:
            if feeds is not None:
                while not feeds.changes.empty():
                    yield _event("peers", feeds.changes.get_nowait())
            now = time.monotonic()
            wait = min(stats_every - (now - last_stats), heartbeat - (now - last_out))
            if feeds is not None:
                wait = min(wait, 0.5)  # peer changes are told within half a second
            rows = await sub.get(max(0.01, wait))
            if rows is not None and q is not None:
                for row in rows:
                    if q.matches(row):
                        yield _event("flow", present(row, None, scope))
                        last_out = time.monotonic()
                        sent += 1
                        if limit is not None and sent >= limit:
                            return
            now = time.monotonic()
            if now - last_stats >= stats_every:
                st = svc.stats()
                yield _event(
                    "stats",
                    {
                        "offered": st["offered"],
                        "stored": st["stored"],
                        "dropped": st["dropped"],
                        "watchDropped": sub.dropped,
                        "agentDropped": _agent_totals(st["hosts"]),
                    },
                )
                last_stats = last_out = now
            elif now - last_out >= heartbeat:
                yield b": keep-alive\n\n"
                last_out = now
            if await request.is_disconnected():
                return
    finally:
        if feeds is not None:
            await feeds.stop()
        svc.unsubscribe(sub)


def _agent_totals(hosts: dict[str, dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in hosts.values():
        for place, n in h["agentDropped"].items():
            out[place] = out.get(place, 0) + n
    return out


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


__all__ = ["VERDICTS", "FlowBatchIn", "FlowRecordIn", "parse_duration", "parse_time", "present", "router"]

"""Host feed wire format: NDJSON, one JSON object per line, over one long-lived HTTP response.

Manager -> agent (`GET /v1/hosts/{host}/feed?from=R`):
    {"type":"snapshot","revision":R,"state":<HostDesiredState JSON>}   from=0, unknown or too old
    {"type":"delta","delta":<HostDelta JSON>}                          delta.from_revision -> to_revision
    {"type":"heartbeat","revision":R}                                  nothing changed; R = current
    {"type":"command","id":ID,"op":OP,"args":{...}}                    an agent command (migration);
        answered by POST /v1/hosts/{host}/commands/{ID} with the result object (or {"error": ...})
Agent -> manager (`POST /v1/hosts/{host}/status`), one JSON object:
    {"realized_revision":R, "error":null, "counters":[{"rule_id":1,"packets":2,"bytes":3}],
     "addresses":{...}}
Unknown message types must be ignored by readers (forward compatibility).
A feed response with the header `X-Omniwall-Status-Stream: 1` (`STATUS_STREAM_HEADER`) says the
manager also takes those reports as lines on one long-lived `POST /v1/hosts/{host}/status/stream`.

A delta's set updates carry added and removed elements only (`SetUpdate`; its in-memory `result` is
marked `wire: False` and `plain()` leaves it out), so a member change costs the same bytes whatever the
group's size; the receiver patches its own copy (`SetUpdate.after`, `apply_delta`). The deltas are the
compiler's own (docs/design/delta-path.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from omniwall.compiler.ir import HostDelta, HostDesiredState, delta_from_json, plain

# Feed lines are encoded by msgspec straight from the IR's dataclasses (sorted keys, like
# `json.dumps(plain(x), sort_keys=True)` did, and the same JSON values): a delta line for each host
# of a change was a good part of the manager's cost per host (bench/manager_hosts.py). The one field
# kept off the wire (`SetUpdate.result`, `wire: False`) lives in a delta's set updates: those alone
# go through `plain`.
_ENCODER = msgspec.json.Encoder(order="sorted")

STATUS_STREAM_HEADER = "X-Omniwall-Status-Stream"  # on a feed response: this manager takes status streams


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    state: HostDesiredState


@dataclass(frozen=True, slots=True)
class Delta:
    delta: HostDelta

    @property
    def revision(self) -> int:
        return self.delta.to_revision


@dataclass(frozen=True, slots=True)
class Heartbeat:
    revision: int


@dataclass(frozen=True, slots=True)
class Unknown:
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Command:
    """A one-off request to the agent (export/import/flush conntrack entries for a migration)."""

    id: str
    op: str
    args: dict[str, Any]


Message = Snapshot | Delta | Heartbeat | Command | Unknown


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def snapshot_line(state: HostDesiredState) -> bytes:
    return _ENCODER.encode({"type": "snapshot", "revision": state.revision, "state": state}) + b"\n"


def delta_line(delta: HostDelta) -> bytes:
    body: Any = delta
    if delta.set_updates:
        body = {f: getattr(delta, f) for f in _DELTA_FIELDS}
        body["set_updates"] = plain(delta.set_updates)
    return _ENCODER.encode({"type": "delta", "delta": body}) + b"\n"


_DELTA_FIELDS = tuple(HostDelta.__dataclass_fields__)


def heartbeat_line(revision: int) -> bytes:
    return _line({"type": "heartbeat", "revision": revision})


def command_line(cmd: dict[str, Any]) -> bytes:
    """`cmd` = {"type": "command", "id", "op", "args"}."""
    return _line({**cmd, "type": "command"})


def encode(msg: Message) -> bytes:
    match msg:
        case Snapshot(state=state):
            return snapshot_line(state)
        case Delta(delta=delta):
            return delta_line(delta)
        case Heartbeat(revision=rev):
            return heartbeat_line(rev)
        case Command(id=cid, op=op, args=args):
            return _line({"type": "command", "id": cid, "op": op, "args": args})
        case Unknown(type=t, data=data):
            return _line({**data, "type": t})
    raise TypeError(f"not a feed message: {msg!r}")


def decode(line: str | bytes) -> Message:
    """One NDJSON line -> a message; ValueError on malformed input."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"feed line is not JSON: {err}") from None
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError("feed line is not an object with a 'type'")
    try:
        match d["type"]:
            case "snapshot":
                return Snapshot(int(d["revision"]), HostDesiredState.from_json(d["state"]))
            case "delta":
                return Delta(delta_from_json(d["delta"]))
            case "heartbeat":
                return Heartbeat(int(d["revision"]))
            case "command":
                return Command(str(d["id"]), str(d["op"]), dict(d.get("args") or {}))
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed {d['type']} message: missing or bad {err}") from None
    return Unknown(str(d["type"]), d)


class RuleCount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule_id: int = Field(ge=1)
    packets: int = Field(ge=0)
    bytes: int = Field(ge=0)


class ConntrackReport(BaseModel):
    """The host's conntrack table: entries in use and its maximum (agent/conntrack_usage.py)."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=0)
    max: int = Field(ge=0)


class StatusReport(BaseModel):
    """What an agent reports after realizing (or failing to realize) a revision."""

    model_config = ConfigDict(extra="forbid")
    realized_revision: int = Field(ge=0)
    error: str | None = None
    counters: list[RuleCount] | None = None  # cumulative per-rule counters (replace the previous report)
    addresses: dict[str, Any] | None = None  # observed workload addresses (inventory), free-form for now
    conntrack: ConntrackReport | None = None  # conntrack table usage (the 80%/95% alarms)


# The same report for the manager's lean ack route (api/feed.py `AgentPath`): msgspec decodes and checks
# it in a few microseconds, where pydantic through FastAPI took a good part of the ack's cost. Strict
# (no "5" for 5): a report it refuses goes to the full route, which judges it with `StatusReport`.
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class _RuleCountIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    rule_id: Annotated[int, msgspec.Meta(ge=1)]
    packets: _NonNeg
    bytes: _NonNeg


class _ConntrackIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    count: _NonNeg
    max: _NonNeg


class StatusIn(msgspec.Struct, forbid_unknown_fields=True):
    realized_revision: _NonNeg
    error: str | None = None
    counters: list[_RuleCountIn] | None = None
    addresses: dict[str, Any] | None = None
    conntrack: _ConntrackIn | None = None


_STATUS_DECODER = msgspec.json.Decoder(StatusIn)


def decode_status(body: bytes) -> StatusIn | None:
    """A status report's JSON body, or None when it is not a valid one by msgspec's strict reading."""
    try:
        return _STATUS_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None

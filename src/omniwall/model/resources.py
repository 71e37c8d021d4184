"""Resource schema shared by the API and YAML: every object is `kind`, `metadata`, `spec`.

Per-object validation lives here (field types, enums, port ranges, CIDR syntax, selector syntax);
cross-object checks (references, cycles, tenancy) live in `model.validate`, which sees the whole set.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from omniwall import PROVIDER_TENANT
from omniwall.model.inet import looks_like_address, parse_ip, parse_network
from omniwall.model.interfaces import DEFAULT_VNIC_INTERFACES, IFNAME_RE, RESERVED_IFNAMES, check_pattern

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
SHARED_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")


class Strict(BaseModel):
    """Unknown fields are errors (Faucet's "fields unknown in ..."), objects are immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(
            f"{v!r} is not a valid name: lower-case letters, digits, '.', '_', '-'; at most 63 characters"
        )
    return v


Name = Annotated[str, Field(min_length=1, max_length=63)]

# Size limits of free-form text (docs/api.md "Input limits and quotas"): a label or attribute is a short
# fact, not a document store (a 30 MB label used to be stored and kept in every history entry).
MAX_LABEL_KEY = 253
MAX_LABEL_VALUE = 256
MAX_LABELS = 64
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_LIST = 64
MAX_VNIC_NAME = 63


def unsafe_character(text: str) -> str | None:
    """The first character that has no place in a key, name or value, described; None if clean.
    Control (NUL, newline, ESC), format (RTL override U+202E, zero width) and line/paragraph separators
    would make `omniwall get` show something other than what a selector matches."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" or cat in ("Zl", "Zp"):
            return f"U+{ord(ch):04X} ({unicodedata.name(ch, cat)})"
    return None


def check_text(v: str, what: str, max_len: int) -> str:
    """A non-empty, printable string of at most `max_len` characters (ValueError naming `what`)."""
    if not v:
        raise ValueError(f"{what} must not be empty")
    if len(v) > max_len:
        raise ValueError(f"{what} is {len(v)} characters long; at most {max_len} are allowed")
    bad = unsafe_character(v)
    if bad is not None:
        raise ValueError(f"{what} {v[:40]!r} contains the control or format character {bad}")
    return v


def check_labels(v: dict[str, str]) -> dict[str, str]:
    if len(v) > MAX_LABELS:
        raise ValueError(f"{len(v)} labels; at most {MAX_LABELS} are allowed")
    for key, value in v.items():
        check_text(key, "label key", MAX_LABEL_KEY)
        check_text(value, f"label {key!r}: value", MAX_LABEL_VALUE)
    return v


class Metadata(Strict):
    name: Name
    tenant: str = PROVIDER_TENANT
    labels: dict[str, str] = Field(default_factory=dict)
    # Owner Application (same tenant). Deleting the Application deletes what it owns.
    application: str | None = None
    uid: str | None = None
    revision: StrictInt | None = None  # `false` is not revision 0
    created: str | None = None
    updated: str | None = None

    @field_validator("name", "tenant", "application")
    @classmethod
    def _v_names(cls, v: str | None) -> str | None:
        return v if v is None else _check_name(v)

    @field_validator("labels")
    @classmethod
    def _v_labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)


# --------------------------------------------------------------------------------------------- enums


class Action(StrEnum):
    ALLOW = "allow"
    DROP = "drop"
    REJECT = "reject"
    PASS = "pass"


class Category(StrEnum):
    EMERGENCY = "emergency"
    INFRASTRUCTURE = "infrastructure"
    ENVIRONMENT = "environment"
    APPLICATION = "application"
    BASELINE = "baseline"  # provider rules after the tenant's own, before its default action


CATEGORY_ORDER: tuple[Category, ...] = (
    Category.EMERGENCY,
    Category.INFRASTRUCTURE,
    Category.ENVIRONMENT,
    Category.APPLICATION,
    Category.BASELINE,
)
PROVIDER_CATEGORIES = frozenset({Category.EMERGENCY, Category.INFRASTRUCTURE, Category.BASELINE})


class Direction(StrEnum):
    IN = "in"
    OUT = "out"
    BOTH = "both"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"
    ANY = "any"


class Mode(StrEnum):
    ENFORCE = "enforce"
    MONITOR = "monitor"


# ----------------------------------------------------------------------------------------- port parsing

PortRange = tuple[int, int]


def parse_port_range(value: int | str) -> PortRange:
    """`80` or `"8000-8080"` -> (lo, hi), both in 1..65535."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port")
    if isinstance(value, int):
        lo = hi = value
    else:
        text = value.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if not m:
            raise ValueError(f"{value!r} is not a port or a port range like 8000-8080")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise ValueError(f"port {value!r} is outside 1..65535")
    if lo > hi:
        raise ValueError(f"port range {value!r} is reversed")
    return lo, hi


INLINE_SERVICE_RE = re.compile(r"^(tcp|udp|icmp|icmpv6|any)(?:/(.+))?$")


def is_inline_service(ref: str) -> bool:
    """`tcp/80`, `udp/1000-2000`, `icmp`, `icmp/8` are inline services; anything else names a Service."""
    return bool(INLINE_SERVICE_RE.match(ref))


def parse_inline_service(ref: str) -> ServiceSpec:
    m = INLINE_SERVICE_RE.match(ref)
    if not m:
        raise ValueError(f"{ref!r} is not an inline service like tcp/80, udp/53 or icmp/8")
    proto, rest = m.group(1), m.group(2)
    if proto in ("icmp", "icmpv6"):
        if rest is None:
            return ServiceSpec(protocol=Protocol(proto))
        parts = rest.split("/")
        try:
            icmp_type = int(parts[0])
            icmp_code = int(parts[1]) if len(parts) > 1 else None
        except ValueError:
            raise ValueError(f"{ref!r}: ICMP type/code must be numbers, like icmp/8 or icmp/3/4") from None
        return ServiceSpec(protocol=Protocol(proto), icmpType=icmp_type, icmpCode=icmp_code)
    if rest is None:
        return ServiceSpec(protocol=Protocol(proto))
    if proto == "any":
        raise ValueError(f"{ref!r}: protocol 'any' takes no ports")
    return ServiceSpec(protocol=Protocol(proto), ports=[p.strip() for p in rest.split(",")])


# ------------------------------------------------------------------------------------------------ specs


# Kernel-side bounds of a connection limit (docs/conntrack-limits.md): nft `ct count` / `limit rate`
# take 32-bit values; beyond 10M a limit limits nothing on any real conntrack table.
CONN_LIMIT_MAX = 10_000_000


class ConnectionLimit(Strict):
    """Per-vNIC connection limits (a resource limit, not policy: the sim ignores them). `perWorkload`:
    concurrent tracked connections a vNIC may originate; `newPerSecond`: new connections per second it
    may open. Unset: no limit of that kind, unless the provider's (`infra`) Tenant sets one, which is
    then both the default and the ceiling for every tenant (docs/conntrack-limits.md)."""

    perWorkload: StrictInt | None = Field(default=None, ge=1, le=CONN_LIMIT_MAX)
    newPerSecond: StrictInt | None = Field(default=None, ge=1, le=CONN_LIMIT_MAX)


class TenantSpec(Strict):
    displayName: str | None = None
    defaultAction: Literal["drop", "allow", "reject"] = "drop"
    mode: Mode = Mode.ENFORCE
    connectionLimit: ConnectionLimit | None = None


class HostSpec(Strict):
    address: str | None = None
    # Host interfaces a vNIC may be attached to (globs); see model/interfaces.py for why this exists.
    vnicInterfaces: list[str] = Field(default_factory=lambda: list(DEFAULT_VNIC_INTERFACES), max_length=32)

    @field_validator("address")
    @classmethod
    def _v_address(cls, v: str | None) -> str | None:
        return v if v is None else str(parse_ip(v))

    @field_validator("vnicInterfaces")
    @classmethod
    def _v_patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one interface pattern (like tap* or vnet*)")
        return [check_pattern(p) for p in v]


class Vnic(Strict):
    name: str = "eth0"
    mac: str | None = None
    ips: list[str] = Field(default_factory=list)
    # Host-side interface (tap/veth) name; derived from workload and vNIC name when absent.
    hostIfname: str | None = None

    @field_validator("ips")
    @classmethod
    def _v_ips(cls, v: list[str]) -> list[str]:
        return [str(parse_ip(ip)) for ip in v]

    @field_validator("name")
    @classmethod
    def _v_name(cls, v: str) -> str:
        check_text(v, "vNIC name", MAX_VNIC_NAME)
        if any(ch.isspace() for ch in v) or "/" in v:
            raise ValueError(f"vNIC name {v!r} must not contain spaces or '/'")
        return v

    @field_validator("mac")
    @classmethod
    def _v_mac(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", v):
            raise ValueError(f"{v!r} is not a MAC address like 52:54:00:12:34:56")
        return v.lower() if v else v

    @field_validator("hostIfname")
    @classmethod
    def _v_ifname(cls, v: str | None) -> str | None:
        if v is not None and not IFNAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a Linux interface name (1-15 characters)")
        if v in RESERVED_IFNAMES:
            raise ValueError(f"{v!r} is the host's own interface, never a vNIC's")
        return v


AttrValue = str | int | float | bool | list[str]


class WorkloadLab(Strict):
    """Lab-only details: ignored outside `omniwall lab`."""

    servers: list[str] = Field(default_factory=list)  # responders to start, e.g. tcp/80, udp/53
    kind: Literal["netns", "vm"] = "netns"  # vm: a QEMU guest instead of a namespace (docs/vms.md)


class WorkloadSpec(Strict):
    host: str
    vnics: list[Vnic] = Field(default_factory=list)
    attributes: dict[str, AttrValue] = Field(default_factory=dict)
    # Named ports the workload serves (for K8s named ports): {"http": "tcp/80"}
    ports: dict[str, str] = Field(default_factory=dict)
    lab: WorkloadLab | None = None

    @field_validator("attributes")
    @classmethod
    def _v_attributes(cls, v: dict[str, AttrValue]) -> dict[str, AttrValue]:
        if len(v) > MAX_ATTRIBUTES:
            raise ValueError(f"{len(v)} attributes; at most {MAX_ATTRIBUTES} are allowed")
        for key, value in v.items():
            check_text(key, "attribute key", MAX_LABEL_KEY)
            values = value if isinstance(value, list) else [value]
            if len(values) > MAX_ATTRIBUTE_LIST:
                raise ValueError(f"attribute {key!r}: at most {MAX_ATTRIBUTE_LIST} values")
            for item in values:
                if isinstance(item, str):
                    check_text(item, f"attribute {key!r}: value", MAX_LABEL_VALUE)
        return v

    @field_validator("ports")
    @classmethod
    def _v_ports(cls, v: dict[str, str]) -> dict[str, str]:
        for name, svc in v.items():
            check_text(name, "named port", MAX_VNIC_NAME)
            m = re.fullmatch(r"(tcp|udp|sctp)/(\d+)", svc)
            if not m or not 1 <= int(m.group(2)) <= 65535:
                raise ValueError(f"port {name!r}: {svc!r} is not like tcp/80")
        return v

    @model_validator(mode="after")
    def _v_vnic_names(self) -> WorkloadSpec:
        names = [v.name for v in self.vnics]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate vNIC name(s): {', '.join(sorted(dup))}")
        return self


class GroupSpec(Strict):
    """Members are the union of the selector's matches and the static lists."""

    selector: str | None = None
    workloads: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)  # "name" (own tenant) or "infra/name" (shared)
    cidrs: list[str] = Field(default_factory=list)
    # Provider groups only: tenants allowed to reference this group ("*" = every tenant).
    shareWith: list[str] = Field(default_factory=list)

    @field_validator("cidrs")
    @classmethod
    def _v_cidrs(cls, v: list[str]) -> list[str]:
        return [str(parse_network(c)) for c in v]

    @field_validator("selector")
    @classmethod
    def _v_selector(cls, v: str | None) -> str | None:
        if v is not None:
            from omniwall.selectors import parse

            parse(v)  # raises SelectorError (a ValueError) with the column
        return v


class ServiceSpec(Strict):
    protocol: Protocol = Protocol.TCP
    # StrictInt: `true` is not port 1 (pydantic's lax mode would convert it).
    ports: list[StrictInt | str] = Field(default_factory=list)
    icmpType: int | None = Field(default=None, ge=0, le=255)
    icmpCode: int | None = Field(default=None, ge=0, le=255)

    @field_validator("ports")
    @classmethod
    def _v_ports(cls, v: list[StrictInt | str]) -> list[StrictInt | str]:
        for p in v:
            parse_port_range(p)
        return v

    @model_validator(mode="after")
    def _v_shape(self) -> ServiceSpec:
        if self.ports and self.protocol not in (Protocol.TCP, Protocol.UDP):
            raise ValueError(f"ports are only valid for tcp and udp, not {self.protocol.value}")
        if (self.icmpType is not None or self.icmpCode is not None) and self.protocol not in (
            Protocol.ICMP,
            Protocol.ICMPV6,
        ):
            raise ValueError("icmpType/icmpCode are only valid for icmp and icmpv6")
        if self.icmpCode is not None and self.icmpType is None:
            raise ValueError("icmpCode needs icmpType")
        return self

    def port_ranges(self) -> tuple[PortRange, ...]:
        return tuple(sorted(parse_port_range(p) for p in self.ports))


class ApplicationSpec(Strict):
    description: str | None = None


class Rule(Strict):
    name: Name
    sources: list[str] = Field(default_factory=lambda: ["any"])
    destinations: list[str] = Field(default_factory=lambda: ["any"])
    services: list[str] = Field(default_factory=list)  # empty = any service
    action: Action
    direction: Direction = Direction.BOTH
    appliedTo: list[str] = Field(default_factory=list)
    log: bool = False
    disabled: bool = False

    @field_validator("name")
    @classmethod
    def _v_name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("sources", "destinations")
    @classmethod
    def _v_peers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must not be empty (use [any])")
        if "any" in v and len(v) > 1:
            raise ValueError("'any' cannot be combined with other peers")
        for peer in v:
            if looks_like_address(peer):
                parse_network(peer)  # a zone id (fe80::1%eth0) would stop the host's ruleset from loading
        return v

    @field_validator("services")
    @classmethod
    def _v_services(cls, v: list[str]) -> list[str]:
        for s in v:
            if is_inline_service(s):
                try:
                    parse_inline_service(s)
                except ValidationError as e:
                    # A nested model's error would otherwise show up under a bogus path (services.ports).
                    reasons = "; ".join(str(x["msg"]).removeprefix("Value error, ") for x in e.errors())
                    raise ValueError(f"{s!r}: {reasons}") from None
        return v


class PolicySpec(Strict):
    category: Category = Category.APPLICATION
    priority: int = Field(default=1000, ge=0, le=1_000_000)
    appliedTo: list[str] = Field(default_factory=list)
    stateful: bool = True
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _v_rule_names(self) -> PolicySpec:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate rule name(s): {', '.join(dup)}")
        return self


# -------------------------------------------------------------------------------------------- resources


class _Resource(Strict):
    apiVersion: str = "omniwall.io/v1"
    metadata: Metadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def tenant(self) -> str:
        return self.metadata.tenant

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, tenant, name): unique per store."""
        return (self.kind, self.metadata.tenant, self.metadata.name)  # type: ignore[attr-defined]


class Tenant(_Resource):
    kind: Literal["Tenant"] = "Tenant"
    spec: TenantSpec = Field(default_factory=TenantSpec)

    @property
    def key(self) -> tuple[str, str, str]:
        # A tenant lives in its own namespace; metadata.tenant is ignored for Tenant objects.
        return ("Tenant", self.metadata.name, self.metadata.name)


class Host(_Resource):
    kind: Literal["Host"] = "Host"
    spec: HostSpec = Field(default_factory=HostSpec)


class Workload(_Resource):
    kind: Literal["Workload"] = "Workload"
    spec: WorkloadSpec


class Group(_Resource):
    kind: Literal["Group"] = "Group"
    spec: GroupSpec = Field(default_factory=GroupSpec)


class Service(_Resource):
    kind: Literal["Service"] = "Service"
    spec: ServiceSpec = Field(default_factory=ServiceSpec)


class Application(_Resource):
    kind: Literal["Application"] = "Application"
    spec: ApplicationSpec = Field(default_factory=ApplicationSpec)


class Policy(_Resource):
    kind: Literal["Policy"] = "Policy"
    spec: PolicySpec = Field(default_factory=PolicySpec)


Resource = Annotated[
    Tenant | Host | Workload | Group | Service | Application | Policy, Field(discriminator="kind")
]
KINDS: dict[str, type[_Resource]] = {
    c.model_fields["kind"].default: c for c in (Tenant, Host, Workload, Group, Service, Application, Policy)
}
# Kinds whose objects belong to the provider no matter what metadata.tenant says.
PROVIDER_ONLY_KINDS = frozenset({"Host"})


def vnic_ifname(workload: Workload, vnic: Vnic) -> str:
    """Host-side interface name of a vNIC: explicit, or a stable hash (Linux limits names to 15 chars)."""
    if vnic.hostIfname:
        return vnic.hostIfname
    md = workload.metadata  # (not the `tenant`/`name` properties: the compiler calls this per vNIC)
    digest = hashlib.sha1(f"{md.tenant}/{md.name}/{vnic.name}".encode()).hexdigest()
    return f"ow{digest[:10]}"


def dump(resource: Any) -> dict[str, Any]:
    """JSON/YAML-ready dict without unset optional noise."""
    return resource.model_dump(mode="json", exclude_none=True)

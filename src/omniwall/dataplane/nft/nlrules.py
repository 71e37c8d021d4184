"""PURE: the renderer's libnftables JSON commands as raw nfnetlink messages, without libnftables.

Why: a full sync of the benchmark's host is ~27k commands; libnftables parses, evaluates and
linearizes each one (~1.7 s of CPU), then the kernel builds them. Encoding the few shapes the
renderer emits directly is a fraction of that. libnftables stays the reference and the fallback:
anything this module does not know raises `Unsupported` (before a byte is sent) and the caller sends
the same commands through libnftables. tests/kernel/test_nft_raw_netns.py loads the same tables both ways
and compares the listings.

What it encodes (and only in the forms render.py / render_index.py produce them):
- table add/delete; chain add (regular, or a filter base chain with hook, priority, policy), flush,
  delete; set and verdict-map add/delete (address, ifname, port, and the index's `ifname . l4proto
  [. dport]` concatenations, hash or interval); counter objects add/delete; the revision quota;
- elements: add/delete of hash sets and maps; add of interval sets and maps declared in the same
  batch (a delta's interval elements go through libnftables, which merges them with the kernel's);
- rule expressions: matches of `meta` (iifname/oifname/nfproto/l4proto), `ip`/`ip6` addresses,
  `th dport`, `icmp`/`icmpv6` type and code, `ct state` against a value, a range, a named set, an
  anonymous set or an interface-name prefix; `vmap` on those keys; counter (anonymous or named),
  log, `ct mark set`, limit, `ct count`, reject, notrack and the verdicts. The bytecode is the one
  libnftables 1.0.6 generates for them (its implicit `meta nfproto` dependency of `ip`/`ip6` in an
  inet table, the merge of `icmp type` + `icmp code` into one load, its register numbering, the
  anonymous sets' flags, sizes and type information), so listings of both tables are identical.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omniwall.dataplane.nft.nlbatch import NFPROTO, NFT_GOTO, NFT_JUMP, _elem_prefix, key_bytes

Msg = tuple[int, int, bytes]  # (nf_tables message type, flags without ACK, body after nfgenmsg)


class Unsupported(ValueError):
    """A command or expression outside what this module encodes: send the batch via libnftables."""


# message types, flags
NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM, NEWOBJ, DELOBJ = 9, 11, 12, 14, 18, 20
F_REQ, F_CREATE, F_APPEND = 0x1, 0x400, 0x800
NESTED = 0x8000

VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5}
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_META = {"iifname": 6, "oifname": 7, "nfproto": 15, "l4proto": 16}
_META_MARK, _META_MARK_KEY = {"meta": {"key": "mark"}}, 3  # NFT_META_MARK
_NFPROTO_VAL = {"ipv4": 2, "ipv6": 10}
_L4 = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_CT_STATE = {"invalid": 1, "established": 2, "related": 4, "new": 8}
_CMP = {"==": 0, "!=": 1, "<=": 3, ">=": 5}
# payload (protocol, field) -> (base, offset, length, nfproto the protocol needs or None)
_PAYLOAD = {
    ("ip", "saddr"): (1, 12, 4, 2),
    ("ip", "daddr"): (1, 16, 4, 2),
    ("ip6", "saddr"): (1, 8, 16, 10),
    ("ip6", "daddr"): (1, 24, 16, 10),
    ("th", "dport"): (2, 2, 2, None),
    ("th", "sport"): (2, 0, 2, None),
    ("icmp", "type"): (2, 0, 1, None),
    ("icmp", "code"): (2, 1, 1, None),
    ("icmpv6", "type"): (2, 0, 1, None),
    ("icmpv6", "code"): (2, 1, 1, None),
}
# anonymous sets' key type information (libnftables' udata: payload protocol and field ids)
_TYPEOF = {("ip", "saddr"): (12, 11), ("ip", "daddr"): (12, 12), ("ip6", "saddr"): (13, 8),
           ("ip6", "daddr"): (13, 9)}  # fmt: skip

# set key types: name -> (type id, key length, byte order in libnftables' set udata)
_TYPES = {
    "ipv4_addr": (7, 4, 2),
    "ipv6_addr": (8, 16, 2),
    "ifname": (0x29, 16, 1),
    "inet_service": (13, 2, 2),
    "inet_proto": (12, 1, 1),
}
SET_F_ANON, SET_F_CONST, SET_F_INTERVAL, SET_F_MAP, SET_F_CONCAT = 0x1, 0x2, 0x4, 0x8, 0x80
NFT_DATA_VERDICT_TYPE = 0xFFFFFF00
ELEM_F_INTERVAL_END = 1
_OPEN_END_UDATA = bytes.fromhex("010401000000")  # NFTNL_UDATA_SET_ELEM_FLAGS: interval open to the end


_HDR = struct.Struct("=HH").pack
_U32 = struct.Struct("=HHI").pack
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length modulo 4
_ZPAD = tuple(b"\0" + p for p in _PAD)  # a string's NUL, then the padding


def _attr(typ: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _HDR(n, typ) + payload + _PAD[n & 3]


def _nest(typ: int, payload: bytes) -> bytes:
    return _HDR(4 + len(payload), typ | NESTED) + payload  # nested payloads are attributes: aligned


def _strz(typ: int, s: str) -> bytes:
    raw = s.encode()
    n = 5 + len(raw)
    return _HDR(n, typ) + raw + _ZPAD[n & 3]


def _u32(typ: int, v: int) -> bytes:
    return _U32(8, typ, socket.htonl(v & 0xFFFFFFFF))


def _u64(typ: int, v: int) -> bytes:
    return _attr(typ, struct.pack("!Q", v))


def _udata(*tlvs: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack("BB", t, len(v)) + v for t, v in tlvs)


_EXPR_NAMES: dict[str, bytes] = {}  # expression name -> its NFTA_EXPR_NAME attribute


def _expr(name: str, data: bytes | None) -> bytes:
    body = _EXPR_NAMES.get(name)
    if body is None:
        body = _EXPR_NAMES[name] = _strz(1, name)
    if data is not None:
        body += _HDR(4 + len(data), 2 | NESTED) + data
    return _HDR(4 + len(body), 1 | NESTED) + body  # NFTA_LIST_ELEM


def _reg(word: int) -> int:
    """libnftables' register number of a value starting at 32-bit word `word` of the registers."""
    return 1 + word // 4 if word % 4 == 0 else 8 + word


def _verdict(code: int, chain: str | None = None) -> bytes:
    v = _u32(1, code)
    if chain is not None:
        v += _strz(2, chain)
    return _nest(2, v)  # NFTA_DATA_VERDICT


def _imm_verdict(code: int, chain: str | None = None) -> bytes:
    return _expr("immediate", _u32(1, 0) + _nest(2, _verdict(code, chain)))


# ------------------------------------------------------------------------------------------ sets


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What encoding elements of, and lookups in, a set needs."""

    fields: tuple[str, ...]  # key types (more than one: a concatenation)
    interval: bool
    is_map: bool

    @property
    def concat(self) -> bool:
        return len(self.fields) > 1


def _field_len(t: str) -> int:
    if t not in _TYPES:
        raise Unsupported(f"set key type {t!r}")
    return _TYPES[t][1]


def _key_bytes(t: str, v: Any) -> bytes:
    """One field of a key in the kernel's layout (network order; ifname NUL padded; unpadded)."""
    if t == "ipv4_addr" or t == "ipv6_addr":
        if not isinstance(v, str):
            raise Unsupported(f"{t} key {v!r}")
        try:
            return socket.inet_pton(socket.AF_INET if t == "ipv4_addr" else socket.AF_INET6, v)
        except OSError:
            raise Unsupported(f"{t} key {v!r}") from None
    if t == "ifname":
        if not isinstance(v, str):
            raise Unsupported(f"ifname key {v!r}")
        raw = v.encode()
        if not raw or len(raw) >= 16 or b"\0" in raw or raw.endswith(b"*"):
            raise Unsupported(f"ifname key {v!r}")
        return raw.ljust(16, b"\0")
    if t == "inet_service":
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
            raise Unsupported(f"port {v!r}")
        return struct.pack("!H", v)
    if t == "inet_proto":
        p = _L4.get(v) if isinstance(v, str) else v
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 255:
            raise Unsupported(f"l4 protocol {v!r}")
        return bytes([p])
    raise Unsupported(f"key type {t!r}")


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _set_decl(body: dict[str, Any], set_id: int) -> tuple[bytes, SetInfo]:
    typ = body.get("type")
    fields = tuple(typ) if isinstance(typ, list) else (typ,)
    flags_in = body.get("flags", [])
    if any(f != "interval" for f in flags_in) or set(body) - {
        "family",
        "table",
        "name",
        "type",
        "flags",
        "map",
    }:
        raise Unsupported(f"set {body.get('name')!r}: {sorted(body)} {flags_in}")
    interval = "interval" in flags_in
    kind = body.get("map")
    if kind not in (None, "verdict"):
        raise Unsupported(f"map {body.get('name')!r} of {kind!r}")
    is_map = kind == "verdict"
    info = SetInfo(fields, interval, is_map)
    flags = (SET_F_INTERVAL if interval else 0) | (SET_F_MAP if is_map else 0)
    if info.concat:
        if interval:
            flags |= SET_F_CONCAT
        type_id = 0
        for f in fields:
            type_id = (type_id << 6) | _TYPES[f][0] if f in _TYPES else _unknown(f)
        key_len = sum(len(_pad4(b"\0" * _field_len(f))) for f in fields)
        order = 0
    else:
        f = fields[0]
        if f not in _TYPES:
            raise Unsupported(f"set key type {f!r}")
        type_id, key_len, order = _TYPES[f]
    msg = _strz(1, body["table"]) + _strz(2, body["name"]) + _u32(3, flags) + _u32(4, type_id)
    msg += _u32(5, key_len)
    if is_map:
        msg += _u32(6, NFT_DATA_VERDICT_TYPE) + _u32(7, 0)
    msg += _u32(10, set_id)
    if info.concat and interval:
        parts = b"".join(_nest(1, _u32(1, _field_len(f))) for f in fields)
        msg += _nest(9, _nest(2, parts))
    ud = [(0, struct.pack("=I", order))]
    if is_map:
        ud.append((1, struct.pack("=I", 0)))
        if info.concat:
            ud.append((3, bytes.fromhex("00040d0000000100")))
        ud.append((6, struct.pack("=I", 0)))
    msg += _attr(13, _udata(*ud))
    return msg, info


def _unknown(f: str) -> int:
    raise Unsupported(f"set key type {f!r}")


def _int_of(t: str, v: Any) -> int:
    return int.from_bytes(_key_bytes(t, v), "big")


def _interval_of(t: str, e: Any) -> tuple[int, int]:
    """An interval set's element (value, prefix or range) as (first, last) integers."""
    if isinstance(e, dict) and "prefix" in e:
        p = e["prefix"]
        if t not in ("ipv4_addr", "ipv6_addr"):
            raise Unsupported(f"prefix in a {t} set")
        try:
            net = ipaddress.ip_network(f"{p['addr']}/{p['len']}", strict=False)
        except (KeyError, ValueError, TypeError):
            raise Unsupported(f"prefix {p!r}") from None
        if (net.version == 4) != (t == "ipv4_addr"):
            raise Unsupported(f"prefix {p!r} in a {t} set")
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(e, dict) and "range" in e:
        lo, hi = e["range"]
        a, b = _int_of(t, lo), _int_of(t, hi)
        if a > b:
            raise Unsupported(f"range {e!r}")
        return a, b
    if isinstance(e, dict):
        raise Unsupported(f"element {e!r}")
    v = _int_of(t, e)
    return v, v


def _elem(key: bytes, *, end: bool = False, data: bytes = b"", key_end: bytes | None = None,
          udata: bytes | None = None) -> bytes:  # fmt: skip
    body = b""
    if end:
        body += _u32(3, ELEM_F_INTERVAL_END)
    body += _nest(1, _attr(1, key))  # KEY{ DATA_VALUE }
    if key_end is not None:
        body += _nest(10, _attr(1, key_end))
    body += data
    if udata is not None:
        body += _attr(6, udata)
    return _nest(1, body)


def _verdict_elem_data(v: Any) -> bytes:
    if not isinstance(v, dict) or len(v) != 1:
        raise Unsupported(f"map element data {v!r}")
    ((kind, arg),) = v.items()
    if kind in ("goto", "jump") and isinstance(arg, dict) and isinstance(arg.get("target"), str):
        code = NFT_GOTO if kind == "goto" else NFT_JUMP
        return _nest(2, _verdict(code, arg["target"]))
    if kind in VERDICTS and arg is None:
        return _nest(2, _verdict(VERDICTS[kind]))
    raise Unsupported(f"map element data {v!r}")


def _verdict_data_memo() -> Any:
    """`_verdict_elem_data` remembering each jump/goto target's bytes (one call's elements: the ~34k
    ipcache elements of the benchmark's host name a few hundred chains)."""
    memo: dict[tuple[str, str], bytes] = {}

    def data(v: Any) -> bytes:
        if type(v) is dict and len(v) == 1:
            ((kind, arg),) = v.items()
            if type(arg) is dict and len(arg) == 1:
                target = arg.get("target")
                if type(target) is str:
                    got = memo.get((kind, target))
                    if got is None:
                        got = memo[kind, target] = _verdict_elem_data(v)
                    return got
        return _verdict_elem_data(v)

    return data


def _interval_elems(t: str, items: list[tuple[int, int, bytes]], *, merge: bool) -> list[bytes]:
    """Start/end elements of (first, last, data) intervals in libnftables' form: sorted; a leading
    interval-end at 0 when the first interval does not start there; an interval reaching the last
    value is marked open instead of ended. `merge`: adjacent/overlapping intervals become one."""
    n = _field_len(t)
    top = (1 << (8 * n)) - 1
    items = sorted(items, key=lambda x: x[0])
    if merge:
        out: list[tuple[int, int, bytes]] = []
        for lo, hi, d in items:
            if out and lo <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], hi), out[-1][2])
            else:
                out.append((lo, hi, d))
        items = out
    elems: list[bytes] = []
    if items and items[0][0] != 0:
        elems.append(_elem(bytes(n), end=True))
    prev_hi = -1
    for lo, hi, d in items:
        if lo <= prev_hi:
            raise Unsupported("overlapping intervals")
        prev_hi = hi
        if hi == top:
            elems.append(_elem(lo.to_bytes(n, "big"), data=d, udata=_OPEN_END_UDATA))
        else:
            elems.append(_elem(lo.to_bytes(n, "big"), data=d))
            elems.append(_elem((hi + 1).to_bytes(n, "big"), end=True))
    return elems


def _concat_key(info: SetInfo, key: Any) -> tuple[bytes, bytes | None]:
    """(key, key_end or None) of a concatenation element {"concat": [part, ...]}, a part a value or
    {"range": [lo, hi]} (interval maps only)."""
    if not isinstance(key, dict) or set(key) != {"concat"} or len(key["concat"]) != len(info.fields):
        raise Unsupported(f"concat key {key!r}")
    lo_parts: list[bytes] = []
    hi_parts: list[bytes] = []
    ranged = False
    for t, p in zip(info.fields, key["concat"], strict=True):
        if isinstance(p, dict) and set(p) == {"range"}:
            if not info.interval:
                raise Unsupported(f"range in a hash concatenation {key!r}")
            a, b = p["range"]
            lo_parts.append(_pad4(_key_bytes(t, a)))
            hi_parts.append(_pad4(_key_bytes(t, b)))
            ranged = True
        else:
            v = _pad4(_key_bytes(t, p))
            lo_parts.append(v)
            hi_parts.append(v)
    lo = b"".join(lo_parts)
    if info.interval:
        return lo, b"".join(hi_parts)
    if ranged:
        raise Unsupported(f"range in {key!r}")
    return lo, None


def _elements(info: SetInfo, elems: Sequence[Any], verb: str, fresh: bool, name: str) -> list[bytes]:
    """The element list of an add/delete (`fresh`: the set was declared in this batch)."""
    out: list[bytes] = []
    if info.concat:
        for e in elems:
            key, data = (e[0], e[1]) if info.is_map and verb == "add" else (e, None)
            if info.is_map and verb == "delete" and isinstance(e, list):
                key = e[0]
            lo, hi = _concat_key(info, key)
            out.append(_elem(lo, key_end=hi, data=_verdict_elem_data(data) if data is not None else b""))
        return out
    t = info.fields[0]
    if not info.is_map and not info.interval and t in ("ipv4_addr", "ipv6_addr", "ifname"):
        prefix = _elem_prefix(t)  # type: ignore[arg-type]  # the bulk case: 100k addresses
        try:
            return [prefix + key_bytes(t, e) for e in elems]  # type: ignore[arg-type]
        except ValueError as e:
            raise Unsupported(str(e)) from None
    if info.interval:
        if verb != "add" or not fresh:
            raise Unsupported(f"{verb} of interval elements of {name} outside its declaration")
        items: list[tuple[int, int, bytes]] = []
        for e in elems:
            key, data = (e[0], _verdict_elem_data(e[1])) if info.is_map else (e, b"")
            lo, hi = _interval_of(t, key)
            items.append((lo, hi, data))
        return _interval_elems(t, items, merge=False)
    vdata = _verdict_data_memo()
    for e in elems:
        if info.is_map and verb == "add":
            if not isinstance(e, list) or len(e) != 2:
                raise Unsupported(f"map element {e!r}")
            out.append(_elem(_key_bytes(t, e[0]), data=vdata(e[1])))
        else:
            key = e[0] if info.is_map and isinstance(e, list) else e
            if isinstance(key, dict):
                raise Unsupported(f"element {key!r} of hash set {name}")
            out.append(_elem(_key_bytes(t, key)))
    return out


def _elem_msgs(table: str, name: str, set_id: int | None, elems: list[bytes], typ: int) -> list[Msg]:
    """Element lists split so each list attribute stays under 64 kB."""
    head = _strz(1, table) + _strz(2, name)
    if set_id is not None:
        head += _u32(4, set_id)
    msgs: list[Msg] = []
    flags = F_REQ | (F_CREATE if typ == NEWSETELEM else 0)
    chunk: list[bytes] = []
    size = 0
    for e in elems:
        if chunk and size + len(e) > 0xFFFF - 8:
            msgs.append((typ, flags, head + _nest(3, b"".join(chunk))))
            chunk, size = [], 0
        chunk.append(e)
        size += len(e)
    if chunk:
        msgs.append((typ, flags, head + _nest(3, b"".join(chunk))))
    return msgs


# ----------------------------------------------------------------------------------------- rules


class _Rule:
    """One rule's expressions, encoded in order; anonymous sets it needs go in `pre`."""

    def __init__(self, enc: RuleEncoder, table: str) -> None:
        self.enc = enc
        self.table = table
        self.out: list[bytes] = []
        self.pre: list[Msg] = []
        self.nfproto: int | None = None  # the family a match established (libnftables' dependency context)
        self.l4: int | None = None

    # loads
    def _need_family(self, fam: int | None) -> None:
        if fam is None or self.nfproto == fam:
            return
        if self.nfproto is not None:
            raise Unsupported("ip and ip6 matches in one rule")
        self.out.append(_expr("meta", _u32(2, _META["nfproto"]) + _u32(1, 1)))
        self.out.append(_cmp(0, bytes([fam])))
        self.nfproto = fam

    def load(self, left: Any, word: int = 0) -> tuple[int, str | None, tuple[str, str] | None]:
        """Emit the load of `left` into the registers at `word`; (length, set key type, payload key)."""
        reg = _reg(word)
        if isinstance(left, dict) and set(left) == {"meta"}:
            key = left["meta"].get("key")
            if key not in _META or set(left["meta"]) != {"key"}:
                raise Unsupported(f"meta {left!r}")
            self.out.append(_expr("meta", _u32(2, _META[key]) + _u32(1, reg)))
            kt = {"iifname": "ifname", "oifname": "ifname", "l4proto": "inet_proto"}.get(key)
            return (16 if kt == "ifname" else 1), kt, None
        if isinstance(left, dict) and set(left) == {"payload"}:
            p = left["payload"]
            k = (p.get("protocol"), p.get("field"))
            if k not in _PAYLOAD or set(p) != {"protocol", "field"}:
                raise Unsupported(f"payload {left!r}")
            base, off, ln, fam = _PAYLOAD[k]
            if k[0] in ("icmp", "icmpv6") and self.l4 != _L4[k[0]]:
                raise Unsupported(f"{k[0]} without its meta l4proto match")
            self._need_family(fam)
            self.out.append(_expr("payload", _u32(1, reg) + _u32(2, base) + _u32(3, off) + _u32(4, ln)))
            kt = {4: "ipv4_addr", 16: "ipv6_addr"}.get(ln) if base == 1 else "inet_service"
            return ln, kt, k  # type: ignore[return-value]
        if isinstance(left, dict) and left == {"ct": {"key": "state"}}:
            self.out.append(_expr("ct", _u32(2, 0) + _u32(1, reg)))
            return 4, None, None
        raise Unsupported(f"match on {left!r}")

    # matches
    def match(self, m: dict[str, Any], nxt: dict[str, Any] | None) -> bool:
        """Encode one match; True when it consumed `nxt` too (icmp type + code: one load)."""
        if set(m) != {"op", "left", "right"}:
            raise Unsupported(f"match {m!r}")
        op, left, right = m["op"], m["left"], m["right"]
        if left == _META_MARK:  # the packet mark (render.same_host_egress_rules): a u32 in host order
            if op not in ("==", "!=") or isinstance(right, bool) or not isinstance(right, int):
                raise Unsupported(f"meta mark match {m!r}")
            self.out.append(_expr("meta", _u32(2, _META_MARK_KEY) + _u32(1, 1)))
            self.out.append(_cmp(_CMP[op], struct.pack("=I", right & 0xFFFFFFFF)))
            return False
        if left == {"ct": {"key": "state"}}:
            if op != "in" or not isinstance(right, list) or not right:
                raise Unsupported(f"ct state match {m!r}")
            mask = 0
            for s in right:
                if s not in _CT_STATE:
                    raise Unsupported(f"ct state {s!r}")
                mask |= _CT_STATE[s]
            self.load(left)
            bw = _u32(1, 1) + _u32(2, 1) + _u32(3, 4) + _nest(4, _attr(1, struct.pack("=I", mask)))
            bw += _nest(5, _attr(1, bytes(4)))
            self.out.append(_expr("bitwise", bw))
            self.out.append(_cmp(1, bytes(4)))
            return False
        if op not in ("==", "!="):
            raise Unsupported(f"match operator {op!r}")
        cmp_op = _CMP[op]
        # icmp type + code: libnftables merges the two adjacent loads into one
        if (
            isinstance(left, dict) and "payload" in left and left["payload"].get("field") == "type"
            and left["payload"].get("protocol") in ("icmp", "icmpv6") and nxt is not None and "match" in nxt
        ):  # fmt: skip
            n = nxt["match"]
            if (
                n.get("op") == "==" == op
                and n.get("left") == {"payload": {"protocol": left["payload"]["protocol"], "field": "code"}}
                and isinstance(right, int)
                and isinstance(n.get("right"), int)
            ):
                proto = left["payload"]["protocol"]
                if self.l4 != _L4[proto]:
                    raise Unsupported(f"{proto} without its meta l4proto match")
                self.out.append(_expr("payload", _u32(1, 1) + _u32(2, 2) + _u32(3, 0) + _u32(4, 2)))
                self.out.append(_cmp(0, bytes([right & 0xFF, n["right"] & 0xFF])))
                return True
        if isinstance(left, dict) and left == {"meta": {"key": "nfproto"}}:
            if right not in _NFPROTO_VAL:
                raise Unsupported(f"nfproto {right!r}")
            self.load(left)
            self.out.append(_cmp(cmp_op, bytes([_NFPROTO_VAL[right]])))
            if op == "==":
                self.nfproto = _NFPROTO_VAL[right]
            return False
        if isinstance(left, dict) and left == {"meta": {"key": "l4proto"}}:
            p = _L4.get(right) if isinstance(right, str) else None
            if p is None:
                raise Unsupported(f"l4proto {right!r}")
            self.load(left)
            self.out.append(_cmp(cmp_op, bytes([p])))
            if op == "==":
                self.l4 = p
            return False
        _ln, kt, pk = self.load(left)
        if isinstance(right, str) and right.startswith("@"):
            self.out.append(self.enc.lookup(right[1:], 1, None, inverted=op == "!="))
            return False
        if isinstance(right, dict) and set(right) == {"set"}:
            if pk not in _TYPEOF or kt is None or not isinstance(right["set"], list) or not right["set"]:
                raise Unsupported(f"anonymous set on {left!r}")
            if len(right["set"]) == 1:  # libnftables compares a one-element set's value instead
                if isinstance(right["set"][0], dict):
                    raise Unsupported(f"one-element set {right!r}")
                self.out.append(_cmp(cmp_op, _key_bytes(kt, right["set"][0])))
                return False
            name, sid = self.anon_set(kt, pk, right["set"])
            self.out.append(self.enc.lookup(name, 1, None, inverted=op == "!=", set_id=sid))
            return False
        if isinstance(right, dict) and set(right) == {"range"}:
            if op != "==" or kt != "inet_service":
                raise Unsupported(f"range match {m!r}")
            lo, hi = right["range"]
            self.out.append(_cmp(_CMP[">="], _key_bytes(kt, lo)))
            self.out.append(_cmp(_CMP["<="], _key_bytes(kt, hi)))
            return False
        if kt == "ifname":
            if not isinstance(right, str) or not right:
                raise Unsupported(f"interface name {right!r}")
            if right.endswith("*") and "\\" not in right:
                data = right[:-1].encode()  # a prefix: compare its bytes only
                if not data:
                    raise Unsupported("empty interface prefix")
            else:
                data = _key_bytes("ifname", right)
            self.out.append(_cmp(cmp_op, data))
            return False
        if kt is None:
            raise Unsupported(f"match {m!r}")
        if pk is not None and pk[0] in ("icmp", "icmpv6"):
            if isinstance(right, bool) or not isinstance(right, int) or not 0 <= right <= 255:
                raise Unsupported(f"icmp value {right!r}")
            self.out.append(_cmp(cmp_op, bytes([right])))
            return False
        self.out.append(_cmp(cmp_op, _key_bytes(kt, right)))
        return False

    def anon_set(self, kt: str, pk: tuple[str, str], elems: list[Any]) -> tuple[str, int]:
        interval = any(isinstance(e, dict) for e in elems)
        sid = self.enc.next_id()
        type_id, key_len, _order = _TYPES[kt]
        if interval:
            items = [(*_interval_of(kt, e), b"") for e in elems]
            enc = _interval_elems(kt, items, merge=True)
        else:
            enc = [_elem(_key_bytes(kt, e)) for e in sorted(set(elems), key=lambda x: _key_bytes(kt, x))]
        flags = SET_F_ANON | SET_F_CONST | (SET_F_INTERVAL if interval else 0)
        desc, field = _TYPEOF[pk]
        typeof = _udata((0, struct.pack("=I", 7)), (1, _udata((0, struct.pack("=I", desc)),
                                                             (1, struct.pack("=I", field)))))  # fmt: skip
        ud = [(0, struct.pack("=I", 2))]
        if interval:
            ud.append((2, struct.pack("=I", 1)))
        ud.append((3, typeof))
        body = _strz(1, self.table) + _strz(2, "__set%d") + _u32(3, flags) + _u32(4, type_id)
        body += _u32(5, key_len) + _u32(10, sid) + _nest(9, _u32(1, len(enc))) + _attr(13, _udata(*ud))
        self.pre.append((NEWSET, F_REQ | F_CREATE, body))
        self.pre += _elem_msgs(self.table, "__set%d", sid, enc, NEWSETELEM)
        return "__set%d", sid

    # statements
    def vmap(self, v: dict[str, Any]) -> None:
        if set(v) != {"key", "data"} or not isinstance(v["data"], str) or not v["data"].startswith("@"):
            raise Unsupported(f"vmap {v!r}")
        name = v["data"][1:]
        info = self.enc.info(name)
        key = v["key"]
        if isinstance(key, dict) and set(key) == {"concat"}:
            word = 0
            for part in key["concat"]:
                ln, kt, _pk = self.load(part, word)
                if kt == "inet_proto" and info.interval:  # libnftables' (no-op) conversion, kept as is
                    r = _reg(word)
                    bo = _u32(1, r) + _u32(2, r) + _u32(3, 1) + _u32(4, 1) + _u32(5, 2)
                    self.out.append(_expr("byteorder", bo))
                word += (ln + 3) // 4
        else:
            self.load(key)
        self.out.append(self.enc.lookup(name, 1, 0))

    def stmt(self, s: dict[str, Any]) -> None:
        if len(s) != 1:
            raise Unsupported(f"statement {s!r}")
        ((kind, arg),) = s.items()
        if kind in VERDICTS and arg is None:
            self.out.append(_imm_verdict(VERDICTS[kind]))
        elif kind in ("goto", "jump"):
            if not isinstance(arg, dict) or set(arg) != {"target"} or not isinstance(arg["target"], str):
                raise Unsupported(f"{kind} {arg!r}")
            self.out.append(_imm_verdict(NFT_GOTO if kind == "goto" else NFT_JUMP, arg["target"]))
        elif kind == "counter":
            if arg is None:
                self.out.append(_expr("counter", b""))
            elif isinstance(arg, str):
                self.out.append(_expr("objref", _u32(1, 1) + _attr(2, arg.encode())))
            else:
                raise Unsupported(f"counter {arg!r}")
        elif kind == "log":
            if not isinstance(arg, dict) or set(arg) - {"prefix", "group"} or "group" not in arg:
                raise Unsupported(f"log {arg!r}")
            data = b""
            if "prefix" in arg:
                data += _strz(2, arg["prefix"])
            data += _attr(1, struct.pack("!H", arg["group"]))
            self.out.append(_expr("log", data))
        elif kind == "mangle" and isinstance(arg, dict) and arg.get("key") == _META_MARK:
            value = arg.get("value")
            if value == {"ct": {"key": "mark"}}:
                self.out.append(_expr("ct", _u32(2, 3) + _u32(1, 1)))  # ct load mark => reg 1
            elif isinstance(value, int) and not isinstance(value, bool):
                self.out.append(
                    _expr("immediate", _u32(1, 1) + _nest(2, _attr(1, struct.pack("=I", value & 0xFFFFFFFF))))
                )
            else:
                raise Unsupported(f"mangle {arg!r}")
            self.out.append(_expr("meta", _u32(2, _META_MARK_KEY) + _u32(3, 1)))  # meta set mark with reg 1
        elif kind == "mangle":
            if (
                not isinstance(arg, dict) or arg.get("key") != {"ct": {"key": "mark"}}
                or isinstance(arg.get("value"), bool) or not isinstance(arg.get("value"), int)
            ):  # fmt: skip
                raise Unsupported(f"mangle {arg!r}")
            self.out.append(
                _expr("immediate", _u32(1, 1) + _nest(2, _attr(1, struct.pack("=I", arg["value"]))))
            )
            self.out.append(_expr("ct", _u32(2, 3) + _u32(4, 1)))
        elif kind == "reject":
            if arg == {"type": "tcp reset"}:
                if self.l4 != _L4["tcp"]:
                    raise Unsupported("tcp reset without meta l4proto tcp")
                self.out.append(_expr("reject", _u32(1, 1) + _attr(2, b"\0")))
            elif arg == {"type": "icmpx", "expr": "admin-prohibited"}:
                self.out.append(_expr("reject", _u32(1, 2) + _attr(2, b"\x03")))
            else:
                raise Unsupported(f"reject {arg!r}")
        elif kind == "notrack" and arg is None:
            self.out.append(_expr("notrack", None))
        elif kind == "limit":
            if (
                not isinstance(arg, dict)
                or arg.get("per") != "second"
                or set(arg) - {"rate", "per", "burst", "inv"}
            ):
                raise Unsupported(f"limit {arg!r}")
            data = _u64(1, arg["rate"]) + _u64(2, 1) + _u32(3, arg.get("burst", 5)) + _u32(4, 0)
            data += _u32(5, 1 if arg.get("inv") else 0)
            self.out.append(_expr("limit", data))
        elif kind == "ct count":
            if not isinstance(arg, dict) or set(arg) - {"val", "inv"}:
                raise Unsupported(f"ct count {arg!r}")
            self.out.append(_expr("connlimit", _u32(1, arg["val"]) + _u32(2, 1 if arg.get("inv") else 0)))
        elif kind == "match":
            raise AssertionError("matches are encoded by match()")
        elif kind == "vmap":
            self.vmap(arg)
        else:
            raise Unsupported(f"statement {kind!r}")


def _handle(h: Any) -> int:
    if isinstance(h, bool) or not isinstance(h, int) or not 0 < h < 1 << 64:
        raise Unsupported(f"rule handle {h!r}")
    return h


def _match_key(m: Any, nfproto: int | None, l4: int | None) -> tuple[Any, ...] | None:
    """The cache key of a match in a rule context; None for what is not cached: anonymous sets (a
    set message per rule), icmp types (merged with the code that follows), unusual forms."""
    try:
        left = m["left"]
        if len(left) != 1:
            return None
        lv = left.get("payload")
        if lv is not None:
            if len(lv) != 2:
                return None
            proto = lv["protocol"]
            if proto == "icmp" or proto == "icmpv6":
                return None
            lk, lt = "payload", (proto, lv["field"])
        else:
            ((lk, lv),) = left.items()
            if (lk != "meta" and lk != "ct") or len(lv) != 1:
                return None
            lt = (lv["key"],)
        right = m["right"]
        tr = type(right)
        if tr is not str and tr is not int:
            if tr is dict and len(right) == 1 and "range" in right:
                lo, hi = right["range"]
                right = ("range", lo, hi)
            elif tr is list and all(type(x) is str for x in right):
                right = ("list", *right)
            else:
                return None
        return (m["op"], lk, lt, right, nfproto, l4)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


_PLAIN_STMTS = frozenset({"counter", "accept", "drop", "continue", "return", "notrack"})
# statements without an argument: their bytes (what _Rule.stmt encodes them as), no cache key needed
_CONST_STMTS: dict[str, bytes] = {
    **{k: _imm_verdict(v) for k, v in VERDICTS.items()},
    "counter": _expr("counter", b""),
    "notrack": _expr("notrack", None),
}
# `ct mark set <value>` (immediate into register 1, then ct set mark): the bytes around the value;
# every rule's mark is its own id, so these are encoded per rule, not cached
_MARK_HEAD = _expr("immediate", _u32(1, 1) + _nest(2, _attr(1, bytes(4))))[:-4]
_MARK_TAIL = _expr("ct", _u32(2, 3) + _u32(4, 1))
_PACK_U32 = struct.Struct("=I").pack
_PACK_PORT = struct.Struct("!H").pack


def _fast_stmt(kind: str, arg: Any) -> bytes | None:
    """The bytes of the statements every rule has (counter, verdict, its own flow log and ct mark) in
    the forms the renderer writes them; None: anything else (the general path encodes/refuses it).
    Logs and marks name the rule, so they never repeat: caching them only filled the cache."""
    if arg is None:
        return _CONST_STMTS.get(kind)
    if type(arg) is not dict or len(arg) != 2:
        return None
    if kind == "log":
        prefix, group = arg.get("prefix"), arg.get("group")
        if type(prefix) is not str or type(group) is not int or not 0 <= group <= 0xFFFF:
            return None
        return _expr("log", _strz(2, prefix) + _attr(1, _PACK_PORT(group)))
    if kind == "mangle":
        value = arg.get("value")
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
            return None
        if arg.get("key") != {"ct": {"key": "mark"}}:
            return None
        return _MARK_HEAD + _PACK_U32(value) + _MARK_TAIL
    return None


def _stmt_key(e: dict[str, Any]) -> tuple[Any, ...] | None:
    ((kind, arg),) = e.items()
    if arg is None:
        return (kind,) if kind in _PLAIN_STMTS else None
    if isinstance(arg, str):
        return (kind, arg) if kind == "counter" else None
    if not isinstance(arg, dict):
        return None
    if kind in ("goto", "jump") and len(arg) == 1:
        return (kind, arg.get("target"))
    if kind == "log" and len(arg) == 2:
        return (kind, arg.get("prefix"), arg.get("group"))
    if kind == "mangle" and len(arg) == 2 and arg.get("key") == {"ct": {"key": "mark"}}:
        return (kind, arg.get("value"))
    return None


def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", _u32(1, 1) + _u32(2, op) + _nest(3, _attr(1, data)))


class RuleEncoder:
    """Encodes one batch of commands; `known` carries the sets of earlier batches (their types)."""

    def __init__(self, family: str, table: str, known: dict[str, SetInfo]) -> None:
        if family not in NFPROTO:
            raise Unsupported(f"family {family!r}")
        self.family = family
        self.table = table
        self.known = known
        self.declared: dict[str, tuple[SetInfo, int]] = {}  # sets of this batch -> (info, id)
        self._id = 0
        self.msgs: list[Msg] = []
        self._head = _strz(1, table)
        self._chains: dict[str, bytes] = {}  # chain name -> a rule message's table and chain attributes
        # expression -> (bytes, rule context after it): a table's 80k matches are a few thousand
        # distinct ones (the same set lookups, protocols, ports and verdicts in many chains)
        self._cache: Cache = {}

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def info(self, name: str) -> SetInfo:
        got = self.declared.get(name)
        if got is not None:
            return got[0]
        info = self.known.get(name)
        if info is None:
            raise Unsupported(f"set {name!r}: type unknown to the raw encoder")
        return info

    def lookup(self, name: str, sreg: int, dreg: int | None, *, inverted: bool = False,
               set_id: int | None = None) -> bytes:  # fmt: skip
        if set_id is None:
            self.info(name)  # a named set must be one the table has (else: libnftables decides)
        data = _u32(2, sreg)
        if dreg is not None:
            data += _u32(3, dreg)
        data += _strz(1, name)
        if set_id is not None:
            data += _u32(4, set_id)
        if inverted:
            data += _u32(5, 1)
        return _expr("lookup", data)

    def _obj(self, body: dict[str, Any]) -> None:
        if body.get("family") != self.family or body.get("table") != self.table:
            raise Unsupported(f"object outside {self.family} {self.table}: {body!r}")

    def command(self, cmd: dict[str, Any]) -> None:
        if len(cmd) != 1:
            raise Unsupported(f"command {cmd!r}")
        ((verb, obj),) = cmd.items()
        if not isinstance(obj, dict) or len(obj) != 1:
            raise Unsupported(f"command {cmd!r}")
        ((kind, body),) = obj.items()
        t = self.table
        if kind == "table":
            if body != {"family": self.family, "name": t}:
                raise Unsupported(f"table {body!r}")
            if verb == "add":
                self.msgs.append((NEWTABLE, F_REQ, _strz(1, t) + _u32(2, 0)))
            elif verb == "delete":
                self.msgs.append((DELTABLE, F_REQ, _strz(1, t)))
                self.known.clear()
            else:
                raise Unsupported(f"{verb} table")
            return
        self._obj(body)
        name = body.get("name")
        if kind == "chain":
            if verb == "add":
                msg = _strz(1, t) + _strz(3, name)
                extra = set(body) - {"family", "table", "name"}
                if extra:
                    if extra != {"type", "hook", "prio", "policy"} or body["type"] != "filter":
                        raise Unsupported(f"chain {body!r}")
                    if body["hook"] not in _HOOKS or body["policy"] not in ("accept", "drop"):
                        raise Unsupported(f"chain {body!r}")
                    msg += _strz(7, "filter") + _u32(5, 1 if body["policy"] == "accept" else 0)
                    msg += _nest(4, _u32(1, _HOOKS[body["hook"]]) + _u32(2, body["prio"]))
                self.msgs.append((NEWCHAIN, F_REQ | F_CREATE, msg))
            elif verb == "flush" and set(body) == {"family", "table", "name"}:
                self.msgs.append((DELRULE, F_REQ, _strz(1, t) + _strz(2, name)))
            elif verb == "delete" and set(body) == {"family", "table", "name"}:
                self.msgs.append((DELCHAIN, F_REQ, _strz(1, t) + _strz(3, name)))
            else:
                raise Unsupported(f"{verb} chain {body!r}")
        elif kind in ("set", "map"):
            if verb == "add":
                if (kind == "map") != ("map" in body):
                    raise Unsupported(f"{kind} {body!r}")
                sid = self.next_id()
                msg, info = _set_decl(body, sid)
                self.msgs.append((NEWSET, F_REQ | F_CREATE, msg))
                self.declared[name] = (info, sid)
            elif verb == "delete" and set(body) == {"family", "table", "name"}:
                self.msgs.append((DELSET, F_REQ, _strz(1, t) + _strz(2, name)))
                self.declared.pop(name, None)
                self.known.pop(name, None)
            else:
                raise Unsupported(f"{verb} {kind} {body!r}")
        elif kind == "element":
            if verb not in ("add", "delete") or set(body) != {"family", "table", "name", "elem"}:
                raise Unsupported(f"{verb} element {sorted(body)}")
            got = self.declared.get(name)
            info = got[0] if got is not None else self.info(name)
            elems = _elements(info, body["elem"], verb, got is not None, name)
            typ = NEWSETELEM if verb == "add" else DELSETELEM
            self.msgs += _elem_msgs(t, name, got[1] if got is not None else None, elems, typ)
        elif kind == "rule":
            if verb == "delete" and set(body) == {"family", "table", "chain", "handle"}:
                msg = _strz(1, t) + _strz(2, body["chain"]) + _u64(3, _handle(body["handle"]))
                self.msgs.append((DELRULE, F_REQ, msg))
                return
            if verb not in ("add", "insert") or set(body) - {
                "family",
                "table",
                "chain",
                "expr",
                "comment",
                "handle",
            }:
                raise Unsupported(f"{verb} rule {sorted(body)}")
            if verb == "insert" and "handle" not in body:
                raise Unsupported("insert at the head of a chain")
            self.rule(body, append=verb == "add")
        elif kind == "counter":
            if set(body) != {"family", "table", "name"}:
                raise Unsupported(f"counter {body!r}")
            if verb == "add":
                data = _nest(4, _u64(1, 0) + _u64(2, 0))
                self.msgs.append((NEWOBJ, F_REQ | F_CREATE, _strz(1, t) + _strz(2, name) + _u32(3, 1) + data))
            elif verb == "delete":
                self.msgs.append((DELOBJ, F_REQ, _strz(1, t) + _strz(2, name) + _u32(3, 1)))
            else:
                raise Unsupported(f"{verb} counter")
        elif kind == "quota":
            want = {"family", "table", "name", "bytes", "used", "inv"}
            if verb != "add" or set(body) != want or body["used"] != 0 or body["inv"] is not False:
                raise Unsupported(f"{verb} quota {body!r}")
            b = body["bytes"]
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < 1 << 64:
                raise Unsupported(f"quota {body!r}")
            data = _u64(1, b) + _u64(4, 0) + _u32(2, 0)  # bytes, consumed, flags: as libnftables sends
            self.msgs.append(
                (NEWOBJ, F_REQ | F_CREATE, _strz(1, t) + _strz(2, name) + _u32(3, 2) + _nest(4, data))
            )
        else:
            raise Unsupported(f"{verb} {kind}")

    def rule(self, body: dict[str, Any], append: bool = True) -> None:
        """An added rule: at the end of its chain, or (with `handle`) right after (`append`) or right
        before that rule."""
        r = _Rule(self, self.table)
        exprs = body.get("expr")
        if not isinstance(exprs, list):
            raise Unsupported("rule without expressions")
        i = 0
        n = len(exprs)
        out = r.out
        cache = self._cache
        while i < n:
            e = exprs[i]
            if not isinstance(e, dict) or len(e) != 1:
                raise Unsupported(f"expression {e!r}")
            m = e.get("match")
            if m is None:
                ((kind, arg),) = e.items()
                fast = _CONST_STMTS.get(kind) if arg is None else _fast_stmt(kind, arg)
                if fast is not None:
                    out.append(fast)
                    i += 1
                    continue
            key = _match_key(m, r.nfproto, r.l4) if m is not None else _stmt_key(e)
            hit = cache.get(key) if key is not None else None
            if hit is not None:  # the same expression in the same context: the same bytes
                out.append(hit[0])
                if m is not None:  # a match moves the context, as it did when it was encoded
                    r.nfproto, r.l4 = hit[1], hit[2]
                i += 1
                continue
            mark = len(out)
            if m is not None:
                nxt = exprs[i + 1] if i + 1 < len(exprs) else None
                step = 2 if r.match(m, nxt) else 1
            else:
                r.stmt(e)
                step = 1
            if key is not None and step == 1 and len(cache) < CACHE_MAX:
                cache[key] = (b"".join(out[mark:]), r.nfproto, r.l4)
            i += step
        chain = body["chain"]
        head = self._chains.get(chain)
        if head is None:
            head = self._chains[chain] = self._head + _strz(2, chain)
        msg = head + _nest(4, b"".join(r.out))
        if "handle" in body:
            msg += _u64(6, _handle(body["handle"]))  # NFTA_RULE_POSITION
        comment = body.get("comment")
        if comment is not None:
            raw = str(comment).encode() + b"\0"
            if len(raw) > 255:
                raise Unsupported("comment longer than 254 bytes")
            msg += _attr(7, _udata((0, raw)))
        if r.pre:
            self.msgs += r.pre
        self.msgs.append((NEWRULE, F_REQ | F_CREATE | (F_APPEND if append else 0), msg))

    def commit_known(self) -> None:
        """The batch went through: its sets are known to later batches."""
        for name, (info, _sid) in self.declared.items():
            self.known[name] = info


def set_info(body: dict[str, Any]) -> SetInfo | None:
    """The key type of a set/map declaration or listing entry; None: not one the encoder handles."""
    typ = body.get("type")
    fields = tuple(typ) if isinstance(typ, list) else (typ,)
    if not all(isinstance(f, str) and f in _TYPES for f in fields):
        return None
    kind = body.get("map")
    if kind not in (None, "verdict"):
        return None
    flags = body.get("flags", [])
    flags = [flags] if isinstance(flags, str) else flags
    return SetInfo(fields, "interval" in flags, kind == "verdict")


def note_sets(known: dict[str, SetInfo], commands: Iterable[dict[str, Any]]) -> None:
    """Follow a transaction sent some other way (libnftables): its set declarations and deletions."""
    for cmd in commands:
        for verb, obj in cmd.items():
            if not isinstance(obj, dict):
                continue
            for kind, body in obj.items():
                if kind == "table" and verb == "delete":
                    known.clear()
                elif kind in ("set", "map") and isinstance(body, dict) and isinstance(body.get("name"), str):
                    if verb == "add":
                        info = set_info(body)
                        if info is None:
                            known.pop(body["name"], None)
                        else:
                            known[body["name"]] = info
                    elif verb == "delete":
                        known.pop(body["name"], None)


Cache = dict[tuple[Any, ...], tuple[bytes, int | None, int | None]]
CACHE_MAX = 200_000  # encoded expressions kept (~100 bytes each)


def encode_commands(
    family: str,
    table: str,
    commands: Iterable[dict[str, Any]],
    known: dict[str, SetInfo] | None = None,
    cache: Cache | None = None,
) -> tuple[list[Msg], RuleEncoder]:
    """The messages of one transaction. Raises Unsupported (nothing encoded is usable then).
    `cache`: encoded expressions of earlier batches of the same table (filled here)."""
    enc = RuleEncoder(family, table, dict(known) if known is not None else {})
    if cache is not None:
        if len(cache) >= CACHE_MAX:
            cache.clear()
        enc._cache = cache
    for cmd in commands:
        enc.command(cmd)
    return enc.msgs, enc


__all__ = [
    "CACHE_MAX",
    "Cache",
    "Msg",
    "RuleEncoder",
    "SetInfo",
    "Unsupported",
    "encode_commands",
    "note_sets",
    "set_info",
]

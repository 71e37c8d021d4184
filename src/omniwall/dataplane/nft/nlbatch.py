"""Set-element changes as one raw nfnetlink batch (= one nf_tables transaction), without libnftables.

Why: libnftables rebuilds its cache before every command. For an element command that is a dump of the
table's chains, sets and objects, and "sets" includes the anonymous set of every rule with a port list
or an anti-spoofing address list: ~13k of them on a 10k-rule table, 30-60 ms here, whatever the change.
A set element needs none of it: the kernel message names table, set and key bytes. So the hot path (an
address joins or leaves a group, the revision moves) is encoded here, ~0.1 ms; everything else (chains,
rules, interval sets, map declarations) still goes through libnftables.

Verdict maps (`MapElemOp`): elements `key : goto|jump <chain>`, same keys. The kernel resolves the chain
by name inside the table when the batch is checked, so a missing chain fails the whole batch (ENOENT).
An add of a key that is already mapped to another verdict is refused (EBUSY, even without EXCL): to
re-point a key, delete it and add it again in the same batch.

Only keys of fixed-size types are supported: ipv4_addr (4 bytes), ipv6_addr (16), ifname (16, NUL padded),
all in the byte order nft uses for them (network order for addresses, a C string for ifname).

Large loads (a full set of 1M addresses): elements go 2-4k per message (the element list is one netlink
attribute, whose length is 16 bits; map elements, of variable length, are packed up to that bound),
every message in one batch = one transaction, sent in one sendmsg; the socket's send buffer is grown to
the batch size first (SO_SNDBUFFORCE, as libnftables does; root). A batch of more than ACK_ALL_MAX
messages asks an ack of its last message only: the kernel reports every failed message anyway
(NETLINK_CAP_ACK keeps those reports to a header), and thousands of acks would overflow the receive
buffer.

The socket is opened on the namespace's thread (netlink sockets belong to the namespace they were
created in, for good), then used from the caller's thread: no thread hop on the hot path.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWOBJ = 12, 14, 18
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_RULE_HANDLE, NFTA_RULE_USERDATA = 3, 7
NLA_F_NESTED = 0x8000
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
# attributes (linux/netfilter/nf_tables.h)
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_JUMP, NFT_GOTO = -3, -4
NFT_CHAIN_MAXNAMELEN = 256  # with the NUL
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_QUOTA = 2
NFTA_QUOTA_BYTES, NFTA_QUOTA_FLAGS = 1, 2
IFNAMSIZ = 16
MAX_ELEMS_PER_MSG = 4096  # the element list is one attribute: its length (16 bits) bounds a message
MAX_LIST_PAYLOAD = 0xFFFF - 4  # the most element bytes one list attribute (4-byte header) can carry
ACK_ALL_MAX = 64  # batches of up to this many messages ack each one; larger ones ack the last only
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
DEFAULT_SNDBUF = 1 << 20
RCVBUF = 4 << 20
# per key type: bytes of the key, and the constant attribute headers in front of it in one list element
_KEY_LEN = {"ipv4_addr": 4, "ipv6_addr": 16, "ifname": IFNAMSIZ}

KeyType = Literal["ipv4_addr", "ipv6_addr", "ifname"]
Verb = Literal["add", "delete", "flush"]
MapVerb = Literal["add", "delete"]
_VERDICT_CODE = {"goto": NFT_GOTO, "jump": NFT_JUMP}


@dataclass(frozen=True, slots=True)
class ElemOp:
    """One element command: add/delete `elems` of set `name`, or flush it (elems ignored)."""

    verb: Verb
    name: str
    keytype: KeyType
    elems: tuple[str, ...] = ()

    @property
    def sends(self) -> bool:
        """False for an add/delete without elements (encoded as nothing)."""
        return self.verb == "flush" or bool(self.elems)

    def as_json(self, family: str, table: str) -> dict[str, Any]:
        """The libnftables JSON command with the same effect (for logs and `Nft.last_batch`)."""
        obj: dict[str, Any] = {"family": family, "table": table, "name": self.name}
        if self.verb == "flush":
            return {"flush": {"set": obj}}
        return {self.verb: {"element": {**obj, "elem": list(self.elems)}}}


@dataclass(frozen=True, slots=True)
class QuotaOp:
    """Create, or update in place, the named quota `name` with a limit of `value` bytes (the revision
    store: a quota no rule references limits nothing)."""

    name: str
    value: int
    sends = True

    def as_json(self, family: str, table: str) -> dict[str, Any]:
        q = {"family": family, "table": table, "name": self.name, "bytes": self.value}
        return {"add": {"quota": {**q, "used": 0, "inv": False}}}


@dataclass(frozen=True, slots=True)
class MapElemOp:
    """Add/delete elements of verdict map `name`; each elem is (key, "goto"|"jump", chain), the chain
    in the same table. A delete sends the key only (verdict and chain are ignored)."""

    verb: MapVerb
    name: str
    keytype: KeyType
    elems: tuple[tuple[str, str, str], ...] = ()

    @property
    def sends(self) -> bool:
        """False without elements (encoded as nothing)."""
        return bool(self.elems)

    def as_json(self, family: str, table: str) -> dict[str, Any]:
        """The libnftables JSON command with the same effect (for logs and `Nft.last_batch`)."""
        obj: dict[str, Any] = {"family": family, "table": table, "name": self.name}
        if self.verb == "delete":
            return {"delete": {"element": {**obj, "elem": [e[0] for e in self.elems]}}}
        elem = [[k, {v: {"target": c}}] for k, v, c in self.elems]
        return {self.verb: {"element": {**obj, "elem": elem}}}


Op = ElemOp | MapElemOp | QuotaOp


def key_bytes(keytype: KeyType, value: str) -> bytes:
    if keytype in ("ipv4_addr", "ipv6_addr"):
        try:  # inet_pton: ~10x faster than ipaddress on 1M keys, and as strict (no leading zeros)
            return socket.inet_pton(socket.AF_INET if keytype == "ipv4_addr" else socket.AF_INET6, value)
        except (OSError, TypeError):
            raise ValueError(f"{keytype} key {value!r}: not an address") from None
    raw = value.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw:
        raise ValueError(f"ifname key {value!r}: 1..{IFNAMSIZ - 1} bytes without NUL")
    return raw.ljust(IFNAMSIZ, b"\0")


def _elem_prefix(keytype: KeyType) -> bytes:
    """The headers of one list element: LIST_ELEM{ KEY{ DATA_VALUE<key> } }, all lengths fixed."""
    n = _KEY_LEN[keytype]
    return struct.pack(
        "=HHHHHH", 12 + n, NFTA_LIST_ELEM | NLA_F_NESTED, 8 + n, NFTA_SET_ELEM_KEY | NLA_F_NESTED, 4 + n,
        NFTA_DATA_VALUE,
    )  # fmt: skip


def _chunk_size(keytype: KeyType) -> int:
    return min(MAX_ELEMS_PER_MSG, (0xFFFF - 4) // (12 + _KEY_LEN[keytype]))


def _attr(typ: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, typ) + payload + b"\0" * (-n % 4)


def _str(typ: int, s: str) -> bytes:
    return _attr(typ, s.encode() + b"\0")


def _verdict_data(verdict: str, chain: str) -> bytes:
    """SET_ELEM_DATA{ DATA_VERDICT{ VERDICT_CODE<be32>, VERDICT_CHAIN<name NUL> } }."""
    code = _VERDICT_CODE.get(verdict)
    if code is None:
        raise ValueError(f"map element verdict {verdict!r}: not one of goto, jump")
    if not isinstance(chain, str) or not chain or "\0" in chain:
        raise ValueError(f"map element chain {chain!r}: a non-empty name without NUL")
    raw = chain.encode()
    if len(raw) >= NFT_CHAIN_MAXNAMELEN:
        raise ValueError(f"map element chain {chain[:32]!r}...: longer than {NFT_CHAIN_MAXNAMELEN - 1} bytes")
    v = _attr(NFTA_VERDICT_CODE, struct.pack("!i", code)) + _attr(NFTA_VERDICT_CHAIN, raw + b"\0")
    return _attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, _attr(NFTA_DATA_VERDICT | NLA_F_NESTED, v))


def _map_lists(op: MapElemOp) -> Iterable[bytes]:
    """The element lists' payloads: elements of variable length (the chain name), as many per list as
    fit one attribute (MAX_LIST_PAYLOAD bytes, MAX_ELEMS_PER_MSG elements)."""
    prefix = _elem_prefix(op.keytype)[4:]  # KEY{ DATA_VALUE } headers; LIST_ELEM's length varies
    datas: dict[tuple[str, str], bytes] = {}  # most elements share a few chains
    parts: list[bytes] = []
    size = 0
    for e in op.elems:
        if not isinstance(e, tuple | list) or len(e) != 3:
            raise ValueError(f"map {op.name} element {e!r}: not a (key, verdict, chain) triple")
        key, verdict, chain = e
        body = prefix + key_bytes(op.keytype, key)
        if op.verb == "add":
            data = datas.get((verdict, chain))
            if data is None:
                data = datas[(verdict, chain)] = _verdict_data(verdict, chain)
            body += data
        elem = struct.pack("=HH", 4 + len(body), NFTA_LIST_ELEM | NLA_F_NESTED) + body
        if parts and (size + len(elem) > MAX_LIST_PAYLOAD or len(parts) >= MAX_ELEMS_PER_MSG):
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(elem)
        size += len(elem)
    if parts:
        yield b"".join(parts)


def _nfmsg(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    hdr = struct.pack("=IHHII", 16 + 4 + len(body), msg_type, flags, seq, 0)
    return hdr + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body


def _quota_body(op: QuotaOp, table: str) -> bytes:
    if not 0 <= op.value < 1 << 64:
        raise ValueError(f"quota {op.name}: {op.value} is not a 64-bit unsigned value")
    data = _attr(NFTA_QUOTA_BYTES, struct.pack("!Q", op.value))
    data += _attr(NFTA_QUOTA_FLAGS, struct.pack("!I", 0))
    # sent without NLM_F_EXCL: an existing quota is updated in place
    return (
        _str(NFTA_OBJ_TABLE, table)
        + _str(NFTA_OBJ_NAME, op.name)
        + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_QUOTA))
        + _attr(NFTA_OBJ_DATA | NLA_F_NESTED, data)
    )


def _elem_msg(verb: str) -> tuple[int, int]:
    """(message type, flags without ACK) of an element add or delete."""
    if verb == "add":
        return NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE
    return NFT_MSG_DELSETELEM, NLM_F_REQUEST


def _list_head(table: str, name: str) -> bytes:
    return _str(NFTA_SET_ELEM_LIST_TABLE, table) + _str(NFTA_SET_ELEM_LIST_SET, name)


def _map_msgs(op: MapElemOp, table: str) -> list[tuple[int, int, bytes]]:
    if op.verb not in ("add", "delete"):
        raise ValueError(f"map {op.name}: verb {op.verb!r} is not one of add, delete")
    typ, flags = _elem_msg(op.verb)
    head = _list_head(table, op.name)
    return [
        (typ, flags, head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, payload))
        for payload in _map_lists(op)
    ]


def encode(
    family: str, table: str, ops: Sequence[Op], seq0: int, *, ack_all: bool | None = None
) -> tuple[bytes, list[int]]:
    """The batch (begin, one message per op and chunk, end) and the sequence numbers that get an ack.
    `ack_all`: ack every message (default: when the batch has at most ACK_ALL_MAX messages), else the
    last one only (the kernel still reports each failed message)."""
    return frame(family, op_msgs(table, ops), seq0, ack_all=ack_all)


def op_msgs(table: str, ops: Sequence[Op]) -> list[tuple[int, int, bytes]]:
    """The messages (nf_tables type, flags without ACK, body) of `ops`, in order."""
    msgs: list[tuple[int, int, bytes]] = []  # (type, flags without ACK, body)
    for op in ops:
        if isinstance(op, QuotaOp):
            msgs.append((NFT_MSG_NEWOBJ, NLM_F_REQUEST | NLM_F_CREATE, _quota_body(op, table)))
            continue
        if isinstance(op, MapElemOp):
            msgs.extend(_map_msgs(op, table))
            continue
        head = _list_head(table, op.name)
        if op.verb == "flush":  # DELSETELEM without an element list flushes the set
            msgs.append((NFT_MSG_DELSETELEM, NLM_F_REQUEST, head))
            continue
        if not op.sends:
            continue
        typ, flags = _elem_msg(op.verb)
        prefix, step = _elem_prefix(op.keytype), _chunk_size(op.keytype)
        elems = op.elems
        for i in range(0, len(elems), step):
            chunk = elems[i : i + step]
            payload = b"".join([prefix + key_bytes(op.keytype, e) for e in chunk])
            msgs.append((typ, flags, head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, payload)))
    return msgs


def frame(
    family: str, msgs: Sequence[tuple[int, int, bytes]], seq0: int, *, ack_all: bool | None = None
) -> tuple[bytes, list[int]]:
    """Messages (nf_tables type, flags without ACK, body) between batch begin and end: the batch and
    the sequence numbers that get an ack (see `encode`)."""
    fam = NFPROTO[family]
    if ack_all is None:
        ack_all = len(msgs) <= ACK_ALL_MAX
    out = [_nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq0, 0, NFNL_SUBSYS_NFTABLES, b"")]
    seqs: list[int] = []
    seq = seq0
    for k, (typ, flags, body) in enumerate(msgs):
        seq += 1
        if ack_all or k == len(msgs) - 1:
            flags |= NLM_F_ACK
            seqs.append(seq)
        out.append(_nfmsg((NFNL_SUBSYS_NFTABLES << 8) | typ, flags, seq, fam, 0, body))
    seq += 1
    out.append(_nfmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(out), seqs


class BatchError(RuntimeError):
    def __init__(self, errno_: int, seq: int) -> None:
        super().__init__(f"nf_tables batch refused (message {seq}): {os.strerror(errno_)}")
        self.errno = errno_
        self.seq = seq


class ElemSocket:
    """A NETLINK_NETFILTER socket in the namespace it was created in; `commit` sends one batch and
    waits for every message's ack (the kernel processes a batch synchronously, all or nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(10.0)
        # failure reports carry the failed message's header only, not its (up to 64 kB) body
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._seq = 0

    def _fit(self, size: int) -> None:
        """Grow the send buffer so one sendmsg carries the whole batch (FORCE: above rmem/wmem_max)."""
        if size + 4096 <= self._sndbuf:
            return
        want = max(DEFAULT_SNDBUF, size + 65536)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:  # not root: as large as the sysctl allows (EMSGSIZE beyond)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def commit(self, family: str, table: str, ops: Iterable[Op]) -> int:
        """Returns the number of messages sent (0: nothing to do). Raises BatchError (nothing applied)."""
        return self._send(*encode(family, table, list(ops), self._seq + 1))

    def commit_msgs(self, family: str, msgs: Sequence[tuple[int, int, bytes]]) -> int:
        """One transaction of prebuilt messages (nlrules.py); as `commit`."""
        return self._send(*frame(family, msgs, self._seq + 1))

    def _send(self, data: bytes, seqs: list[int]) -> int:
        if not seqs:
            return 0
        begin = self._seq + 1
        self._seq = seqs[-1] + 1
        self._fit(len(data))
        self.sock.settimeout(10.0 + len(data) / 4e6)  # the kernel commits ~1M elements a second
        self.sock.send(data)
        pending, failure = set(seqs), None
        while pending:
            try:
                buf = self.sock.recv(65536)
            except TimeoutError:  # the kernel answers within the send; silence means a lost ack
                raise failure or BatchError(errno.ETIMEDOUT, min(pending)) from None
            off = 0
            while off + 16 <= len(buf):
                ln, typ, _flags, seq = struct.unpack_from("=IHHI", buf, off)
                if ln < 16:
                    break
                if typ == NLMSG_ERROR and begin <= seq <= self._seq:  # not a late ack of an older batch
                    (err,) = struct.unpack_from("=i", buf, off + 16)
                    if err and failure is None:
                        failure = BatchError(-err, seq)
                        self.sock.settimeout(0.5)  # a failed batch's reports come together
                    pending.discard(seq)
                    if seq == begin and err:  # the commit itself failed: acks may not all follow
                        pending.clear()
                off += (ln + 3) & ~3
        if failure is not None:
            raise failure
        return len(seqs)

    def dump_rules(self, family: str, table: str, chain: str) -> list[tuple[int, str | None]]:
        """The rules of one chain, in order: (handle, comment or None). Raises BatchError (errno) when
        the kernel refuses (no such table or chain)."""
        self._seq += 1
        seq = self._seq
        body = struct.pack("=BBH", NFPROTO[family], 0, 0) + _str(1, table) + _str(2, chain)
        hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0)  # fmt: skip
        self.sock.settimeout(10.0)
        self.sock.send(hdr + body)
        out: list[tuple[int, str | None]] = []
        while True:
            try:
                buf = self.sock.recv(1 << 20)
            except TimeoutError:
                raise BatchError(errno.ETIMEDOUT, seq) from None
            off = 0
            while off + 16 <= len(buf):
                ln, typ, _flags, mseq = struct.unpack_from("=IHHI", buf, off)
                if ln < 16:
                    break
                if mseq == seq:
                    if typ == NLMSG_DONE:
                        return out
                    if typ == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", buf, off + 16)
                        if err:
                            raise BatchError(-err, seq)
                    elif typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
                        out.append(_rule_handle(buf[off + 20 : off + ln]))
                off += (ln + 3) & ~3

    def close(self) -> None:
        self.sock.close()


def _rule_handle(attrs: bytes) -> tuple[int, str | None]:
    """(handle, comment) of a rule message's attributes."""
    handle, comment = -1, None
    off = 0
    while off + 4 <= len(attrs):
        ln, typ = struct.unpack_from("=HH", attrs, off)
        if ln < 4:
            break
        typ &= 0x7FFF
        if typ == NFTA_RULE_HANDLE:
            (handle,) = struct.unpack_from("!Q", attrs, off + 4)
        elif typ == NFTA_RULE_USERDATA:
            ud = attrs[off + 4 : off + ln]
            k = 0
            while k + 2 <= len(ud):  # TLVs: type, length, value (the comment: type 0, NUL ended)
                t, n = ud[k], ud[k + 1]
                if t == 0:
                    comment = ud[k + 2 : k + 2 + n].rstrip(b"\0").decode(errors="replace")
                k += 2 + n
        off += (ln + 3) & ~3
    return handle, comment


def load_ops(name: str, keytype: KeyType, elements: Sequence[str], *, replace: bool = False) -> list[Op]:
    """The ops that load `elements` into set `name` (after flushing it when `replace`)."""
    ops: list[Op] = [ElemOp("flush", name, keytype)] if replace else []
    ops.append(ElemOp("add", name, keytype, tuple(elements)))
    return ops


__all__ = [
    "BatchError",
    "ElemOp",
    "ElemSocket",
    "MapElemOp",
    "Op",
    "QuotaOp",
    "encode",
    "frame",
    "key_bytes",
    "load_ops",
    "op_msgs",
]

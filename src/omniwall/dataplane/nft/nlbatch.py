"""Set-element changes as one raw nfnetlink batch (= one nf_tables transaction), without libnftables.

Why: libnftables rebuilds its cache before every command. For an element command that is a dump of the
table's chains, sets and objects, and "sets" includes the anonymous set of every rule with a port list
or an anti-spoofing address list: ~13k of them on a 10k-rule table, 30-60 ms here, whatever the change.
A set element needs none of it: the kernel message names table, set and key bytes. So the hot path (an
address joins or leaves a group, the revision moves) is encoded here, ~0.1 ms; everything else (chains,
rules, maps, interval sets) still goes through libnftables.

Only keys of fixed-size types are supported: ipv4_addr (4 bytes), ipv6_addr (16), ifname (16, NUL padded),
all in the byte order nft uses for them (network order for addresses, a C string for ifname).

The socket is opened on the namespace's thread (netlink sockets belong to the namespace they were
created in, for good), then used from the caller's thread: no thread hop on the hot path.
"""

from __future__ import annotations

import errno
import ipaddress
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
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
# attributes (linux/netfilter/nf_tables.h)
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_QUOTA = 2
NFTA_QUOTA_BYTES, NFTA_QUOTA_FLAGS = 1, 2
IFNAMSIZ = 16
MAX_ELEMS_PER_MSG = 256  # keeps every message far below the socket buffer

KeyType = Literal["ipv4_addr", "ipv6_addr", "ifname"]
Verb = Literal["add", "delete", "flush"]


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


Op = ElemOp | QuotaOp


def key_bytes(keytype: KeyType, value: str) -> bytes:
    if keytype == "ipv4_addr":
        return ipaddress.IPv4Address(value).packed
    if keytype == "ipv6_addr":
        return ipaddress.IPv6Address(value).packed
    raw = value.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw:
        raise ValueError(f"ifname key {value!r}: 1..{IFNAMSIZ - 1} bytes without NUL")
    return raw.ljust(IFNAMSIZ, b"\0")


def _attr(typ: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, typ) + payload + b"\0" * (-n % 4)


def _str(typ: int, s: str) -> bytes:
    return _attr(typ, s.encode() + b"\0")


def _nfmsg(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    hdr = struct.pack("=IHHII", 16 + 4 + len(body), msg_type, flags, seq, 0)
    return hdr + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body


def _quota_msg(op: QuotaOp, table: str, fam: int, seq: int) -> bytes:
    if not 0 <= op.value < 1 << 64:
        raise ValueError(f"quota {op.name}: {op.value} is not a 64-bit unsigned value")
    data = _attr(NFTA_QUOTA_BYTES, struct.pack("!Q", op.value))
    data += _attr(NFTA_QUOTA_FLAGS, struct.pack("!I", 0))
    body = (
        _str(NFTA_OBJ_TABLE, table)
        + _str(NFTA_OBJ_NAME, op.name)
        + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_QUOTA))
        + _attr(NFTA_OBJ_DATA | NLA_F_NESTED, data)
    )
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK  # no EXCL: an existing quota is updated in place
    return _nfmsg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ, flags, seq, fam, 0, body)


def encode(family: str, table: str, ops: Sequence[Op], seq0: int) -> tuple[bytes, list[int]]:
    """The batch (begin, one message per op and chunk, end) and the sequence numbers that get an ack."""
    fam = NFPROTO[family]
    out = [_nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq0, 0, NFNL_SUBSYS_NFTABLES, b"")]
    seqs: list[int] = []
    seq = seq0
    for op in ops:
        if isinstance(op, QuotaOp):
            seq += 1
            out.append(_quota_msg(op, table, fam, seq))
            seqs.append(seq)
            continue
        head = _str(NFTA_SET_ELEM_LIST_TABLE, table) + _str(NFTA_SET_ELEM_LIST_SET, op.name)
        if op.verb == "flush":  # DELSETELEM without an element list flushes the set
            chunks: list[tuple[str, ...]] = [()]
        else:
            if not op.sends:
                continue
            chunks = [op.elems[i : i + MAX_ELEMS_PER_MSG] for i in range(0, len(op.elems), MAX_ELEMS_PER_MSG)]
        for chunk in chunks:
            body = head
            if chunk:
                elems = b"".join(
                    _attr(
                        NFTA_LIST_ELEM | NLA_F_NESTED,
                        _attr(
                            NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key_bytes(op.keytype, e))
                        ),
                    )
                    for e in chunk
                )
                body += _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems)
            seq += 1
            if op.verb == "add":
                typ, flags = NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
            else:
                typ, flags = NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK
            out.append(_nfmsg((NFNL_SUBSYS_NFTABLES << 8) | typ, flags, seq, fam, 0, body))
            seqs.append(seq)
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
        self._seq = 0

    def commit(self, family: str, table: str, ops: Iterable[Op]) -> int:
        """Returns the number of messages sent (0: nothing to do). Raises BatchError (nothing applied)."""
        data, seqs = encode(family, table, list(ops), self._seq + 1)
        if not seqs:
            return 0
        begin = self._seq + 1
        self._seq = seqs[-1] + 1
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
                    pending.discard(seq)
                    if seq == begin and err:  # the commit itself failed: acks may not all follow
                        pending.clear()
                off += (ln + 3) & ~3
        if failure is not None:
            raise failure
        return len(seqs)

    def close(self) -> None:
        self.sock.close()


__all__ = ["BatchError", "ElemOp", "ElemSocket", "Op", "QuotaOp", "encode", "key_bytes"]

"""Verdict-map elements in raw nfnetlink batches (nlbatch.MapElemOp): byte encoding against hand-built
messages, chunking of variable-length elements under the 16-bit attribute length, the libnftables JSON."""

from __future__ import annotations

import struct

import pytest

from omniwall.dataplane.nft import nlbatch
from omniwall.dataplane.nft.nlbatch import ElemOp, MapElemOp, QuotaOp, encode

NESTED = 0x8000
SUBSYS = 10 << 8
NEWSETELEM, DELSETELEM = SUBSYS | 12, SUBSYS | 14


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload after the 16-byte nlmsghdr) of every message in a batch."""
    out, off = [], 0
    while off < len(data):
        ln, typ, flags, seq = struct.unpack_from("=IHHI", data, off)
        assert ln >= 16 and off + ln <= len(data)
        out.append((typ, flags, seq, data[off + 16 : off + ln]))
        off += (ln + 3) & ~3
    return out


def attrs(buf: bytes) -> list[tuple[int, bytes]]:
    """(type with flags, payload) of a run of netlink attributes; asserts they tile `buf` exactly."""
    out, off = [], 0
    while off < len(buf):
        ln, typ = struct.unpack_from("=HH", buf, off)
        assert ln >= 4 and off + ln <= len(buf), "attribute overruns its container"
        out.append((typ, buf[off + 4 : off + ln]))
        off += (ln + 3) & ~3
    assert off == len(buf)
    return out


def hdr(length: int, typ: int) -> bytes:
    return struct.pack("=HH", length, typ)


# family inet, version 0, res_id 0; table "owtest"; set "m" (padded by hand)
NFGEN = b"\x01\x00\x00\x00"
HEAD = hdr(11, 1) + b"owtest\0" + b"\0" + hdr(6, 2) + b"m\0" + b"\0\0"


def vmap_elem(key: bytes, code: bytes, chain: bytes) -> bytes:
    """LIST_ELEM{ KEY{ VALUE<key> }, DATA{ VERDICT{ CODE<be32>, CHAIN<name NUL> } } }, written out."""
    value = hdr(4 + len(key), 1) + key
    keyattr = hdr(4 + len(value), 1 | NESTED) + value
    name = chain + b"\0"
    chainattr = hdr(4 + len(name), 2) + name + b"\0" * (-len(name) % 4)
    verdict = hdr(8, 1) + code + chainattr
    verdictattr = hdr(4 + len(verdict), 2 | NESTED) + verdict
    data = hdr(4 + len(verdictattr), 2 | NESTED) + verdictattr
    body = keyattr + data
    return hdr(4 + len(body), 1 | NESTED) + body


def test_goto_element_bytes():
    data, seqs = encode(
        "inet", "owtest", [MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"),))], 7
    )
    msgs = messages(data)
    assert [m[0] for m in msgs] == [0x10, NEWSETELEM, 0x11]
    assert seqs == [8] and msgs[1][2] == 8
    assert msgs[1][1] == 0x1 | 0x4 | 0x400  # REQUEST | ACK | CREATE
    elem = (
        hdr(40, 1 | NESTED)  # LIST_ELEM: 4 + key 12 + data 24
        + hdr(12, 1 | NESTED) + hdr(8, 1) + bytes([10, 0, 0, 1])
        + hdr(24, 2 | NESTED) + hdr(20, 2 | NESTED)  # DATA{ VERDICT{ code 8 + chain 8 } }
        + hdr(8, 1) + b"\xff\xff\xff\xfc"  # NFT_GOTO = -4, big endian
        + hdr(7, 2) + b"c1\0" + b"\0"
    )  # fmt: skip
    assert elem == vmap_elem(bytes([10, 0, 0, 1]), b"\xff\xff\xff\xfc", b"c1")
    assert msgs[1][3] == NFGEN + HEAD + hdr(4 + len(elem), 3 | NESTED) + elem


def test_jump_element_bytes_ifname_key():
    op = MapElemOp("add", "m", "ifname", (("ow1", "jump", "chain-4"),))
    msgs = messages(encode("inet", "owtest", [op], 0)[0])
    elem = vmap_elem(b"ow1" + b"\0" * 13, b"\xff\xff\xff\xfd", b"chain-4")  # NFT_JUMP = -3
    # the chain attribute: 4 + "chain-4\0" = 12 bytes, no padding
    assert b"".join([hdr(12, 2), b"chain-4\0"]) in elem
    assert msgs[1][3] == NFGEN + HEAD + hdr(4 + len(elem), 3 | NESTED) + elem


def test_delete_sends_keys_only():
    """A map delete is the same message as a set delete of the same keys: verdict and chain ignored."""
    keys = ("fd00::1", "fd00::2")
    mop = MapElemOp("delete", "m", "ipv6_addr", tuple((k, "whatever", "") for k in keys))
    got = encode("inet", "owtest", [mop], 40)
    assert got == encode("inet", "owtest", [ElemOp("delete", "m", "ipv6_addr", keys)], 40)
    assert messages(got[0])[1][0] == DELSETELEM


def test_empty_op_sends_nothing_and_mixes_with_other_ops():
    assert encode("inet", "t", [MapElemOp("add", "m", "ipv4_addr")], 1)[1] == []
    ops = [
        MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"),)),
        ElemOp("add", "s", "ipv4_addr", ("10.0.0.2",)),
        MapElemOp("delete", "m", "ipv4_addr", (("10.0.0.3", "jump", "c2"),)),
        QuotaOp("_rev", 3),
    ]
    msgs = messages(encode("inet", "t", ops, 1)[0])
    assert [m[0] for m in msgs] == [0x10, NEWSETELEM, NEWSETELEM, DELSETELEM, SUBSYS | 18, 0x11]


def decode_elements(msgs: list[tuple[int, int, int, bytes]]) -> list[tuple[bytes, int, str]]:
    """Every (key, verdict code, chain) in the batch's element lists, in order; asserts each list is
    one attribute whose true size (it is the message's last attribute) is below 64 KiB."""
    out = []
    for _typ, _flags, _seq, payload in msgs[1:-1]:
        body = payload[4:]  # after nfgenmsg
        top = attrs(body)
        assert [t for t, _ in top] == [1, 2, 3 | NESTED]
        start = len(body) - len(top[-1][1]) - 4
        assert len(body) - start < 65536  # the element list's real length, not its 16-bit field
        for t, elem in attrs(top[-1][1]):
            assert t == 1 | NESTED
            (kt, key), (dt, data) = attrs(elem)
            assert (kt, dt) == (1 | NESTED, 2 | NESTED)
            [(vt, verdict)] = attrs(data)
            assert vt == 2 | NESTED
            (ct, code), (nt, name) = attrs(verdict)
            assert (ct, nt) == (1, 2) and name.endswith(b"\0")
            out.append((attrs(key)[0][1], struct.unpack("!i", code)[0], name[:-1].decode()))
    return out


def test_chunking_10k_elements_with_long_chain_names():
    chains = [f"{'x' * 38}{i:02d}" for i in range(3)]
    assert all(len(c) == 40 for c in chains)
    keys = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(10_000)]
    elems = tuple((k, "goto" if i % 2 else "jump", chains[i % 3]) for i, k in enumerate(keys))
    data, seqs = encode("inet", "owtest", [MapElemOp("add", "m", "ipv4_addr", elems)], 0)
    msgs = messages(data)
    assert len(msgs) - 2 > 10  # ~76 bytes an element: several messages, none over the bound
    assert len(seqs) == len(msgs) - 2  # up to ACK_ALL_MAX messages: each acked
    got = decode_elements(msgs)
    want = [(bytes(map(int, k.split("."))), -4 if v == "goto" else -3, c) for k, v, c in elems]
    assert got == want


def test_chunk_bound_is_tight(monkeypatch):
    """Lists are filled up to the bound, not a fixed count: with a small bound, every list but the last
    is within one element of it."""
    monkeypatch.setattr(nlbatch, "MAX_LIST_PAYLOAD", 1000)
    elems = tuple((f"10.0.{i >> 8}.{i & 255}", "goto", "c" * (1 + i % 50)) for i in range(300))
    msgs = messages(encode("inet", "t", [MapElemOp("add", "m", "ipv4_addr", elems)], 0)[0])
    sizes = [len(attrs(m[3][4:])[-1][1]) for m in msgs[1:-1]]
    assert all(s <= 1000 for s in sizes)
    assert all(s > 1000 - 100 for s in sizes[:-1])  # an element here is at most 96 bytes
    assert len(decode_elements(msgs)) == 300


def test_as_json():
    op = MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"), ("10.0.0.2", "jump", "c2")))
    assert op.as_json("inet", "owtest") == {
        "add": {
            "element": {
                "family": "inet",
                "table": "owtest",
                "name": "m",
                "elem": [["10.0.0.1", {"goto": {"target": "c1"}}], ["10.0.0.2", {"jump": {"target": "c2"}}]],
            }
        }
    }
    dop = MapElemOp("delete", "m", "ifname", (("ow1", "goto", "c1"),))
    assert dop.as_json("inet", "owtest") == {
        "delete": {"element": {"family": "inet", "table": "owtest", "name": "m", "elem": ["ow1"]}}
    }
    assert op.sends and not MapElemOp("delete", "m", "ifname").sends


@pytest.mark.parametrize(
    ("elem", "needle"),
    [
        (("10.0.0.1", "accept", "c1"), "verdict 'accept'"),
        (("10.0.0.1", "goto", ""), "chain ''"),
        (("10.0.0.1", "goto", "c\0"), "chain"),
        (("10.0.0.1", "jump", "c" * 256), "longer than 255 bytes"),
        (("10.0.0.300", "goto", "c1"), "not an address"),
        ("10.0.0.1", "not a (key, verdict, chain) triple"),
        (("10.0.0.1", "goto"), "not a (key, verdict, chain) triple"),
    ],
)
def test_bad_elements_are_refused_before_sending(elem, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        encode("inet", "t", [MapElemOp("add", "m", "ipv4_addr", (elem,))], 0)  # type: ignore[arg-type]


def test_chain_of_255_bytes_is_accepted_and_bad_verb_refused():
    encode("inet", "t", [MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "jump", "c" * 255),))], 0)
    with pytest.raises(ValueError, match="verb 'flush'"):
        encode("inet", "t", [MapElemOp("flush", "m", "ipv4_addr", (("10.0.0.1", "goto", "c"),))], 0)  # type: ignore[arg-type]
    # a delete with a str element would otherwise delete the key made of its first character
    with pytest.raises(ValueError, match="triple"):
        encode("inet", "t", [MapElemOp("delete", "m", "ifname", ("ow1",))], 0)  # type: ignore[arg-type]

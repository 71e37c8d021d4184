"""Verdict-map elements (`key : goto|jump <chain>`) as raw nfnetlink batches (nlbatch.MapElemOp), in a
namespace of their own: committed through ElemSocket, read back with libnftables' JSON listing."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from omniwall.dataplane.nft.libnft import Nft, NftError
from omniwall.dataplane.nft.nlbatch import BatchError, ElemOp, ElemSocket, MapElemOp

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]

FAM, TABLE = "inet", "owtest"
LONG = "x" * 38  # + 2 digits: 40-byte chain names


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces, nftables)")
    name = f"owtest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _table_commands() -> list[dict[str, Any]]:
    t = {"family": FAM, "table": TABLE}
    chains = ["c1", "c2", *(f"{LONG}{i:02d}" for i in range(3))]
    return [
        {"add": {"table": {"family": FAM, "name": TABLE}}},
        *({"add": {"chain": {**t, "name": c}}} for c in chains),
        {"add": {"map": {**t, "name": "m", "type": "ipv4_addr", "map": "verdict"}}},
        {"add": {"map": {**t, "name": "mi", "type": "ifname", "map": "verdict"}}},
        {"add": {"map": {**t, "name": "mj", "type": "ipv4_addr", "map": "verdict"}}},  # for as_json
        {"add": {"set": {**t, "name": "s", "type": "ipv4_addr"}}},
    ]


@pytest.fixture
def nft(netns: str) -> Iterator[Nft]:
    n = Nft(netns)
    try:
        n.transact(_table_commands())
        yield n
    finally:
        n.close()


@pytest.fixture
def sock(nft: Nft) -> Iterator[ElemSocket]:
    s = nft.thread.call(ElemSocket)  # created on the namespace's thread: bound to that namespace
    try:
        yield s
    finally:
        s.close()


def listed(nft: Nft, kind: str, name: str) -> dict[str, tuple[str, str]] | list[str]:
    """A map's elements as {key: (verdict, chain)}, or a set's as a sorted list."""
    for obj in nft.list_table(FAM, TABLE) or []:
        o = obj.get(kind)
        if o is not None and o["name"] == name:
            if kind == "set":
                return sorted(o.get("elem", []))
            out = {}
            for key, data in o.get("elem", []):
                [(verdict, target)] = data.items()
                out[key] = (verdict, target["target"])
            return out
    raise AssertionError(f"{kind} {name} not listed")


def listed_map(nft: Nft, name: str, n: int | None = None) -> dict[str, tuple[str, str]]:
    """As `listed`; with `n`, re-read a listing that shows fewer elements: a dump racing the kernel's
    background resize of a hash that just grew by thousands can miss some (see test_nft_bulk.py)."""
    for _ in range(10):
        got = listed(nft, "map", name)
        assert isinstance(got, dict)
        if n is None or len(got) == n:
            break
        time.sleep(0.2)
    return got


def test_add_delete_repoint_ipv4(nft, sock):
    add = MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"), ("10.0.0.2", "jump", "c2")))
    assert sock.commit(FAM, TABLE, [add]) == 1
    assert listed_map(nft, "m") == {"10.0.0.1": ("goto", "c1"), "10.0.0.2": ("jump", "c2")}
    # re-point a key (delete + add in one transaction), add and remove others
    ops = [
        MapElemOp("delete", "m", "ipv4_addr", (("10.0.0.1", "", ""),)),
        MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "jump", "c2"), ("10.0.0.3", "goto", "c2"))),
        MapElemOp("delete", "m", "ipv4_addr", (("10.0.0.2", "jump", "c2"),)),
    ]
    assert sock.commit(FAM, TABLE, ops) == 3
    assert listed_map(nft, "m") == {"10.0.0.1": ("jump", "c2"), "10.0.0.3": ("goto", "c2")}
    # an add of a mapped key with another verdict is refused (not silently kept or replaced)
    with pytest.raises(BatchError):
        sock.commit(FAM, TABLE, [MapElemOp("add", "m", "ipv4_addr", (("10.0.0.3", "goto", "c1"),))])
    assert listed_map(nft, "m") == {"10.0.0.1": ("jump", "c2"), "10.0.0.3": ("goto", "c2")}


def test_ifname_map(nft, sock):
    add = MapElemOp("add", "mi", "ifname", (("ow1", "goto", "c1"), ("tap-abc.12", "jump", f"{LONG}00")))
    sock.commit(FAM, TABLE, [add])
    assert listed_map(nft, "mi") == {"ow1": ("goto", "c1"), "tap-abc.12": ("jump", f"{LONG}00")}
    sock.commit(FAM, TABLE, [MapElemOp("delete", "mi", "ifname", (("ow1", "goto", "c1"),))])
    assert listed_map(nft, "mi") == {"tap-abc.12": ("jump", f"{LONG}00")}


def test_missing_chain_fails_whole_batch(nft, sock):
    sock.commit(FAM, TABLE, [MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"),))])
    good = MapElemOp("add", "m", "ipv4_addr", (("10.0.0.2", "goto", "c2"), ("10.0.0.3", "jump", "c1")))
    bad = MapElemOp("add", "m", "ipv4_addr", (("10.0.0.4", "goto", "nosuchchain"),))
    gone = MapElemOp("delete", "m", "ipv4_addr", (("10.0.0.1", "", ""),))
    plain = ElemOp("add", "s", "ipv4_addr", ("192.168.1.1",))
    for ops in ([good, gone, plain, bad], [bad, good, gone, plain]):
        with pytest.raises(BatchError) as exc:
            sock.commit(FAM, TABLE, ops)
        assert exc.value.errno == 2  # ENOENT: the chain
        assert listed_map(nft, "m") == {"10.0.0.1": ("goto", "c1")}
        assert listed(nft, "set", "s") == []
    # a bad element in the middle of one op: the same
    mixed = MapElemOp("add", "m", "ipv4_addr", (("10.0.0.2", "goto", "c2"), ("10.0.0.4", "goto", "c3")))
    with pytest.raises(NftError):
        nft.elements(FAM, TABLE, [mixed])
    assert listed_map(nft, "m") == {"10.0.0.1": ("goto", "c1")}


def test_mixed_batch_applies_both(nft, sock):
    ops = [
        MapElemOp("add", "m", "ipv4_addr", (("10.0.0.1", "goto", "c1"),)),
        ElemOp("add", "s", "ipv4_addr", ("192.168.1.1", "192.168.1.2")),
    ]
    assert sock.commit(FAM, TABLE, ops) == 2
    assert listed_map(nft, "m") == {"10.0.0.1": ("goto", "c1")}
    assert listed(nft, "set", "s") == ["192.168.1.1", "192.168.1.2"]


def test_through_nft_elements_and_as_json(nft):
    """Nft.elements commits a MapElemOp as it is; its as_json, run by libnftables, has the same effect."""
    elems = (("10.0.0.1", "goto", "c1"), ("10.0.0.2", "jump", f"{LONG}01"))
    op = MapElemOp("add", "m", "ipv4_addr", elems)
    nft.elements(FAM, TABLE, [op, ElemOp("add", "s", "ipv4_addr", ("192.168.1.1",))])
    assert nft.element_writes == 1
    assert nft.last_batch[0] == op.as_json(FAM, TABLE)
    nft.transact([MapElemOp("add", "mj", "ipv4_addr", elems).as_json(FAM, TABLE)])
    assert listed_map(nft, "m") == listed_map(nft, "mj") == {k: (v, c) for k, v, c in elems}
    dele = MapElemOp("delete", "mj", "ipv4_addr", elems[:1])
    nft.transact([dele.as_json(FAM, TABLE)])
    nft.elements(FAM, TABLE, [MapElemOp("delete", "m", "ipv4_addr", elems[:1])])
    assert listed_map(nft, "m") == listed_map(nft, "mj") == {"10.0.0.2": ("jump", f"{LONG}01")}


def test_10k_elements_long_chains_one_transaction(nft, sock):
    n = 10_000
    elems = tuple(
        (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "goto" if i % 2 else "jump", f"{LONG}{i % 3:02d}")
        for i in range(n)
    )
    sent = sock.commit(FAM, TABLE, [MapElemOp("add", "m", "ipv4_addr", elems)])
    assert sent > 10  # several messages: elements of ~76 bytes, lists under 64 KiB
    assert listed_map(nft, "m", n) == {k: (v, c) for k, v, c in elems}
    sock.commit(FAM, TABLE, [MapElemOp("delete", "m", "ipv4_addr", elems[1:])])
    assert listed_map(nft, "m") == {elems[0][0]: elems[0][1:]}

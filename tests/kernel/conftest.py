"""Kernel test fixtures: a self-cleaning namespace topology and NftBackend instances bound to it.

Skipped (visibly) only when not root. Every namespace has a per-run prefix; all are deleted in
`finally`, also when a test fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
from topo import Server, Topo

from omniwall.dataplane.nft.backend import NftBackend


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces, nftables)")


@pytest.fixture
def topo() -> Iterator[Topo]:
    _need_root()
    t = Topo()
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
def backends() -> Iterator[Callable[..., NftBackend]]:
    made: list[NftBackend] = []

    def make(netns: str, **kw: object) -> NftBackend:
        b = NftBackend(netns, **kw)  # type: ignore[arg-type]
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.close()


@pytest.fixture
def servers() -> Iterator[Callable[[str, int], Server]]:
    made: list[Server] = []

    def make(ns: str, port: int) -> Server:
        s = Server(ns, port)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


def _root_has_our_table() -> bool:
    res = subprocess.run(["nft", "list", "table", "inet", "omniwall"], capture_output=True, text=True)
    return res.returncode == 0


@pytest.fixture
def root_untouched() -> Iterator[None]:
    """The initial namespace's nftables must not gain (or lose) an omniwall table during the test."""
    before = _root_has_our_table()
    yield
    assert _root_has_our_table() == before, "a test changed the root namespace's nftables"


@pytest.fixture
def one_host(topo: Topo, servers: Callable[[str, int], Server]) -> Callable[..., tuple]:
    """Factory: host `h1` with the named workloads (numbered 1, 2, ... in order, so `a` is 10.0.0.1) and
    echo servers on the given (workload, port) pairs; returns (host, *workloads)."""

    def make(*names: str, serve: tuple[tuple[str, int], ...] = ()) -> tuple:
        h = topo.add_host("h1")
        workloads = {n: topo.add_workload(h, n, i) for i, n in enumerate(names, 1)}
        for n, port in serve:
            servers(workloads[n].ns, port)
        return (h, *workloads.values())

    return make

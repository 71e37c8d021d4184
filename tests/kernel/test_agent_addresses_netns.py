"""The agent's address watcher in a real namespace: host routes via a vNIC are that vNIC's workload IPs.

Topology (all created here, unique prefix, removed on exit): one "host" namespace with a veth pair whose
host side plays the vNIC; /32 and /128 routes `dev <vnic>` play the hypervisor's routing for the workload.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from omniwall.agent.addresses import AddressWatcher

pytestmark = pytest.mark.kernel

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("needs root and iproute2 (network namespaces)", allow_module_level=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hostns() -> Iterator[tuple[str, str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns, vnic, other = f"owaa{tag}", f"owv{tag}", f"owo{tag}"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "add", vnic, "type", "veth", "peer", "name", f"owp{tag}")
        ip("-n", ns, "link", "add", other, "type", "veth", "peer", "name", f"owq{tag}")
        for dev in (vnic, f"owp{tag}", other, f"owq{tag}"):
            ip("-n", ns, "link", "set", dev, "up")
        yield ns, vnic, other
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_watcher_reports_host_routes_and_their_changes(hostns: tuple[str, str, str]) -> None:
    ns, vnic, other = hostns
    ip("-n", ns, "route", "add", "10.77.0.5/32", "dev", vnic)
    ip("-n", ns, "-6", "route", "add", "fd77::5/128", "dev", vnic)
    ip("-n", ns, "route", "add", "10.77.1.0/24", "dev", vnic)  # a prefix, not a workload address
    ip("-n", ns, "route", "add", "10.77.0.99/32", "dev", other)  # not a watched vNIC
    reports: list[dict[str, list[str]]] = []

    async def scenario() -> None:
        watcher = AddressWatcher(lambda: [vnic], reports.append, netns=ns, debounce=0.05)
        task = asyncio.create_task(watcher.run())
        try:
            await until(lambda: bool(reports), "first report")
            assert reports[-1] == {vnic: ["10.77.0.5", "fd77::5"]}
            # the workload is re-addressed: the hypervisor swaps its host route
            ip("-n", ns, "route", "add", "10.77.0.6/32", "dev", vnic)
            ip("-n", ns, "route", "del", "10.77.0.5/32", "dev", vnic)
            await until(lambda: reports[-1] == {vnic: ["10.77.0.6", "fd77::5"]}, "re-addressed report")
            # the last route goes: the vNIC drops out of the report instead of reporting []
            ip("-n", ns, "route", "del", "10.77.0.6/32", "dev", vnic)
            ip("-n", ns, "-6", "route", "del", "fd77::5/128", "dev", vnic)
            await until(lambda: reports[-1] == {}, "empty report")
            n = len(reports)
            ip("-n", ns, "route", "add", "10.77.0.100/32", "dev", other)  # unwatched: no report
            await asyncio.sleep(0.5)
            assert len(reports) == n
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))

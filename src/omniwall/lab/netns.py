"""Network namespaces for the lab: create, delete, list, run commands, sysctls, veths between two of them.

Namespaces are created and deleted with `ip netns add/delete` rather than pyroute2: iproute2 sets up
`/run/netns` as a shared bind mount exactly the way every other tool (`ip netns exec`, nsenter, our own
`setns()`) expects, and a half-made namespace is then always visible to `ip netns list` for cleanup.
Links, addresses, routes and sysctls go through `Netlink`: pyroute2 on one thread per namespace.

A veth is created *directly* between two namespaces (`link add X ... peer {ifname: Y, net_ns_fd: B}`
issued inside A), so no interface ever appears in the root namespace, not even for a moment.

Netlink sockets and /proc/sys/net files belong to the namespace of the *thread* that opens them, so
both are opened from a thread that has `setns()`'d into the lab namespace
(`omniwall.dataplane.netns.NetnsThread`); the root namespace is never touched.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from pyroute2 import IPRoute

from omniwall.dataplane.netns import NETNS_RUN_DIR, NetnsThread, in_netns, netns_path
from omniwall.lab import guest

__all__ = [
    "LabNetnsError",
    "Netlink",
    "create",
    "delete",
    "exec_argv",
    "exists",
    "in_netns",
    "ipv6_available",
    "list_names",
    "run",
]


class LabNetnsError(RuntimeError):
    pass


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_names(prefix: str = "") -> list[str]:
    """Named namespaces (as `ip netns list` shows them) starting with `prefix`, sorted."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def create(name: str) -> None:
    """A new, empty namespace. Refuses to reuse an existing one (it might not be ours)."""
    if exists(name):
        raise LabNetnsError(f"network namespace {name!r} already exists")
    _ip(["netns", "add", name])


def delete(name: str) -> bool:
    """Delete a namespace if present (idempotent). Returns whether it existed."""
    if not exists(name):
        return False
    _ip(["netns", "delete", name])
    return True


def _ip(args: list[str]) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise LabNetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or f'exit {res.returncode}'}")


class Netlink:
    """Netlink and sysctl access to lab namespaces: one worker thread per namespace, `setns()`'d there
    once, holding one pyroute2 `IPRoute` opened inside it. (`IPRoute(netns=...)` forks a helper process
    per open; with a few dozen opens per lab that was most of `lab up`'s time.) Use as a context
    manager; `ipr(ns)` returns a proxy whose calls run on that namespace's thread."""

    def __init__(self) -> None:
        self._workers: dict[str, tuple[NetnsThread, IPRoute]] = {}

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self, ns: str) -> tuple[NetnsThread, IPRoute]:
        if ns not in self._workers:
            thread = NetnsThread(ns, name="lab-netlink")
            self._workers[ns] = (thread, thread.call(IPRoute))
        return self._workers[ns]

    def ipr(self, ns: str) -> _IprProxy:
        thread, ipr = self._worker(ns)
        return _IprProxy(thread, ipr)

    def sysctl(self, ns: str, values: Mapping[str, str | int]) -> None:
        """Write `net.*` sysctls inside `ns` (never in the root namespace)."""
        self._worker(ns)[0].call(_write_sysctls, dict(values))

    def index(self, ns: str, ifname: str) -> int:
        found = self.ipr(ns).link_lookup(ifname=ifname)
        if not found:
            raise LabNetnsError(f"interface {ifname} not found in {ns}")
        return int(found[0])

    def add_veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, *, mac_b: str | None = None) -> None:
        """A veth pair with end `if_a` in `ns_a` and `if_b` in `ns_b`, both up."""
        peer: dict[str, object] = {"ifname": if_b, "net_ns_fd": ns_b}
        if mac_b:
            peer["address"] = mac_b
        a = self.ipr(ns_a)
        a.link("add", ifname=if_a, kind="veth", peer=peer)
        a.link("set", index=self.index(ns_a, if_a), state="up")
        self.ipr(ns_b).link("set", index=self.index(ns_b, if_b), state="up")

    def close(self) -> None:
        for thread, ipr in self._workers.values():
            with contextlib.suppress(Exception):
                thread.call(ipr.close)
            thread.close()
        self._workers.clear()


class _IprProxy:
    """Forwards `ipr.link(...)`, `ipr.addr(...)`, ... to the IPRoute living on a namespace's thread."""

    def __init__(self, thread: NetnsThread, ipr: IPRoute) -> None:
        self._thread, self._ipr = thread, ipr

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._ipr, name)
        return lambda *args, **kwargs: self._thread.call(method, *args, **kwargs)


def _write_sysctls(values: dict[str, str | int]) -> None:
    for key, value in values.items():
        if not key.startswith("net."):
            raise LabNetnsError(f"sysctl {key}: only net.* keys are namespaced")
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
        except OSError as e:
            raise LabNetnsError(f"sysctl {key}={value}: {e.strerror}") from None


def ipv6_available() -> bool:
    """IPv6 compiled in and not disabled by default for new namespaces."""
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def run(
    netns: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `netns`; the caller looks at the exit code."""
    if guest.is_guest(netns):  # a VM workload's "namespace" is its guest (lab/guest.py)
        return guest.exec_in_guest(netns, argv, capture=capture, timeout=timeout)
    return subprocess.run(exec_argv(netns, argv), capture_output=capture, text=True, timeout=timeout)

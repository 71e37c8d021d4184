"""A minimal, self-cleaning netns topology for data-plane kernel tests, plus traffic helpers.

  workload ns (eth0: 10.0.0.N/32, fd00::N/128)  --veth-->  host ns (ifname "<name>"; /32 + /128 routes,
  default via 169.254.1.1 (proxy-ARP, owned by     proxy_arp, forwarding on; 169.254.1.1 on lo,
  the host's lo) and fe80::1 (host veth's LL)       fe80::1 on every workload veth)
  host ns  --veth "fab" (192.168.255.1/30 <-> .2, fd99::1 <-> fd99::2)--  second host ns (optional)

Every namespace name starts with a per-run prefix (`owt<pid>x<n>`); `cleanup()` deletes exactly those.
Sockets are opened in-process inside the namespace (`in_netns`) and used from the test thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from omniwall.compiler.ir import HostDesiredState, IRRule, IRSet, IRVnic, ServiceMatch
from omniwall.dataplane.netns import in_netns

_seq = itertools.count()


def sh(argv: list[str], *, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def nsexec(ns: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return sh(["ip", "netns", "exec", ns, *argv], **kw)  # type: ignore[arg-type]


@dataclass
class Workload:
    name: str
    ns: str
    host: str  # host namespace
    ifname: str  # host-side interface (the vNIC ifname in the IR)
    ip4: str
    ip6: str

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.ip4, self.ip6)


@dataclass
class Topo:
    prefix: str = field(default_factory=lambda: f"owt{os.getpid()}x{next(_seq)}")
    namespaces: list[str] = field(default_factory=list)
    workloads: dict[str, Workload] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    _fabric: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # host -> (peer, peer4, peer6)

    def _ns(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        sh(["ip", "netns", "add", name])
        self.namespaces.append(name)
        nsexec(name, ["ip", "link", "set", "lo", "up"])
        return name

    def _sysctl(self, ns: str, *pairs: str) -> None:
        nsexec(ns, ["sysctl", "-q", "-w", *pairs])

    def add_host(self, suffix: str = "h1") -> str:
        ns = self._ns(suffix)
        self._sysctl(
            ns,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.default.accept_dad=0",
        )
        nsexec(ns, ["ip", "addr", "add", "169.254.1.1/32", "dev", "lo"])
        self.hosts.append(ns)
        return ns

    def add_workload(self, host: str, name: str, n: int, ifname: str | None = None) -> Workload:
        ns = self._ns(f"w{name}")
        self._sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        ifname = ifname or f"tap{name}"
        nsexec(host, ["ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", ns])
        ip4, ip6 = f"10.0.0.{n}", f"fd00::{n:x}"
        # host side
        self._sysctl(host, f"net.ipv4.conf.{ifname}.proxy_arp=1", f"net.ipv4.conf.{ifname}.rp_filter=0")
        nsexec(host, ["ip", "addr", "add", "fe80::1/64", "dev", ifname])
        nsexec(host, ["ip", "link", "set", ifname, "up"])
        nsexec(host, ["ip", "route", "add", f"{ip4}/32", "dev", ifname])
        nsexec(host, ["ip", "-6", "route", "add", f"{ip6}/128", "dev", ifname])
        # workload side
        nsexec(ns, ["ip", "addr", "add", f"{ip4}/32", "dev", "eth0"])
        nsexec(ns, ["ip", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
        nsexec(ns, ["ip", "link", "set", "eth0", "up"])
        nsexec(ns, ["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])
        nsexec(ns, ["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])
        nsexec(ns, ["ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])
        w = Workload(name, ns, host, ifname, ip4, ip6)
        self.workloads[name] = w
        for other, (peer, p4, p6) in self._fabric.items():
            if other != host and peer == host:
                nsexec(other, ["ip", "route", "add", f"{ip4}/32", "via", p4])
                nsexec(other, ["ip", "-6", "route", "add", f"{ip6}/128", "via", p6])
        return w

    def link_hosts(self, h1: str, h2: str) -> None:
        """A veth 'fab' between two hosts; workloads added later get routes on the other side."""
        nsexec(h1, ["ip", "link", "add", "fab", "type", "veth", "peer", "name", "fab", "netns", h2])
        for h, a4, a6 in ((h1, "192.168.255.1/30", "fd99::1/64"), (h2, "192.168.255.2/30", "fd99::2/64")):
            nsexec(h, ["ip", "addr", "add", a4, "dev", "fab"])
            nsexec(h, ["ip", "addr", "add", a6, "dev", "fab", "nodad"])
            nsexec(h, ["ip", "link", "set", "fab", "up"])
        self._fabric[h1] = (h2, "192.168.255.2", "fd99::2")
        self._fabric[h2] = (h1, "192.168.255.1", "fd99::1")
        for w in self.workloads.values():
            other = h2 if w.host == h1 else h1 if w.host == h2 else None
            if other is not None:
                peer4, peer6 = self._fabric[other][1], self._fabric[other][2]
                nsexec(other, ["ip", "route", "add", f"{w.ip4}/32", "via", peer4])
                nsexec(other, ["ip", "-6", "route", "add", f"{w.ip6}/128", "via", peer6])

    def cleanup(self) -> None:
        for ns in reversed(self.namespaces):
            sh(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()


# ------------------------------------------------------------------------------------------ traffic


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_connect(ns: str, dst: str, port: int, timeout: float = 1.0) -> str:
    """'open', 'refused' (RST), 'unreachable' (ICMP error) or 'timeout'."""
    with in_netns(ns):
        s = socket.socket(_family(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return "unreachable" if e.errno in (113, 101, 13, 1) else f"error:{e.errno}"
    finally:
        s.close()


def open_stream(ns: str, dst: str, port: int, timeout: float = 1.0) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(_family(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((dst, port))
    return s


def stream_alive(s: socket.socket, payload: bytes = b"ping", timeout: float = 1.0) -> bool:
    """Send on an open connection to an echo server and expect the echo back."""
    s.settimeout(timeout)
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def udp_probe(ns: str, dst: str, port: int, timeout: float = 1.0) -> str:
    """'open' (echo came back), 'unreachable' (ICMP error) or 'timeout'."""
    with in_netns(ns):
        s = socket.socket(_family(dst), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        s.send(b"hello")
        s.recv(64)
        return "open"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "unreachable" if e.errno in (113, 101, 13, 1) else f"error:{e.errno}"
    finally:
        s.close()


def ping(ns: str, dst: str, timeout: float = 1.0) -> str:
    """'open', 'filtered' (ICMP admin-prohibited came back) or 'timeout'."""
    res = sh(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", str(timeout), dst], check=False)
    if res.returncode == 0:
        return "open"
    if "filtered" in res.stdout.lower() or "prohibited" in res.stdout.lower():
        return "filtered"
    return "timeout"


class Server:
    """TCP and UDP echo servers on one port inside a namespace (threads; sockets opened in the netns)."""

    def __init__(self, ns: str, port: int, *, v6: bool = True) -> None:
        self.port = port
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        fams = [socket.AF_INET] + ([socket.AF_INET6] if v6 else [])
        with in_netns(ns):
            for fam in fams:
                t = socket.socket(fam, socket.SOCK_STREAM)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                t.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                t.listen(64)
                u = socket.socket(fam, socket.SOCK_DGRAM)
                if fam == socket.AF_INET6:
                    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                u.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                self._socks += [t, u]
        for s in self._socks:
            s.settimeout(0.2)
            target = self._tcp if s.type == socket.SOCK_STREAM else self._udp
            threading.Thread(target=target, args=(s,), daemon=True).start()

    def _tcp(self, ls: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                c, _ = ls.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        c.settimeout(0.2)
        with c:
            while not self._stop.is_set():
                try:
                    data = c.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    c.sendall(data)

    def _udp(self, us: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data, addr = us.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError):
                us.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        time.sleep(0.25)
        for s in self._socks:
            s.close()


# --------------------------------------------------------------------------------------- IR builders
# Tests build IR directly (not through the compiler) so the data plane is tested on its own.


def rule(
    rid: int,
    action: str,
    src: str | None = None,
    dst: str | None = None,
    services: tuple[ServiceMatch, ...] = (),
    *,
    category: str = "application",
    stateful: bool = True,
    log: bool = False,
    monitor: bool = False,
) -> IRRule:
    return IRRule(rid, "t", "p", f"r{rid}", category, action, src, dst, services, stateful, log, monitor)  # type: ignore[arg-type]


def tcp(*ports: int | tuple[int, int]) -> ServiceMatch:
    return ServiceMatch("tcp", tuple(p if isinstance(p, tuple) else (p, p) for p in ports))


def udp(*ports: int) -> ServiceMatch:
    return ServiceMatch("udp", tuple((p, p) for p in ports))


def icmp(typ: int | None = None, code: int | None = None, v6: bool = False) -> ServiceMatch:
    return ServiceMatch("icmpv6" if v6 else "icmp", (), typ, code)


def vnic(
    w: Workload,
    egress: tuple[int, ...] = (),
    ingress: tuple[int, ...] = (),
    default: str = "drop",
    monitor: bool = False,
    addresses: tuple[str, ...] | None = None,
) -> IRVnic:
    return IRVnic(
        w.ifname, f"t/{w.name}", "t", addresses if addresses is not None else w.addresses,
        egress, ingress, default, monitor,  # type: ignore[arg-type]
    )  # fmt: skip


def state(
    rev: int, vnics: list[IRVnic], rules: list[IRRule], sets: list[IRSet] | None = None, host: str = "h"
) -> HostDesiredState:
    return HostDesiredState(
        host,
        rev,
        tuple(sorted(vnics, key=lambda v: v.ifname)),
        tuple(sorted(rules, key=lambda r: r.id)),
        tuple(sorted(sets or [], key=lambda s: s.name)),
    )


__all__ = [
    "Server",
    "Topo",
    "Workload",
    "nsexec",
    "open_stream",
    "ping",
    "sh",
    "stream_alive",
    "tcp_connect",
    "udp_probe",
]

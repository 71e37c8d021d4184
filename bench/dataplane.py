"""Data-plane benchmark: what Omniwall's nftables rules cost a forwarded TCP flow, next to the floor
(conntrack alone) and the naive model (one rule per member address). Needs root; builds its own lab.

    sudo .venv/bin/python bench/dataplane.py                          # everything, ~10 min
    sudo .venv/bin/python bench/dataplane.py --rounds 1 --skip-sweep --only-arms   # quick look

One lab (two hosts, one workload on each; the flow crosses both hosts' forward hooks), every arm in
the same run:
  (a) no firewall: no table (and so no conntrack) in either host namespace;
  (d) minimal stateful table: `ct state established,related accept; accept`;
  (b) Omniwall: `NftBackend.sync` of a `HostDesiredState` with 10k rules and sets of 100k members per
      host, the path's vNIC hop holding `--hop-rules` rules with the allowing rule last (bench/_rulesets.py;
      a linear walk would pay them all, the hop index does not);
  (c) naive: 10k rules, one per member address, in one linear chain (iptables without ipset);
  (m) minimal enforcing table, hand-written: anti-spoofing of the path's vNIC in raw, its hop by ifname
      map, one allow rule (counter, ct mark), else drop: the least a per-vNIC firewall does;
  b@N (sweep): (b) with the path's hop holding N rules (flat with the hop index).
Arms are compared head to head in blocks, measured in rotating order round after round; a ratio is the
median of the per-round ratios:
floor = (a) vs (d) (table loaded/deleted around each measurement); main = (d), (b), (c), (m) all loaded
once and switched by the tables' `dormant` flag (unhooked: no cost, no reload between measurements);
one sweep block per N = (d) vs b@N. A ratio to (a) outside the floor block is X/(d) * (d)/(a).
Metrics: iperf3 TCP throughput (one stream) and new-connection rate (bench/_connrate.py). Then: time to
load a 1,000,000-element ipv4_addr hash set in one transaction, and `NftBackend.apply` of one-element
set deltas in process (median of 200; with conntrack empty and busy).

Prints a table and, last, one JSON line with every number. See BENCHMARKS.md ("Data plane") and
docs/design/dataplane-bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omniwall.compiler.ir import HostDelta, HostDesiredState, SetUpdate, apply_delta
from omniwall.dataplane.nft.backend import NftBackend
from omniwall.dataplane.nft.libnft import Nft
from omniwall.dataplane.nft.names import TABLE
from omniwall.lab.lab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _rulesets as rs

CONNRATE = str(Path(__file__).resolve().parent / "_connrate.py")
SRC_IP, DST_IP = "10.90.0.1", "10.90.0.2"
IPERF_PORT, CONN_PORT, CLOSED_PORT = 5201, 5300, 5399
LAB = f"""
kind: Host
metadata: {{name: h1}}
---
kind: Host
metadata: {{name: h2}}
---
kind: Workload
metadata: {{name: src, tenant: bench}}
spec: {{host: h1, vnics: [{{name: eth0, ips: [{SRC_IP}]}}]}}
---
kind: Workload
metadata: {{name: dst, tenant: bench}}
spec: {{host: h2, vnics: [{{name: eth0, ips: [{DST_IP}]}}]}}
"""


@dataclass
class Arm:
    """One ruleset, measured within one block. `on`/`off` switch it in and out between measurements."""

    name: str
    label: str
    on: Callable[[], None]
    off: Callable[[], None]
    enforcing: bool  # does it drop a flow it does not allow (checked before every measurement)
    gbps: list[float] = field(default_factory=list)
    cps: list[float] = field(default_factory=list)


@dataclass
class Block:
    """Arms compared head to head: measured in rotating order, `rounds` times, median per arm."""

    name: str
    arms: list[Arm]
    load_s: dict[str, float] = field(default_factory=dict)  # ruleset load times (both hosts)


def sh(ns: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.src_ns, self.dst_ns = lab.workload_netns("src"), lab.workload_netns("dst")
        self.hosts = [lab.host_netns("h1"), lab.host_netns("h2")]
        self.src_if = lab.plan.workload("src").vnics[0].host_ifname
        self.dst_if = lab.plan.workload("dst").vnics[0].host_ifname
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.nft = [Nft(h) for h in self.hosts]
        self.backends = [NftBackend(h) for h in self.hosts]

    # ------------------------------------------------------------------------------------ servers
    def start_servers(self) -> None:
        sh(self.src_ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        py = sys.executable
        self._spawn([py, CONNRATE, "server", "--addr", DST_IP, "--port", str(CONN_PORT)], "ready")
        self._spawn(["iperf3", "-s", "--forceflush", "-B", DST_IP, "-p", str(IPERF_PORT)], "listening")

    def _spawn(self, argv: list[str], ready: str) -> None:
        """Start a server in the destination workload; its output goes to a file (a pipe nobody reads
        would fill up and block it); wait until it prints `ready`."""
        out = tempfile.NamedTemporaryFile("w+", prefix="owbench-", suffix=".log")  # noqa: SIM115
        self.logs.append(out)
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.dst_ns, *argv], stdout=out, stderr=subprocess.STDOUT
        )
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while ready not in Path(out.name).read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {Path(out.name).read_text()[-300:]!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for b in self.backends:
            try:
                b.teardown()
            finally:
                b.close()
        for n in self.nft:
            n.close()
        for p in self.procs:  # only what we started, by PID
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for f in self.logs:
            f.close()

    # ------------------------------------------------------------------------------------- arms
    def omniwall_states(self, hop: int) -> list[HostDesiredState]:
        return [self.path_state(hop_rules=hop), self.path_state(hop_rules=hop, host="h2")]

    def sync_omniwall(self, hop: int) -> float:
        """Arm (b)/(b@N): a fresh full sync in both hosts (in parallel: the kernel work overlaps)."""
        states = self.omniwall_states(hop)
        for b in self.backends:
            b.teardown()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda bs: bs[0].sync(bs[1]), zip(self.backends, states, strict=True)))
        return time.perf_counter() - t0

    def nft_all(self, cmds: list[dict[str, Any]]) -> None:
        self.transact_all(cmds)

    def transact_all(self, cmds: list[dict[str, Any]]) -> float:
        t0 = time.perf_counter()
        for n in self.nft:
            n.transact(cmds)
        return time.perf_counter() - t0

    def set_dormant(self, table: str, dormant: bool) -> None:
        for n in self.nft:
            n.run_text(rs.dormant_text(table, dormant))

    def parked(self, name: str, label: str, table: str, enforcing: bool) -> Arm:
        """An arm whose table stays loaded and is switched by the table's dormant flag: a dormant table
        is unhooked, so it costs packets nothing (its ct expressions keep conntrack on in the namespace,
        which is why arm (a) never shares a block with a parked table)."""
        return Arm(
            name,
            label,
            lambda: self.set_dormant(table, False),
            lambda: self.set_dormant(table, True),
            enforcing,
        )

    def block_floor(self) -> Block:
        """(a) vs (d): (d)'s tiny table is loaded and deleted around each of its measurements."""
        d_cmds = rs.stateful_table(rs.TABLE_D)
        return Block(
            "floor",
            [
                Arm("a", "no firewall", lambda: None, lambda: None, False),
                Arm(
                    "d",
                    "minimal stateful table",
                    lambda: self.nft_all(d_cmds),
                    lambda: self.nft_all(rs.delete_table(rs.TABLE_D)),
                    False,
                ),
            ],
        )

    def block_main(self) -> Block:
        """(d) vs (b) vs (c): all three loaded once, parked, and woken one at a time."""
        a = self.args
        ports = (IPERF_PORT, CONN_PORT)
        blk = Block(
            "main",
            [
                self.parked("d", "minimal stateful table", rs.TABLE_D, False),
                self.parked("b", f"Omniwall, {a.hop_rules} rules on the hop", TABLE, True),
                self.parked("c", f"linear chain, {a.rules} rules", rs.TABLE_C, True),
                self.parked("m", "minimal enforcing table", rs.TABLE_M, True),
            ],
        )
        blk.load_s["d"] = self.transact_all(rs.stateful_table(rs.TABLE_D))
        blk.load_s["m"] = self.load_minimal(ports)
        blk.load_s["c"] = self.transact_all(rs.linear_table(rs.TABLE_C, SRC_IP, DST_IP, ports, a.rules))
        blk.load_s["b"] = self.sync_omniwall(a.hop_rules)
        for table in (rs.TABLE_D, rs.TABLE_C, rs.TABLE_M, TABLE):
            self.set_dormant(table, True)
        return blk

    def load_minimal(self, ports: tuple[int, ...]) -> float:
        """Arm (m) in both hosts: each table knows its own host's vNIC on the path."""
        t0 = time.perf_counter()
        for n, ifname, own, direction in zip(
            self.nft, (self.src_if, self.dst_if), (SRC_IP, DST_IP), ("egress", "ingress"), strict=True
        ):
            n.transact(rs.minimal_enforcing_table(rs.TABLE_M, ifname, own, direction, ports))
        return time.perf_counter() - t0

    def block_sweep(self, hop: int) -> Block:
        """(d) vs (b@N): (d) stays loaded from the main block; the Omniwall table is replaced."""
        blk = Block(
            f"sweep{hop}",
            [
                self.parked("d", "minimal stateful table", rs.TABLE_D, False),
                self.parked(f"b@{hop}", f"Omniwall, {hop} rules on the hop", TABLE, True),
            ],
        )
        blk.load_s[f"b@{hop}"] = self.sync_omniwall(hop)
        self.set_dormant(TABLE, True)
        return blk

    def drop_tables(self) -> None:
        for table in (rs.TABLE_D, rs.TABLE_C, rs.TABLE_M):
            self.transact_all(rs.delete_table(table))
        for b in self.backends:
            b.teardown()

    def run_block(self, blk: Block, rounds: int) -> None:
        log(f"block {blk.name}: {', '.join(x.name for x in blk.arms)}; loads {_fmt(blk.load_s)}")
        for r in range(rounds):
            k = r % len(blk.arms)
            for arm in blk.arms[k:] + blk.arms[:k]:
                arm.on()
                try:
                    self.measure(arm, blk.name, r)
                finally:
                    arm.off()

    # ------------------------------------------------------------------------------------ measure
    def flush_conntrack(self) -> None:
        for h in self.hosts:
            sh(h, ["conntrack", "-F"])

    def connrate(self, seconds: float) -> dict[str, Any]:
        r = sh(
            self.src_ns,
            [sys.executable, CONNRATE, "client", "--dst", DST_IP, "--port", str(CONN_PORT),
             "--seconds", str(seconds), "--concurrency", str(self.args.concurrency)],
            timeout=seconds + 30,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"connection-rate client failed: {r.stderr.strip()}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def iperf(self, seconds: float) -> float:
        r = sh(
            self.src_ns,
            ["iperf3", "-c", DST_IP, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1", "-J"],
            timeout=seconds + 30,
        )
        data = json.loads(r.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return data["end"]["sum_received"]["bits_per_second"] / 1e9

    def closed_port_refused(self) -> bool:
        """True when a connect to a port nobody listens on is refused (RST came back = not filtered)."""
        code = (
            "import socket,sys\ns=socket.socket();s.settimeout(1.0)\n"
            f"try:\n s.connect(('{DST_IP}',{CLOSED_PORT}));print('open')\n"
            "except ConnectionRefusedError:\n print('refused')\nexcept OSError:\n print('timeout')\n"
        )
        return sh(self.src_ns, [sys.executable, "-c", code]).stdout.strip() == "refused"

    def measure(self, arm: Arm, block: str, r: int) -> None:
        a = self.args
        if self.closed_port_refused() == arm.enforcing:
            raise RuntimeError(f"arm {arm.name}: the ruleset is not what it should be (closed-port check)")
        self.flush_conntrack()
        gbps = self.iperf(a.seconds)
        self.flush_conntrack()
        self.connrate(1.0)  # warm-up: caches, conntrack hash, client/server pages
        self.flush_conntrack()
        cr = self.connrate(a.seconds)
        self.flush_conntrack()
        if cr["errors"]:
            raise RuntimeError(f"arm {arm.name}: {cr['errors']} failed connections {cr['codes']}")
        arm.gbps.append(gbps)
        arm.cps.append(cr["rate"])
        load, rate = os.getloadavg()[0], cr["rate"]
        log(f"  {block:10} r{r + 1} {arm.name:7} {gbps:6.2f} Gbit/s {rate:8.0f} conn/s  (load {load:.2f})")

    # -------------------------------------------------------------------------------- set, delta
    def set_load(self) -> dict[str, Any]:
        """A 1M-element ipv4_addr hash set loaded in one transaction, two ways: the raw nfnetlink batch
        `NftBackend` uses for big member loads (`Nft.load_elements`; the set itself is created just
        before, in its own small transaction, as the backend does), and one libnftables JSON transaction
        (structure and elements together; its JSON encoding is timed apart)."""
        n = self.nft[0]
        size = self.args.set_size
        cmds = rs.big_set(size)
        structure = cmds[:-1]  # table + empty set; the last command adds the elements
        addrs = list(rs.member_addresses(0, size))
        raw, times, encode = [], [], []
        for _ in range(self.args.set_reps):
            n.transact(structure)
            t0 = time.perf_counter()
            n.load_elements("inet", rs.BENCH_TABLE, "big", "ipv4_addr", addrs)
            raw.append(time.perf_counter() - t0)
            self._check_last(n, size)
            n.transact(rs.delete_table())
            t0 = time.perf_counter()
            json.dumps({"nftables": cmds}, separators=(",", ":"))
            encode.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n.transact(cmds)
            times.append(time.perf_counter() - t0)
            self._check_last(n, size)
            n.transact(rs.delete_table())
        return {
            "elements": size,
            "seconds_median": statistics.median(raw),
            "seconds_all": raw,
            "json_seconds_median": statistics.median(times),
            "json_seconds_all": times,
            "json_encode_seconds": statistics.median(encode),
        }

    @staticmethod
    def _check_last(n: Any, size: int) -> None:
        """The last element really is in the kernel's set (a load that silently failed is no result)."""
        last = rs.member_addresses(size - 1, 1)[0]
        got = n.run_text(f"get element inet {rs.BENCH_TABLE} big {{ {last} }}")
        if last not in got:
            raise RuntimeError(f"1M set: element {last} missing after load")

    def path_state(self, host: str = "h1", **kw: Any) -> HostDesiredState:
        """Arm (b)'s state for h1 (the path's egress hop) or h2 (its ingress hop)."""
        a = self.args
        kw.setdefault("hop_rules", a.hop_rules)
        ifname, addr, direction = (
            (self.src_if, SRC_IP, "egress") if host == "h1" else (self.dst_if, DST_IP, "ingress")
        )
        return rs.omniwall_state(
            host, ifname=ifname, vnic_addr=addr, direction=direction, src_ip=SRC_IP, dst_ip=DST_IP,
            ports=(IPERF_PORT, CONN_PORT), rules=a.rules, members=a.members, **kw,
        )  # fmt: skip

    def port_list_load(self) -> dict[str, Any]:
        """Full `sync` of arm (b)'s state on one host, as is and with port lists instead of one range
        (every rule that has one then owns an anonymous set in the kernel)."""
        b = self.backends[0]
        out: dict[str, Any] = {}
        for key, port_list in (("range", False), ("port_list", True)):
            st = self.path_state(port_list=port_list)
            t0 = time.perf_counter()
            b.sync(st)
            out[f"{key}_s"] = time.perf_counter() - t0
            b.teardown()
        return out

    def delta_apply(self, busy: bool) -> dict[str, Any]:
        """`NftBackend.apply` of one-element deltas (alternately add and remove one address to the set
        the path's allowing rule takes its sources from) on the synced arm-(b) state, in this process.
        `busy`: with the conntrack table of the host full of recent connections (a loaded host)."""
        st = self.path_state()
        b = self.backends[0]
        b.sync(st)
        ct_entries = 0
        if busy:
            self.connrate(2.0)
            ct_entries = b.ct.count()
        target = st.sets[0]  # g0000: the allowing rule's source set
        extra = "10.127.255.254"
        grown = replace(target, addresses=tuple(sorted((*target.addresses, extra))))
        deltas = [
            SetUpdate(grown.name, result=grown, added_addresses=(extra,)),
            SetUpdate(target.name, result=target, removed_addresses=(extra,)),
        ]
        kernel: list[float] = []
        paths: dict[str, int] = {}

        def timed(name: str, fn: Callable[..., None]) -> Callable[..., None]:
            def go(*args: Any) -> None:
                t0 = time.perf_counter()
                fn(*args)
                kernel.append(time.perf_counter() - t0)
                paths[name] = paths.get(name, 0) + 1

            return go

        nft = b.nft
        saved = {k: getattr(nft, k) for k in ("transact", "elements") if hasattr(nft, k)}
        for k, fn in saved.items():
            setattr(nft, k, timed(k, fn))
        times: list[float] = []
        by_op: dict[str, list[float]] = {"add": [], "remove": []}
        rev = st.revision
        cur = st
        try:
            for i in range(self.args.delta_reps):
                d = HostDelta(host="h1", from_revision=rev, to_revision=rev + 1, set_updates=(deltas[i % 2],))
                n = apply_delta(cur, d)  # the reconciler's one application (not timed: not the backend's)
                t0 = time.perf_counter()
                b.apply(cur, d, n)
                dt = time.perf_counter() - t0
                cur = n
                times.append(dt)
                by_op["add" if i % 2 == 0 else "remove"].append(dt)
                rev += 1
        finally:
            for k, fn in saved.items():
                setattr(nft, k, fn)
        realized = b.realized()
        ok = realized is not None and realized.revision == rev and self.closed_port_refused() is False
        b.teardown()
        self.flush_conntrack()
        times.sort()
        return {
            "reps": len(times),
            "conntrack_entries": ct_entries,
            "ms_median": statistics.median(times) * 1e3,
            "ms_p90": times[int(len(times) * 0.9)] * 1e3,
            "add_ms_median": statistics.median(by_op["add"]) * 1e3,
            "remove_ms_median": statistics.median(by_op["remove"]) * 1e3,
            "kernel_ms_median": statistics.median(kernel) * 1e3,
            "kernel_calls": paths,  # which Nft method carried the change (elements: raw netlink batch)
            "table_consistent": ok,
        }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def paired(xs: list[float], base: list[float]) -> float:
    """Median of the per-round ratios xs[r] / base[r]."""
    return statistics.median(x / b for x, b in zip(xs, base, strict=True))


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def environment() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(),
        "nft": nft,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in d.items()) or "-"


def report(blocks: list[Block], set_res: dict[str, Any] | None, delta: dict[str, Any] | None,
           env: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """A ratio inside a block is the median over rounds of the round's ratio (the two arms measured
    one after the other: slow drift of the shared machine cancels); a ratio to (a) outside the floor
    block chains two of them: X/(a) = X/(d) [X's block] * (d)/(a) [floor block]."""
    floor = blocks[0]
    fa, fd = floor.arms
    d_over_a_g, d_over_a_c = paired(fd.gbps, fa.gbps), paired(fd.cps, fa.cps)
    rows = []
    for blk in blocks:
        d = next(x for x in blk.arms if x.name == "d")
        dg, dc = med(d.gbps), med(d.cps)
        for x in blk.arms:
            if blk is not floor and x.name == "d":
                continue
            g, c = med(x.gbps), med(x.cps)
            if blk is floor:
                rg, rc, rd = paired(x.gbps, fa.gbps), paired(x.cps, fa.cps), paired(x.cps, d.cps)
            else:
                x_d_g, x_d_c = paired(x.gbps, d.gbps), paired(x.cps, d.cps)
                rg, rc, rd = x_d_g * d_over_a_g, x_d_c * d_over_a_c, x_d_c
            rows.append({
                "arm": x.name, "label": x.label, "block": blk.name, "gbps": g, "gbps_ratio_a": rg,
                "gbps_ratio_d": paired(x.gbps, d.gbps), "cps": c, "cps_ratio_a": rc, "cps_ratio_d": rd,
                "load_s": blk.load_s.get(x.name), "gbps_rounds": x.gbps, "cps_rounds": x.cps,
                "block_d_gbps": dg, "block_d_cps": dc,
            })  # fmt: skip
    heads = ("Gbit/s", "/(a)", "conn/s", "/(a)", "/(d)", "load s")
    print(f"{'arm':8} {'ruleset':32} " + " ".join(f"{h:>7}" for h in heads))
    for row in rows:
        cells = (
            f"{row['gbps']:7.2f}", f"{row['gbps_ratio_a']:7.3f}", f"{row['cps']:7.0f}",
            f"{row['cps_ratio_a']:7.3f}", f"{row['cps_ratio_d']:7.3f}",
            f"{row['load_s']:7.2f}" if row["load_s"] is not None else f"{'-':>7}",
        )  # fmt: skip
        print(f"{row['arm']:8} {row['label']:32} " + " ".join(cells))
    b = next((r for r in rows if r["arm"] == "b"), None)
    targets: dict[str, dict[str, Any]] = {}
    if b is not None:
        targets["b_over_a_throughput"] = {
            "value": b["gbps_ratio_a"],
            "target": 0.95,
            "met": b["gbps_ratio_a"] >= 0.95,
        }
        targets["b_over_d_connections"] = {
            "value": b["cps_ratio_d"],
            "target": 0.97,
            "met": b["cps_ratio_d"] >= 0.97,
        }
    m = next((r for r in rows if r["arm"] == "m"), None)
    if b is not None and m is not None:  # informational: Omniwall against the least enforcement can do
        blk_main = next(x for x in blocks if x.name == "main")
        bm = paired(*(next(x for x in blk_main.arms if x.name == n).cps for n in ("b", "m")))
        print(f"(b)/(m) connections: {bm:.3f}   (m)/(d): {m['cps_ratio_d']:.3f}")
        targets["b_over_m_connections_info"] = {"value": bm, "target": None, "met": None}
    if set_res:
        s = set_res["seconds_median"]
        js, enc = set_res["json_seconds_median"], set_res["json_encode_seconds"]
        print(
            f"1M-element set, one transaction: {s:.2f} s median via raw netlink batch "
            f"({js:.2f} s via libnftables JSON, encode {enc:.2f} s)"
        )
        targets["set_load_1m_s"] = {"value": s, "target": 3.0, "met": s < 3.0}
    if delta:
        m = delta["ms_median"]
        print(
            f"one-element delta, NftBackend.apply: {m:.3f} ms median, p90 {delta['ms_p90']:.3f} ms "
            f"(kernel {delta['kernel_ms_median']:.3f} ms via {delta['kernel_calls']}); "
            f"add {delta['add_ms_median']:.3f} ms, remove {delta['remove_ms_median']:.3f} ms"
        )
        if "busy" in delta:
            bz = delta["busy"]
            print(
                f"  ... with {bz['conntrack_entries']} conntrack entries: {bz['ms_median']:.3f} ms median, "
                f"p90 {bz['ms_p90']:.3f} ms; add {bz['add_ms_median']:.3f} ms, "
                f"remove {bz['remove_ms_median']:.3f} ms"
            )
        if "full_sync" in delta:
            fs = delta["full_sync"]
            print(
                f"full sync of arm (b)'s state on one host: {fs['range_s']:.2f} s "
                f"({fs['port_list_s']:.2f} s with port lists)"
            )
        targets["delta_apply_ms"] = {"value": m, "target": 1.0, "met": m < 1.0}
    for k, t in targets.items():
        if t["target"] is not None:
            print(f"target {k}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "bench": "dataplane", "env": env, "params": {k: v for k, v in vars(args).items()},
        "arms": rows, "set_load": set_res, "delta_apply": delta, "targets": targets,
    }  # fmt: skip


# ------------------------------------------------------------------ one-rule change and full sync
# `--changes`: arm (b)'s state of one host (10k rules, 100k members) in a scratch namespace, no lab:
# a full sync from nothing, then one-rule changes through `NftBackend.apply`, timed per call
# (rendering + kernel + revocation). Each round runs one worker per code tree, in alternating order:
# this tree, and `--base-src` (the old code path, e.g. a `git worktree` of the base commit).


def change_worker(args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    from omniwall.compiler.ir import HostDelta, RuleUpdate, VnicUpdate, apply_delta
    from omniwall.dataplane.nft.backend import NftBackend

    ns = f"owpl{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        be = NftBackend(ns)
        try:
            st = rs.omniwall_state(
                "h1", ifname="owpath", vnic_addr=SRC_IP, direction="egress", src_ip=SRC_IP, dst_ip=DST_IP,
                ports=(IPERF_PORT, CONN_PORT), rules=args.rules, members=args.members,
            )  # fmt: skip
            be.teardown()
            t0, c0 = time.perf_counter(), time.process_time()
            be.sync(st)
            full = time.perf_counter() - t0
            full_cpu = time.process_time() - c0  # this process: Python, libnftables and the kernel's work
            new_api = len(inspect.signature(be.apply).parameters) == 3
            kernel: list[float] = []
            nft = be.nft
            saved = {k: getattr(nft, k) for k in ("transact", "elements")}

            def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
                def go(*a: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return fn(*a)
                    finally:
                        kernel.append(time.perf_counter() - t)

                return go

            for k, fn in saved.items():
                setattr(nft, k, timed(fn))
            times: list[float] = []
            cpus: list[float] = []
            ker: list[float] = []
            s = st
            rmap = s.rule_map()
            for i in range(args.change_reps):
                r = rmap[
                    args.hop_rules + 1 + (i * 37) % (args.rules - args.hop_rules)
                ]  # a synthetic vNIC's rule
                port = 40000 + i
                r2 = replace(r, services=(replace(r.services[0], ports=((port, port),)),))
                users = tuple(VnicUpdate(v) for v in s.vnics if r.id in (*v.egress, *v.ingress))
                d = HostDelta(
                    "h1", s.revision, s.revision + 1, rule_updates=(RuleUpdate(r2),), vnic_updates=users
                )
                n = apply_delta(s, d)  # the reconciler's one application (not timed: it is not the backend's)
                kernel.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                if new_api:
                    be.apply(s, d, n)
                else:
                    be.apply(d)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                ker.append(sum(kernel))
                s = n
                rmap[r.id] = r2
            for k, fn in saved.items():
                setattr(nft, k, fn)
            back = be.realized()
            ok = back is not None and back.revision == s.revision and back.rules == s.rules
            be.teardown()
        finally:
            be.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {
        "full_sync_s": full,
        "full_sync_cpu_s": full_cpu,
        "change_cpu_ms_median": statistics.median(cpus) * 1e3,
        "change_ms_median": statistics.median(times) * 1e3,
        "change_ms_p90": sorted(times)[int(len(times) * 0.9)] * 1e3,
        "change_kernel_ms_median": statistics.median(ker) * 1e3,
        "first_change_ms": times[0] * 1e3,
        "reps": len(times),
        "read_back_ok": ok,
    }


def change_bench(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    trees = {"after": None, "before": args.base_src}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ["after", "before"] if r % 2 == 0 else ["before", "after"]
        got: dict[str, Any] = {}
        for tree in order:
            if trees[tree] is None and tree == "before":
                continue
            envv = dict(os.environ)
            if trees[tree] is not None:
                envv["PYTHONPATH"] = str(Path(trees[tree]) / "src")
            cmd = [sys.executable, __file__, "--change-worker", "--rules", str(args.rules),
                   "--members", str(args.members), "--hop-rules", str(args.hop_rules),
                   "--change-reps", str(args.change_reps)]  # fmt: skip
            out = subprocess.run(cmd, env=envv, capture_output=True, text=True, check=True, timeout=1800)
            got[tree] = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"round {r + 1} {tree}: {got[tree]}")
        rounds.append(got)

    def col(tree: str, key: str) -> list[float]:
        return [g[tree][key] for g in rounds if tree in g]

    out: dict[str, Any] = {"env": {**env, "loadavg_end": os.getloadavg()}, "rounds": rounds}
    for key in ("full_sync_s", "full_sync_cpu_s", "change_ms_median", "change_cpu_ms_median",
                "change_kernel_ms_median"):  # fmt: skip
        out[key] = {"after": med(col("after", key))}
        if args.base_src:
            out[key]["before"] = med(col("before", key))
            out[key]["after/before (median of per-round ratios)"] = paired(
                col("after", key), col("before", key)
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=3.0, help="per iperf3 and per connection-rate run")
    p.add_argument("--concurrency", type=int, default=16, help="connects in flight")
    p.add_argument("--rules", type=int, default=10_000)
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--hop-rules", type=int, default=100, help="rules on the path's hop in arm (b)")
    p.add_argument("--sweep", default="10,1000,10000", help="extra b@N arms (comma list)")
    p.add_argument("--sweep-rounds", type=int, default=2)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--set-size", type=int, default=1_000_000)
    p.add_argument("--set-reps", type=int, default=3)
    p.add_argument("--delta-reps", type=int, default=200)
    p.add_argument("--only-arms", action="store_true", help="skip the set-load and delta measurements")
    p.add_argument("--json-out", type=Path, help="also write the JSON result here")
    p.add_argument("--changes", action="store_true", help="only: full sync and one-rule changes, no lab")
    p.add_argument("--base-src", help="with --changes: a tree of the old code path, measured in the same run")
    p.add_argument("--change-reps", type=int, default=30)
    p.add_argument("--change-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.change_worker:
        print(json.dumps(change_worker(args)))
        return 0
    if args.changes:
        res = change_bench(args)
        line = json.dumps(res, separators=(",", ":"), default=str)
        if args.json_out:
            args.json_out.write_text(line + "\n")
        print(line)
        return 0
    args.sweep = [] if args.skip_sweep else [int(x) for x in args.sweep.split(",") if x.strip()]
    if os.geteuid() != 0:
        print("bench/dataplane.py needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("iperf3", "conntrack", "ip"):
        if shutil.which(tool) is None:
            print(f"bench/dataplane.py needs {tool} (see APT_PACKAGES in the Makefile)", file=sys.stderr)
            return 2
    env = environment()
    log(f"kernel {env['kernel']}, {env['nft']}, {env['cpus']} CPUs, load {env['loadavg_start']}")
    with Lab.up(LAB, policy=False, responders=False, ipv6=False) as lab:
        log(f"lab {lab.name}: {', '.join(lab.namespaces())}")
        bench = Bench(lab, args)
        try:
            bench.start_servers()
            blocks = [bench.block_floor()]
            bench.run_block(blocks[0], args.rounds)
            blocks.append(bench.block_main())
            bench.run_block(blocks[1], args.rounds)
            for hop in args.sweep:
                blocks.append(bench.block_sweep(hop))
                bench.run_block(blocks[-1], args.sweep_rounds)
            bench.drop_tables()
            set_res = delta = None
            if not args.only_arms:
                log("1M-element set load ...")
                set_res = bench.set_load()
                log("one-element delta apply ...")
                delta = bench.delta_apply(busy=False)
                delta["busy"] = bench.delta_apply(busy=True)
                log("arm (b) state: full sync on one host, one port range vs port lists ...")
                delta["full_sync"] = bench.port_list_load()
        finally:
            bench.stop()
    result = report(blocks, set_res, delta, env, args)
    line = json.dumps(result, separators=(",", ":"), default=str)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

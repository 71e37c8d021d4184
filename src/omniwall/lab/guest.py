"""A VM workload's guest as the lab's other modules see it: its run directory, whether a lab
"namespace" name is a guest, and running a command inside it over its command channel (vm/channel.py).

Below netns.py and probe.py (which send a guest's commands and probes here) and vm.py (which starts and
stops guests): it imports none of them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omniwall.lab import state as lab_state
from omniwall.vm import channel


def vm_dir() -> Path:
    return lab_state.STATE_DIR / "vm"


def rundir(name: str) -> Path:
    """A VM workload's run directory, by its `WorkloadPlan.netns` name."""
    return vm_dir() / name


def is_guest(name: str) -> bool:
    return (rundir(name) / "guest.json").is_file()


def exec_in_guest(
    name: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30
) -> subprocess.CompletedProcess[str]:
    """`lab exec` for a VM: run argv in the guest's busybox shell; its output (stdout and stderr
    together) is returned as stdout, or printed when not captured."""
    res = channel.run(rundir(name) / "ctl.sock", shlex.join(argv), timeout=timeout or 30)
    if not capture:
        sys.stdout.write(res.output + ("\n" if res.output and not res.output.endswith("\n") else ""))
        sys.stdout.flush()
        return subprocess.CompletedProcess(list(argv), res.returncode, None, None)
    return subprocess.CompletedProcess(list(argv), res.returncode, res.output, "")


# ------------------------------------------------------------------- long-running flows with a guest
# For VM migration tests and bench/vm_migration.py. busybox-static has no UDP server and its `nc` has
# no UDP at all, so the UDP flow is the guest's busybox `tftp` client *putting* an endless file
# (/dev/zero) to a sink in a namespace that acknowledges every block: a datagram each way per block,
# one UDP connection (one conntrack entry) for the whole run, paced by the sink.


def start_tcp_echo(name: str, port: int) -> None:
    """A persistent TCP echo server in the guest (busybox `nc -ll -e cat`: a `cat` per connection)."""
    _background(name, f"nc -ll -p {port} -e cat")


def start_udp_put(name: str, host: str, port: int) -> None:
    """The guest's UDP flow: busybox `tftp -p` of an endless file to `host:port` (a `TftpSink`)."""
    _background(name, f"tftp -p -l /dev/zero -r flow {host} {port}")


def _background(name: str, cmd: str) -> None:
    res = channel.run(rundir(name) / "ctl.sock", f"({cmd} </dev/null >/dev/null 2>&1 &)", timeout=30)
    if res.returncode != 0:
        raise channel.ChannelError(f"guest {name}: {cmd}: exit {res.returncode}: {res.output}")


SINK = r"""
import json, signal, socket, struct, sys, threading, time
port, pace = int(sys.argv[1]), float(sys.argv[2])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); s.settimeout(0.2)
st = {"blocks": 0, "requests": 0, "peers": [], "maxGapMs": 0.0, "gaps": []}; last = None
print(json.dumps({"ready": True}), flush=True)
while not stop.is_set():
    try: d, peer = s.recvfrom(4096)
    except socket.timeout: continue
    op = struct.unpack("!H", d[:2])[0]
    if op == 2:  # WRQ: a (new) transfer; ACK 0 from this port
        st["requests"] += 1
        if list(peer) not in st["peers"]: st["peers"].append(list(peer))
        s.sendto(struct.pack("!HH", 4, 0), peer)
    elif op == 3:  # DATA n: ACK n after the pace
        now = time.monotonic()
        if last is not None:
            gap = round((now - last) * 1000, 1); st["maxGapMs"] = max(st["maxGapMs"], gap)
            if gap > 20: st["gaps"].append([round(now, 4), gap])
        last = now; st["blocks"] += 1
        time.sleep(pace)
        s.sendto(struct.pack("!H", 4) + d[2:4], peer)
st["lastBlockAgoMs"] = round((time.monotonic() - last) * 1000, 1) if last else None
print(json.dumps(st), flush=True)
"""


class TftpSink:
    """The host side of a guest's UDP flow, in namespace `netns`: `{blocks, requests, peers, maxGapMs,
    gaps, lastBlockAgoMs}` at `stop()` (`gaps`: [monotonic time, ms] of each pause > 20 ms between
    blocks). One request from one peer for the whole run = the flow survived."""

    def __init__(self, netns: str, port: int, *, pace: float = 0.01) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", SINK, str(port), str(pace)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if '"ready"' not in line:
            self.proc.kill()
            raise RuntimeError(f"UDP sink in {netns} did not start: {line!r}")

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no report"}


__all__ = [
    "TftpSink",
    "exec_in_guest",
    "is_guest",
    "rundir",
    "start_tcp_echo",
    "start_udp_put",
    "vm_dir",
]

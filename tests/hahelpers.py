"""Helpers of the HA fault tests and the failover benchmark (tests/e2e/test_ha_*.py, bench/propagation.py):
a writer that bursts small writes at several managers and keeps what each acknowledged, the live traffic
(an allowed TCP stream and denied-flow probers) of the MOBILITY inventory (lab/streams.py), and reads
through any manager that answers.

Writes are Groups `t1/<prefix>-<n>` with a selector nothing matches: real store writes through the API
(audited, compiled, revisioned) that change no host's rules, so a burst does not perturb the traffic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TENANT = "t1"


@dataclass
class Ack:
    name: str
    manager: str
    revision: int
    at: float  # time.time() of the answer


@dataclass
class Writer:
    """`start()` a thread that creates Groups round-robin over `urls` (each request to one manager, no
    retry elsewhere: a write is acknowledged by the manager that answered 2xx) until `stop()`."""

    urls: list[str]
    token: str
    verify: Any
    prefix: str = "burst"
    pause: float = 0.01
    acked: list[Ack] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (manager, reason)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, name=f"writer-{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Writer:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self

    def _run(self) -> None:
        clients = {u: httpx.Client(base_url=u, verify=self.verify, timeout=5.0) for u in self.urls}
        headers = {"Authorization": f"Bearer {self.token}"}
        n = 0
        try:
            while not self._stop.is_set():
                url = self.urls[n % len(self.urls)]
                name = f"{self.prefix}-{n}"
                n += 1
                body = group(name)
                try:
                    r = clients[url].post("/v1/groups", json=body, headers=headers)
                except httpx.HTTPError as e:
                    self.failed.append((url, f"{type(e).__name__}"))
                    self._stop.wait(self.pause)
                    continue
                if r.status_code < 300:
                    rev = int((r.json().get("metadata") or {}).get("revision") or 0)
                    self.acked.append(Ack(name, url, rev, time.time()))
                else:
                    self.failed.append((url, f"HTTP {r.status_code}"))
                self._stop.wait(self.pause)
        finally:
            for c in clients.values():
                c.close()


def group(name: str, selector: str = 'role == "nobody"') -> dict[str, Any]:
    return {"kind": "Group", "metadata": {"name": name, "tenant": TENANT}, "spec": {"selector": selector}}


def missing(cp: Any, names: list[str], *, avoid: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """The Groups of `names` that a running manager (not in `avoid`) does not have."""
    i = next(i for i in range(cp.managers) if i not in avoid and cp.manager_alive(i))
    out = []
    with httpx.Client(base_url=cp.manager_url(i), verify=cp.verify, timeout=10.0) as c:
        r = c.get(
            "/v1/groups", params={"tenant": TENANT}, headers={"Authorization": f"Bearer {cp.admin_token}"}
        )
        r.raise_for_status()
        body = r.json()
        items = body.get("items", body) if isinstance(body, dict) else body
        have = {it["metadata"]["name"] for it in items}
    out = [n for n in names if n not in have]
    return out


class Traffic:
    """In the MOBILITY lab: an allowed TCP stream cli -> srv:5001 (every byte echoed and checked) and
    two denied-flow probers (bad -> srv:5001, cli -> srv:7001) for the block between start and stop."""

    def __init__(self, lab: Any) -> None:
        from omniwall.lab.streams import Flow, wait_port

        cli, srv, bad = (lab.plan.workload(f"{TENANT}/{n}") for n in ("cli", "srv", "bad"))
        srv_ip = srv.vnics[0].ips[0]
        self.server = Flow("tcp-echo", srv.netns, ("5001",)).start()
        wait_port(cli.netns, srv_ip, 5001)
        self.flows = {
            "stream": Flow("tcp-stream", cli.netns, (srv_ip, "5001")).start(),
            "intruder": Flow("tcp-prober", bad.netns, (srv_ip, "5001")).start(),
            "wrong-port": Flow("tcp-prober", cli.netns, (srv_ip, "7001")).start(),
        }

    def stop(self) -> dict[str, dict[str, Any]]:
        out = {k: f.stop() for k, f in self.flows.items()}
        self.server.stop(timeout=5)
        return out


def assert_no_gap(res: dict[str, dict[str, Any]]) -> None:
    """The allowed stream unbroken, every denied probe refused."""
    assert res["stream"]["ok"] and res["stream"]["sent"] > 100_000, res["stream"]
    for k in ("intruder", "wrong-port"):
        assert res[k]["attempts"] > 10 and res[k]["successes"] == 0, (k, res[k])


def wait_attached_elsewhere(
    cp: Any, hosts: list[str], gone: str, since: float, timeout: float = 15.0
) -> dict[str, float]:
    """Until every host's agent attached to a manager other than `gone` after `since`; returns the
    seconds each took (from `since`)."""
    deadline = time.monotonic() + timeout
    took: dict[str, float] = {}
    while len(took) < len(hosts):
        for h in hosts:
            at = cp.attached(h)
            if h not in took and at is not None and at[0] != gone and at[1] >= since - 0.01:
                took[h] = at[1] - since
        if time.monotonic() > deadline:
            raise AssertionError(f"not re-attached within {timeout:g} s: {sorted(set(hosts) - set(took))}")
        time.sleep(0.02)
    return took


class KernelWrites:
    """`nft monitor` in some host namespaces for the block between start and stop: every committed nft
    transaction there ("# new generation" line), i.e. every kernel write of the agents."""

    def __init__(self, lab: Any, hosts: list[str]) -> None:
        import subprocess

        self._procs = {
            h: subprocess.Popen(
                ["ip", "netns", "exec", lab.host_netns(h), "nft", "monitor"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for h in hosts
        }
        time.sleep(0.5)  # the monitor subscribes a little after it starts

    def stop(self) -> dict[str, list[str]]:
        """Each host's monitor lines (the generation lines and what they committed)."""
        out = {}
        for h, p in self._procs.items():
            p.terminate()
            try:
                text, _ = p.communicate(timeout=5)
            except Exception:
                p.kill()
                text, _ = p.communicate()
            out[h] = [line for line in (text or "").splitlines() if line.strip()]
        return out

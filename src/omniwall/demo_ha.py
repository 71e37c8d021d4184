"""`make demo-ha`: the three-tier example on a managed lab with three managers on a three-member etcd.

    python -m omniwall.demo_ha [EXAMPLE_DIR] [--once]

Needs root. Brings up the lab (`omniwall.lab.managed`, `managers=3, etcd=3`): an etcd cluster on
loopback ports, three managers on it, one agent per host that knows all three managers. Prints every
manager URL, the etcd endpoints and leader, which manager each agent is attached to, the sign-in token,
and checks the policy with real traffic (the matrix against the sim). Then it shows a failover: the
manager of the first host's agent is killed (SIGKILL); the agents attached to it move to another manager
while the kernel keeps enforcing (the matrix is measured again with that manager down), and the killed
manager is started again. It then stays up until Ctrl-C (or SIGTERM) and tears
everything down (agents, managers, etcd members by PID, namespaces).
`--once`: no waiting (tests). Exit status 1 when a check fails.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

# omniwall/examples is a link to the repository's examples/ and a copy in an installed wheel
EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "three-tier"
MANAGERS = 3
ETCD = 3
REATTACH_TIMEOUT = 30.0


def print_cluster(console: Console, cp: Any) -> None:
    leader = cp.etcd_leader()
    console.print("\n[bold]control plane[/] (docs/ha.md)")
    for i, url in enumerate(cp.urls):
        console.print(f"  manager {i + 1}:   {url}   (OpenAPI docs: {url}/docs, console: {url}/ui/)")
    for i, m in enumerate(cp.etcd_members):
        console.print(f"  etcd {m.name}: {m.client_url}{'   (leader)' if i == leader else ''}")
    console.print(f"  managers' store: --store {cp.store_spec}")
    for host in sorted(cp.record.agents):
        at = cp.attached(host)
        console.print(f"  agent {host}: attached to {at[0] if at else '?'}")
    ca = f" OMNIWALL_CA={cp.ca_file}" if cp.ca_file else ""
    console.print(
        f"  sign in with:  {cp.admin_token}   (provider admin, valid on every manager)\n"
        f"  logs:          {cp.dir}/\n"
        "[bold]try[/] (in another terminal; `omniwall` is in .venv/bin)\n"
        f"  export PATH={Path(sys.executable).parent}:$PATH\n"
        f"  export OMNIWALL_SERVER={cp.urls[-1]} OMNIWALL_TOKEN={cp.admin_token}{ca}\n"
        "  omniwall status\n",
        highlight=False,
        soft_wrap=True,
    )


def failover(console: Console, lab: Any, cp: Any) -> bool:
    """Kill the manager the first host's agent is attached to; every agent attached there must attach
    elsewhere, the matrix must still agree, and the killed manager comes back. True when all held."""
    hosts = sorted(cp.record.agents)
    first = cp.attached(hosts[0])
    if first is None:
        console.print("[red]no agent reports an attachment[/]")
        return False
    victim = cp.urls.index(first[0])
    moving = [h for h in hosts if (cp.attached(h) or ("",))[0] == first[0]]
    console.print(
        f"[bold]failover[/]: kill -9 manager {victim + 1} ({first[0]}), serving {', '.join(moving)}"
    )
    killed = time.time()
    cp.stop_manager(signal.SIGKILL, index=victim)
    deadline = time.monotonic() + REATTACH_TIMEOUT
    moved: dict[str, tuple[str, float]] = {}
    while len(moved) < len(moving) and time.monotonic() < deadline:
        for h in moving:
            at = cp.attached(h)
            if at is not None and at[1] >= killed - 0.01 and at[0] != first[0]:
                moved[h] = at
        time.sleep(0.05)
    for h in moving:
        if h in moved:
            console.print(f"  {h}: re-attached to {moved[h][0]} after {moved[h][1] - killed:.2f} s")
        else:
            console.print(f"  [red]{h}: not re-attached within {REATTACH_TIMEOUT:g} s[/]")
    wrong = [e for e in lab.matrix(expect=True) if not e.agrees]
    console.print(
        f"  matrix with manager {victim + 1} down: "
        + ("[green]all probes agree[/]" if not wrong else f"[red]{len(wrong)} probes differ[/]")
    )
    cp.start_manager(index=victim)
    console.print(f"  manager {victim + 1} started again on {cp.manager_url(victim)}")
    return len(moved) == len(moving) and not wrong


def show(console: Console, lab: Any, cp: Any) -> bool:
    """The HA demo on an up lab: the matrix against the sim, a manager's failover, the cluster's
    URLs and attachments. True when every check held."""
    entries = lab.matrix(expect=True)
    wrong = [e for e in entries if not e.agrees]
    console.print(
        f"[bold green]all {len(entries)} probes agree with the policy[/]"
        if not wrong
        else f"[bold red]{len(wrong)} of {len(entries)} probes differ from the policy[/]"
    )
    ok = not wrong and failover(console, lab, cp)
    cp.wait_in_sync()
    print_cluster(console, cp)
    return ok


def run(directory: Path, *, once: bool, console: Console) -> int:
    from omniwall.lab.demorun import run_demo

    console.print(
        f"[bold]bringing up an HA lab from {directory}[/] ({ETCD} etcd members, {MANAGERS} managers, "
        "one agent per host) ..."
    )
    return run_demo(
        directory,
        lambda lab, cp: show(console, lab, cp),
        console=console,
        once=once,
        gone="lab down: namespaces, agents, managers and etcd members removed",
        managers=MANAGERS,
        etcd=ETCD,
    )


def cli(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m omniwall.demo_ha", description=__doc__.split("\n")[0])
    ap.add_argument("directory", nargs="?", type=Path, default=EXAMPLE_DIR, help="resource files")
    ap.add_argument("--once", action="store_true", help="check, print, tear down; do not wait")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if os.geteuid() != 0:
        print(
            "error: the HA demo needs root (network namespaces, nftables): run `sudo make demo-ha`",
            file=sys.stderr,
        )
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # SIGTERM tears down like Ctrl-C
    width = None if sys.stdout.isatty() else 130
    return run(args.directory, once=args.once, console=Console(highlight=False, width=width))


if __name__ == "__main__":
    raise SystemExit(cli())

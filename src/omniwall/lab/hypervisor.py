"""The managed lab's hypervisor: it moves a workload's vNIC when the manager orders the switch of a
migration, as a real hypervisor (libvirt, a container runtime) does on real hosts.

    python -m omniwall.lab.hypervisor --control-dir /run/omniwall/lab/ow1a2b3-managed

One process per managed lab, started and stopped with its manager and agents (lab/control.py). It
follows the manager's audit stream (`GET /v1/audit/watch`, kind Workload) through `omniwall.client`;
a migration that enters phase `switching` (the destination enforces the workload's policy and holds its
connections) has its vNICs moved by `lab.migrate.switch_vnics` (host ends into the destination's
namespace, routes repointed; recorded in the lab's state file), then `POST .../migrate/{id}/switched`.
A VM workload is live-migrated instead (`lab.vm.migrate_guest`: the destination QEMU started with
`-incoming` in the destination's namespace, routes switched on its RESUME, the source QEMU stopped);
when that fails the guest stays on its source, no `switched` is sent and the manager rolls back after
its switch timeout.
After a (re)connection it first looks for migrations already waiting in `switching`
(`GET /v1/workloads`: `status.migration`), so a manager restart or a dropped stream loses none.

Migrations of workloads or to hosts the lab does not have are left alone (the manager rolls them back
after its switch timeout). A `lab migrate` in another process may move the vNIC first: the move is
done once (under the state file's lock) and `switched` is idempotent on the manager.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from omniwall.client import Client, ClientError, Retry
from omniwall.lab import state as lab_state
from omniwall.lab.errors import LabError
from omniwall.lab.migrate import StaleSwitch, switch_vnics, waits_for_vnic
from omniwall.lab.vm import GuestMigrationError

log = logging.getLogger("omniwall.lab.hypervisor")
RECONNECT = 1.0  # seconds between attempts while the manager is away


class Hypervisor:
    def __init__(self, control_dir: Path) -> None:
        record = json.loads((control_dir / "managed.json").read_text())
        self.dir = control_dir
        self.prefix: str = record["prefix"]
        tls = bool(record.get("tls"))
        url = f"{'https' if tls else 'http'}://127.0.0.1:{record['port']}"
        token = (control_dir / "hypervisor.token").read_text().strip()
        ca = str(control_dir / "pki" / "ca.crt") if tls else None
        self.api = Client(url, token, ca=ca, timeout=30.0, retry=Retry(attempts=3))
        self.done: set[str] = set()  # migration ids switched (or found not ours)
        self.stop = threading.Event()
        self.moving = False  # SIGTERM during a move ends the process after it, never half way

    # ---- the one job
    def switch(self, mig: dict[str, Any]) -> None:
        """Move the vNICs of migration `mig` (`{id, tenant, name, destination}`) and say `switched`."""
        mid, key, to = mig["id"], f"{mig['tenant']}/{mig['name']}", mig["destination"]
        if mid in self.done:
            return
        st = lab_state.find(self.prefix)
        if st is None or st.plan is None:
            raise LabError(f"no lab with prefix {self.prefix!r} is up")
        if key not in {w.key for w in st.plan.workloads} or to not in {h.name for h in st.plan.hosts}:
            log.info("migration %s of %s to %s: not a workload or host of this lab, left alone", mid, key, to)
            self.done.add(mid)
            return
        self.moving = True
        try:
            t0 = time.monotonic()
            moved = switch_vnics(st.name, key, to, waiting=lambda: self.waits(key, mid))
            ms = (time.monotonic() - t0) * 1000
        except StaleSwitch:  # read late: it no longer waits (asked under the lock, before a move)
            log.info("migration %s of %s: no longer waits in switching, left alone", mid, key)
            self.done.add(mid)
            return
        except GuestMigrationError as e:
            # The guest still runs on its source. No `switched`: the manager rolls back after its
            # switch timeout (there is no abort verb); not retried, a new `omniwall migrate` is.
            log.error("migration %s of %s: %s", mid, key, e)
            self.done.add(mid)
            return
        finally:
            self.moving = False
            if self.stop.is_set():
                sys.exit(0)
        try:
            rec = self.api.switched(key, mid)
        except ClientError as e:
            if e.status not in (404, 409):
                raise
            rec = {"phase": f"gone ({e})"}  # it ended meanwhile: whoever moved the vNIC said so
        self.done.add(mid)
        what = f"moved the vNIC to {to} in {ms:.0f} ms" if moved else f"vNIC already on {to}"
        log.info("migration %s of %s: %s; manager: phase %s", mid, key, what, rec.get("phase"))

    def waits(self, key: str, mid: str) -> bool:
        """Whether migration `mid` is `key`'s current one and waits for its vNIC right now: the audit
        stream replays entries after a reconnection, and an entry read late must not move anything."""
        try:
            r = self.api.migration(key)
        except ClientError as e:
            if e.status == 404:
                return False
            raise
        return waits_for_vnic(r, mid)

    def waiting(self) -> list[dict[str, Any]]:
        """Migrations that wait for their vNIC to move right now."""
        out = []
        for w in self.api.iter("workloads"):
            mig = (w.get("status") or {}).get("migration") or {}
            if mig.get("result") == "running" and mig.get("phase") == "switching":
                out.append(mig)
        return out

    def follow(self) -> None:
        """Catch up, then handle each migration entering `switching` as the audit stream shows it."""
        for mig in self.waiting():
            self.switch(mig)
        for e in self.api.watch_audit(kind="Workload"):
            x = e.get("extra") or {}
            if (
                e.get("action") == "migrate"
                and x.get("phase") == "switching"
                and x.get("result") == "running"
            ):
                self.switch(
                    {"id": x["migration"], "tenant": e["tenant"], "name": e["name"], "destination": x["to"]}
                )
            if self.stop.is_set():
                return

    def run(self) -> None:
        log.info("hypervisor of lab %s: following %s", self.prefix, self.api.server)
        while not self.stop.is_set():
            if not (self.dir / "managed.json").exists():
                log.info("the lab's control plane is gone: exiting")
                return
            try:
                self.follow()
            except (ClientError, LabError, OSError) as e:
                log.warning("%s; again in %g s", e, RECONNECT)
            self.stop.wait(RECONNECT)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omniwall.lab.hypervisor", description=__doc__.split("\n")[0])
    ap.add_argument("--control-dir", type=Path, required=True, help="the managed lab's control directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    hv = Hypervisor(args.control_dir)

    def on_term(signum: int, frame: FrameType | None) -> None:
        hv.stop.set()
        if not hv.moving:  # else switch() exits once the move is done
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    hv.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

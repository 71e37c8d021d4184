"""libvirt's QEMU hook (`/etc/libvirt/hooks/qemu`): register a domain's interfaces with the manager.

libvirtd runs `qemu <domain> <operation> <sub-operation> <extra>` with the domain's XML on stdin, and
waits for it; a non-zero exit during `prepare`, `start` or `migrate` makes libvirt refuse to start the
domain (its stderr becomes libvirt's error). Per operation:

  prepare   validate the Omniwall metadata (domain.py) and the tenant; unannotated domains are left
            alone or refused (the host's `unannotated`)
  start     (taps exist, QEMU not yet started) apply the domain's Workload (`spec.host` = this host,
            each vNIC's tap, MAC and addresses) and wait until this host's agent realized it: the guest
            never runs unprotected. Manager unreachable: retried until `timeout`, then the start fails
            (closed). A refusal (tenant not allowed, 403, 422) fails it at once, with the manager's
            message in the hook's log and on libvirt's error.
  migrate   (on the destination, before `prepare`) `POST .../migrate` to this host: the manager's
            protocol (destination programmed first, connections copied, switch on the vNIC's route);
            `start` then only waits until the destination enforces the workload
  stopped,  remove the Workload registered for this domain (its `libvirt.domain` attribute), unless
  release   it is no longer this host's (migrated away, or moving: a running migration from here);
            a missing one is fine
Everything else (started, restore, reconnect, attach) is accepted unchanged.

Every decision is one line in the hook's log (`HookConfig.log`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from omniwall.client import Client, ClientError, Retry
from omniwall.libvirt import domain as dom
from omniwall.libvirt.config import DEFAULT_PATH, ConfigError, HookConfig, load

POLL = 0.1
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class Refused(Exception):
    """The domain must not start (or the operation fails); the message says why. `status`: the
    manager's HTTP status when it was a refusal of the manager's."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Hook:
    def __init__(self, cfg: HookConfig, domain_name: str) -> None:
        self.cfg = cfg
        self.domain_name = domain_name
        self._client: Client | None = None

    # ---- plumbing
    def log(self, msg: str) -> None:
        line = f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {self.domain_name}: {msg}\n"
        with contextlib.suppress(OSError):
            self.cfg.log.parent.mkdir(parents=True, exist_ok=True)
            with self.cfg.log.open("a") as f:
                f.write(line)

    @property
    def api(self) -> Client:
        if self._client is None:
            if self.cfg.manager_netns:
                try:
                    _enter_netns(self.cfg.manager_netns)
                except OSError as e:
                    raise Refused(f"managerNetns {self.cfg.manager_netns}: {e}") from None
            try:
                token = self.cfg.token_file.read_text().strip()
            except OSError as e:
                raise Refused(f"token file {self.cfg.token_file}: {e.strerror}") from None
            verify: Any = str(self.cfg.ca_file) if self.cfg.ca_file else True
            try:
                self._client = Client(
                    self.cfg.server, token, verify=verify, timeout=10.0, retry=Retry(attempts=2)
                )
            except (OSError, ClientError) as e:
                raise Refused(
                    f"cannot set up the manager's client (caFile {self.cfg.ca_file}): {e}"
                ) from None
        return self._client

    def call(self, what: str, fn: Callable[[], T], deadline: float) -> T:
        """`fn()`, retried while the manager is unreachable (or 503) until `deadline`; a refusal (any
        other HTTP error) raises Refused with the manager's message."""
        while True:
            try:
                return fn()
            except ClientError as e:
                if e.status is not None and e.status != 503:
                    raise Refused(f"the manager refused {what}: {e.status} {e.message}", e.status) from None
                if time.monotonic() > deadline:
                    raise Refused(f"the manager is unreachable ({what}: {e}); failing closed") from None
                self.log(f"{what}: manager unreachable ({e}); retrying")
                time.sleep(1.0)

    # ---- the operations
    def check(self, d: dom.Domain) -> bool:
        """Whether the domain is ours to register; Refused when it must not start."""
        if not d.annotated:
            if self.cfg.unannotated == "refuse":
                raise Refused(
                    f'no Omniwall metadata (<ow:workload xmlns:ow="{dom.NS}">) and this host refuses '
                    "unannotated domains"
                )
            return False
        if self.cfg.tenants is not None and d.tenant not in self.cfg.tenants:
            raise Refused(
                f"tenant {d.tenant!r} in the domain's metadata may not be used on host {self.cfg.host} "
                f"(allowed: {', '.join(self.cfg.tenants) or 'none'}); the domain stays closed"
            )
        return True

    def prepare(self, d: dom.Domain) -> None:
        if self.check(d):
            self.log(f"prepare: {d.key}, {len(d.vnics)} vNIC(s): metadata accepted")
        else:
            self.log("prepare: no Omniwall metadata: left alone")

    def start(self, d: dom.Domain) -> None:
        if not self.check(d):
            return
        if d.missing_taps():
            raise Refused(f"interfaces without a tap name at start: {', '.join(d.missing_taps())}")
        deadline = time.monotonic() + self.cfg.timeout
        cur = self.workload(d, deadline)
        mig = ((cur or {}).get("status") or {}).get("migration") or {}
        if mig.get("result") == "running" and mig.get("destination") == self.cfg.host:
            self.wait_migration_programmed(d, mig["id"], deadline)
            return
        doc = d.workload_doc(self.cfg.host)
        out = self.call(f"apply of Workload {d.key}", lambda: self.api.apply([doc]), deadline)
        revision = int(out["revision"])
        self.wait_realized(revision, deadline)
        taps = ", ".join(f"{v.tap} {','.join(v.ips)}" for v in d.vnics)
        self.log(f"start: {d.key} registered on {self.cfg.host} ({taps}); realized at revision {revision}")

    def migrate(self, d: dom.Domain) -> None:
        if not self.check(d):
            return
        deadline = time.monotonic() + self.cfg.timeout
        cur = self.workload(d, deadline)
        if cur is None:  # not known yet: `start` registers it here
            self.log(f"migrate: {d.key} is not registered: it will be at start")
            return
        if (cur.get("spec") or {}).get("host") == self.cfg.host:
            return
        rec = self.call(
            f"migration of {d.key} to {self.cfg.host}",
            lambda: self.api.migrate(d.workload, self.cfg.host, tenant=d.tenant),
            deadline,
        )
        self.log(f"migrate: {d.key} -> {self.cfg.host}: migration {rec.get('id')} started")

    def release(self, d: dom.Domain, op: str) -> None:
        if not d.annotated:
            return
        deadline = time.monotonic() + self.cfg.timeout
        cur = self.workload(d, deadline)
        if cur is None:
            return
        host = (cur.get("spec") or {}).get("host")
        mig = (cur.get("status") or {}).get("migration") or {}
        owner = ((cur.get("spec") or {}).get("attributes") or {}).get("libvirt.domain")
        if owner != d.name:  # registered by someone else (or another domain): not ours to remove
            self.log(f"{op}: {d.key} was not registered for this domain (libvirt.domain {owner!r}): kept")
            return
        if host != self.cfg.host or (mig.get("result") == "running" and mig.get("source") == self.cfg.host):
            self.log(f"{op}: {d.key} now belongs to {mig.get('destination') or host}: kept")
            return
        try:
            self.call(
                f"delete of {d.key}",
                lambda: self.api.delete("workload", d.workload, tenant=d.tenant),
                deadline,
            )
        except Refused as e:
            if e.status != 404:
                raise
        self.log(f"{op}: {d.key} removed from the manager")

    # ---- the manager's side
    def workload(self, d: dom.Domain, deadline: float) -> dict[str, Any] | None:
        try:
            return dict(
                self.call(
                    f"GET Workload {d.key}",
                    lambda: self.api.get("workload", d.workload, tenant=d.tenant),
                    deadline,
                )
            )
        except Refused as e:
            if e.status == 404:
                return None
            raise

    def wait_realized(self, revision: int, deadline: float) -> None:
        last: Any = None
        while True:
            with contextlib.suppress(ClientError):
                last = (self.api.status().get("hosts") or {}).get(self.cfg.host)
                if last and last.get("connected") and int(last.get("realizedRevision") or 0) >= revision:
                    return
            if time.monotonic() > deadline:
                raise Refused(
                    f"host {self.cfg.host}'s agent did not realize revision {revision} within "
                    f"{self.cfg.timeout:g} s (last status {last}); failing closed"
                )
            time.sleep(POLL)

    def wait_migration_programmed(self, d: dom.Domain, mid: str, deadline: float) -> None:
        """An incoming migration: wait until this host enforces the workload (phase past `import`)."""
        while True:
            rec = self.call(
                f"GET migration of {d.key}", lambda: self.api.migration(d.workload, tenant=d.tenant), deadline
            )
            if rec.get("id") != mid or rec.get("result") != "running":
                raise Refused(f"migration {mid} of {d.key} ended {rec.get('result')}: {rec.get('error')}")
            if rec.get("phase") not in ("prepare", "export", "import"):
                self.log(f"start: incoming {d.key}: this host enforces it (migration {mid} {rec['phase']})")
                return
            if time.monotonic() > deadline:
                raise Refused(f"migration {mid} of {d.key} still in {rec.get('phase')}; failing closed")
            time.sleep(POLL)


def _enter_netns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def run(cfg: HookConfig, argv: Sequence[str], xml: str) -> int:
    """One hook invocation: argv = [domain, operation, sub-operation, extra...]. Returns the exit code."""
    name, op = argv[0], argv[1]
    sub = argv[2] if len(argv) > 2 else "-"
    hook = Hook(cfg, name)
    handlers: dict[tuple[str, str], Callable[[dom.Domain], None]] = {
        ("prepare", "begin"): hook.prepare,
        ("start", "begin"): hook.start,
        ("migrate", "begin"): hook.migrate,
        ("stopped", "end"): lambda d: hook.release(d, "stopped"),
        ("release", "end"): lambda d: hook.release(d, "release"),
    }
    handler = handlers.get((op, sub))
    if handler is None:
        return 0
    try:
        d = dom.parse(xml)
        handler(d)
        return 0
    except (dom.MetadataError, Refused) as e:
        if op in ("stopped", "release"):  # the domain is gone whatever we say: record and go on
            hook.log(f"{op}: {e}")
            return 0
        hook.log(f"{op}: REFUSED: {e}")
        print(f"omniwall: domain {name}: {e}", file=sys.stderr)
        return 1
    finally:
        if hook._client is not None:
            hook._client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = DEFAULT_PATH
    if len(args) >= 2 and args[0] == "--config":
        path, args = Path(args[1]), args[2:]
    if len(args) < 2:
        print(
            "usage: qemu [--config FILE] DOMAIN OPERATION SUB-OPERATION EXTRA (run by libvirtd)",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"omniwall libvirt hook: {e}", file=sys.stderr)
        return 1 if args[1] in ("prepare", "start", "migrate") else 0  # closed: no start without config
    xml = sys.stdin.read()
    return run(cfg, args, xml)


if __name__ == "__main__":
    raise SystemExit(main())

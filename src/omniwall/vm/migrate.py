"""Live migration of a running guest between two QEMU processes, driven over both QMP sockets.

The destination QEMU was started (vm/qemu.py `start`) with the same devices and `-incoming <uri>`; it
listens there and stays paused until the whole state arrived. `run` then:

1. connects to the destination's QMP first (events go only to connected clients: its RESUME must not
   be missed), then the source's;
2. sets the source's migration parameters (bandwidth: unlimited in practice; the downtime limit, which
   decides when the source pauses for the last copy) and starts `migrate`;
3. waits for the source's STOP (the guest paused: the last RAM pages and device state travel now) and
   the destination's RESUME (the guest runs there), and calls `on_resume` at once: that is where the
   caller moves the routes, so packets reach the guest where it runs;
4. waits for the source to report `completed`.

A migration that fails before the destination resumed leaves the guest on the source: `run` cancels
the outgoing migration, makes sure the source runs again (`cont` when it was left paused) and raises
MigrationError; the caller stops the destination QEMU. After the destination's RESUME nothing rolls back
(the guest runs there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omniwall.vm.qmp import Qmp, QmpError

DOWNTIME_LIMIT_MS = 100  # the source pauses once the rest fits in this (QEMU's estimate)
MAX_BANDWIDTH = 10 * 1024**3  # bytes/s: no throttle (the default, 128 MiB/s, stretches a 192 MB guest)
TIMEOUT = 120.0  # TCG on a loaded 2-core machine: ~0.3 s idle, seconds under load


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds since `migrate` was issued (at `started`, time.monotonic())."""

    started: float
    stop: float  # the source paused the guest
    resume: float  # the destination resumed it
    completed: float  # the source reported `completed`
    downtime_ms: float | None  # QEMU's own figure (query-migrate)

    @property
    def paused_ms(self) -> float:
        return (self.resume - self.stop) * 1000


def run(
    source_qmp: Path,
    dest_qmp: Path,
    uri: str,
    *,
    on_resume: Callable[[], None] | None = None,
    timeout: float = TIMEOUT,
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS,
) -> Timing:
    """Migrate the guest behind `source_qmp` to the QEMU listening on `uri` (behind `dest_qmp`)."""
    try:
        dst = Qmp(dest_qmp, timeout=timeout)
    except QmpError as e:
        raise MigrationError(f"destination QEMU: {e}") from None
    try:
        with Qmp(source_qmp, timeout=timeout) as src:
            st = src.execute("query-status")
            if st.get("status") != "running":
                raise MigrationError(f"the source guest is {st.get('status')!r}, not running")
            src.execute(
                "migrate-set-parameters",
                {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": downtime_limit_ms},
            )
            t0 = time.monotonic()
            src.execute("migrate", {"uri": uri})
            try:
                _wait_stop(src, time.monotonic() + timeout)
                t_stop = time.monotonic()
                dst.wait_event("RESUME", timeout=timeout)
                t_resume = time.monotonic()
            except QmpError as e:
                _abort(src)
                raise MigrationError(f"{e}; {_status(src)}") from None
            if on_resume is not None:
                on_resume()
            info = _wait_completed(src, time.monotonic() + timeout)
            return Timing(
                started=t0,
                stop=t_stop - t0,
                resume=t_resume - t0,
                completed=time.monotonic() - t0,
                downtime_ms=info.get("downtime"),
            )
    except QmpError as e:
        raise MigrationError(f"source QEMU: {e}") from None
    finally:
        dst.close()


def _wait_stop(src: Qmp, deadline: float) -> None:
    """The source's STOP event; fails early when the migration failed before it (e.g. the
    destination refused the connection)."""
    while True:
        try:
            src.wait_event("STOP", timeout=0.05)
            return
        except QmpError:
            pass
        status = src.execute("query-migrate").get("status")
        if status in ("failed", "cancelled"):
            raise QmpError(f"the migration {status} before the source paused")
        if time.monotonic() > deadline:
            raise QmpError("the source did not pause within the timeout")


def _wait_completed(src: Qmp, deadline: float) -> dict:
    while True:
        info = src.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            # The destination resumed, so the guest runs there: the source's late view does not matter.
            return info
        time.sleep(0.01)


def _status(src: Qmp) -> str:
    try:
        info = src.execute("query-migrate")
    except QmpError as e:
        return f"query-migrate: {e}"
    return f"migration {info.get('status')}: {info.get('error-desc', '')}".rstrip(": ")


def _abort(src: Qmp) -> None:
    """The migration failed before the destination ran the guest: keep it on the source."""
    try:
        if src.execute("query-migrate").get("status") not in ("failed", "cancelled", "completed", None):
            src.execute("migrate_cancel")
            deadline = time.monotonic() + 10
            while src.execute("query-migrate").get("status") not in ("failed", "cancelled", "completed"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        if src.execute("query-status").get("status") != "running":
            src.execute("cont")
    except QmpError:
        pass


def ensure_running(qmp: Path) -> str:
    """The guest's run state after making sure it runs (`cont` when paused): the rollback's check."""
    with Qmp(qmp) as q:
        status = q.execute("query-status").get("status")
        if status in ("paused", "postmigrate", "finish-migrate"):
            q.execute("cont")
            status = q.execute("query-status").get("status")
        return str(status)


__all__ = ["MigrationError", "Timing", "ensure_running", "run"]

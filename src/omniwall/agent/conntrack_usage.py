"""How full the host's conntrack table is, and the alarm level the agent reports (docs/conntrack-limits.md).

`nf_conntrack_count` / `nf_conntrack_max` of the agent's network namespace: both files are opened once
inside that namespace and kept open (a /proc/sys/net file answers for the namespace it was opened in),
then re-read with `pread`, a few microseconds, so the reporter can poll it every counters interval. A
table at 80% of its maximum is a warning, at 95% critical: past 100% the kernel drops new connections
of every workload on the host ("nf_conntrack: table full, dropping packet").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from omniwall.dataplane.netns import in_netns

WARNING_RATIO = 0.80
CRITICAL_RATIO = 0.95
PROC_DIR = "/proc/sys/net/netfilter"
Alarm = Literal["ok", "warning", "critical"]


def alarm_level(count: int, maximum: int) -> Alarm:
    if maximum <= 0:
        return "ok"  # nf_conntrack_max 0: no limit in the kernel
    ratio = count / maximum
    return "critical" if ratio >= CRITICAL_RATIO else "warning" if ratio >= WARNING_RATIO else "ok"


@dataclass(frozen=True, slots=True)
class ConntrackUsage:
    count: int
    max: int

    @property
    def ratio(self) -> float:
        return self.count / self.max if self.max > 0 else 0.0

    @property
    def alarm(self) -> Alarm:
        return alarm_level(self.count, self.max)

    def to_json(self) -> dict[str, int]:
        """The status report's `conntrack` field (the manager derives ratio and alarm itself)."""
        return {"count": self.count, "max": self.max}


class ConntrackUsageReader:
    """Reads the usage of one namespace's conntrack table (None: the agent's own namespace). The files
    are opened at the first `read()`, which returns None when the namespace has no conntrack."""

    def __init__(self, netns: str | None = None, proc_dir: str = PROC_DIR) -> None:
        self.netns = netns
        self.proc_dir = proc_dir
        self._fds: tuple[int, int] | None = None
        self._absent = False

    def _open(self) -> tuple[int, int] | None:
        if self._fds is None and not self._absent:
            opened: list[int] = []
            try:
                with in_netns(self.netns):
                    for name in ("nf_conntrack_count", "nf_conntrack_max"):
                        opened.append(os.open(f"{self.proc_dir}/{name}", os.O_RDONLY))
                self._fds = (opened[0], opened[1])
            except FileNotFoundError:
                self._absent = True  # no conntrack in this namespace: nothing to report, ever
                for fd in opened:
                    os.close(fd)
            except OSError:
                for fd in opened:
                    os.close(fd)
                raise
        return self._fds

    def read(self) -> ConntrackUsage | None:
        fds = self._open()
        if fds is None:
            return None
        count, maximum = (int(os.pread(fd, 32, 0)) for fd in fds)
        return ConntrackUsage(count, maximum)

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


__all__ = [
    "CRITICAL_RATIO",
    "WARNING_RATIO",
    "Alarm",
    "ConntrackUsage",
    "ConntrackUsageReader",
    "alarm_level",
]

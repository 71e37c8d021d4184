"""The lab's state file, `/run/omniwall/lab/<name>.json`: how a later `lab down/exec/matrix` finds a lab.

It is claimed (created exclusively) *before* anything is built, with the lab's unique namespace prefix,
so a second `lab up` with the same name is refused, and `lab down` can clean up a half-built lab from
the prefix alone. `/run` is a tmpfs: after a reboot the namespaces are gone, and so is the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniwall.lab.plan import LabPlan

STATE_DIR = Path(os.environ.get("OMNIWALL_LAB_STATE_DIR", "/run/omniwall/lab"))
LAB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class LabStateError(RuntimeError):
    pass


@dataclass
class LabState:
    name: str
    prefix: str
    status: str = "building"  # building | up
    created: float = field(default_factory=time.time)
    ipv6: bool = True
    policy: str = "none"  # none | standalone | managed
    files: list[str] = field(default_factory=list)
    plan: LabPlan | None = None
    responders: dict[str, int] = field(default_factory=dict)  # workload key -> pid
    # The resources the lab was built from (dumped), so matrix --expect can recompile them later.
    resources: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "status": self.status,
            "created": self.created,
            "ipv6": self.ipv6,
            "policy": self.policy,
            "files": self.files,
            "plan": self.plan.to_json() if self.plan else None,
            "responders": self.responders,
            "resources": self.resources,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> LabState:
        return LabState(
            name=d["name"],
            prefix=d["prefix"],
            status=d.get("status", "building"),
            created=float(d.get("created", 0)),
            ipv6=bool(d.get("ipv6", True)),
            policy=d.get("policy", "none"),
            files=list(d.get("files", [])),
            plan=LabPlan.from_json(d["plan"]) if d.get("plan") else None,
            responders={k: int(v) for k, v in d.get("responders", {}).items()},
            resources=list(d.get("resources", [])),
        )


def check_name(name: str) -> str:
    if not LAB_NAME_RE.match(name):
        raise LabStateError(f"lab name {name!r}: use letters, digits, '.', '_', '-' (at most 63)")
    return name


def path_of(name: str) -> Path:
    return STATE_DIR / f"{check_name(name)}.json"


def claim(state: LabState) -> None:
    """Create the state file; refuse when a lab of that name exists (up, or left half-built)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = path_of(state.name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise LabStateError(
            f"a lab named {state.name!r} is already up (state file {path}); "
            f"run `omniwall lab down --name {state.name}` first, or choose another --name"
        ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(state.to_json(), f)


def save(state: LabState) -> None:
    """Replace the state file atomically (write a temporary file, then rename)."""
    path = path_of(state.name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=1))
    os.replace(tmp, path)


def load(name: str) -> LabState:
    path = path_of(name)
    try:
        return LabState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LabStateError(f"no lab named {name!r} is up (no {path})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LabStateError(f"state file {path} is unreadable: {e}") from None


def remove(name: str) -> None:
    path_of(name).unlink(missing_ok=True)
    (STATE_DIR / f"{check_name(name)}.lock").unlink(missing_ok=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold lab `name`'s lock for a read-modify-write of its state file that other processes may do at
    the same time (a vNIC move by the lab's hypervisor and by `lab migrate`)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(STATE_DIR / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def find(prefix: str) -> LabState | None:
    """The lab whose namespaces carry `prefix`, if one is up."""
    for name in names():
        with contextlib.suppress(LabStateError):
            st = load(name)
            if st.prefix == prefix:
                return st
    return None


def names() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))

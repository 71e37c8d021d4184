"""Built-in address allocation from the network config's `subnet`, per host (like CNI's host-local):
one file per allocated address, `<dataDir>/<network>/<ip>`, holding `<container id> <ifname>`,
created exclusively, so two concurrent ADDs never get the same address."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from omniwall.cni.config import ERR_TRY_LATER, CniError


def _dir(data_dir: Path, network: str) -> Path:
    d = data_dir / network
    d.mkdir(parents=True, exist_ok=True)
    return d


def owner(container_id: str, ifname: str) -> str:
    return f"{container_id} {ifname}"


def find(data_dir: Path, network: str, container_id: str, ifname: str) -> str | None:
    d = data_dir / network
    if not d.is_dir():
        return None
    for f in d.iterdir():
        try:
            if f.read_text().strip() == owner(container_id, ifname):
                return f.name
        except OSError:
            continue
    return None


def allocate(
    data_dir: Path, network: str, subnet: ipaddress.IPv4Network, container_id: str, ifname: str
) -> str:
    """The container's address (the same one again for a repeated ADD)."""
    have = find(data_dir, network, container_id, ifname)
    if have:
        return have
    d = _dir(data_dir, network)
    for ip in subnet.hosts():
        try:
            fd = os.open(d / str(ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(owner(container_id, ifname))
        return str(ip)
    raise CniError(ERR_TRY_LATER, f"no free address left in {subnet}")


def release(data_dir: Path, network: str, container_id: str, ifname: str) -> str | None:
    ip = find(data_dir, network, container_id, ifname)
    if ip:
        (data_dir / network / ip).unlink(missing_ok=True)
    return ip

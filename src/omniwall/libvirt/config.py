"""The libvirt hook's host configuration: a JSON file written by `omniwall libvirt install-hook`.

    {"server": "https://manager:8443", "tokenFile": "/etc/omniwall/libvirt.token", "caFile": null,
     "host": "hv-1", "unannotated": "ignore", "tenants": ["shop"], "timeout": 20,
     "log": "/var/log/omniwall/libvirt-hook.log", "managerNetns": null}

- `host`: this hypervisor's Host name in Omniwall (the Workloads' `spec.host`);
- `unannotated`: a domain without Omniwall metadata is left alone (`ignore`: the agent still drops
  traffic on its taps if they match the host's `vnicInterfaces`) or refused (`refuse`: libvirt does not
  start it);
- `tenants`: the tenants a domain's metadata may name on this host (absent or null: whatever the token
  may write; the manager refuses the rest either way);
- `timeout`: seconds the hook keeps trying (manager unreachable) and waits for the agent to realize the
  domain's rules before it fails the start (fail closed);
- `managerNetns`: a network namespace file to reach the manager from (the lab, whose manager is on the
  root namespace's loopback while libvirtd runs in a host namespace); absent on real hosts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/omniwall/libvirt-hook.json")
DEFAULT_LOG = Path("/var/log/omniwall/libvirt-hook.log")
UNANNOTATED = ("ignore", "refuse")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HookConfig:
    server: str
    token_file: Path
    host: str
    ca_file: Path | None = None
    unannotated: str = "ignore"
    tenants: tuple[str, ...] | None = None
    timeout: float = 20.0
    log: Path = DEFAULT_LOG
    manager_netns: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "tokenFile": str(self.token_file),
            "caFile": str(self.ca_file) if self.ca_file else None,
            "host": self.host,
            "unannotated": self.unannotated,
            "tenants": list(self.tenants) if self.tenants is not None else None,
            "timeout": self.timeout,
            "log": str(self.log),
            "managerNetns": str(self.manager_netns) if self.manager_netns else None,
        }


def from_json(d: Any, where: str = "hook config") -> HookConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    unknown = set(d) - {
        "server", "tokenFile", "caFile", "host", "unannotated", "tenants", "timeout", "log", "managerNetns"
    }  # fmt: skip
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")

    def need(k: str) -> str:
        v = d.get(k)
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}: field {k!r} is required (a non-empty string)")
        return v

    unannotated = d.get("unannotated", "ignore")
    if unannotated not in UNANNOTATED:
        raise ConfigError(f"{where}: field 'unannotated' must be one of {', '.join(UNANNOTATED)}")
    tenants = d.get("tenants")
    if tenants is not None and (
        not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants)
    ):
        raise ConfigError(f"{where}: field 'tenants' must be a list of tenant names or null")
    timeout = d.get("timeout", 20.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where}: field 'timeout' must be a positive number of seconds")
    return HookConfig(
        server=need("server"),
        token_file=Path(need("tokenFile")),
        host=need("host"),
        ca_file=Path(d["caFile"]) if d.get("caFile") else None,
        unannotated=unannotated,
        tenants=tuple(tenants) if tenants is not None else None,
        timeout=float(timeout),
        log=Path(d.get("log") or DEFAULT_LOG),
        manager_netns=Path(d["managerNetns"]) if d.get("managerNetns") else None,
    )


def load(path: Path) -> HookConfig:
    try:
        return from_json(json.loads(path.read_text()), str(path))
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from None


__all__ = ["DEFAULT_PATH", "ConfigError", "HookConfig", "from_json", "load"]

"""The plugin's input: the CNI environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
CNI_ARGS, CNI_PATH) and the network configuration on stdin, checked in one place; a bad field gives
a CNI error naming it (code 7, "invalid network config", or 4, "invalid environment variables")."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
IFNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_INVALID_CONFIG = 7
ERR_TRY_LATER = 11
ERR_INTERNAL = 999


class CniError(Exception):
    """A CNI error result: printed as JSON on stdout, exit code 1."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str = "1.0.0") -> dict[str, Any]:
        return {"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    server: str  # the manager's URL
    token_file: Path
    host: str  # this host's name in Omniwall
    tenant: str
    subnet: ipaddress.IPv4Network  # addresses for containers on this host (built-in IPAM)
    data_dir: Path  # IPAM state
    ca_file: Path | None = None
    timeout: float = 30.0  # how long ADD waits for the agent to realize the container's rules
    labels: dict[str, str] = field(default_factory=dict)
    host_netns: str | None = None  # labs: the named namespace playing this host (net.py)
    manager_netns: Path | None = None  # labs: a handle of the namespace where `server` is reachable
    prev_result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]


def parse_env(env: Mapping[str, str]) -> Env:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CniError(ERR_INVALID_ENV, f"CNI_COMMAND {command!r}: use ADD, DEL, CHECK or VERSION")
    args: dict[str, str] = {}
    for part in filter(None, env.get("CNI_ARGS", "").split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        args[key] = value
    out = Env(
        command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", ""), args
    )
    if command == "VERSION":
        return out
    if not out.container_id:
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is required")
    if not IFNAME_RE.match(out.ifname):
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {out.ifname!r} is not an interface name")
    if command in ("ADD", "CHECK") and not out.netns:
        raise CniError(ERR_INVALID_ENV, "CNI_NETNS is required")
    return out


def parse_netconf(text: str) -> NetConf:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise CniError(ERR_INVALID_CONFIG, f"network config: not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CniError(ERR_INVALID_CONFIG, "network config: not a JSON object")

    def need(key: str) -> Any:
        v = raw.get(key)
        if not isinstance(v, str) or not v:
            raise CniError(ERR_INVALID_CONFIG, f"network config: {key}: a non-empty string is required")
        return v

    version = need("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"network config: cniVersion {version!r}: supported {', '.join(SUPPORTED_VERSIONS)}",
        )
    try:
        subnet = ipaddress.IPv4Network(need("subnet"))
    except ValueError as e:
        raise CniError(ERR_INVALID_CONFIG, f"network config: subnet: {e}") from None
    timeout = raw.get("timeout", 30.0)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise CniError(ERR_INVALID_CONFIG, "network config: timeout: seconds, 0 < timeout <= 600")
    return NetConf(
        cni_version=version,
        name=need("name"),
        server=need("server").rstrip("/"),
        token_file=Path(need("tokenFile")),
        host=need("host"),
        tenant=need("tenant"),
        subnet=subnet,
        data_dir=Path(raw.get("dataDir") or "/var/lib/cni/omniwall"),
        ca_file=Path(raw["caFile"]) if raw.get("caFile") else None,
        timeout=float(timeout),
        labels=_labels(raw),
        host_netns=_host_netns(raw),
        manager_netns=_manager_netns(raw),
        prev_result=raw.get("prevResult"),
    )


def _host_netns(raw: dict[str, Any]) -> str | None:
    v = raw.get("hostNetns")
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v) or v in (".", ".."):
        raise CniError(ERR_INVALID_CONFIG, "network config: hostNetns: a network namespace name")
    return v


def _manager_netns(raw: dict[str, Any]) -> Path | None:
    v = raw.get("managerNetns")
    if v is None:
        return None
    if not isinstance(v, str) or not v.startswith("/"):
        raise CniError(ERR_INVALID_CONFIG, "network config: managerNetns: an absolute path")
    return Path(v)


def _labels(raw: dict[str, Any]) -> dict[str, str]:
    """Labels from the CNI conventions' `args.cni.labels` ([{key, value}]), podman's network aliases
    of the form `key=value` (`runtimeConfig.aliases`, {network: [alias]}, sent when the network
    config declares the `aliases` capability; other aliases are names, not labels), and
    `runtimeConfig.labels` ({key: value}, for runtimes passing pod labels as a capability)."""
    out: dict[str, str] = {}
    args = (raw.get("args") or {}).get("cni") or {}
    for i, item in enumerate(args.get("labels") or []):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise CniError(
                ERR_INVALID_CONFIG, f"network config: args.cni.labels[{i}]: want {{key, value}} strings"
            )
        out[item["key"]] = item["value"]
    aliases = ((raw.get("runtimeConfig") or {}).get("aliases") or {}).get(raw.get("name")) or []
    if not isinstance(aliases, list):
        raise CniError(ERR_INVALID_CONFIG, "network config: runtimeConfig.aliases: want lists of names")
    for alias in aliases:
        key, sep, value = str(alias).partition("=")
        if sep and key:
            out[key] = value
    rt = (raw.get("runtimeConfig") or {}).get("labels") or {}
    if not isinstance(rt, dict):
        raise CniError(ERR_INVALID_CONFIG, "network config: runtimeConfig.labels: want an object")
    out.update({str(k): str(v) for k, v in rt.items()})
    return out


def args_labels(env: Env) -> dict[str, str]:
    """Labels from `CNI_ARGS` key `OMNIWALL_LABELS` (`app=web,tier=front`): podman passes its own
    environment's CNI_ARGS on to the plugin, so `CNI_ARGS=OMNIWALL_LABELS=app=web podman run ...`."""
    out: dict[str, str] = {}
    for part in filter(None, env.args.get("OMNIWALL_LABELS", "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: OMNIWALL_LABELS: {part!r} is not key=value")
        out[key] = value
    return out


def workload_name(env: Env) -> str:
    """K8S_POD_NAMESPACE/K8S_POD_NAME (CNI_ARGS) when the runtime gives them, else the container id."""
    pod, ns = env.args.get("K8S_POD_NAME"), env.args.get("K8S_POD_NAMESPACE")
    name = f"{ns}.{pod}" if pod and ns else pod or f"c-{env.container_id[:12]}"
    name = re.sub(r"[^a-z0-9.-]", "-", name.lower()).strip("-.")[:63]
    return name or f"c-{env.container_id[:12]}"

"""CNI commands. ADD: address, veth, Workload registered with the manager, then wait until this host's
agent has realized it (so the container never runs unprotected: until then the agent drops its
traffic, as for any unknown `ow*` interface); on any failure ADD undoes what it did and the runtime
gets a CNI error. DEL: Workload, veth and address gone, each step idempotent (missing is fine).
CHECK: veth, address, route and the Workload are as ADD left them. VERSION: the versions spoken.

Results and errors are JSON on stdout (CNI spec 1.0); a log line per command goes to stderr."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from omniwall.client import Client, ClientError, Retry
from omniwall.cni import ipam, net
from omniwall.cni.config import (
    ERR_INTERNAL,
    ERR_TRY_LATER,
    SUPPORTED_VERSIONS,
    CniError,
    Env,
    NetConf,
    args_labels,
    parse_env,
    parse_netconf,
    workload_name,
)

POLL = 0.05


class Manager:
    """The few manager calls the plugin makes, through `omniwall.client` (its retries on connection
    errors and 503s; one error type): a client error becomes the CNI error the runtime sees."""

    def __init__(self, conf: NetConf) -> None:
        try:
            token = conf.token_file.read_text().strip()
        except OSError as e:
            raise CniError(7, f"network config: tokenFile {conf.token_file}: {e.strerror}") from None
        verify: Any = str(conf.ca_file) if conf.ca_file else True
        self.client = Client(conf.server, token, verify=verify, timeout=10.0, retry=Retry(attempts=3))

    def apply(self, doc: dict[str, Any]) -> int:
        try:
            return int(self.client.apply([doc])["revision"])
        except ClientError as e:
            raise _cni_error("the workload", e) from None

    def workload(self, name: str, tenant: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.get("workload", name, tenant=tenant))
        except ClientError as e:
            if e.status == 404:
                return None
            raise _cni_error(f"GET workload {tenant}/{name}", e) from None

    def delete(self, name: str, tenant: str) -> None:
        try:
            self.client.delete("workload", name, tenant=tenant)
        except ClientError as e:
            if e.status != 404:  # already gone: DEL is idempotent
                raise _cni_error(f"DELETE workload {tenant}/{name}", e) from None

    def wait_realized(self, host: str, revision: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with contextlib.suppress(ClientError):  # not yet answering: keep waiting until the deadline
                last = (self.client.status().get("hosts") or {}).get(host)
                if last and last.get("connected") and int(last.get("realizedRevision") or 0) >= revision:
                    return
            if time.monotonic() > deadline:
                raise CniError(
                    ERR_TRY_LATER,
                    f"host {host}: the agent did not realize revision {revision} within {timeout:g} s",
                    json.dumps(last),
                )
            time.sleep(POLL)


def _cni_error(what: str, e: ClientError) -> CniError:
    """Unreachable or overloaded (retries spent): try later; refused: the manager's own message."""
    if e.status is None or e.status == 503:
        return CniError(ERR_TRY_LATER, f"manager unreachable: {what}: {e}")
    return CniError(ERR_INTERNAL, f"manager refused {what}: {e}", json.dumps(e.body)[:2000])


def workload_doc(conf: NetConf, env: Env, name: str, host_if: str, ip: str, mac: str) -> dict[str, Any]:
    """Labels: the network config's (`args.cni.labels`, `key=value` aliases, `runtimeConfig.labels`),
    then CNI_ARGS' OMNIWALL_LABELS."""
    return {
        "apiVersion": "omniwall.io/v1",
        "kind": "Workload",
        "metadata": {"name": name, "tenant": conf.tenant, "labels": {**conf.labels, **args_labels(env)}},
        "spec": {
            "host": conf.host,
            "vnics": [{"name": env.ifname, "hostIfname": host_if, "mac": mac, "ips": [ip]}],
            "attributes": {"container.id": env.container_id},
        },
    }


def cmd_add(conf: NetConf, env: Env) -> dict[str, Any]:
    host_if = net.host_ifname(env.container_id, env.ifname)
    name = workload_name(env)
    args_labels(env)  # a bad OMNIWALL_LABELS is refused before anything is done
    mgr = Manager(conf)
    _refuse_if_taken(mgr, conf, env, name)
    ip = ipam.allocate(conf.data_dir, conf.name, conf.subnet, env.container_id, env.ifname)
    try:
        host_mac, mac = net.add(env.netns, env.ifname, host_if, ip, conf.host_netns)
        revision = mgr.apply(workload_doc(conf, env, name, host_if, ip, mac))
        mgr.wait_realized(conf.host, revision, conf.timeout)
    except BaseException:
        _undo(conf, env, mgr, name, host_if)
        raise
    return {
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": host_if, "mac": host_mac},
            {"name": env.ifname, "mac": mac, "sandbox": env.netns},
        ],
        "ips": [{"address": f"{ip}/32", "gateway": net.GATEWAY4, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": net.GATEWAY4}],
        "dns": {},
    }


def _container_id(wl: dict[str, Any]) -> str | None:
    return ((wl.get("spec") or {}).get("attributes") or {}).get("container.id")


def _refuse_if_taken(mgr: Manager, conf: NetConf, env: Env, name: str) -> None:
    """A Workload of this name for another host's container (podman names containers, and two hosts
    may both run `web1` in one tenant): refused, rather than taking it over. One on this host is a
    stale registration (a DEL that never reached the manager) and is replaced."""
    have = mgr.workload(name, conf.tenant)
    if have is None or _container_id(have) == env.container_id:
        return
    host = (have.get("spec") or {}).get("host")
    if host != conf.host:
        raise CniError(
            ERR_INTERNAL,
            f"workload {conf.tenant}/{name} is already registered for container {_container_id(have)} "
            f"on host {host}: give this container another name",
        )


def _undo(conf: NetConf, env: Env, mgr: Manager, name: str, host_if: str) -> None:
    for step in (lambda: mgr.delete(name, conf.tenant), lambda: net.delete(host_if, conf.host_netns)):
        try:
            step()
        except Exception as e:  # keep undoing; the original error is what the runtime sees
            _log(f"undo: {e}")
    ipam.release(conf.data_dir, conf.name, env.container_id, env.ifname)


def cmd_del(conf: NetConf, env: Env) -> None:
    """The Workload is deleted only while it is this container's (its `container.id`): a name reused
    by a newer container, here or on another host, is left alone."""
    name = workload_name(env)
    mgr = Manager(conf)
    have = mgr.workload(name, conf.tenant)
    if have is not None and _container_id(have) == env.container_id:
        mgr.delete(name, conf.tenant)
    elif have is not None:
        _log(f"DEL: {conf.tenant}/{name} belongs to container {_container_id(have)}: left alone")
    net.delete(net.host_ifname(env.container_id, env.ifname), conf.host_netns)
    ipam.release(conf.data_dir, conf.name, env.container_id, env.ifname)


def cmd_check(conf: NetConf, env: Env) -> None:
    ip = ipam.find(conf.data_dir, conf.name, env.container_id, env.ifname)
    if ip is None:
        raise CniError(ERR_INTERNAL, f"container {env.container_id}: no address allocated")
    try:
        net.check(env.netns, env.ifname, net.host_ifname(env.container_id, env.ifname), ip, conf.host_netns)
    except net.NetError as e:
        raise CniError(ERR_INTERNAL, str(e)) from None
    name = workload_name(env)
    if Manager(conf).workload(name, conf.tenant) is None:
        raise CniError(ERR_INTERNAL, f"workload {conf.tenant}/{name} is not registered with the manager")


def run(environ: Mapping[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: (exit code, JSON to print)."""
    version = "1.0.0"
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
        conf = parse_netconf(stdin)
        version = conf.cni_version
        if conf.manager_netns:
            conf = _enter_manager_netns(conf)
        if env.command == "ADD":
            return 0, cmd_add(conf, env)
        if env.command == "DEL":
            cmd_del(conf, env)
        else:
            cmd_check(conf, env)
        return 0, None
    except CniError as e:
        _log(f"error {e.code}: {e.msg} {e.details}")
        return 1, e.to_json(version)
    except (OSError, net.NetError) as e:
        _log(f"error: {e}")
        return 1, CniError(ERR_INTERNAL, str(e)).to_json(version)


def _enter_manager_netns(conf: NetConf) -> NetConf:
    """`managerNetns` (labs whose manager listens on another namespace's loopback, as the libvirt
    hook's `managerNetns`): this single-threaded process moves there for its HTTP, and its host-side
    netlink goes back to the namespace it was started in (held open by a descriptor)."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        net.enter_netns(str(conf.manager_netns))
    except net.NetError as e:
        os.close(here)
        raise CniError(ERR_INTERNAL, f"network config: managerNetns: {e}") from None
    return dataclasses.replace(conf, host_netns=conf.host_netns or f"/proc/self/fd/{here}")


def _log(msg: str) -> None:
    print(f"omniwall-cni[{os.getpid()}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    code, out = run(os.environ, stdin)
    if out is not None:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return code

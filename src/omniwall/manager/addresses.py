"""Addresses follow the workload: the vNIC addresses an agent observes become the Workload's ips.

An agent reports `{"<host ifname>": ["<ip>", ...]}` for the vNICs of its desired state (agent/addresses.py:
the /32 and /128 routes `dev <vnic>` it sees in its host's namespace). `reconcile(manager, host, report)`
compares each entry with the Workload that owns that interface and, where they differ, writes the new ips
in ONE audited store txn (actor `agent:<host>`). The commit recompiles; every host that references the
workload gets a delta that changes set elements (and, on the workload's own host, the vNIC's
anti-spoofing addresses), never a policy edit. The old address stops matching everywhere at once.

Guards (a wrong report would re-address a workload cluster-wide):
- only workloads whose `spec.host` is the reporting host, and only interfaces that map to one of their
  vNICs (`vnic_ifname`); anything else in the report is ignored;
- an absent vNIC, an empty list, or a list with no valid address is "not known", never "no
  addresses" (a veth before its route, a workload migrating away): ignored;
- a workload with a migration in flight is left alone (both hosts see it during the switch);
- the comparison is as sets: a new order of the same addresses writes nothing. Addresses the workload
  keeps keep their position (the first address is the one `explain`/`matrix` use), new ones follow;
- a write the model refuses (say, the address belongs to another workload) is logged and skipped for
  that workload only; a concurrent writer (409) makes it re-read and retry.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omniwall.model.inet import parse_ip
from omniwall.model.resources import Vnic, Workload, vnic_ifname

from .audit import Actor
from .contracts import InvalidResources
from .service import Conflict, Manager, NotFound

log = logging.getLogger(__name__)

MAX_RETRIES = 5
MAX_ADDRESSES = 64  # per vNIC: more is a confused (or hostile) agent, not a workload


@dataclass(frozen=True, slots=True)
class Readdress:
    """One workload re-addressed from a report: `tenant/name`, vNIC name, old and new ips."""

    workload: str
    vnic: str
    old: tuple[str, ...]
    new: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "vnic": self.vnic, "old": list(self.old), "new": list(self.new)}


def agent_actor(host: str, token_id: str = "") -> Actor:
    return Actor(token_id or f"agent:{host}", f"agent:{host}", "agent")


def observed_ips(value: object) -> list[str] | None:
    """A report entry -> normalised, de-duplicated addresses; None when it says nothing usable."""
    if not isinstance(value, list) or not value or len(value) > MAX_ADDRESSES:
        return None
    out: list[str] = []
    for v in value:
        if not isinstance(v, str):
            continue
        try:
            ip = str(parse_ip(v.strip()))  # strict: a zone id would poison the host's ruleset
        except ValueError:
            continue
        if ip not in out:
            out.append(ip)
    return out or None


def merged(current: list[str], observed: list[str]) -> list[str]:
    """The new ips: current ones still observed, in their order, then the new ones (sorted, v4 first)."""
    keep = [ip for ip in current if ip in observed]
    new = sorted(
        (ip for ip in observed if ip not in current),
        key=lambda s: (ipaddress.ip_address(s).version, ipaddress.ip_address(s)),
    )
    return keep + new


def plan_changes(m: Manager, host: str, report: Mapping[str, Any]) -> list[tuple[Workload, Readdress]]:
    """Workloads on `host` whose vNIC addresses differ from the report: (new workload, what changed)."""
    by_ifname: dict[str, tuple[Workload, int]] = {}
    for w in m.list("Workload"):
        assert isinstance(w, Workload)
        if w.spec.host != host:
            continue
        for i, v in enumerate(w.spec.vnics):
            by_ifname[vnic_ifname(w, v)] = (w, i)
    updated: dict[tuple[str, str], tuple[Workload, list[Readdress]]] = {}
    for ifname in sorted(report):
        hit = by_ifname.get(ifname)
        ips = observed_ips(report[ifname])
        if hit is None or ips is None:
            continue
        w, i = hit
        key = (w.metadata.tenant, w.metadata.name)
        mig = m.migrations.get(*key)
        if mig is not None and mig.result == "running":
            continue
        cur_w, changes = updated.get(key, (w, []))
        vnic = cur_w.spec.vnics[i]
        if set(ips) == set(vnic.ips):
            continue
        new_ips = merged(list(vnic.ips), ips)
        vnics: list[Vnic] = list(cur_w.spec.vnics)
        vnics[i] = vnic.model_copy(update={"ips": new_ips})
        cur_w = cur_w.model_copy(update={"spec": cur_w.spec.model_copy(update={"vnics": vnics})})
        changes.append(Readdress(f"{key[0]}/{key[1]}", vnic.name, tuple(vnic.ips), tuple(new_ips)))
        updated[key] = (cur_w, changes)
    return [(w, c) for w, cs in updated.values() for c in cs]


def reconcile(m: Manager, host: str, report: Mapping[str, Any] | None, actor: Actor) -> list[Readdress]:
    """Apply a host's address report to the model (one txn). Returns what changed ([]: nothing)."""
    if not report or not isinstance(report, Mapping):
        return []
    for _ in range(MAX_RETRIES):
        changes = plan_changes(m, host, report)
        if not changes:
            return []
        workloads = list({(w.metadata.tenant, w.metadata.name): w for w, _ in changes}.values())
        try:
            m.commit(m.plan_apply(workloads, mode="update"), actor)
        except Conflict:
            continue  # a workload changed meanwhile: compare again with its new value
        except NotFound:
            continue  # deleted meanwhile
        except InvalidResources as err:
            if len(workloads) == 1:
                log.warning(
                    "ignoring addresses host %s reported for %s: %s", host, changes[0][1].workload, err
                )
                return []
            return _one_by_one(m, host, report, actor)
        except Exception:  # never fail the agent's ack over this; its next address change retries
            log.exception("applying addresses reported by host %s failed", host)
            return []
        done = [c for _, c in changes]
        for c in done:
            log.info("%s re-addressed by %s: %s %s -> %s", c.workload, actor.name, c.vnic, c.old, c.new)
        return done
    log.warning("addresses reported by host %s: workloads kept changing; giving up this report", host)
    return []


def _one_by_one(m: Manager, host: str, report: Mapping[str, Any], actor: Actor) -> list[Readdress]:
    """After the batch was refused: each workload alone, so one bad address blocks only its workload."""
    by_key: dict[tuple[str, str], tuple[Workload, list[Readdress]]] = {}
    for w, c in plan_changes(m, host, report):
        key = (w.metadata.tenant, w.metadata.name)
        by_key[key] = (w, [*by_key.get(key, (w, []))[1], c])
    done: list[Readdress] = []
    for (tenant, name), (w, changes) in sorted(by_key.items()):
        try:
            m.commit(m.plan_apply([w], mode="update"), actor)
        except (Conflict, NotFound, InvalidResources) as err:
            log.warning("ignoring addresses host %s reported for %s/%s: %s", host, tenant, name, err)
            continue
        done += changes
    return done


__all__ = ["Readdress", "agent_actor", "merged", "observed_ips", "plan_changes", "reconcile"]

"""Workload attribute updates from identity and posture sources, each as one audited store txn.

- Identity (`identity_event`): `login` adds a user to the workload's `user` list attribute, `logout`
  removes it (the attribute goes away with its last user). Several users per workload are allowed (a
  terminal server, a shared desktop).
- Posture (`posture_report`): sets the reported posture attributes (`av.status`, `av.engine`, ...);
  a `null` value removes one. Keys outside the posture namespaces are refused, so a scanner can never
  rewrite `user` or a workload's inventory facts.

Ownership: `user` and the posture namespaces' keys belong to the sources. Ordinary writes of a Workload
(PUT, apply, rollback) keep their stored values and may not use them as labels (`protect_source_facts`,
called by `Manager.plan_apply` unless `from_source=True`); only these two calls change them after the
workload was created.

Both are read-modify-write of one Workload: the write goes through `Manager.plan_apply` + `commit`
(validation, one txn with its audit entry, compare-and-swap on the workload's revision). A concurrent
writer makes the commit fail with `Conflict`; the update is then recomputed from the new value and
retried, so two logins racing on one desktop both land. An event that changes nothing writes nothing.

Posture is remembered by workload name (`posture/<tenant>/<name>` in the store, written after every
report and every seeded create): a Workload created without `posture.write` (a tenant) gets the last
posture recorded for its name, whatever its document says (`settle_posture`), so deleting and recreating
a quarantined workload, or rolling back to a revision before the report, does not lift the quarantine.
Only a caller with `posture.write` (the provider admin) may seed posture attributes on create.

Tenancy: identity and posture sources are provider-wide (an IdP or a scanner serves every tenant).
A workload is named `tenant/name`, or by `name` plus an optional `tenant`; a bare name that several
tenants use is refused as ambiguous (422), an unknown one answers 404.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from omniwall.model.resources import MAX_LABEL_KEY, AttrValue, Workload, _Resource, unsafe_character
from omniwall.store import Put

from .audit import Actor
from .contracts import InvalidResources, Problem, problems_from_pydantic
from .plan import Conflict, NotFound, Plan
from .service import Manager
from .sourcefacts import POSTURE_NAMESPACES, USER_ATTRIBUTE, is_posture, protect_source_facts, source_owned

POSTURE_PREFIX = "posture/"  # store key of the last posture of a workload name
MAX_USER_LEN = 256
MAX_RETRIES = 8
_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[A-Za-z0-9_-]+)+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

IdentityAction = Literal["login", "logout"]


@dataclass(frozen=True, slots=True)
class AttributeUpdate:
    """What an event did: the workload (`tenant/name`), whether it wrote, the store revision that holds
    the result (wait for hosts to realize it), and the workload's attributes afterwards."""

    workload: str
    changed: bool
    revision: int
    attributes: dict[str, AttrValue]

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "changed": self.changed,
            "revision": self.revision,
            "attributes": self.attributes,
        }


def _invalid(path: str, reason: str, document: str = "request body") -> InvalidResources:
    return InvalidResources([Problem(document, path, reason)])


def find_workload(m: Manager, workload: str, tenant: str | None) -> Workload:
    """`tenant/name`, or `name` (+ optional tenant). Raises NotFound, or InvalidResources (ambiguous)."""
    if "/" in workload:
        t, _, name = workload.partition("/")
        if tenant is not None and tenant != t:
            raise _invalid("tenant", f"{tenant!r} contradicts the tenant in workload {workload!r}")
        tenant = t
    else:
        name = workload
    if tenant is not None:
        found = m.get("Workload", tenant, name)
        if found is None:
            raise NotFound(f"Workload/{tenant}/{name} not found")
        return found  # type: ignore[return-value]
    matches = [w for (_t, n), w in sorted(m.catalog.workloads.items()) if n == name]
    if not matches:
        raise NotFound(f"Workload {name!r} not found in any tenant")
    if len(matches) > 1:
        tenants = ", ".join(w.metadata.tenant for w in matches)
        raise _invalid(
            "workload", f"workload {name!r} exists in several tenants ({tenants}); name the tenant"
        )
    return matches[0]


def _revalidated(w: Workload, attrs: dict[str, AttrValue]) -> Workload:
    """The workload with `attrs`, through the schema again (model_copy skips validation, and an attribute
    the schema refuses would make the stored workload unreadable): 422 naming the attribute otherwise."""
    data = w.model_dump(mode="json", exclude_none=True)
    data["spec"]["attributes"] = attrs
    try:
        return Workload.model_validate(data)
    except pydantic.ValidationError as err:
        raise InvalidResources(problems_from_pydantic(err, "request body")) from None


def _update(
    m: Manager,
    actor: Actor,
    workload: str,
    tenant: str | None,
    change: Callable[[dict[str, AttrValue]], dict[str, AttrValue]],
) -> AttributeUpdate:
    for attempt in range(MAX_RETRIES):
        if attempt:
            # jittered, growing pause: writers that keep colliding on one workload (a login storm on a
            # shared desktop host) spread out instead of retrying in lockstep until the retries run out
            time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
        w = find_workload(m, workload, tenant)
        key = f"{w.metadata.tenant}/{w.metadata.name}"
        attrs = change(dict(w.spec.attributes))
        if attrs == w.spec.attributes:
            return AttributeUpdate(key, False, m.revision, dict(attrs))
        new = _revalidated(w, attrs)
        plan = with_posture_records(m, m.plan_apply([new], mode="update", from_source=True))
        try:
            revision = m.commit(plan, actor)
        except Conflict:
            continue  # the workload changed meanwhile: recompute from its new value
        return AttributeUpdate(key, True, revision, dict(attrs))
    raise Conflict(f"workload {workload!r} kept changing concurrently; retry")


# ------------------------------------------------------------------------------------------ ownership


def posture_of(attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    return {k: v for k, v in sorted(attrs.items()) if is_posture(k)}


def posture_key(tenant: str, name: str) -> str:
    return f"{POSTURE_PREFIX}{tenant}/{name}"


def last_posture(m: Manager, tenant: str, name: str) -> dict[str, AttrValue] | None:
    """The posture last reported (or seeded) for this workload name; None if there never was one."""
    kv = m.store.get(posture_key(tenant, name))
    if kv is None or not kv.value:
        return None
    try:
        data = json.loads(kv.value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def with_posture_records(m: Manager, plan: Plan) -> Plan:
    """The plan, committing with it the posture record of every Workload it writes whose posture differs
    from the recorded one (a report, a seeded create): one txn, so record and workload never disagree."""
    puts = []
    for c in plan.writes:
        if isinstance(c.new, Workload):
            posture = posture_of(c.new.spec.attributes)
            if isinstance(c.old, Workload) and posture_of(c.old.spec.attributes) == posture:
                # the record was written with the workload's posture, which this write keeps (and the
                # txn compares the workload): nothing to record, no store read (a round trip on etcd,
                # in every label change's PUT)
                continue
            recorded = last_posture(m, c.tenant, c.name)
            if posture != (recorded or {}) and (posture or recorded is not None):
                puts.append(Put(posture_key(c.tenant, c.name), json.dumps(posture, sort_keys=True)))
    if puts:
        plan.notes["store_puts"] = [*plan.notes.get("store_puts", ()), *puts]
    return plan


def settle_posture(m: Manager, docs: Iterable[_Resource], *, may_seed: bool) -> list[_Resource]:
    """Workloads that would be created get the posture recorded for their name instead of the one in
    their document (unless the caller may seed posture and its document sets some). Updates are left to
    `protect_source_facts` (the stored values win)."""
    out: list[_Resource] = []
    for d in docs:
        if not isinstance(d, Workload) or m.get("Workload", d.metadata.tenant, d.metadata.name) is not None:
            out.append(d)
            continue
        claimed = posture_of(d.spec.attributes)
        if may_seed and claimed:
            out.append(d)
            continue
        posture = last_posture(m, d.metadata.tenant, d.metadata.name) or {}
        if claimed == posture:
            out.append(d)
            continue
        attrs = {k: v for k, v in d.spec.attributes.items() if not is_posture(k)} | posture
        out.append(d.model_copy(update={"spec": d.spec.model_copy(update={"attributes": attrs})}))
    return out


# ------------------------------------------------------------------------------------------ identity


def check_user(user: object) -> str:
    if not isinstance(user, str) or not user.strip():
        raise _invalid("user", "must be a non-empty string")
    if len(user) > MAX_USER_LEN or _CONTROL.search(user) or unsafe_character(user):
        raise _invalid("user", f"must be at most {MAX_USER_LEN} printable characters")
    return user


def _users(value: AttrValue | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return list(value)
    return [str(value)]  # a scalar `user` written by hand: treated as one user


def identity_event(
    m: Manager, actor: Actor, workload: str, user: str, action: IdentityAction, tenant: str | None = None
) -> AttributeUpdate:
    """`login`: add `user` to the workload's `user` attribute; `logout`: remove it."""
    user = check_user(user)
    if action not in ("login", "logout"):
        raise _invalid("action", f"must be 'login' or 'logout', not {action!r}")

    def change(attrs: dict[str, AttrValue]) -> dict[str, AttrValue]:
        users = _users(attrs.get(USER_ATTRIBUTE))
        if action == "login" and user not in users:
            users.append(user)
        elif action == "logout":
            users = [u for u in users if u != user]
        if users:
            attrs[USER_ATTRIBUTE] = users
        else:
            attrs.pop(USER_ATTRIBUTE, None)
        return attrs

    return _update(m, actor, workload, tenant, change)


# ------------------------------------------------------------------------------------------ posture


def flatten(report: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"av": {"status": "infected"}}` and `{"av.status": "infected"}` both give `{"av.status": ...}`."""
    out: dict[str, Any] = {}
    for k, v in report.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_posture(facts: Mapping[str, Any]) -> dict[str, str | int | float | bool | None]:
    """Every key `<namespace>.<field>` with a posture namespace; values scalar (null removes)."""
    problems: list[Problem] = []
    out: dict[str, str | int | float | bool | None] = {}
    for key, value in facts.items():
        ns = key.partition(".")[0]
        if len(key) > MAX_LABEL_KEY:
            problems.append(Problem("request body", key[:60], f"longer than {MAX_LABEL_KEY} characters"))
        elif not _KEY_RE.match(key) or ns not in POSTURE_NAMESPACES:
            allowed = ", ".join(f"{n}.*" for n in sorted(POSTURE_NAMESPACES))
            problems.append(Problem("request body", key, f"not a posture attribute (allowed: {allowed})"))
        elif value is not None and not isinstance(value, str | int | float | bool):
            problems.append(Problem("request body", key, "must be a string, number, boolean or null"))
        elif isinstance(value, str) and (not value or len(value) > MAX_USER_LEN or unsafe_character(value)):
            problems.append(Problem("request body", key, f"must be 1 to {MAX_USER_LEN} printable characters"))
        else:
            out[key] = value
    if problems:
        raise InvalidResources(problems)
    if not out:
        raise _invalid("av.status", "a posture report needs at least one posture attribute (e.g. av.status)")
    return out


def posture_report(
    m: Manager, actor: Actor, workload: str, facts: Mapping[str, Any], tenant: str | None = None
) -> AttributeUpdate:
    """Set the reported posture attributes (flattened, checked); a null value removes one."""
    checked = check_posture(flatten(facts))

    def change(attrs: dict[str, AttrValue]) -> dict[str, AttrValue]:
        for k, v in checked.items():
            if v is None:
                attrs.pop(k, None)
            else:
                attrs[k] = v
        return attrs

    return _update(m, actor, workload, tenant, change)


__all__ = [
    "POSTURE_NAMESPACES",
    "USER_ATTRIBUTE",
    "AttributeUpdate",
    "check_posture",
    "find_workload",
    "flatten",
    "identity_event",
    "last_posture",
    "posture_report",
    "protect_source_facts",
    "settle_posture",
    "source_owned",
    "with_posture_records",
]

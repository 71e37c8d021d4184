"""Source-owned workload facts: `user` (identity events) and the posture namespaces' keys (posture
reports). Ordinary writes keep their stored values and may not use them as labels; only the sources'
own calls (manager/attributes.py) change them. Apart from attributes.py so that the write path
(manager/writes.py) can apply the rule without importing the source handlers, which use the Manager.
"""

from __future__ import annotations

from typing import Any

from .contracts import Problem

USER_ATTRIBUTE = "user"
# Attribute namespaces a posture report may set: antivirus/EDR state, host firewall, disk encryption,
# patch level, and free-form `posture.*` facts.
POSTURE_NAMESPACES = frozenset({"av", "edr", "fw", "disk", "patch", "posture"})


def source_owned(key: str) -> bool:
    """Keys only the identity and posture sources write: `user` and `<posture namespace>.<field>`."""
    ns, dot, _ = key.partition(".")
    return key == USER_ATTRIBUTE or (bool(dot) and ns in POSTURE_NAMESPACES)


def protect_source_facts(old: Any, new: Any, document: str, problems: list[Problem]) -> Any:
    """For a Workload written through the resource API or apply (not by a source): keep the stored
    source-owned attributes (a routine `omniwall apply` of a workload file must neither log a user out
    nor lift a quarantine), and refuse labels with source-owned keys (a label shadows the attribute of
    the same name in selectors, so `av.status: clean` as a label would escape the quarantine).
    A create takes the document's attributes as given (seeding, e.g. examples/three-tier infected-1)."""
    for key in sorted(new.metadata.labels):
        if source_owned(key):
            problems.append(
                Problem(
                    document,
                    f"metadata.labels.{key}",
                    "reserved for identity/posture sources (POST /v1/identity/events, /v1/posture/reports); "
                    "it would shadow the attribute of the same name",
                )
            )
    if old is None:
        return new
    attrs = {k: v for k, v in new.spec.attributes.items() if not source_owned(k)}
    attrs.update({k: v for k, v in old.spec.attributes.items() if source_owned(k)})
    if attrs == new.spec.attributes:
        return new
    return new.model_copy(update={"spec": new.spec.model_copy(update={"attributes": attrs})})


def is_posture(key: str) -> bool:
    ns, dot, _ = key.partition(".")
    return bool(dot) and ns in POSTURE_NAMESPACES


__all__ = ["POSTURE_NAMESPACES", "USER_ATTRIBUTE", "is_posture", "protect_source_facts", "source_owned"]

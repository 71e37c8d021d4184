"""PURE: the few libnftables JSON expression builders every renderer module shares."""

from __future__ import annotations

from typing import Any

from omniwall.dataplane.nft.names import FAMILY, TABLE

Json = dict[str, Any]
T: Json = {"family": FAMILY, "table": TABLE}  # every object of Omniwall's table carries these


def payload(proto: str, field: str) -> Json:
    return {"payload": {"protocol": proto, "field": field}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def goto(target: str) -> Json:
    return {"goto": {"target": target}}


def rule(exprs: list[Json], comment: str) -> Json:
    """One rule's body (chain and table are added where it is placed)."""
    return {"expr": exprs, "comment": comment}


__all__ = ["Json", "T", "goto", "match", "meta", "payload", "rule"]

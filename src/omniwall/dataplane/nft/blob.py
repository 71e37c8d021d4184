"""PURE: the realized IR stored inside the table, so a restarted agent can adopt it (no memory needed).

What is stored: the IR minus the revision and minus the sets' host addresses ("structure"), as
zlib-compressed JSON, base64, split across rule comments (nft caps a comment at 128 bytes) of the
never-jumped chain `_state`. The revision lives alone in chain `_rev`; set addresses are read back from
the kernel's own hash sets. So the frequent changes (an IP joins a group, a new revision) never rewrite
the blob: only a rule, vNIC or network change does.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import replace
from typing import Any

from omniwall.compiler.ir import HostDesiredState

CHUNK = 120
MAGIC = "ow1:"  # first chunk's prefix; a table without it is not adoptable (full rebuild)


def structure(state: HostDesiredState) -> dict[str, Any]:
    # drop the addresses before serialising: asdict() of a 100k-member set is the slow part
    data = replace(state, sets=tuple(replace(s, addresses=()) for s in state.sets)).to_json()
    data.pop("revision", None)
    return data


def same_structure(a: HostDesiredState, b: HostDesiredState) -> bool:
    """Cheap equivalent of structure(a) == structure(b)."""
    return (
        a.host == b.host
        and a.vnics == b.vnics
        and a.rules == b.rules
        and [(s.name, s.cidrs) for s in a.sets] == [(s.name, s.cidrs) for s in b.sets]
    )


def encode(state: HostDesiredState) -> list[str]:
    raw = json.dumps(structure(state), sort_keys=True, separators=(",", ":")).encode()
    text = MAGIC + base64.b64encode(zlib.compress(raw, 9)).decode()
    return [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]


def decode(chunks: list[str]) -> dict[str, Any] | None:
    """The structure dict, or None when the chunks are missing or corrupt."""
    text = "".join(chunks)
    if not text.startswith(MAGIC):
        return None
    try:
        data = json.loads(zlib.decompress(base64.b64decode(text[len(MAGIC) :])))
    except (ValueError, zlib.error):
        return None
    return data if isinstance(data, dict) else None


def assemble(struct: dict[str, Any], revision: int, addresses: dict[str, list[str]]) -> HostDesiredState:
    """Rebuild the full IR from the stored structure, the revision and each set's kernel addresses."""
    data = dict(struct)
    data["revision"] = revision
    data["sets"] = [{**s, "addresses": sorted(addresses.get(s["name"], []))} for s in struct.get("sets", [])]
    return HostDesiredState.from_json(data)


__all__ = ["assemble", "decode", "encode", "same_structure", "structure"]

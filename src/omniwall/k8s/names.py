"""Names of generated resources: readable, valid Omniwall names, hashed (never truncated alone).

Generated names are `k8s.<namespace>.<policy>` plus `_`-separated suffixes (`_in-0_peer-1`). Kubernetes
names never contain `_` and namespaces never contain `.`, so no two objects' names can meet.
"""

from __future__ import annotations

import hashlib
import re

from omniwall.model.resources import NAME_RE

PREFIX = "k8s"
MAX_LEN = 63
_DIGEST_LEN = 10


def resource_name(text: str) -> str:
    """`text` itself when it is a valid Omniwall name; otherwise (too long) a readable head plus a
    hash of the full text, so two different long names never meet."""
    if NAME_RE.fullmatch(text):
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:_DIGEST_LEN]
    head = re.sub(r"[^a-z0-9._-]", "-", text.lower())[: MAX_LEN - _DIGEST_LEN - 1].rstrip("._-")
    return f"{head}-{digest}"


def policy_base(namespace: str, policy: str) -> str:
    return f"{PREFIX}.{namespace}.{policy}"

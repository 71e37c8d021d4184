"""Feed lines encoded by msgspec (stream/wire.py) carry exactly what `json.dumps(plain(x), sort_keys=True)`
carried: the same bytes for every snapshot and delta of the example worlds, and never a `wire: False`
field (`SetUpdate.result`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apihelpers import seeded_manager

from omniwall.compiler.ir import plain
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM
from omniwall.store.memory import MemoryStore
from omniwall.stream.wire import Delta, Snapshot, decode, delta_line, snapshot_line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _old(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _world(name: str) -> str:
    return "\n---\n".join(p.read_text() for p in sorted((EXAMPLES / name).glob("*.yaml")))


def test_snapshots_and_deltas_encode_as_before() -> None:
    seen_sets = 0
    for example in ("three-tier", "vdi"):
        m = seeded_manager(MemoryStore(), _world(example))
        states = m.desired.all()
        assert states
        for st in states.values():
            line = snapshot_line(st)
            assert line == _old({"type": "snapshot", "revision": st.revision, "state": plain(st)})
            msg = decode(line)
            assert isinstance(msg, Snapshot) and msg.state == st
        # a change with set updates (a new member of a group) and rule updates: every host's delta
        before = {h: s.revision for h, s in states.items()}
        docs = [load_documents(p.read_text(), p.name) for p in sorted((EXAMPLES / example).glob("*.yaml"))]
        tiered = [r for ds in docs for r in ds if r.kind == "Workload" and "tier" in r.metadata.labels]
        relabelled = []
        for w in tiered[:2]:  # web -> app and the like: members move between the tiers' address sets
            labels = {**w.metadata.labels, "tier": "app" if w.metadata.labels["tier"] != "app" else "web"}
            meta = w.metadata.model_copy(update={"labels": labels})
            relabelled.append(w.model_copy(update={"metadata": meta}))
        m.commit(m.plan_apply(relabelled), SYSTEM)
        for host, rev in before.items():
            for d in m.desired.deltas_since(host, rev) or []:
                line = delta_line(d)
                assert line == _old({"type": "delta", "delta": plain(d)})
                assert b'"result"' not in line
                seen_sets += len(d.set_updates)
                msg = decode(line)
                assert isinstance(msg, Delta) and msg.delta.to_revision == d.to_revision
    assert seen_sets, "no change moved a set member: the test would prove less than it says"

"""A bounded random history of concurrent writes and reads through several managers on one etcd cluster,
with manager kills (SIGKILL) and restarts in between, and its checker (issue 12, part 7).

The history: each write sets one Host object's label `v` to a value never used before (PUT
/v1/hosts/<key>, a blind write); the answer's `metadata.revision` is its store revision. A write that
got no answer (the manager was killed, 503) is *indeterminate*: it may or may not have happened; one
answered 409 (a concurrent write to the same key won the compare) is *rejected*: it must not have. Each
read lists every Host of the history (`GET /v1/hosts?consistent=true`): one snapshot and the revision
it is at. Before and after each read the client reads etcd's revision directly (`start`, `end`).

The checker, against etcd's own per-key history read at the end (no compaction during the run):
- every acknowledged write is in the history at the revision it was acknowledged with (nothing lost),
  every value in the history was written by some client (nothing invented), none by a rejected write;
- the history's revisions are a serial order of the writes (one write per revision per key);
- every read equals the state at its revision R (replaying the history up to R), and
  start <= R <= end: the read saw a state that existed at a point between its start and its end
  (linearizable reads);
- at the end, every key holds the value of its last write in the history (present to the end).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from etcdhelpers import ManagerProcess, etcd_cluster, manager_processes

from omniwall.manager.audit import chained
from omniwall.manager.service import Manager
from omniwall.store import open_store
from omniwall.store.etcd import EtcdStore


@dataclass(frozen=True)
class Write:
    client: int
    key: str
    value: str
    revision: int | None  # its store revision; None: not known from the answer
    manager: int
    acked: bool = True  # False: indeterminate (no answer, 503): it may or may not have happened
    rejected: bool = False  # 409 (a concurrent write to the key won): it must not have happened


@dataclass(frozen=True)
class Read:
    client: int
    start: int  # etcd store revision read before the request
    end: int  # and after its answer
    revision: int  # the revision the answer is at
    values: dict[str, str]  # key -> label v ("" when the key had none)
    manager: int


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    kills: int = 0
    errors: list[str] = field(default_factory=list)  # answers that were neither success nor 503/refused
    outcomes: dict[str, int] = field(default_factory=dict)  # "PUT 200", "PUT refused", ... -> count
    latencies: dict[str, list[float]] = field(default_factory=dict)  # "PUT"/"GET" -> seconds, answered


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    acked: int
    indeterminate: int
    indeterminate_applied: int
    rejected: int
    reads: int
    kills: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problemCount": len(self.problems),
            "problems": self.problems[:20],
            "acknowledgedWrites": self.acked,
            "indeterminateWrites": self.indeterminate,
            "indeterminateApplied": self.indeterminate_applied,
            "rejectedWrites": self.rejected,
            "reads": self.reads,
            "managerKills": self.kills,
        }


def check(history: History, truth: dict[str, list[tuple[int, str]]], final: dict[str, str]) -> Verdict:
    """`truth`: key -> [(store revision, value)] from etcd's history, oldest first (the initial value
    included); `final`: key -> value read from etcd at the end."""
    problems: list[str] = []
    written = {w.value: w for w in history.writes}
    acked = [w for w in history.writes if w.acked]
    by_value = {(k, v): r for k, entries in truth.items() for r, v in entries}
    for w in acked:
        r = by_value.get((w.key, w.value))
        if r is None:
            problems.append(f"acknowledged write {w.key}={w.value} (revision {w.revision}) is lost")
        elif w.revision is not None and r != w.revision:
            problems.append(f"write {w.key}={w.value} acknowledged at {w.revision}, stored at {r}")
    applied_unknown = 0
    for k, entries in truth.items():
        revs = [r for r, _ in entries]
        if revs != sorted(set(revs)):
            problems.append(f"{k}: revisions not a strict order: {revs}")
        for _r, v in entries[1:]:
            if v not in written:
                problems.append(f"{k}: value {v!r} in the store was never written")
            elif written[v].rejected:
                problems.append(f"{k}: value {v!r} is in the store, but its write was answered 409")
            elif not written[v].acked:
                applied_unknown += 1
        if final.get(k) != entries[-1][1]:
            problems.append(f"{k}: ends as {final.get(k)!r}, its last write was {entries[-1][1]!r}")

    def state_at(rev: int) -> dict[str, str]:
        out = {}
        for k, entries in truth.items():
            v = None
            for r, val in entries:  # oldest first
                if r > rev:
                    break
                v = val
            if v is not None:
                out[k] = v
        return out

    for rd in history.reads:
        if not rd.start <= rd.revision <= rd.end:
            problems.append(f"read at revision {rd.revision} outside its interval [{rd.start}, {rd.end}]")
            continue
        expect = state_at(rd.revision)
        if rd.values != expect:
            diff = {k: (rd.values.get(k), expect.get(k)) for k in expect.keys() | rd.values.keys()
                    if rd.values.get(k) != expect.get(k)}  # fmt: skip
            problems.append(f"read at revision {rd.revision} (manager {rd.manager}) differs: {diff}")
    return Verdict(
        not problems,
        problems,
        len(acked),
        sum(1 for w in history.writes if not w.acked and not w.rejected),
        applied_unknown,
        sum(1 for w in history.writes if w.rejected),
        len(history.reads),
        history.kills,
    )


def host_doc(key: str, value: str) -> dict[str, Any]:
    return {"kind": "Host", "metadata": {"name": key, "labels": {"v": value}}}


class Run:
    """The clients and the killer, over `managers` (restarted in place after each kill)."""

    def __init__(
        self,
        tmp: Path,
        etcd_url: str,
        managers: list[ManagerProcess],
        token: str,
        keys: Sequence[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.tmp = tmp
        self.etcd_url = etcd_url
        self.managers = managers
        self.token = token
        self.keys = list(keys)
        self.history = History()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.down: set[int] = set()

    def _client(self, i: int) -> None:
        rnd = random.Random(i)
        store = EtcdStore(self.etcd_url.removeprefix("etcd://"))
        http = httpx.Client(headers={"Authorization": f"Bearer {self.token}"}, timeout=5)
        seq = 0
        try:
            while not self.stop.is_set():
                with self.lock:
                    up = [j for j in range(len(self.managers)) if j not in self.down]
                if not up:
                    time.sleep(0.05)
                    continue
                j = rnd.choice(up)
                url = self.managers[j].url
                if rnd.random() < 0.5:
                    seq += 1
                    key, value = rnd.choice(self.keys), f"c{i}-{seq}"
                    t0 = time.monotonic()
                    try:
                        r = http.put(f"{url}/v1/hosts/{key}", json=host_doc(key, value))
                    except httpx.HTTPError as e:
                        self._count(f"PUT {type(e).__name__}")
                        self._record(Write(i, key, value, None, j, acked=False))
                        continue
                    self._count(f"PUT {r.status_code}", time.monotonic() - t0)
                    if r.status_code == 200:
                        md = r.json()["metadata"]
                        # the answer shows the object as the manager's model has it just after the
                        # write: a concurrent write to the same key may already be there instead
                        ours = (md.get("labels") or {}).get("v") == value
                        self._record(Write(i, key, value, int(md["revision"]) if ours else None, j))
                    elif r.status_code == 409:  # the compare failed: nothing was written
                        self._record(Write(i, key, value, None, j, acked=False, rejected=True))
                    else:
                        self._record(Write(i, key, value, None, j, acked=False))
                        if r.status_code != 503:
                            self.history.errors.append(f"PUT {r.status_code}: {r.text[:200]}")
                else:
                    start = store.revision()
                    t0 = time.monotonic()
                    try:
                        r = http.get(f"{url}/v1/hosts", params={"consistent": "true"})
                    except httpx.HTTPError as e:
                        self._count(f"GET {type(e).__name__}")
                        continue
                    self._count(f"GET {r.status_code}", time.monotonic() - t0)
                    end = store.revision()
                    if r.status_code != 200:
                        if r.status_code != 503:
                            self.history.errors.append(f"GET {r.status_code}: {r.text[:200]}")
                        continue
                    body = r.json()
                    values = {
                        it["metadata"]["name"]: (it["metadata"].get("labels") or {}).get("v", "")
                        for it in body["items"]
                        if it["metadata"]["name"] in self.keys
                    }
                    self._record(Read(i, start, end, int(body["revision"]), values, j))
        finally:
            http.close()
            store.close()

    def _count(self, what: str, seconds: float | None = None) -> None:
        with self.lock:
            self.history.outcomes[what] = self.history.outcomes.get(what, 0) + 1
            if seconds is not None:
                self.history.latencies.setdefault(what.split()[0], []).append(seconds)

    def _record(self, op: Write | Read) -> None:
        with self.lock:
            (self.history.writes if isinstance(op, Write) else self.history.reads).append(op)

    def _killer(self, every: float, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.wait(every):
            j = rnd.randrange(len(self.managers))
            with self.lock:
                self.down.add(j)
            self.managers[j].kill()
            self.history.kills += 1
            self.managers[j] = restart(self.managers[j], self.tmp, self.etcd_url, self.env)
            with self.lock:
                self.down.discard(j)

    def run(self, clients: int, seconds: float, kill_every: float, seed: int = 1) -> History:
        threads = [threading.Thread(target=self._client, args=(seed * 100 + i,)) for i in range(clients)]
        threads.append(threading.Thread(target=self._killer, args=(kill_every, seed)))
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join(timeout=120)
        return self.history


def restart(old: ManagerProcess, tmp: Path, etcd_url: str, env: dict[str, str] | None) -> ManagerProcess:
    """A new manager process in place of a killed one (new port; its old working directory's token
    file is not needed: the clients' token is in etcd)."""
    cm = manager_processes(tmp, etcd_url, 1, env=env)
    (new,) = cm.__enter__()
    _keep.append(cm)  # closed (killed by PID) by `stop_restarted`
    return new


_keep: list[Any] = []


def stop_restarted() -> None:
    while _keep:
        cm = _keep.pop()
        with contextlib.suppress(Exception):  # already gone
            cm.__exit__(None, None, None)


def truth_of(
    store: EtcdStore, keys: Sequence[str]
) -> tuple[dict[str, list[tuple[int, str]]], dict[str, str]]:
    """etcd's per-key history of the label `v`, and the final values."""
    from omniwall.manager.objects import key_of

    truth: dict[str, list[tuple[int, str]]] = {}
    final: dict[str, str] = {}
    for k in keys:
        entries = []
        for e in store.history(key_of("Host", "", k)):
            if e.type == "put" and e.value:
                labels = json.loads(e.value).get("metadata", {}).get("labels") or {}
                entries.append((e.revision, labels.get("v", "")))
        truth[k] = entries
        kv = store.get(key_of("Host", "", k))
        final[k] = (json.loads(kv.value).get("metadata", {}).get("labels") or {}).get("v", "") if kv else ""
    return truth, final


def consistency_run(
    tmp: Path, *, members: int = 3, managers: int = 3, clients: int = 6, seconds: float = 15.0,
    kill_every: float = 5.0, keys: int = 4, seed: int = 1, manager_env: dict[str, str] | None = None,
) -> tuple[Verdict, History]:  # fmt: skip
    """Start `members` etcd members and `managers` managers, run the history, check it."""
    names = [f"k{i}" for i in range(keys)]
    with etcd_cluster(tmp, members) as cluster:
        seed_m = Manager(chained(open_store(cluster.url)))
        token, _ = seed_m.tokens.create("provider-admin", name="consistency")
        from omniwall.manager.audit import SYSTEM
        from omniwall.manager.contracts import load_documents

        world = "\n---\n".join(f"kind: Host\nmetadata: {{name: {k}, labels: {{v: init}}}}" for k in names)
        seed_m.commit(seed_m.plan_apply(load_documents(world, "world.yaml")), SYSTEM)
        seed_m.store.close()
        try:
            with manager_processes(tmp, cluster.url, managers, env=manager_env) as procs:
                run = Run(tmp, cluster.url, procs, token, names, manager_env)
                history = run.run(clients, seconds, kill_every, seed)
                history.writes.extend(Write(-1, k, "init", None, -1) for k in names)  # the seed's
        finally:
            stop_restarted()
        store = EtcdStore(cluster.endpoints)
        truth, final = truth_of(store, names)
        store.close()
    verdict = check(history, truth, final)
    if history.errors:
        verdict.problems.extend(history.errors[:5])
        verdict.ok = False
    return verdict, history

"""`kill -9` of a real `omniwall manager` (uvicorn, SQLite) during a stream of `POST /v1/apply`.

Three client threads each send multi-document applies (a Group, a Service, a Policy that uses both, and
an update of the thread's own tally Group). The manager is SIGKILLed mid-stream and restarted on the same
database, twice. After each restart:
- every apply that got a 2xx is there: its objects, at the revision the reply named, with their audit
  entries (one per object, one request id, that revision);
- an apply whose reply never came (in flight at the kill) is there entirely or not at all, audit
  included; nothing else is there;
- each tally shows the last apply of its thread that made it.

127.0.0.1 only; the test kills only the PID it started; loops are bounded; everything lives in tmp_path.
The store-level twin is tests/unit/test_store_durability.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from omniwall.lab.control import free_port

THREADS = 3
KILL_AFTER = 24  # acknowledged applies per round before the kill
ROUNDS = 2
MAX_PER_THREAD = 400  # bound on each client loop
START_TIMEOUT = 30.0
ROUND_TIMEOUT = 60.0
KINDS = (("groups", "g"), ("services", "s"), ("policies", "p"))


class ManagerProcess:
    """One `omniwall manager` process on 127.0.0.1; its output goes to a log file in the temp dir."""

    def __init__(self, db: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "omniwall.cli.main", "manager", "--db", str(db)]
        argv += ["--listen", f"127.0.0.1:{self.port}"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )

    def wait_ready(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"manager exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2.0)
                if r.status_code == 200:
                    return int(r.json()["revision"])
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"manager not ready within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # only the PID this test started
        self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Attempt:
    round: int
    thread: int
    seq: int
    state: str = "sent"  # sent -> acked (2xx) | refused (409) | unknown (no reply)
    revision: int | None = None

    @property
    def batch(self) -> str:
        return f"{self.round}-{self.thread}-{self.seq}"

    def name(self, suffix: str) -> str:
        return f"c-{self.batch}-{suffix}"


def tally_name(round_: int, thread: int) -> str:
    return f"tally-{round_}-{thread}"


def body(a: Attempt) -> str:
    labels = f'{{crash: batch, batch: "{a.batch}"}}'
    g, s, p = a.name("g"), a.name("s"), a.name("p")
    docs = [
        f"kind: Group\nmetadata: {{name: {g}, tenant: acme, labels: {labels}}}\n"
        f"spec: {{cidrs: [10.{a.round}.{a.thread}.{a.seq % 256}/32]}}",
        f"kind: Service\nmetadata: {{name: {s}, tenant: acme, labels: {labels}}}\n"
        f"spec: {{protocol: tcp, ports: [{1000 + a.seq}]}}",
        f"kind: Policy\nmetadata: {{name: {p}, tenant: acme, labels: {labels}}}\n"
        f"spec: {{rules: [{{name: r, action: allow, sources: [{g}], services: [{s}]}}]}}",
        # every apply of a thread also updates that thread's tally: the last one to land is visible
        f"kind: Group\nmetadata: {{name: {tally_name(a.round, a.thread)}, tenant: acme, "
        f'labels: {{crash: tally, seq: "{a.seq}"}}}}\nspec: {{cidrs: [10.250.{a.round}.{a.thread}/32]}}',
    ]
    return "\n---\n".join(docs) + "\n"


def client_loop(
    url: str, token: str, round_: int, thread: int, log: list[Attempt], stop: threading.Event
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"}
    with httpx.Client(base_url=url, headers=headers, timeout=10.0) as c:
        for seq in range(MAX_PER_THREAD):
            if stop.is_set():
                return
            a = Attempt(round_, thread, seq)
            log.append(a)  # before sending: it may land even if no reply ever comes
            try:
                r = c.post("/v1/apply", content=body(a))
            except httpx.HTTPError:
                a.state = "unknown"
                return
            if r.status_code == 409:
                a.state = "refused"
            elif r.is_success:
                a.state, a.revision = "acked", int(r.json()["revision"])
            else:
                a.state = f"error {r.status_code}: {r.text[:300]}"
                return


def stream_and_kill(mgr: ManagerProcess, token: str, round_: int) -> list[Attempt]:
    logs: list[list[Attempt]] = [[] for _ in range(THREADS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(mgr.url, token, round_, t, logs[t], stop), daemon=True)
        for t in range(THREADS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + ROUND_TIMEOUT
    try:
        while time.monotonic() < deadline:
            acked = sum(a.state == "acked" for log in logs for a in log)
            if acked >= KILL_AFTER or not any(t.is_alive() for t in threads):
                break
            time.sleep(0.005)
    finally:
        mgr.kill9()  # mid-stream: the threads have requests in flight right now
        stop.set()
        for t in threads:
            t.join(timeout=20)
    attempts = [a for log in logs for a in log]
    errors = [f"{a.batch}: {a.state}" for a in attempts if a.state.startswith("error")]
    assert not errors, f"applies failed before the kill: {errors}\n{mgr.log_tail()}"
    assert sum(a.state == "acked" for a in attempts) >= KILL_AFTER, (
        f"too few applies acknowledged:\n{mgr.log_tail()}"
    )
    assert not any(t.is_alive() for t in threads), "a client thread did not stop"
    return attempts


# ------------------------------------------------------------------------------------------ checks


def get_all(c: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cont = None
    for _ in range(1000):
        r = c.get(path, params={**params, **({"continue": cont} if cont else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        items += page["items"]
        cont = page.get("continue")
        if not cont:
            return items
    raise AssertionError(f"{path}: pagination did not end")


def check_store(url: str, token: str, attempts: list[Attempt], revision_now: int) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as c:
        objects: dict[tuple[str, str], dict[str, Any]] = {}
        for plural, _ in KINDS:
            for o in get_all(c, f"/v1/{plural}", tenant="acme", labelSelector="crash=batch"):
                objects[(plural, o["metadata"]["name"])] = o
        tallies = {
            o["metadata"]["name"]: o
            for o in get_all(c, "/v1/groups", tenant="acme", labelSelector="crash=tally")
        }
        audit = get_all(c, "/v1/audit", tenant="acme", limit=1000)

    entries_by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in audit:
        entries_by_name[e["name"]].append(e)
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in audit:
        by_request[e["request"]].append(e)

    problems: list[str] = []
    landed: list[Attempt] = []  # with the revision it landed at
    expected_names: set[tuple[str, str]] = set()
    for a in attempts:
        keys = [(plural, a.name(sfx)) for plural, sfx in KINDS]
        present = [k in objects for k in keys]
        if a.state == "acked":
            if not all(present):
                problems.append(
                    f"acknowledged apply {a.batch} (revision {a.revision}) lost {keys}: {present}"
                )
                continue
        elif a.state in ("refused", "sent", "unknown"):
            if a.state == "refused" and any(present):
                problems.append(f"apply {a.batch} answered 409 but wrote {present}")
                continue
            if any(present) and not all(present):
                problems.append(f"apply {a.batch} (no reply) is partially visible: {present}")
                continue
            if not any(present):
                if entries_by_name.get(a.name("g")):
                    problems.append(f"apply {a.batch} is absent but audited")
                continue
        revisions = {objects[k]["metadata"]["revision"] for k in keys}
        if len(revisions) != 1:
            problems.append(f"apply {a.batch}: its objects carry different revisions {revisions}")
            continue
        rev = revisions.pop()
        if a.state == "acked" and rev != a.revision:
            problems.append(f"apply {a.batch}: objects at revision {rev}, the reply said {a.revision}")
            continue
        a.revision = rev
        landed.append(a)
        expected_names.update(keys)
        # audit: the four objects of this apply, one request id, that revision, nothing else in it
        mine = [e for sfx in ("g", "s", "p") for e in entries_by_name.get(a.name(sfx), [])]
        tally = [
            e
            for e in entries_by_name.get(tally_name(a.round, a.thread), [])
            if e["revision"] == rev and e["kind"] == "Group"
        ]
        if len(mine) != 3 or len(tally) != 1:
            problems.append(
                f"apply {a.batch}: audit has {len(mine)} object entries and {len(tally)} tally entries"
            )
            continue
        requests = {e["request"] for e in [*mine, *tally]}
        if len(requests) != 1 or {e["revision"] for e in mine} != {rev}:
            problems.append(f"apply {a.batch}: audit entries {[*mine, *tally]} are not one request at {rev}")
            continue
        if len(by_request[requests.pop()]) != 4:
            problems.append(f"apply {a.batch}: its audit request holds other entries too")
        if {e["action"] for e in mine} != {"create"}:
            problems.append(f"apply {a.batch}: audit actions {[e['action'] for e in mine]}")

    extra = sorted(set(objects) - expected_names)
    if extra:
        problems.append(f"objects that no apply sent, or whose apply did not land: {extra}")
    # Each thread applies in sequence: its tally shows the last of its applies that landed.
    last: dict[str, Attempt] = {}
    for a in sorted(landed, key=lambda a: a.seq):
        last[tally_name(a.round, a.thread)] = a
    for name, a in last.items():
        t = tallies.get(name)
        if t is None:
            problems.append(f"{name} missing")
        elif (t["metadata"]["labels"]["seq"], t["metadata"]["revision"]) != (str(a.seq), a.revision):
            problems.append(
                f"{name} at seq {t['metadata']['labels']['seq']} rev {t['metadata']['revision']}, "
                f"want seq {a.seq} rev {a.revision}"
            )
    if set(tallies) != set(last):
        problems.append(f"tallies {sorted(tallies)}, want {sorted(last)}")
    max_acked = max((a.revision or 0 for a in attempts if a.state == "acked"), default=0)
    if revision_now < max_acked:
        problems.append(f"store revision {revision_now} after restart < last acknowledged {max_acked}")
    assert not problems, "\n".join(problems[:30])


# ------------------------------------------------------------------------------------------ test


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[list[ManagerProcess]]:
    started: list[ManagerProcess] = []
    yield started
    for m in started:  # whatever happened: no manager outlives the test
        m.kill9()


def test_kill_9_during_applies_keeps_every_acknowledged_apply_whole(
    tmp_path: Path, managers: list[ManagerProcess]
) -> None:
    db = tmp_path / "omniwall.db"
    log = tmp_path / "manager.log"

    def start() -> tuple[ManagerProcess, int]:
        mgr = ManagerProcess(db, log)
        managers.append(mgr)
        return mgr, mgr.wait_ready()

    mgr, _ = start()
    token = Path(f"{db}.admin-token").read_text().strip()
    r = httpx.post(
        f"{mgr.url}/v1/apply",
        content="kind: Tenant\nmetadata: {name: acme}\n",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"},
        timeout=30.0,
    )
    assert r.status_code == 200, r.text

    attempts: list[Attempt] = []
    for round_ in range(ROUNDS):
        attempts += stream_and_kill(mgr, token, round_)
        assert mgr.proc.returncode == -signal.SIGKILL
        mgr, revision = start()  # same database
        check_store(mgr.url, token, attempts, revision)

    in_flight = [a for a in attempts if a.state != "acked"]
    assert in_flight, "no apply was in flight at either kill: the test did not test a crash mid-stream"
    # The restarted manager takes writes again, above every revision it acknowledged before.
    r = httpx.post(
        f"{mgr.url}/v1/apply",
        content=body(Attempt(ROUNDS, 0, 0)),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"},
        timeout=30.0,
    )
    assert r.status_code == 200, r.text
    assert r.json()["revision"] > max(a.revision or 0 for a in attempts)

"""Flows across managers (docs/ha.md, "Flows across managers"): who the peers are, and how their answers
are merged. The HTTP side (calls, the peer route, the live fan-out) is api/flowrelay.py.

Each manager keeps the flow records its agents shipped in its own store. A manager answering a flow query
asks its live peers too and merges, as Hubble Relay does:

- **Peers** come from the registry of managers (manager/coordination.py: `managers/<id>` on the manager's
  lease, with the URL it advertised and a random peer key). A manager dead for longer than its lease is
  gone from it.
- **Stores** are listed apart, without a lease (`flowstores/<store id>` runtime key: the last manager
  and URL that served it, and when): a store whose manager is not alive is *missing*, and an answer
  without it says so (`partial`), rather than quietly lacking its rows. An entry older than the
  retention is ignored (its rows would have been pruned).
- **Pages** merge the stores' newest-first lists by time (`t`, the record's end; each store's own order is
  its insertion order, as on one manager) and carry a cursor that holds one position per store, so each
  row is returned exactly once whichever stores answer on which page; a store that failed keeps its
  position and is retried on the next page.
- **Counts** (rule hits, graph edges) are sums over the stores that answered.
"""

from __future__ import annotations

import base64
import heapq
import json
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .coordination import Coordination
from .flowstore import COL, Hit, Row

STORES = "flowstores/"  # runtime keys: store id -> {"manager", "url", "seen"} (no lease)
PEER_HEADER = "X-Omniwall-Peer"  # "<manager id> <peer key>": a manager calling another (flowrelay.py)
CURSOR_PREFIX = "m1."  # a cursor over several stores; a plain number is one store's (single manager)
PEERS_CACHE = 1.0  # seconds a registry read is reused (every query would otherwise range etcd)
EXHAUSTED = 0  # a store's cursor position once it has nothing older (ids start at 1)


@dataclass(frozen=True, slots=True)
class Peer:
    manager: str
    url: str
    store: str  # its flow store's id ("" when it did not say)


@dataclass(frozen=True, slots=True)
class SourceError:
    """A store whose rows are not in an answer, and why."""

    manager: str
    url: str
    store: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"manager": self.manager, "url": self.url, "store": self.store, "error": self.error}


class Registry:
    """This manager's entry among the managers, and its view of the others. Without etcd (one manager):
    no peers, nothing published."""

    def __init__(self, coordination: Coordination, runtime: Any | None, store_id: str) -> None:
        self.coordination = coordination
        self.rt = runtime  # EtcdRuntime, or None
        self.store_id = store_id
        self.key = secrets.token_urlsafe(24)  # peers present it back: only managers read the registry
        self.url = ""
        self._cache: tuple[float, list[Peer], dict[str, dict[str, Any]]] | None = None
        self._keys: dict[str, str] = {}  # live peer id -> its key, as of the last registry read
        self._lock = threading.Lock()

    @property
    def clustered(self) -> bool:
        return self.rt is not None

    def advertise(self, url: str) -> None:
        """Publish this manager's URL and store: in its leased registry entry, and in the store list."""
        self.url = url
        if self.rt is None:
            return
        self.coordination.advertise({"url": url, "flows": self.store_id, "peerKey": self.key})
        entry = {"manager": self.coordination.id, "url": url, "seen": int(time.time())}
        self.rt.write([(STORES + self.store_id, json.dumps(entry), 0)])

    def view(self) -> tuple[list[Peer], dict[str, dict[str, Any]]]:
        """(live peers with a URL, known stores: id -> entry), cached PEERS_CACHE seconds."""
        if self.rt is None:
            return [], {}
        with self._lock:
            cached = self._cache
            if cached is not None and time.monotonic() - cached[0] < PEERS_CACHE:
                return cached[1], cached[2]
        peers: list[Peer] = []
        registered = self.coordination.peers()
        keys = {mid: str(info.get("peerKey", "")) for mid, info in registered.items()}
        for mid, info in sorted(registered.items()):
            url = info.get("url")
            if isinstance(url, str) and url:
                peers.append(Peer(mid, url, str(info.get("flows", ""))))
        items, _ = self.rt.range(STORES)
        stores: dict[str, dict[str, Any]] = {}
        for kv in items:
            try:
                entry = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(entry, dict):
                stores[kv.key[len(STORES) :]] = entry
        with self._lock:
            self._cache = (time.monotonic(), peers, stores)
            self._keys = keys
        return peers, stores

    def missing(
        self, peers: Sequence[Peer], stores: Mapping[str, dict[str, Any]], retention: float
    ) -> list[SourceError]:
        """Stores that no live manager serves now, seen within `retention`: their rows are not reachable."""
        served = {self.store_id, *(p.store for p in peers)}
        now = time.time()
        out = []
        for sid, e in sorted(stores.items()):
            seen = float(e.get("seen", 0) or 0)
            if sid in served or now - seen > retention:
                continue
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen))
            out.append(
                SourceError(
                    str(e.get("manager", "")),
                    str(e.get("url", "")),
                    sid,
                    f"no live manager serves this flow store (last from {e.get('url', '?')} at {when})",
                )
            )
        return out

    def verify(self, header: str) -> str | None:
        """The manager id a peer header proves, or None. Keys come from the registry (so a dead manager's
        key dies with its lease), read at most once per PEERS_CACHE seconds however many callers guess:
        a wrong key costs no etcd read beyond that."""
        if self.rt is None:
            return None
        mid, _, key = header.strip().partition(" ")
        if not mid or not key:
            return None
        with self._lock:
            known = self._keys.get(mid)
        if known is None or not _same(known, key):
            self.view()  # refreshes the keys if the cached view is older than PEERS_CACHE
            with self._lock:
                known = self._keys.get(mid)
        return mid if known and _same(known, key) else None

    def header(self) -> str:
        return f"{self.coordination.id} {self.key}"


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


# ---------------------------------------------------------------------------------------------- cursor


def encode_cursor(positions: Mapping[str, int]) -> str:
    raw = json.dumps(dict(sorted(positions.items())), separators=(",", ":")).encode()
    return CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, local_store: str) -> dict[str, int]:
    """store id -> the id rows must be below (EXHAUSTED: nothing left). A store absent from the cursor
    starts from its newest row (a manager that joined since the first page). ValueError: not ours."""
    if text.isdigit():  # a single manager's cursor (before fan-out, or from one)
        return {local_store: int(text)}
    if not text.startswith(CURSOR_PREFIX):
        raise ValueError("not a cursor this API gave out")
    body = text[len(CURSOR_PREFIX) :]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError):
        raise ValueError("not a cursor this API gave out") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()
    ):
        raise ValueError("not a cursor this API gave out")
    return data


# ---------------------------------------------------------------------------------------------- merges

Found = list[tuple[int, Row]]  # one store's answer: (id, row), newest first


def merge_page(
    answers: Mapping[str, Found], limit: int, cursor: Mapping[str, int], failed: Iterable[str] = ()
) -> tuple[list[tuple[str, int, Row]], dict[str, int] | None]:
    """Up to `limit` rows from the stores' answers (each up to `limit` rows below its cursor position),
    newest `t` first: (store, id, row), and the next cursor (None: every store that answered is
    exhausted). Each store's rows are taken in its own order, so a row left out now is the first of that
    store next time; a store in `failed` keeps its position."""
    t = COL["t"]
    heads: list[tuple[float, str, int]] = []  # (-t, store, index)
    for store, found in answers.items():
        if found:
            heads.append((-found[0][1][t], store, 0))
    heapq.heapify(heads)
    out: list[tuple[str, int, Row]] = []
    taken: dict[str, int] = {}
    while heads and len(out) < limit:
        _, store, i = heapq.heappop(heads)
        rid, row = answers[store][i]
        out.append((store, rid, row))
        taken[store] = i + 1
        if i + 1 < len(answers[store]):
            heapq.heappush(heads, (-answers[store][i + 1][1][t], store, i + 1))
    nxt = dict(cursor)
    for store, found in answers.items():
        n = taken.get(store, 0)
        if n:
            nxt[store] = found[n - 1][0]
        if n == len(found) and len(found) < limit:
            nxt[store] = EXHAUSTED  # it gave all it had below its position
    # A failed store keeps its position (or its absence: from its newest) but does not keep the listing
    # going: a client paging to the end stops, told the answer is partial, instead of spinning on it.
    down = set(failed)
    more = any(v != EXHAUSTED for s, v in nxt.items() if s not in down)
    return out, (nxt if more else None)


def merge_hits(answers: Iterable[Iterable[Hit]]) -> list[Hit]:
    """Per (rule, verdict): counts summed over the stores, the latest last hit."""
    by: dict[tuple[int, str], Hit] = {}
    for hits in answers:
        for h in hits:
            k = (h.rule_id, h.verdict)
            o = by.get(k)
            by[k] = h if o is None else Hit(o.rule_id, o.rule_tenant, o.policy, o.rule, o.category,
                                            o.verdict, o.count + h.count, max(o.last, h.last))  # fmt: skip
    return list(by.values())


def merge_aggregate(answers: Iterable[Iterable[Sequence[Any]]]) -> list[tuple[Any, ...]]:
    """Grouped rows (values..., count) from several stores: the same group's counts summed."""
    sums: dict[tuple[Any, ...], int] = {}
    for rows in answers:
        for r in rows:
            k = tuple(r[:-1])
            sums[k] = sums.get(k, 0) + int(r[-1])
    return [(*k, n) for k, n in sums.items()]


__all__ = [
    "CURSOR_PREFIX",
    "EXHAUSTED",
    "PEER_HEADER",
    "STORES",
    "Peer",
    "Registry",
    "SourceError",
    "decode_cursor",
    "encode_cursor",
    "merge_aggregate",
    "merge_hits",
    "merge_page",
]

"""Revisioned key-value store (DESIGN §7): `Store` protocol; SQLite (default), in-memory and etcd backends."""

from __future__ import annotations

import os

from omniwall.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    FutureRevisionError,
    KeyValue,
    Op,
    Put,
    Store,
    StoreError,
    StoreLimitError,
    StoreUnavailable,
    TxnResult,
)


def open_store(spec: str) -> Store:
    """Open the store a `--db`/`--store` value names:

    - `etcd://HOST:PORT[,HOST:PORT...]` -> an EtcdStore on that cluster (docs/etcd.md);
    - `sqlite://PATH` (so `sqlite:///abs/path` for an absolute one) or a plain path -> a SqliteStore;
    - `:memory:` -> a MemoryStore (nothing durable).

    An etcd that does not answer raises StoreError naming the endpoints (checked here, at startup).
    etcd over TLS: `OMNIWALL_ETCD_CA` (CA file), `OMNIWALL_ETCD_CERT`/`OMNIWALL_ETCD_KEY` (client
    certificate); either makes https:// the default scheme.
    """
    if spec.startswith("etcd://"):
        from omniwall.store.etcd import EtcdStore

        ca, cert, key = (os.environ.get(f"OMNIWALL_ETCD_{v}") for v in ("CA", "CERT", "KEY"))
        if bool(cert) != bool(key):
            raise ValueError("OMNIWALL_ETCD_CERT and OMNIWALL_ETCD_KEY go together (etcd client certificate)")
        try:
            return EtcdStore(spec, ca=ca or None, cert=(cert, key) if cert and key else None)
        except StoreError as e:
            raise StoreError(f"store {spec}: {e}") from None
    path = sqlite_path(spec)
    if path == ":memory:":
        from omniwall.store.memory import MemoryStore

        return MemoryStore()
    from omniwall.store.sqlite import SqliteStore

    return SqliteStore(path)


def sqlite_path(spec: str) -> str | None:
    """The local file (or `:memory:`) a store spec names; None for a remote store (etcd)."""
    if spec.startswith("etcd://"):
        return None
    if spec.startswith("sqlite://"):
        path = spec.removeprefix("sqlite://")
        if not path:
            raise ValueError(f"--store {spec!r}: expected sqlite:///path/to/file.db")
        return path
    if "://" in spec:
        raise ValueError(
            f"--store {spec!r}: unknown scheme (expected etcd://HOST:PORT,... or sqlite:///path)"
        )
    return spec


__all__ = [
    "CompactedError",
    "Compare",
    "Delete",
    "Event",
    "FutureRevisionError",
    "KeyValue",
    "Op",
    "Put",
    "Store",
    "StoreError",
    "StoreLimitError",
    "StoreUnavailable",
    "TxnResult",
    "open_store",
    "sqlite_path",
]

"""Revisioned key-value store (DESIGN §7): `Store` protocol, SQLite (default) and in-memory backends."""

from __future__ import annotations

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
    TxnResult,
)


def open_store(path: str) -> Store:
    """`:memory:` -> a MemoryStore (nothing durable); anything else -> a SqliteStore at that path."""
    if path == ":memory:":
        from omniwall.store.memory import MemoryStore

        return MemoryStore()
    from omniwall.store.sqlite import SqliteStore

    return SqliteStore(path)


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
    "TxnResult",
    "open_store",
]

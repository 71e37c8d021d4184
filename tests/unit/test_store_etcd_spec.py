"""`--store` values (no etcd needed): which store they open and where the manager's local files go."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniwall.api.server import FlowOptions
from omniwall.store import open_store, sqlite_path
from omniwall.store.etcd import parse_endpoints
from omniwall.store.sqlite import SqliteStore


def test_sqlite_url_is_the_same_as_db(tmp_path: Path) -> None:
    db = tmp_path / "ow.db"
    s = open_store(f"sqlite://{db}")  # sqlite:///abs/path
    assert isinstance(s, SqliteStore) and s.put("k", "v") == 1
    s.close()
    again = open_store(str(db))
    assert again.get("k").value == "v"  # type: ignore[union-attr]
    again.close()
    assert sqlite_path(f"sqlite://{db}") == str(db) == sqlite_path(str(db))
    assert sqlite_path("etcd://127.0.0.1:2379") is None


def test_local_files_of_an_etcd_manager() -> None:
    assert FlowOptions().path_for("etcd://127.0.0.1:2379") == "omniwall.flows"
    assert FlowOptions().path_for("sqlite:///var/lib/ow.db") == "/var/lib/ow.db.flows"
    assert FlowOptions().path_for(":memory:") == ":memory:"


def test_bad_store_values_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="expected sqlite:///path"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="no etcd endpoint"):
        open_store("etcd://")
    assert parse_endpoints("etcd://a:1, https://b:2") == ["http://a:1", "https://b:2"]
    assert parse_endpoints("a:1", "https") == ["https://a:1"]

"""The CLI client commands against a real manager (uvicorn on a loopback socket), and replica sync."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apihelpers import ACME_WEB1, seeded_manager, serving
from typer.testing import CliRunner

from omniwall.api.app import create_app
from omniwall.cli.main import app as cli
from omniwall.manager.contracts import load_documents
from omniwall.manager.service import SYSTEM, Manager
from omniwall.store.sqlite import SqliteStore

FILE = ACME_WEB1


@pytest.fixture
def manager_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Manager, Path]]:
    db = tmp_path / "m.db"
    m = Manager(SqliteStore(db))
    token, _ = m.tokens.create("provider-admin", name="cli")
    with serving(create_app(m, watch=True), timeout_graceful_shutdown=1) as url:
        monkeypatch.setenv("OMNIWALL_SERVER", url)
        monkeypatch.setenv("OMNIWALL_TOKEN", token)
        monkeypatch.setenv("OMNIWALL_CONFIG", str(tmp_path / "none.yaml"))
        yield url, m, db


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in res.output
    return res.exit_code, res.output


def test_cli_apply_get_diff_history_rollback_delete(
    manager_url: tuple[str, Manager, Path], tmp_path: Path
) -> None:
    _, m, _ = manager_url
    f = tmp_path / "world.yaml"
    f.write_text(FILE)
    code, out = run("apply", "-f", str(f))
    assert code == 0, out
    assert "Workload/acme/web1 created" in out
    first = m.store.revision()
    code, out = run("get", "workloads", "-o", "json")
    assert code == 0 and json.loads(out)[0]["metadata"]["name"] == "web1"
    code, out = run("get", "workload", "web1", "--tenant", "acme", "-o", "yaml")
    assert code == 0 and "10.0.0.1" in out
    code, out = run("get", "workloads")
    assert code == 0 and "web1" in out.splitlines()[1]
    f.write_text(FILE.replace("10.0.0.1", "10.0.0.2"))
    code, out = run("diff", "-f", str(f))
    assert code == 1 and "-    - 10.0.0.1" in out and "+    - 10.0.0.2" in out and "impact:" in out
    code, out = run("apply", "--dry-run", "-f", str(f))
    assert code == 0 and "nothing written" in out and m.store.revision() == first
    code, out = run("apply", "-f", str(f))
    assert code == 0 and "Workload/acme/web1 updated" in out
    code, out = run("history", "workload", "web1", "--tenant", "acme")
    assert code == 0 and len(out.strip().splitlines()) == 3
    code, out = run("rollback", "workload", "web1", "--tenant", "acme", "--to-revision", str(first))
    assert code == 0, out
    assert m.get("Workload", "acme", "web1").spec.vnics[0].ips == ["10.0.0.1"]  # type: ignore[union-attr]
    code, out = run("status")
    assert code == 0 and "h1" in out
    code, out = run("audit", "--kind", "workload")
    assert code == 0 and "rollback" in out
    code, out = run("compact", "--keep", "1")
    assert code == 0 and m.store.compacted_revision() == m.store.revision() - 1
    code, out = run("rollback", "workload", "web1", "--tenant", "acme", "--to-revision", str(first))
    assert code == 1 and "compacted" in out and "HTTP 410" in out
    code, out = run("delete", "workload", "web1", "--tenant", "acme")
    assert code == 0 and "deleted" in out


def test_cli_shows_server_errors_without_traceback(
    manager_url: tuple[str, Manager, Path], tmp_path: Path
) -> None:
    code, out = run("get", "workload", "nope", "--tenant", "acme")
    assert code == 1 and "error: Workload/acme/nope not found (HTTP 404)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: s}\nspec: {protocol: tcp, ports: [70000]}\n")
    code, out = run("apply", "-f", str(bad))
    assert code == 1 and "HTTP 422" in out and "spec.ports" in out and "bad.yaml" in out
    code, out = run("get", "gizmos")
    assert code == 1 and "unknown kind" in out
    code, out = run("apply", "-f", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml" in out


def test_token_commands_on_the_db_are_seen_by_the_running_manager(
    manager_url: tuple[str, Manager, Path],
) -> None:
    _, m, db = manager_url
    code, out = run("token", "create", "--role", "tenant-viewer", "--tenant", "acme", "--db", str(db))
    assert code == 1 and "tenant 'acme' does not exist" in out  # finding 7: checked on the file too
    m.commit(m.plan_apply(load_documents(FILE, "world.yaml")), SYSTEM)
    code, out = run("token", "create", "--role", "tenant-viewer", "--tenant", "acme", "--db", str(db))
    assert code == 0, out
    token = out.splitlines()[0].strip()
    assert m.tokens.verify(token) is not None
    code, out = run("token", "list")
    assert code == 0 and "tenant-viewer" in out
    tid = token.split(".")[1]
    code, out = run("token", "create", "--role", "tenant-viewer")
    assert code == 1 and "needs a tenant" in out
    code, out = run("token", "revoke", tid)
    assert code == 0 and m.tokens.verify(token) is None


def test_a_second_manager_on_the_same_store_converges(tmp_path: Path) -> None:
    """Replicas share one store: a write through one appears in the other's model and desired states."""
    db = tmp_path / "shared.db"
    a, b = Manager(SqliteStore(db)), Manager(SqliteStore(db))
    b.start_watch(poll=0.05)
    try:
        a.commit(a.plan_apply(load_documents(FILE, "f")), SYSTEM)
        deadline = time.monotonic() + 5
        while b.revision < a.revision and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.revision == a.revision
        assert b.get("Workload", "acme", "web1") == a.get("Workload", "acme", "web1")
        assert b.desired_state("h1") == a.desired_state("h1")
    finally:
        b.stop_watch()


def test_incremental_desired_states_match_a_full_compile(tmp_path: Path) -> None:
    from omniwall.compiler.build import compile_catalog

    m = seeded_manager(SqliteStore(tmp_path / "m.db"), FILE)
    for i in range(4):
        text = (
            f"kind: Workload\nmetadata: {{name: w{i}, tenant: acme, labels: {{tier: web}}}}\n"
            f"spec: {{host: h1, vnics: [{{ips: [10.0.3.{i + 1}]}}]}}\n---\n"
            "kind: Group\nmetadata: {name: web, tenant: acme}\nspec: {selector: 'tier == \"web\"'}\n---\n"
            f"kind: Policy\nmetadata: {{name: p, tenant: acme}}\nspec: {{rules: [{{name: r, sources: [web], "
            f"services: [tcp/{80 + i}], action: allow}}]}}\n"
        )
        m.commit(m.plan_apply(load_documents(text, "f")), SYSTEM)
    m.commit(m.plan_delete("Workload", "acme", "w0"), SYSTEM)
    full = compile_catalog(m.catalog, m.revision)
    for host, st in full.items():
        got = m.desired_state(host)
        assert got is not None
        assert got.vnics == st.vnics and got.rules == st.rules and got.sets == st.sets


def test_cli_reads_server_and_token_file_from_the_config_file(
    manager_url: tuple[str, Manager, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _, _ = manager_url
    token = os.environ["OMNIWALL_TOKEN"]
    (tmp_path / "tok").write_text(token + "\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"server: {url}\ntoken_file: {tmp_path / 'tok'}\n")
    monkeypatch.delenv("OMNIWALL_SERVER")
    monkeypatch.delenv("OMNIWALL_TOKEN")
    monkeypatch.setenv("OMNIWALL_CONFIG", str(cfg))
    code, out = run("status")
    assert code == 0 and out.startswith("revision ")
    cfg.write_text(f"server: {url}\n")
    code, out = run("status")
    assert code == 1 and "no token" in out

"""The CLI's conventions (issue 13): -f files/directories/globs, tenant/name, -o table|wide|json|yaml,
--version, completion, diff exit codes, audit newest first / --follow, identity and posture verbs,
config contexts. Against a real manager on a loopback socket, like test_api_cli.py."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from apihelpers import serving
from typer.testing import CliRunner

from omniwall.api.app import create_app
from omniwall.cli.args import expand_files, split_ref
from omniwall.cli.audit_cmd import detail
from omniwall.cli.events_cmd import parse_facts
from omniwall.cli.main import app as cli
from omniwall.manager.service import Manager
from omniwall.manager.tokens import Role
from omniwall.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-tier"


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, Manager]]:
    m = Manager(SqliteStore(tmp_path / "m.db"))
    token, _ = m.tokens.create("provider-admin", name="cli")
    with serving(create_app(m, watch=True), timeout_graceful_shutdown=1) as url:
        monkeypatch.setenv("OMNIWALL_SERVER", url)
        monkeypatch.setenv("OMNIWALL_TOKEN", token)
        monkeypatch.setenv("OMNIWALL_CONFIG", str(tmp_path / "config.yaml"))
        monkeypatch.delenv("OMNIWALL_CONTEXT", raising=False)
        yield url, token, m


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in res.output
    return res.exit_code, res.output


# ------------------------------------------------------------------------------------------- helpers


def test_expand_files_takes_files_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.yaml", "d/a.yml", "d/sub/c.json", "d/notes.txt"):
        (tmp_path / name).write_text("{}")
    assert expand_files([tmp_path / "d"]) == [
        str(tmp_path / "d/a.yml"),
        str(tmp_path / "d/b.yaml"),
        str(tmp_path / "d/sub/c.json"),
    ]
    assert expand_files([f"{tmp_path}/d/*.yaml", "-"]) == [str(tmp_path / "d/b.yaml"), "-"]
    with pytest.raises(ValueError, match="no file matches"):
        expand_files([f"{tmp_path}/nothing/*.yaml"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*.yaml"):
        expand_files([tmp_path / "empty"])


def test_split_ref() -> None:
    assert split_ref("web-1") == (None, "web-1")
    assert split_ref("web-1", "acme") == ("acme", "web-1")
    assert split_ref("acme/web-1") == ("acme", "web-1")
    assert split_ref("acme/web-1", "acme") == ("acme", "web-1")
    for bad in ("/web-1", "acme/", "a/b/c"):
        with pytest.raises(ValueError, match="TENANT/NAME"):
            split_ref(bad)
    with pytest.raises(ValueError, match="--tenant is 'other'"):
        split_ref("acme/web-1", "other")


def test_migration_audit_entries_name_their_phase() -> None:
    e = {"action": "migrate", "extra": {"phase": "switching", "from": "h1", "to": "h3", "result": "running"}}
    assert detail(e) == "switching h1 -> h3"
    e["extra"] |= {"phase": "rolled-back", "result": "failed", "error": "timeout"}
    assert detail(e) == "rolled-back h1 -> h3 (failed): timeout"
    assert detail({"action": "update", "changed": ["spec"]}) == "spec"


def test_parse_facts() -> None:
    assert parse_facts(["av.status=infected", "av.score=3", "av.engine=null", "fw.on=true"]) == {
        "av.status": "infected",
        "av.score": 3,
        "av.engine": None,
        "fw.on": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_facts(["av.status"])


# ----------------------------------------------------------------------------------------- offline


def test_version_completion_and_roles() -> None:
    code, out = run("--version")
    assert code == 0 and out.startswith("omniwall ") and out.split()[1][0].isdigit()
    for shell, marker in (("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete --command")):
        code, out = run("completion", shell)
        assert code == 0 and "_OMNIWALL_COMPLETE" in out and marker in out, (shell, out)
    code, _ = run("completion", "tcsh")
    assert code == 2
    code, out = run("token", "create", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for role in Role:
        assert role.value in flat, role


def test_completion_answers_commands() -> None:
    env = {
        **os.environ,
        "_OMNIWALL_COMPLETE": "complete_bash",
        "COMP_WORDS": "omniwall au",
        "COMP_CWORD": "1",
    }
    res = subprocess.run(
        [sys.executable, "-m", "omniwall.cli.main"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "audit" in res.stdout.split(), res.stdout + res.stderr


def test_offline_commands_take_quoted_globs() -> None:
    code, out = run("validate", "-f", f"{EXAMPLE}/*.yaml")
    assert code == 0 and out.startswith("valid:"), out
    code, out = run("validate", "-f", f"{EXAMPLE}/nope-*.yaml")
    assert code == 2 and "no file matches" in out


# ------------------------------------------------------------------------------------- with manager


def test_apply_and_diff_take_directories_and_globs_diff_exit_codes(
    manager: tuple[str, str, Manager], tmp_path: Path
) -> None:
    code, out = run("apply", "-f", str(EXAMPLE) + "/")
    assert code == 0 and "Workload/tenant-a/web-1 created" in out, out
    code, out = run("diff", "-f", str(EXAMPLE))
    assert code == 0 and "impact: 0 host(s)" in out, out
    changed = tmp_path / "ex"
    changed.mkdir()
    for f in EXAMPLE.glob("*.yaml"):
        (changed / f.name).write_text(f.read_text().replace("ports: [8080]", "ports: [8081]"))
    files = sorted(str(f) for f in changed.glob("*.yaml"))
    code, out = run("diff", "-f", files[0], *files[1:])  # `-f dir/*.yaml` as the shell expands it
    assert code == 1 and "+  - 8081" in out, out
    assert "tenant-a/web-1 (ow" in out  # workloads named, with their interface
    code, out = run("diff", "-f", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in out
    code, out = run("apply", "-f", f"{changed}/*.yaml")  # quoted glob
    assert code == 0 and "Service/tenant-a/app updated" in out, out
    code, out = run("diff", "-f", str(changed))
    assert code == 0


def test_tenant_slash_name_everywhere(manager: tuple[str, str, Manager]) -> None:
    assert run("apply", "-f", str(EXAMPLE))[0] == 0
    code, out = run("get", "workloads", "tenant-a/web-1", "-o", "json")
    assert code == 0 and json.loads(out)["metadata"]["name"] == "web-1"
    code, out = run("get", "workload", "web-1", "-t", "tenant-b", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["metadata"]["tenant"] == "tenant-b"
    code, out = run("get", "workloads", "tenant-a/web-1", "-t", "tenant-b")
    assert code == 1 and "--tenant is 'tenant-b'" in out
    code, out = run("history", "service", "tenant-a/http")
    assert code == 0 and out.splitlines()[0].split() == ["REVISION", "CHANGE", "UPDATED"]
    code, out = run("members", "tenant-a/web", "-o", "json")
    assert code == 0 and json.loads(out)["group"] == "web"
    code, out = run("realization", "tenant-a/shop", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["policy"] == "shop"
    code, out = run("delete", "workload", "tenant-b/db-1")
    assert code == 0 and "Workload/tenant-b/db-1 deleted" in out
    code, out = run("rollback", "workload", "tenant-b/db-1", "--to-revision", "2")
    assert code == 0 and "rolled back to revision 2" in out, out


def test_output_formats(manager: tuple[str, str, Manager]) -> None:
    assert run("apply", "-f", str(EXAMPLE))[0] == 0
    code, out = run("get", "workloads", "-o", "wide")
    header = out.splitlines()[0].split()
    assert code == 0 and header[-2:] == ["HOST", "LABELS"], out
    assert all(line == line.rstrip() for line in out.splitlines())  # no hand padding left behind
    code, out = run("get", "workloads")
    assert code == 0 and "LABELS" not in out and len(out.splitlines()) == 11
    code, out = run("status", "-o", "json")
    assert code == 0 and json.loads(out)["revision"] == 2 and "host-1" in json.loads(out)["hosts"]
    code, out = run("status")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["HOST", "CONNECTED", "DESIRED"]
    code, out = run("token", "list", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)[0]["role"] == "provider-admin"
    code, out = run("token", "list", "-o", "wide")
    assert code == 0 and "CREATED BY" in out
    code, out = run("status", "-o", "xml")
    assert code == 2 and "expected one of table, wide, json, yaml" in out


def test_audit_newest_first_paginated_filtered(manager: tuple[str, str, Manager]) -> None:
    for _ in range(3):
        assert run("apply", "-f", str(EXAMPLE))[0] == 0
        assert run("delete", "workload", "tenant-a/db-1")[0] == 0
    code, out = run("audit", "--limit", "2", "-o", "json")
    items = json.loads(out)
    assert code == 0 and len(items) == 2
    assert items[0]["time"] >= items[1]["time"] and items[0]["revision"] > items[1]["revision"]
    assert items[0]["action"] == "delete"
    code, out = run("audit", "--kind", "workload", "--name", "tenant-a/db-1", "--action", "create")
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 3 and all("create" in r and "tenant-a/db-1" in r for r in rows), out
    code, out = run("audit", "--oldest-first", "--limit", "1", "-o", "json")
    page = json.loads(out)
    assert code == 0 and page["items"][0]["revision"] == 2 and page["continue"]
    code, out = run("audit", "--oldest-first", "--limit", "1", "--continue", page["continue"], "-o", "json")
    assert code == 0 and json.loads(out)["items"][0] != page["items"][0]


def test_audit_follow_streams_new_entries(manager: tuple[str, str, Manager], tmp_path: Path) -> None:
    url, token, _ = manager
    env = {**os.environ, "OMNIWALL_SERVER": url, "OMNIWALL_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omniwall.cli.main", "audit", "--follow", "--kind", "tenant"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the stream is open (a cold start of the CLI)
        f = tmp_path / "t.yaml"
        f.write_text("kind: Tenant\nmetadata: {name: late}\n")
        assert run("apply", "-f", str(f))[0] == 0
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no line streamed"
        line = proc.stdout.readline()
        assert "create" in line and "Tenant/late/late" in line, line
    finally:
        proc.terminate()  # by its own PID
        proc.wait(10)


def test_identity_and_posture_verbs(manager: tuple[str, str, Manager]) -> None:
    assert run("apply", "-f", str(EXAMPLE))[0] == 0
    code, out = run("identity", "login", "tenant-a/web-1", "--user", "alice", "-o", "json")
    assert code == 0 and json.loads(out)["attributes"]["user"] == ["alice"], out
    code, out = run("identity", "logout", "web-1", "-t", "tenant-a", "--user", "alice")
    assert code == 0 and "changed" in out and "user" not in out.split(":", 1)[1]
    code, out = run("posture", "report", "tenant-a/web-1", "av.status=infected", "av.score=3")
    assert code == 0 and 'av.status="infected"' in out and "av.score=3" in out, out
    code, out = run("members", "quarantined", "-t", "infra", "-o", "json")
    assert "tenant-a/web-1" in [w["workload"] for w in json.loads(out)["workloads"]]
    code, out = run("posture", "report", "tenant-a/web-1", "os.family=linux")
    assert code == 1 and "os.family" in out


def test_config_contexts(
    manager: tuple[str, str, Manager], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, token, _ = manager
    monkeypatch.delenv("OMNIWALL_SERVER")
    monkeypatch.delenv("OMNIWALL_TOKEN")
    (tmp_path / "good.token").write_text(token + "\n")
    code, out = run(
        "config", "set-context", "lab", "--server", url, "--token-file", str(tmp_path / "good.token")
    )
    assert code == 0
    code, out = run("config", "set-context", "dead", "--server", "http://127.0.0.1:9", "--token", "x")
    assert code == 0
    assert (os.stat(tmp_path / "config.yaml").st_mode & 0o777) == 0o600
    code, out = run("config", "current-context")
    assert code == 0 and out.strip() == "lab"  # the first context becomes current
    code, out = run("status", "-o", "json")
    assert code == 0 and "revision" in json.loads(out)
    code, out = run("config", "use-context", "dead")
    assert code == 0
    code, out = run("config", "get-contexts")
    rows = {r.lstrip("* ").split()[0]: r for r in out.splitlines()[1:]}
    assert code == 0 and rows["dead"].startswith("*") and not rows["lab"].startswith("*"), out
    code, out = run("status")
    assert code == 1 and "cannot reach the manager at http://127.0.0.1:9" in out
    monkeypatch.setenv("OMNIWALL_CONTEXT", "lab")  # one command, another context
    assert run("status")[0] == 0
    monkeypatch.setenv("OMNIWALL_CONTEXT", "nope")
    code, out = run("status")
    assert code == 1 and "context 'nope'" in out
    monkeypatch.delenv("OMNIWALL_CONTEXT")
    code, out = run("config", "use-context", "nope")
    assert code == 2 and "contexts: dead, lab" in out
    assert run("config", "delete-context", "dead")[0] == 0
    code, out = run("config", "current-context")
    assert code == 2


def test_offline_commands_take_output() -> None:
    code, out = run("validate", "-f", str(EXAMPLE), "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["counts"]["Workload"] == 10
    code, out = run("compile", "-f", str(EXAMPLE), "--host", "host-1", "-o", "json")
    assert code == 0 and json.loads(out)["host"] == "host-1"
    code, out = run("validate", "-f", str(EXAMPLE), "-o", "xml")
    assert code == 2 and "expected text, json or yaml" in out

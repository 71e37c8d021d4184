"""`omniwall validate | compile | explain` on the three-tier example: verdicts, exit codes, and errors
that name the problem (stderr, exit 2) instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from omniwall.cli.main import app
from omniwall.compiler.ir import HostDesiredState

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "three-tier"

runner = CliRunner()


def run(*args: str) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        result.exception
    )
    return result


def explain(*args: str) -> Result:
    return run("explain", "-f", str(EXAMPLE), *args)


# ---------------------------------------------------------------------------------------------- validate


def test_validate_example_counts_kinds() -> None:
    r = run("validate", "-f", str(EXAMPLE))
    assert r.exit_code == 0, r.output
    assert "valid:" in r.stdout and "10 Workloads" in r.stdout and "3 Hosts" in r.stdout
    assert "4 Policies" in r.stdout
    r = run("validate", "-f", str(EXAMPLE), "--json")
    assert json.loads(r.stdout)["counts"]["Workload"] == 10


def test_validate_accepts_shell_expanded_globs() -> None:
    files = sorted(str(p) for p in EXAMPLE.glob("*.yaml"))
    r = run("validate", "-f", *files)
    assert r.exit_code == 0, r.output
    assert "10 Workloads" in r.stdout


def test_validate_bad_field_names_file_object_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: Policy\nmetadata: {name: p, tenant: tenant-a}\nspec:\n"
        "  rules:\n  - {name: r, action: alow, sources: [web], destinations: [app]}\n"
    )
    r = run("validate", "-f", str(EXAMPLE), "-f", str(bad))
    assert r.exit_code == 2
    assert r.stdout == ""
    assert "bad.yaml#1" in r.stderr and "Policy/tenant-a/p" in r.stderr
    assert "spec.rules[0].action" in r.stderr and "alow" in r.stderr


def test_validate_reference_error(tmp_path: Path) -> None:
    bad = tmp_path / "ref.yaml"
    bad.write_text(
        "kind: Policy\nmetadata: {name: p, tenant: tenant-a}\nspec:\n"
        "  rules:\n  - {name: r, action: allow, sources: [nosuch], destinations: [app]}\n"
    )
    r = run("validate", "-f", str(EXAMPLE), str(bad))
    assert r.exit_code == 2
    assert "spec.rules[0].sources" in r.stderr and "nosuch" in r.stderr


def test_validate_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    bad = tmp_path / "syntax.yaml"
    bad.write_text("kind: Tenant\nmetadata: {name: x\n")
    r = run("validate", "-f", str(bad))
    assert r.exit_code == 2 and "syntax.yaml:" in r.stderr and "invalid YAML" in r.stderr


def test_validate_missing_file_and_no_input(tmp_path: Path) -> None:
    r = run("validate", "-f", str(tmp_path / "nope.yaml"))
    assert r.exit_code == 2 and "nope.yaml" in r.stderr and "cannot read" in r.stderr
    r = run("validate")
    assert r.exit_code == 2 and "no input" in r.stderr


# ----------------------------------------------------------------------------------------------- compile


def test_compile_human_summary() -> None:
    r = run("compile", "-f", str(EXAMPLE), "--host", "host-1")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("host host-1 (revision 0):")
    # host-1 runs dns-1, tenant-a/web-1 and tenant-b/db-1.
    for w in ("infra/dns-1", "tenant-a/web-1", "tenant-b/db-1"):
        assert w in out
    assert "host-2" not in out
    assert "egress:" in out and "ingress:" in out
    assert "infra/quarantine/drop-from-quarantined" in out
    assert "tenant-a/shop/web-to-app" in out
    # Categories appear in evaluation order within a hop.
    assert out.index("emergency") < out.index("infrastructure") < out.index("application")


def test_compile_json_round_trips() -> None:
    r = run("compile", "-f", str(EXAMPLE), "--host", "host-2", "--json")
    assert r.exit_code == 0, r.output
    state = HostDesiredState.from_json(json.loads(r.stdout))
    assert state.host == "host-2"
    assert {v.workload for v in state.vnics} == {
        "infra/ntp-1",
        "tenant-a/app-1",
        "tenant-a/infected-1",
        "tenant-b/web-1",
    }
    r = run("compile", "-f", str(EXAMPLE), "--json")
    assert set(json.loads(r.stdout)) == {"host-1", "host-2", "host-3"}


def test_compile_unknown_host() -> None:
    r = run("compile", "-f", str(EXAMPLE), "--host", "host-9")
    assert r.exit_code == 2 and "unknown host 'host-9'" in r.stderr and "host-1" in r.stderr


# ----------------------------------------------------------------------------------------------- explain


@pytest.mark.parametrize("tenant", ["tenant-a", "tenant-b"])
def test_explain_web_to_app_allowed(tenant: str) -> None:
    policy = "shop" if tenant == "tenant-a" else "crm"
    r = explain("--from", f"{tenant}/web-1", "--to", f"{tenant}/app-1", "--proto", "tcp", "--port", "8080")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if f"{tenant}/{policy}/web-to-app (id " in ln]
    assert len(lines) == 2
    assert "egress" in lines[0] and "ingress" in lines[1]
    assert "ALLOWED" in r.stdout
    assert "conntrack: established" in r.stdout  # the reply


def test_explain_app_to_db_allowed() -> None:
    r = explain("--from", "tenant-a/app-1", "--to", "tenant-a/db-1", "--proto", "tcp", "--port", "5432")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("tenant-a/shop/app-to-db (id ") == 2


def test_explain_web_to_db_denied_by_default() -> None:
    r = explain("--from", "tenant-a/web-1", "--to", "tenant-a/db-1", "--proto", "tcp", "--port", "5432")
    assert r.exit_code == 1, r.output
    assert "DENIED" in r.stdout
    assert "default (tenant tenant-a: drop)" in r.stdout


def test_explain_cross_tenant_denied() -> None:
    r = explain("--from", "tenant-a/web-1", "--to", "tenant-b/app-1", "--proto", "tcp", "--port", "8080")
    assert r.exit_code == 1, r.output
    egress = next(ln for ln in r.stdout.splitlines() if "egress" in ln)
    assert "drop" in egress and "default (tenant tenant-a: drop)" in egress


def test_explain_infected_quarantined_but_reaches_remediation() -> None:
    r = explain("--from", "infected-1", "--to", "tenant-a/app-1", "--proto", "tcp", "--port", "8080")
    assert r.exit_code == 1, r.output
    assert "infra/quarantine/drop-from-quarantined (id " in r.stdout
    r = explain("--from", "infected-1", "--to", "remediation-1", "--proto", "tcp", "--port", "80")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("infra/quarantine/allow-remediation (id ") == 2


def test_explain_to_dns_and_to_an_address() -> None:
    r = explain("--from", "tenant-b/db-1", "--to", "dns-1", "--proto", "udp", "--port", "53")
    assert r.exit_code == 0, r.output
    assert "infra/infra-services/dns (id " in r.stdout
    # To an address outside the inventory: one hop, the source's egress.
    r = explain("--from", "tenant-a/app-1", "--to", "192.0.2.1", "--proto", "tcp", "--port", "443")
    assert r.exit_code == 1
    assert "default (tenant tenant-a: drop)" in r.stdout
    r = explain("--from", "tenant-a/app-1", "--to", "10.1.0.3", "--proto", "tcp", "--port", "5432")
    assert r.exit_code == 0  # the address of tenant-a/db-1


def test_explain_json() -> None:
    r = explain(
        "--from", "tenant-a/web-1", "--to", "tenant-a/db-1", "--proto", "tcp", "--port", "5432", "--json"
    )
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["allowed"] is False and data["verdict"] == "drop" and data["reply"] is None
    hops = data["request"]["hops"]
    assert [h["direction"] for h in hops] == ["egress", "ingress"]
    assert hops[0]["reason"] == "default" and hops[0]["decision"] == "default (tenant tenant-a: drop)"
    assert hops[1]["reached"] is False


def test_explain_icmp() -> None:
    r = explain("--from", "tenant-a/web-1", "--to", "tenant-a/app-1", "--proto", "icmp")
    assert r.exit_code == 1 and "icmp 10.1.0.1 -> 10.1.0.2 type 8" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "web-1", "--to", "tenant-a/app-1", "--port", "80"], "ambiguous"),
        (
            ["--from", "tenant-a/web-9", "--to", "tenant-a/app-1", "--port", "80"],
            "unknown workload 'tenant-a/web-9'",
        ),
        (["--from", "web-2", "--to", "app-1x", "--port", "80"], "unknown workload 'web-2'"),
        (["--from", "tenant-a/web-1", "--to", "tenant-a/app-1"], "--port"),
        (
            ["--from", "tenant-a/web-1", "--to", "tenant-a/app-1", "--proto", "sctp", "--port", "80"],
            "protocol",
        ),
        (["--from", "tenant-a/web-1", "--to", "tenant-a/app-1", "--port", "70000"], "70000"),
        (["--from", "tenant-a/web-1", "--to", "fd00::1", "--port", "80"], "IP version"),
        (["--to", "tenant-a/app-1", "--port", "80"], "--from"),
    ],
)
def test_explain_bad_input(args: list[str], message: str) -> None:
    r = explain(*args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stdout == ""


def test_real_process_errors_go_to_stderr_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Widget\nmetadata: {name: x}\n")
    p = subprocess.run(
        [sys.executable, "-m", "omniwall.cli.main", "validate", "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert "unknown kind 'Widget'" in p.stderr and "Traceback" not in p.stderr


def test_demo_flows_match_the_design(capsys: pytest.CaptureFixture[str]) -> None:
    from omniwall import demo

    assert demo.main([str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "flows as the design says" in out and "UNEXPECTED" not in out
    catalog, states = demo.load_example(EXAMPLE)
    results = demo.explain_flows(catalog, states, demo.demo_flows())
    assert len(results) >= 10 and all(r.as_expected for r in results)
    # A flow whose expectation is wrong is reported, not hidden.
    wrong = demo.Flow("bogus", "tenant-a/web-1", "tenant-a/db-1", "tcp", 5432, True)
    assert not demo.explain_flows(catalog, states, [wrong])[0].as_expected


def test_usage_errors_exit_2_without_traceback() -> None:
    r = explain("--from", "tenant-a/web-1", "--to", "tenant-a/app-1", "--port", "eighty")
    assert r.exit_code == 2 and "--port" in r.stderr
    r = run("compile", "--bogus")
    assert r.exit_code == 2 and "--bogus" in r.stderr


def test_explain_stateless_policy_shows_the_refused_reply(tmp_path: Path) -> None:
    for f in EXAMPLE.glob("*.yaml"):
        text = f.read_text()
        if f.name == "tenant-a.yaml":
            text = text.replace("  priority: 1000\n", "  priority: 1000\n  stateful: false\n", 1)
        (tmp_path / f.name).write_text(text)
    r = run(
        "explain", "-f", str(tmp_path), "--from", "tenant-a/web-1", "--to", "tenant-a/app-1", "--port", "8080"
    )
    assert r.exit_code == 1, r.output
    request, reply = r.stdout.split("  reply:")
    assert request.count("[untracked]") == 2 and "tenant-a/shop/web-to-app" in request
    assert "conntrack: invalid" in reply

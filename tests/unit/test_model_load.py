"""Loading YAML: multi-document files, schema errors with document/object/path, round trip."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from omniwall.model.errors import FieldError, ValidationError
from omniwall.model.loader import dump_yaml, format_path, load_files, load_text, source_of
from omniwall.model.resources import Group, Policy, Tenant, Workload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "three-tier"


def errors_of(text: str, source: str = "x.yaml") -> list[FieldError]:
    with pytest.raises(ValidationError) as info:
        load_text(text, source)
    return info.value.errors


def only_error(text: str) -> FieldError:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_multi_document_and_empty_documents() -> None:
    text = """
---
kind: Tenant
metadata: {name: tenant-a}
---
# only a comment
---
kind: Group
metadata: {name: web, tenant: tenant-a}
spec: {selector: 'tier == "web"'}
"""
    rs = load_text(text, "t.yaml")
    assert [type(r) for r in rs] == [Tenant, Group]
    assert rs[1].key == ("Group", "tenant-a", "web")
    assert source_of(rs[0]) == "t.yaml#1"
    assert source_of(rs[1]) == "t.yaml#3"
    assert load_text("") == []


def test_field_error_str_and_validation_error_message() -> None:
    e = FieldError(
        "examples/x.yaml#3", "spec.rules[2].services", "unknown service 'htp'", "Policy/tenant-a/p"
    )
    assert str(e) == "examples/x.yaml#3 Policy/tenant-a/p: spec.rules[2].services: unknown service 'htp'"
    assert str(FieldError("", "spec.host", "unknown host 'h'")) == "spec.host: unknown host 'h'"
    err = ValidationError([e, FieldError("y.yaml:1:2", "", "invalid YAML: x")])
    assert err.errors[0] is e
    assert str(err) == f"2 errors:\n  {e}\n  y.yaml:1:2: invalid YAML: x"
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and str(again) == str(err)


def test_schema_error_names_document_object_and_path() -> None:
    text = """
kind: Tenant
metadata: {name: tenant-a}
---
kind: Policy
metadata: {name: web-policy, tenant: tenant-a}
spec:
  rules:
    - {name: r0, action: allow}
    - {name: r1, action: allow}
    - {name: r2, action: permit}
"""
    e = only_error(text)
    assert e.document == "x.yaml#2"
    assert e.resource == "Policy/tenant-a/web-policy"
    assert e.path == "spec.rules[2].action"
    assert e.message == "Input should be 'allow', 'drop', 'reject' or 'pass' (got 'permit')"
    assert str(e).startswith("x.yaml#2 Policy/tenant-a/web-policy: spec.rules[2].action: Input should")


@pytest.mark.parametrize(
    ("doc", "path", "fragment"),
    [
        ("kind: Tenant\nmetadata: {}", "metadata.name", "required field is missing"),
        ("kind: Tenant\nmetadata: {name: Bad_Name}", "metadata.name", "'Bad_Name' is not a valid name"),
        (
            "kind: Policy\nmetadata: {name: p}\nspec: {rules: [{name: r, action: allow, sorces: [any]}]}",
            "spec.rules[0].sorces",
            "unknown field (did you mean 'sources'?)",
        ),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {protokol: tcp}",
            "spec.protokol",
            "did you mean 'protocol'",
        ),
        (
            "kind: Host\nmetadata: {name: h}\nspec: {zzz: 1}",
            "spec.zzz",
            "unknown field (allowed: address, vnicInterfaces)",
        ),
        ("kind: Service\nmetadata: {name: s}\nspec: {ports: [70000]}", "spec.ports", "outside 1..65535"),
        (
            "kind: Policy\nmetadata: {name: p}\nspec: {rules: [{name: r, action: allow, services: [tcp/0]}]}",
            "spec.rules[0].services",
            "'tcp/0': port '0' is outside 1..65535",
        ),
        (
            "kind: Group\nmetadata: {name: g}\nspec: {selector: 'tier = \"web\"'}",
            "spec.selector",
            "selector 'tier = \"web\"': column 6: expected '==', '!=', 'in' or 'not in'",
        ),
        ("kind: Group\nmetadata: {name: g}\nspec: {cidrs: [10.0.0.0/33]}", "spec.cidrs", "is not a CIDR"),
        (
            "kind: Workload\nmetadata: {name: w}\nspec: {host: h, vnics: [{ips: [1.2.3]}]}",
            "spec.vnics[0].ips",
            "'1.2.3' is not an IPv4 or IPv6 address",
        ),
        (
            "kind: Workload\nmetadata: {name: w, labels: {rack: 3}}\nspec: {host: h}",
            "metadata.labels.rack",
            'quote it in YAML: "3"',
        ),
        (
            "kind: Workload\nmetadata: {name: w, labels: {app.kubernetes.io/name: [x]}}\nspec: {host: h}",
            'metadata.labels["app.kubernetes.io/name"]',
            "Input should be a valid string",
        ),
        (
            "kind: Workload\nmetadata: {name: w}\nspec: {host: h, attributes: {x: {y: 1}}}",
            "spec.attributes.x",
            "expected a string, an integer, a number, a boolean or a list (got {'y': 1})",
        ),
        ("kind: Workload\nmetadata: {name: w}\nspec: {}", "spec.host", "required field is missing"),
        ("kind: Policy\nmetadata: {name: p}\nspec: {category: urgent}", "spec.category", "(got 'urgent')"),
        ("kind: Polcy\nmetadata: {name: p}", "kind", "unknown kind 'Polcy' (did you mean 'Policy'?)"),
        ("metadata: {name: p}", "kind", "required field is missing (one of Application, Group, Host,"),
        ("kind: 3", "kind", "unknown kind 3"),
        ("- a\n- b", "", "a document must be a mapping with kind, metadata and spec, got list"),
    ],
)
def test_schema_errors(doc: str, path: str, fragment: str) -> None:
    e = only_error(doc)
    assert e.document == "x.yaml#1"
    assert e.path == path
    assert fragment in e.message, e.message


def test_yaml_syntax_error_names_file_line_and_column() -> None:
    e = only_error("kind: Tenant\nmetadata: {name: [a}\n")
    assert e.document == "x.yaml:2:20"
    assert e.message.startswith("invalid YAML: ")


def test_duplicate_yaml_key_is_an_error() -> None:
    e = only_error("kind: Tenant\nmetadata:\n  name: a\n  name: b\n")
    assert e.document == "x.yaml:4:3"
    assert "duplicate key 'name' (first at line 3)" in e.message


def test_dates_stay_strings() -> None:
    (t,) = load_text("kind: Tenant\nmetadata: {name: a, created: 2024-01-01}")
    assert t.metadata.created == "2024-01-01"


def test_all_errors_of_all_documents_in_one_pass() -> None:
    text = """
kind: Tenant
metadata: {name: OK-no}
---
kind: Service
metadata: {name: s}
spec: {protocol: sctp}
---
kind: Tenant
metadata: {name: fine}
"""
    errs = errors_of(text)
    assert [(e.document, e.path) for e in errs] == [
        ("x.yaml#1", "metadata.name"),
        ("x.yaml#2", "spec.protocol"),
    ]


def test_load_files_collects_errors_of_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: Tenant\nmetadata: {name: a}\n---\nkind: Nope\n")
    (tmp_path / "b.yaml").write_text("kind: Tenant\nmetadata: [\n")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValidationError) as info:
        load_files([tmp_path / "a.yaml", tmp_path / "b.yaml", missing])
    docs = [e.document for e in info.value.errors]
    assert docs == [f"{tmp_path}/a.yaml#2", f"{tmp_path}/b.yaml:3:1", str(missing)]
    assert "cannot read file" in info.value.errors[2].message


def test_load_files_expands_directories(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.yaml").write_text("kind: Tenant\nmetadata: {name: b}\n")
    (tmp_path / "sub" / "a.yml").write_text("kind: Tenant\nmetadata: {name: a}\n")
    (tmp_path / "notes.txt").write_text("not yaml")
    rs = load_files([tmp_path])
    assert [r.name for r in rs] == ["b", "a"]  # sorted paths: b.yaml < sub/a.yml


def test_examples_load() -> None:
    rs = load_files([EXAMPLES])
    kinds = {r.kind for r in rs}
    assert kinds == {"Tenant", "Host", "Workload", "Group", "Service", "Application", "Policy"}
    assert sum(isinstance(r, Workload) for r in rs) == 3 + 4 + 3
    assert all(source_of(r).startswith(str(EXAMPLES)) for r in rs)


def test_yaml_round_trip() -> None:
    rs = load_files([EXAMPLES])
    text = dump_yaml(rs)
    again = load_text(text, "dump")
    assert again == rs
    assert dump_yaml(again) == text
    first = text.split("---\n")[0]
    assert first.startswith("apiVersion: omniwall.io/v1\nkind: ")


def test_round_trip_keeps_value_types() -> None:
    text = """
kind: Workload
metadata: {name: w, tenant: t, labels: {version: "3", flag: "true"}}
spec:
  host: h
  attributes: {n: 3, f: 1.5, b: true, s: "007", l: [a, b], d: "2024-01-01"}
  vnics: [{name: eth0, ips: ["10.0.0.1", "fd00::1"], mac: "52:54:00:AA:bb:cc"}]
---
kind: Policy
metadata: {name: p, tenant: t}
spec:
  rules: [{name: r, sources: [10.0.0.0/8], services: [tcp/80, udp/1000-2000], action: allow}]
"""
    rs = load_text(text)
    assert load_text(dump_yaml(rs)) == rs
    w = rs[0]
    assert isinstance(w, Workload) and isinstance(rs[1], Policy)
    assert w.spec.attributes == {"n": 3, "f": 1.5, "b": True, "s": "007", "l": ["a", "b"], "d": "2024-01-01"}


def test_format_path() -> None:
    assert format_path(("spec", "rules", 2, "action")) == "spec.rules[2].action"
    assert format_path(("metadata", "labels", "a b")) == 'metadata.labels["a b"]'
    assert format_path(()) == ""

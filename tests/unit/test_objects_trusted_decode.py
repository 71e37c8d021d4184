"""The start-up load constructs stored objects without re-validation (`decode(..., trusted=True)`): it must
give exactly what validation gives, and fall back to validation for anything the schema does not know."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from omniwall.compiler.testing import group, host, md, policy, service, tenant, workload
from omniwall.manager.objects import decode, encode
from omniwall.model.loader import load_files
from omniwall.model.resources import (
    Application,
    ApplicationSpec,
    ConnectionLimit,
    Rule,
    Vnic,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _resources() -> list[object]:
    out: list[object] = [
        host("h1"),
        tenant("t1", mode="monitor", defaultAction="reject", connectionLimit=ConnectionLimit(perWorkload=5)),
        workload(
            "t1",
            "w1",
            "h1",
            [Vnic(name="eth0", ips=["10.0.0.1", "fd00::1"], mac="02:00:00:00:00:01"), Vnic(name="eth1")],
            {"app": "a", "tier": "web"},
            attributes={"os": "linux", "n": 3, "tags": ["x", "y"]},
        ),
        group("t1", "g", 'app == "a"', cidrs=["10.1.0.0/16"], shareWith=[]),
        service("infra", "web", "tcp", [80, "8000-8080"]),
        policy(
            "t1",
            "p",
            Rule(name="r1", sources=["g"], services=["tcp/22"], action="drop", direction="in", log=True),
            Rule(name="r2", destinations=["10.0.0.0/8"], action="allow"),
            category="environment",
            priority=7,
        ),
        Application(metadata=md("app", "t1"), spec=ApplicationSpec(description="d")),
    ]
    for f in sorted(EXAMPLES.glob("*/*.yaml")):
        try:
            out += load_files([f])
        except Exception:  # examples of other formats (k8s manifests)
            continue
    return out


@pytest.mark.parametrize("r", _resources(), ids=lambda r: "/".join(r.key) if hasattr(r, "key") else "?")
def test_trusted_decode_equals_validation(r: object) -> None:
    stored = encode(r)  # type: ignore[arg-type]
    a = decode(stored, 42)
    b = decode(stored, 42, trusted=True)
    assert b == a
    assert repr(b) == repr(a)  # field order, enums, nested models
    assert b.model_fields_set == a.model_fields_set
    assert b.metadata.model_fields_set == a.metadata.model_fields_set
    assert encode(b) == stored
    assert b.metadata.revision == 42
    assert type(b.spec) is type(a.spec)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):  # still frozen
        b.metadata.name = "x"  # type: ignore[misc]


def test_trusted_decode_falls_back_to_validation() -> None:
    good = json.loads(encode(workload("t1", "w1", "h1", [Vnic(name="eth0", ips=["10.0.0.1"])])))
    unknown = dict(good, spec=dict(good["spec"], bogus=1))
    with pytest.raises(ValidationError):
        decode(json.dumps(unknown), 1, trusted=True)
    missing = dict(good, spec={k: v for k, v in good["spec"].items() if k != "host"})
    with pytest.raises(ValidationError):
        decode(json.dumps(missing), 1, trusted=True)
    bad_enum = json.loads(encode(policy("t1", "p", Rule(name="r", action="drop"))))
    bad_enum["spec"]["rules"][0]["action"] = "explode"
    with pytest.raises(ValidationError):
        decode(json.dumps(bad_enum), 1, trusted=True)
    not_a_model = dict(good, spec="w1")
    with pytest.raises(ValidationError):
        decode(json.dumps(not_a_model), 1, trusted=True)

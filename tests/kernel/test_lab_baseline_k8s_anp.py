"""The provider `baseline` category and the AdminNetworkPolicy example, in a real lab (standalone:
compiler + nftables in host namespaces, real connections between workload namespaces)."""

from __future__ import annotations

from pathlib import Path

from labhelpers import STANDALONE_MARKS, TWO_HOSTS, netns_list
from omniwall.k8s import import_files
from omniwall.k8s.output import to_yaml
from omniwall.lab import Lab

pytestmark = STANDALONE_MARKS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "k8s-anp"

BASELINE = """
kind: Tenant
metadata: {name: t1}
spec: {defaultAction: allow}
---
kind: Group
metadata: {name: all}
spec: {selector: '!has(no-such-label)'}
---
kind: Policy
metadata: {name: base}
spec:
  category: baseline
  rules:
    - {name: no-80, destinations: [all], services: [tcp/80], action: drop}
---
kind: Group
metadata: {name: c, tenant: t1}
spec: {workloads: [c]}
---
kind: Policy
metadata: {name: app, tenant: t1}
spec:
  rules:
    - {name: c-web, destinations: [c], services: [tcp/80], action: allow}
"""


def test_baseline_drop_applies_unless_the_tenant_allows() -> None:
    with Lab.up(TWO_HOSTS + "---" + BASELINE, policy=True) as lab:
        prefix = lab.prefix
        assert lab.probe("a", "c", "tcp", 80)  # the tenant's allow overrides the baseline drop
        assert not lab.probe("a", "b", "tcp", 80, timeout=0.5)  # the tenant says nothing: baseline
        assert lab.probe("a", "c", "udp", 53)  # the baseline does not match: tenant default (allow)
        wrong = [e for e in lab.matrix("tcp/80,udp/53", expect=True) if not e.agrees]
        assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
    assert not {n for n in netns_list() if n.startswith(prefix)}


def test_k8s_anp_example_in_a_lab(tmp_path: Path) -> None:
    result = import_files([EXAMPLE], "shop")
    imported = tmp_path / "shop-anp.yaml"
    imported.write_text(to_yaml(result.resources))
    with Lab.up([EXAMPLE / "00-hosts.yaml", imported], policy=True) as lab:
        prefix = lab.prefix
        assert lab.probe("web-1", "api-1", "tcp", 8081)  # ANP Pass -> NetworkPolicy allows
        assert not lab.probe("web-1", "db-1", "tcp", 5432, timeout=0.5)  # Pass -> NP isolation drops
        assert lab.probe("prom-1", "db-1", "tcp", 9187)  # ANP Allow (named port) beats NP isolation
        assert not lab.probe("dev-1", "web-1", "tcp", 8080, timeout=0.5)  # ANP Deny
        assert not lab.probe("api-1", "web-1", "tcp", 8080, timeout=0.5)  # BANP Deny
        assert lab.probe("dev-1", "prom-1", "tcp", 9090)  # NP allow overrides the BANP
        wrong = [e for e in lab.matrix(expect=True) if not e.agrees]
        assert not wrong, "\n".join(f"{e.json_line()} ({e.detail})" for e in wrong)
    assert not {n for n in netns_list() if n.startswith(prefix)}

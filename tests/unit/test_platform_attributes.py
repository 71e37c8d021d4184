"""A tenant cannot set or change the `k8s.*` attributes its pods are selected by (the gap the ANP import
left open: a tenant admin moving its pod out of a provider AdminNetworkPolicy Deny's subject)."""

from __future__ import annotations

from typing import Any

import pytest
from apihelpers import auth, blank_client, issue_tokens, seeded_manager, use_manager
from fastapi.testclient import TestClient

from omniwall.store.memory import MemoryStore

WORLD = """
kind: Tenant
metadata: {name: shop}
---
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: pod-1, tenant: shop, labels: {app: web}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.1.0.1]}]
  attributes: {k8s.namespace: dev, k8s.namespace.labels.env: dev}
"""


def pod(name: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "Workload",
        "metadata": {"name": name, "tenant": "shop", "labels": {"app": "web"}},
        "spec": {"host": "h1", "vnics": [{"name": "eth0", "ips": ["10.1.0.9"]}], "attributes": attributes},
    }


@pytest.fixture(scope="module")
def client() -> TestClient:
    return blank_client()


@pytest.fixture
def tokens(client: TestClient) -> dict[str, dict[str, str]]:
    m = seeded_manager(MemoryStore(), WORLD)
    use_manager(client, m)
    raw = issue_tokens(m, {"admin": ("provider-admin", {}), "ta": ("tenant-admin", {"tenant": "shop"})})
    return {k: auth(v) for k, v in raw.items()}


def test_a_tenant_cannot_create_a_pod_in_a_namespace(client: TestClient, tokens) -> None:
    r = client.post("/v1/workloads", json=pod("pod-2", {"k8s.namespace": "prod"}), headers=tokens["ta"])
    assert r.status_code == 403, r.text
    assert "k8s.namespace" in r.text and "provider.write" in r.text
    assert client.get("/v1/workloads/pod-2?tenant=shop", headers=tokens["admin"]).status_code == 404
    # the platform (provider) registers pods with their namespace
    r = client.post("/v1/workloads", json=pod("pod-2", {"k8s.namespace": "prod"}), headers=tokens["admin"])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "attributes",
    [
        {"k8s.namespace": "prod", "k8s.namespace.labels.env": "dev"},  # moved
        {"k8s.namespace": "dev"},  # a namespace label dropped
        {"k8s.namespace": "dev", "k8s.namespace.labels.env": "prod"},  # relabelled
    ],
)
def test_a_tenant_cannot_move_or_relabel_its_pod(client: TestClient, tokens, attributes) -> None:
    body = pod("pod-1", attributes)
    body["spec"]["vnics"][0]["ips"] = ["10.1.0.1"]
    r = client.put("/v1/workloads/pod-1?tenant=shop", json=body, headers=tokens["ta"])
    assert r.status_code == 403, r.text
    got = client.get("/v1/workloads/pod-1?tenant=shop", headers=tokens["ta"]).json()
    assert got["spec"]["attributes"]["k8s.namespace"] == "dev"


def test_a_tenant_may_still_change_everything_else(client: TestClient, tokens) -> None:
    body = pod("pod-1", {"k8s.namespace": "dev", "k8s.namespace.labels.env": "dev", "os.family": "linux"})
    body["spec"]["vnics"][0]["ips"] = ["10.1.0.1"]
    body["metadata"]["labels"] = {"app": "api"}
    r = client.put("/v1/workloads/pod-1?tenant=shop", json=body, headers=tokens["ta"])
    assert r.status_code == 200, r.text

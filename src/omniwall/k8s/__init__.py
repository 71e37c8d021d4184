"""Kubernetes NetworkPolicy import: `networking.k8s.io/v1` NetworkPolicy -> Omniwall resources.

`read_inputs(paths)` parses the input files (NetworkPolicies, Namespaces, Omniwall Workloads),
`translate(...)` produces the equivalent resources; `import_files(paths, tenant)` does both.
The mapping and its limits: docs/k8s.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omniwall.k8s.inputs import K8sInputs, read_inputs
from omniwall.k8s.objects import K8sImportError, Namespace, NetworkPolicy
from omniwall.k8s.translate import ImportResult, translate
from omniwall.model.resources import Tenant, Workload


def import_files(paths: Iterable[str | Path], tenant: str) -> ImportResult:
    """Read `paths` and translate their NetworkPolicies for `tenant`; raises K8sImportError."""
    inputs = read_inputs(paths)
    workloads = [r for r in inputs.resources if isinstance(r, Workload)]
    tenants = [r for r in inputs.resources if isinstance(r, Tenant) and r.name == tenant]
    return translate(
        inputs.policies,
        tenant,
        namespaces=inputs.namespaces,
        workloads=workloads,
        tenant_resource=tenants[0] if tenants else None,
    )


__all__ = [
    "ImportResult",
    "K8sImportError",
    "K8sInputs",
    "Namespace",
    "NetworkPolicy",
    "import_files",
    "read_inputs",
    "translate",
]

"""Kubernetes policy import: `networking.k8s.io/v1` NetworkPolicy and `policy.networking.k8s.io/v1alpha1`
AdminNetworkPolicy / BaselineAdminNetworkPolicy -> Omniwall resources.

`read_inputs(paths)` parses the input files (policies, Namespaces, Omniwall Workloads and Hosts),
`translate(...)` produces the NetworkPolicies' resources, `translate_admin(...)` the admin policies'
(provider policies); `import_files(paths, tenant)` does all of it.
The mapping and its limits: docs/k8s.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omniwall.k8s.admin_translate import translate_admin
from omniwall.k8s.inputs import K8sInputs, read_inputs
from omniwall.k8s.objects import K8sImportError, Namespace, NetworkPolicy
from omniwall.k8s.translate import ImportResult, translate
from omniwall.model.resources import Host, Tenant, Workload


def import_files(paths: Iterable[str | Path], tenant: str) -> ImportResult:
    """Read `paths` and translate their NetworkPolicies for `tenant`; raises K8sImportError."""
    inputs = read_inputs(paths)
    workloads = [r for r in inputs.resources if isinstance(r, Workload)]
    tenants = [r for r in inputs.resources if isinstance(r, Tenant) and r.name == tenant]
    result = translate(
        inputs.policies,
        tenant,
        namespaces=inputs.namespaces,
        workloads=workloads,
        tenant_resource=tenants[0] if tenants else None,
    )
    if inputs.admin:
        hosts = [r for r in inputs.resources if isinstance(r, Host)]
        admin = translate_admin(inputs.admin, tenant, inputs.namespaces, workloads, hosts)
        result.resources.extend(admin.resources)
        result.warnings.extend(admin.warnings)
    return result


__all__ = [
    "ImportResult",
    "K8sImportError",
    "K8sInputs",
    "Namespace",
    "NetworkPolicy",
    "import_files",
    "read_inputs",
    "translate",
    "translate_admin",
]

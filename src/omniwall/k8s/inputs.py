"""Read the importer's input files: Kubernetes objects and Omniwall resources, side by side.

Accepted: `networking.k8s.io/v1` NetworkPolicy (and NetworkPolicyList), `v1` Namespace (and
NamespaceList), `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy and BaselineAdminNetworkPolicy
(and their Lists), `v1` List of those (what `kubectl get -o yaml` prints), and Omniwall resources
(`apiVersion: omniwall.io/v1`, e.g. the Workloads that declare pods' named ports). A path may be a file,
a directory (its *.yaml, *.yml, *.json files, sorted) or `-` (stdin).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from omniwall.k8s.admin_objects import ANP_KIND, BANP_KIND, AdminPolicy, parse_admin_policy
from omniwall.k8s.admin_objects import API_VERSION as ADMIN_API
from omniwall.k8s.objects import (
    K8sImportError,
    Namespace,
    NetworkPolicy,
    parse_namespace,
    parse_network_policy,
)
from omniwall.model.loader import format_path
from omniwall.model.resources import KINDS, Resource, _Resource

_OMNIWALL_API_PREFIX = "omniwall.io/"
_K8S_KINDS = {
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "Namespace"),
    (ADMIN_API, ANP_KIND),
    (ADMIN_API, BANP_KIND),
}
_K8S_LISTS = {
    ("networking.k8s.io/v1", "NetworkPolicyList"),
    ("v1", "NamespaceList"),
    ("v1", "List"),
    (ADMIN_API, f"{ANP_KIND}List"),
    (ADMIN_API, f"{BANP_KIND}List"),
}
_RESOURCE = TypeAdapter(Resource)


@dataclass
class K8sInputs:
    policies: list[NetworkPolicy] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    admin: list[AdminPolicy] = field(default_factory=list)  # AdminNetworkPolicies and the BANP
    resources: list[_Resource] = field(default_factory=list)  # Omniwall resources given alongside


def _files(paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(source name, text) per input file."""
    for raw in paths:
        if str(raw) == "-":
            yield "<stdin>", sys.stdin.read()
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
            )
            for p in found:
                yield str(p), p.read_text()
        elif path.is_file():
            yield str(path), path.read_text()
        else:
            raise K8sImportError([f"{path}: no such file or directory"])


def _documents(source: str, text: str) -> Iterator[tuple[str, Any]]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise K8sImportError([f"{source}: not valid YAML/JSON: {exc}"]) from None
    for i, doc in enumerate(docs):
        if doc is not None:
            yield (f"{source}#{i + 1}" if len(docs) > 1 else source), doc


def _omniwall_resource(doc: dict[str, Any], where: str) -> _Resource:
    try:
        return _RESOURCE.validate_python(doc)
    except ValidationError as exc:
        meta = doc.get("metadata")
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        problems = [
            f"{where}: {doc.get('kind')}/{name}: {format_path(e['loc'][1:]) or '(document)'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        raise K8sImportError(problems) from None


def _add(doc: Any, where: str, out: K8sInputs) -> None:
    if not isinstance(doc, dict):
        raise K8sImportError([f"{where}: a document must be a mapping with apiVersion and kind"])
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if (api, kind) in _K8S_LISTS:
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise K8sImportError([f"{where}: {kind}: items must be a list"])
        problems: list[str] = []
        for i, item in enumerate(items):
            try:
                _add(item, f"{where} items[{i}]", out)
            except K8sImportError as exc:
                problems.extend(exc.problems)
        if problems:
            raise K8sImportError(problems)
    elif (api, kind) == ("networking.k8s.io/v1", "NetworkPolicy"):
        out.policies.append(parse_network_policy(doc, where))
    elif (api, kind) == ("v1", "Namespace"):
        out.namespaces.append(parse_namespace(doc, where))
    elif (api, kind) in ((ADMIN_API, ANP_KIND), (ADMIN_API, BANP_KIND)):
        out.admin.append(parse_admin_policy(doc, where))
    elif (isinstance(api, str) and api.startswith(_OMNIWALL_API_PREFIX)) or (api is None and kind in KINDS):
        out.resources.append(_omniwall_resource(doc, where))
    else:
        supported = ", ".join(sorted(f"{a} {k}" for a, k in _K8S_KINDS | _K8S_LISTS))
        raise K8sImportError(
            [
                f"{where}: apiVersion {api!r} kind {kind!r} is not supported (expected {supported}, "
                "or an omniwall.io/v1 resource)"
            ]
        )


def read_inputs(paths: Iterable[str | Path]) -> K8sInputs:
    """Parse every document of every path; raise one K8sImportError listing all problems found."""
    out = K8sInputs()
    problems: list[str] = []
    for source, text in _files(paths):
        try:
            documents = list(_documents(source, text))
        except K8sImportError as exc:
            problems.extend(exc.problems)
            continue
        for where, doc in documents:
            try:
                _add(doc, where, out)
            except K8sImportError as exc:
                problems.extend(exc.problems)
    problems.extend(_duplicates(out))
    if problems:
        raise K8sImportError(problems)
    return out


def _duplicates(inputs: K8sInputs) -> list[str]:
    problems = []
    seen: dict[tuple[str, ...], str] = {}
    keys = [(("NetworkPolicy", p.namespace, p.name), p.source) for p in inputs.policies]
    keys += [(("Namespace", n.name), n.source) for n in inputs.namespaces]
    keys += [((a.kind, a.name), a.source) for a in inputs.admin]
    for key, source in keys:
        if key in seen:
            problems.append(f"{source}: {key[0]} {'/'.join(key[1:])} is also defined at {seen[key]}")
        else:
            seen[key] = source
    return problems

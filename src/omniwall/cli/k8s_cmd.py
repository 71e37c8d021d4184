"""`omniwall import k8s -f FILE... --tenant T [-o yaml|json]`: Kubernetes NetworkPolicy,
AdminNetworkPolicy and BaselineAdminNetworkPolicy -> Omniwall."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from omniwall.k8s import K8sImportError, import_files
from omniwall.k8s.output import to_json, to_yaml
from omniwall.model.resources import NAME_RE


class OutputFormat(StrEnum):
    YAML = "yaml"
    JSON = "json"


import_app = typer.Typer(
    help="Translate policies from other systems into Omniwall resources.", no_args_is_help=True
)


@import_app.command("k8s")
def import_k8s(
    files: list[Path] = typer.Option(
        ...,
        "-f",
        "--file",
        help="NetworkPolicy / AdminNetworkPolicy / BaselineAdminNetworkPolicy / Namespace YAML or JSON, "
        "Omniwall Workloads (the pods) and Hosts (the nodes) "
        "(repeat -f; a directory reads its *.yaml/*.yml/*.json; '-' reads stdin).",
    ),
    tenant: str = typer.Option(..., "--tenant", help="Tenant whose workloads are the pods."),
    output: OutputFormat = typer.Option(OutputFormat.YAML, "-o", "--output", help="yaml or json."),
) -> None:
    """Print Omniwall resources equivalent to Kubernetes network policies (docs/k8s.md)."""
    if not NAME_RE.fullmatch(tenant):
        typer.echo(f"error: --tenant {tenant!r} is not a valid tenant name", err=True)
        raise typer.Exit(2)
    try:
        result = import_files(files, tenant)
    except K8sImportError as exc:
        n = len(exc.problems)
        typer.echo(f"error: {n} problem{'s' if n != 1 else ''} in the input:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if output is OutputFormat.JSON:
        typer.echo(to_json(result.resources), nl=False)
    else:
        typer.echo(to_yaml(result.resources), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")

"""`omniwall pki`: a CA, manager certificates and one client certificate per host (omniwall.pki).

omniwall pki init --dir pki
omniwall pki manager --dir pki --san 10.0.0.1 --san manager.example.net
omniwall pki host host-1 --dir pki
omniwall pki show pki/hosts/host-1.crt
"""

from __future__ import annotations

from pathlib import Path

import typer

from omniwall import pki
from omniwall.cli.output import check_format, emit

DirOpt = typer.Option(Path("pki"), "--dir", help="the PKI directory (CA, manager and host certificates)")
DaysOpt = typer.Option(pki.LEAF_DAYS, "--days", help="validity in days")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    pki_app = typer.Typer(
        help="Certificates for mutual TLS between agents and managers.", no_args_is_help=True
    )
    app.add_typer(pki_app, name="pki")

    @pki_app.command("init")
    def init_cmd(
        d: Path = DirOpt,
        name: str = typer.Option("Omniwall CA", "--name", help="the CA's common name"),
        days: int = typer.Option(pki.CA_DAYS, "--days", help="validity in days"),
        force: bool = typer.Option(
            False, "--force", help="replace an existing CA (its certificates stop working)"
        ),
    ) -> None:
        """Create the CA (ca.crt, ca.key) in --dir."""
        try:
            out = pki.init_ca(d, name=name, days=days, force=force)
        except pki.PkiError as e:
            _fail(str(e))
        typer.echo(f"CA: {out.cert} (key {out.key}, mode 0600)")

    @pki_app.command("manager")
    def manager_cmd(
        d: Path = DirOpt,
        san: list[str] = typer.Option(
            ..., "--san", help="an IP address or DNS name agents use to reach the manager (repeat)"
        ),
        name: str = typer.Option("manager", "--name", help="file name stem: <dir>/<name>.crt, .key"),
        days: int = DaysOpt,
    ) -> None:
        """Issue (or re-issue: rotation) a manager certificate for the given addresses and names."""
        try:
            out = pki.issue_manager(d, san, out=pki.Issued(d / f"{name}.crt", d / f"{name}.key"), days=days)
        except pki.PkiError as e:
            _fail(str(e))
        typer.echo(f"manager certificate: {out.cert} (key {out.key}) for {', '.join(san)}")

    @pki_app.command("host")
    def host_cmd(
        host: str = typer.Argument(..., help="the host's name, as registered in the manager"),
        d: Path = DirOpt,
        days: int = DaysOpt,
    ) -> None:
        """Issue (or re-issue: rotation) the client certificate of one host's agent."""
        try:
            out = pki.issue_host(d, host, days=days)
        except pki.PkiError as e:
            _fail(str(e))
        typer.echo(f"host certificate: {out.cert} (key {out.key})")

    @pki_app.command("show")
    def show_cmd(
        cert: Path = typer.Argument(..., help="a certificate file"),
        output: str = typer.Option("json", "--output", "-o", help="json or yaml"),
    ) -> None:
        """Subject, SANs, serial and validity of a certificate."""
        check_format(output, ("json", "yaml"))
        try:
            emit(pki.describe(cert), output)
        except pki.PkiError as e:
            _fail(str(e))

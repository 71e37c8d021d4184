"""`omniwall libvirt install-hook`: make libvirt register its domains with Omniwall (docs/vms.md)."""

from __future__ import annotations

from pathlib import Path

import typer

libvirt_app = typer.Typer(help="libvirt integration: the QEMU hook (docs/vms.md).", no_args_is_help=True)


@libvirt_app.command("install-hook")
def install_hook(
    server: str = typer.Option(..., "--server", help="the manager's URL"),
    token_file: Path = typer.Option(
        ..., "--token-file", help="a token file the hook reads (tenant-admin or provider)"
    ),
    host: str = typer.Option(..., "--host", help="this hypervisor's Host name in Omniwall"),
    ca: Path | None = typer.Option(None, "--ca", help="CA bundle of the manager's certificate"),
    unannotated: str = typer.Option(
        "ignore", "--unannotated", help="domains without Omniwall metadata: ignore (left alone) or refuse"
    ),
    tenant: list[str] = typer.Option(
        None,
        "--tenant",
        help="a tenant domains on this host may name (repeat; default: what the token allows)",
    ),
    timeout: float = typer.Option(
        20.0, "--timeout", help="seconds to reach the manager and see the rules realized"
    ),
    log: Path = typer.Option(Path("/var/log/omniwall/libvirt-hook.log"), "--log", help="the hook's log"),
    manager_netns: Path | None = typer.Option(
        None, "--manager-netns", help="reach the manager from this network namespace file (the lab)"
    ),
    root: Path = typer.Option(Path("/"), "--root", help="install under this directory instead of /"),
    force: bool = typer.Option(False, "--force", help="replace a hook script that is not Omniwall's"),
) -> None:
    """Install /etc/libvirt/hooks/qemu and /etc/omniwall/libvirt-hook.json; restart libvirtd after."""
    from omniwall.libvirt.config import ConfigError, from_json
    from omniwall.libvirt.install import InstallError, install

    try:
        cfg = from_json(
            {
                "server": server,
                "tokenFile": str(token_file),
                "caFile": str(ca) if ca else None,
                "host": host,
                "unannotated": unannotated,
                "tenants": list(tenant) if tenant else None,
                "timeout": timeout,
                "log": str(log),
                "managerNetns": str(manager_netns) if manager_netns else None,
            },
            "options",
        )
        hook, conf = install(cfg, root=root, force=force)
    except (ConfigError, InstallError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"installed {hook} and {conf}; restart libvirtd so that it runs the hook")


def register(app: typer.Typer) -> None:
    app.add_typer(libvirt_app, name="libvirt")


__all__ = ["register"]

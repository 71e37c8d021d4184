"""`omniwall agent`: run the host agent. Mounted by `omniwall.cli.main` through `register(app)`.

Also runnable alone, `python -m omniwall.agent.cli --manager ... --host ...` (the kernel tests do that).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from omniwall.agent.guard import Guard
from omniwall.agent.main import DEFAULT_STATE_DIR, run_agent
from omniwall.agent.managers import parse_manager_urls
from omniwall.daemon_config import config_option_callback
from omniwall.logformat import check_format, setup_logging
from omniwall.model.interfaces import DEFAULT_VNIC_INTERFACES, check_pattern
from omniwall.tls import client_context

BACKENDS = ("nft", "memory", "sim")  # sim: the old name of memory


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file: cannot read {path}: {e.strerror or e}") from e
    if not token:
        raise ValueError(f"--token-file: {path} is empty")
    return token


def agent(
    manager: Annotated[
        list[str],
        typer.Option(
            "--manager",
            help="Manager base URL, e.g. https://10.0.0.1:8443 (plain http:// only to this machine); "
            "repeat it or separate URLs with commas to fail over between managers on one etcd",
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="This host's name, as registered in the manager")],
    token_file: Annotated[Path, typer.Option("--token-file", help="File holding this host's agent token")],
    netns: Annotated[
        str | None, typer.Option("--netns", help="Network namespace of the host (lab); default: this one")
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="Data plane: nft (kernel) or memory (alias sim)")
    ] = "nft",
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Agent state directory (the sim backend keeps its state there)"),
    ] = DEFAULT_STATE_DIR,
    counters_interval: Annotated[
        float, typer.Option("--counters-interval", help="Seconds between rule counter reports")
    ] = 5.0,
    vnic_interfaces: Annotated[
        str,
        typer.Option(
            "--vnic-interfaces",
            help="Comma-separated globs of the host interfaces vNICs may be attached to; "
            "any other is refused, whatever the manager sends",
        ),
    ] = ",".join(DEFAULT_VNIC_INTERFACES),
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="CA certificate that signed the manager's (default: system CAs)"),
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="This host's client certificate (omniwall pki host)")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="The key of --cert")] = None,
    flows: Annotated[
        bool,
        typer.Option(
            "--flows/--no-flows", help="Flow records: log every verdict and ship them to the manager"
        ),
    ] = True,
    metrics_address: Annotated[
        str | None,
        typer.Option("--metrics-address", help="Serve Prometheus /metrics at host:port (default: off)"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step")] = False,
    log_format: Annotated[
        str, typer.Option("--log-format", help="Log lines as text or json (one object a line)")
    ] = "text",
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="YAML file of these options (default: $OMNIWALL_AGENT_CONFIG, else "
            "/etc/omniwall/agent.yaml when present; '' for none). Flags override it.",
            is_eager=True,
            callback=config_option_callback("agent"),
        ),
    ] = None,
) -> None:
    """Run the host agent: realize this host's desired state in the kernel, report back, fail static."""
    # SIGHUP means "re-read the certificate" (agent/main.py): one that arrives during start-up must not
    # end the agent
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        setup_logging(check_format(log_format), logging.DEBUG if verbose else logging.INFO, sys.stderr)
    except ValueError as e:
        typer.echo(f"omniwall agent: {e}", err=True)
        raise typer.Exit(2) from None
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per status POST is noise
    try:
        if backend not in BACKENDS:
            raise ValueError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        try:
            patterns = [check_pattern(p.strip()) for p in vnic_interfaces.split(",") if p.strip()]
        except ValueError as e:
            raise ValueError(f"--vnic-interfaces: {e}") from None
        if not patterns:
            raise ValueError("--vnic-interfaces: name at least one pattern, like tap*")
        managers = parse_manager_urls(manager)  # refuses http:// to a manager off this machine
        tls = None
        if managers[0].startswith("https://"):
            # certificate and key are re-read on every reconnect and on SIGHUP (rotation)
            tls = client_context(ca, cert, key)
        elif ca or cert or key:
            raise ValueError("--ca/--cert/--key need an https:// --manager")
        token = read_token(token_file)
        run_agent(
            managers,
            host,
            token,
            netns=netns,
            backend=backend,
            state_dir=state_dir,
            counters_interval=counters_interval,
            guard=Guard(patterns),
            tls=tls,
            flows=flows,
            metrics_address=metrics_address,
        )
    except (ValueError, OSError, ImportError) as e:
        typer.echo(f"omniwall agent: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
    except Exception as e:  # no traceback for the operator; the log above has the details
        typer.echo(f"omniwall agent: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("agent")(agent)


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(agent)
    app()


if __name__ == "__main__":
    main()

"""`omniwall demo`: the demo of `make demo`, from an installed package too (the wheel carries examples/).

omniwall demo                  # live: a lab of namespaces, a manager and agents (root)
omniwall demo --offline        # no lab: the sim explains the example's flows
omniwall demo --once DIR       # measure, print, tear down; another directory of resource files
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        directory: Path | None = typer.Argument(None, help="resource files (default: the bundled example)"),
        once: bool = typer.Option(False, "--once", help="measure, print, tear down; do not wait"),
        offline: bool = typer.Option(False, "--offline", help="no lab: explain the flows with the sim only"),
    ) -> None:
        """Run the demo: a live lab behind Omniwall (root), or the sim's explanation with --offline."""
        from omniwall import demo as demo_mod

        argv = [str(directory)] if directory is not None else []
        argv += ["--once"] if once else []
        argv += ["--offline"] if offline else []
        raise typer.Exit(demo_mod.cli(argv))

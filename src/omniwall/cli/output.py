"""Shared CLI output: errors to stderr (never a traceback), JSON to stdout, rich tables.

Every command wraps its body in `cli_errors()`: a `ValidationError` prints one line per problem and exits
2; a bad value (`ValueError`, `KeyError`, `OSError`) prints its message and exits 2; anything else is a
bug, printed as one line naming it, exit 70. `typer.Exit` (a deliberate exit code) passes through.
Messages are printed without rich markup, so `spec.rules[0]` or `[any]` reach the user as written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.table import Table

from omniwall.model.errors import ValidationError

# Bound to sys.stdout/sys.stderr at print time (rich looks them up lazily), so CliRunner captures them.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_DENIED = 1  # explain: the traffic is refused
EXIT_USAGE = 2  # bad input: validation errors, unknown names, bad flags
EXIT_BUG = 70  # EX_SOFTWARE: an unexpected exception


def echo(text: str = "", *, style: str | None = None) -> None:
    """A line to stdout, taken literally (no markup)."""
    out.print(text, markup=False, style=style)


def error(message: str) -> None:
    """`error: <message>` on stderr."""
    err.print(f"error: {message}", markup=False, style="red")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    error(message)
    raise typer.Exit(code)


def print_validation_error(e: ValidationError) -> None:
    n = len(e.errors)
    error(f"{n} problem{'s' if n != 1 else ''} found, nothing was applied:")
    for fe in e.errors:
        err.print(f"  {fe}", markup=False)


def emit_json(data: Any) -> None:
    """Indented, key-sorted JSON on stdout (plain write: rich would wrap long lines)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    return t


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn expected failures into a message on stderr and an exit code; never show a traceback."""
    try:
        yield
    except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except ValidationError as e:
        print_validation_error(e)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyError as e:
        # KeyError's str() adds quotes around the message; show the message itself.
        fail(str(e.args[0]) if e.args else "not found")
    except (ValueError, OSError) as e:
        fail(str(e))
    except Exception as e:  # a bug: say what, not where
        fail(f"internal error ({type(e).__name__}): {e}", EXIT_BUG)


__all__ = [
    "EXIT_BUG",
    "EXIT_DENIED",
    "EXIT_USAGE",
    "cli_errors",
    "echo",
    "emit_json",
    "err",
    "error",
    "fail",
    "out",
    "print_validation_error",
    "table",
]

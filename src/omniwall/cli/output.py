"""Shared CLI output: errors to stderr (never a traceback), JSON to stdout, rich tables.

Every command wraps its body in `cli_errors()`: a `ValidationError` prints one line per problem and exits
2; a bad value (`ValueError`, `KeyError`, `OSError`) prints its message and exits 2; anything else is a
bug, printed as one line naming it, exit 70. `typer.Exit` (a deliberate exit code) passes through.
Messages are printed without rich markup, so `spec.rules[0]` or `[any]` reach the user as written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import typer
import yaml
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


# ----------------------------------------------------------------------------- -o table|wide|json|yaml

FORMATS = ("table", "wide", "json", "yaml")
# A default value (`output: str = OutputOpt`), as the client commands declare their options.
OutputOpt: Any = typer.Option(
    "table",
    "--output",
    "-o",
    help="table, wide (more columns), json or yaml.",
    autocompletion=lambda: list(FORMATS),
)


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: its header, how to get the cell from a record, and whether only `-o wide`
    shows it."""

    header: str
    cell: Callable[[dict[str, Any]], Any]
    wide: bool = False


def col(header: str, key: str, *, wide: bool = False, default: str = "-") -> Column:
    """A column showing `record[key]` (dotted keys go down: `metadata.name`)."""

    def get(rec: dict[str, Any]) -> Any:
        v: Any = rec
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return default if v is None or v == "" else v

    return Column(header, get, wide)


def check_format(fmt: str, allowed: Sequence[str] = FORMATS) -> str:
    """Checked before anything is asked of the manager, so a typo costs nothing."""
    if fmt not in allowed:
        fail(f"-o {fmt!r}: expected one of {', '.join(allowed)}")
    return fmt


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def _stdout_console() -> Console:
    """A console for stdout as it is now: the terminal's width, or, when stdout is not a terminal (a
    pipe, a test), wide enough that no row is wrapped or cut (`| grep` sees whole rows). The module's
    `out` keeps the width it found at import."""
    tty = sys.stdout.isatty()
    return Console(highlight=False, width=None if tty else 10_000, force_terminal=tty or None)


def print_rich(renderable: Any) -> None:
    """A rich renderable (a bordered table) to stdout, never wrapped when stdout is not a terminal."""
    _stdout_console().print(renderable)


def table_lines(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> list[str]:
    """Rows aligned in columns by rich (two spaces between columns, no borders, no trailing blanks),
    as lines: for tables that are part of a larger text (explain's hops)."""
    t = Table(box=None, show_header=headers is not None, header_style="bold", pad_edge=False)
    for h in headers or [""] * (len(rows[0]) if rows else 0):
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*(_cell(c) for c in r))
    console = _stdout_console()
    with console.capture() as cap:
        console.print(t, markup=False)
    return [line.rstrip() for line in cap.get().splitlines()]


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A borderless kubectl-style table: columns as wide as their widest cell, never wrapped or cut when
    stdout is not a terminal (a pipe, a test), no trailing blanks."""
    sys.stdout.write("".join(line + "\n" for line in table_lines(rows, headers)))


def emit(data: Any, fmt: str) -> None:
    """JSON or YAML of `data` (the API's own shape)."""
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        emit_json(data)


def render(
    records: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    fmt: str,
    *,
    document: Any = None,
) -> None:
    """Records as a table (`wide`: every column) or the document as JSON/YAML (default: the records)."""
    if fmt in ("json", "yaml"):
        emit(records if document is None else document, fmt)
        return
    shown = [c for c in columns if fmt == "wide" or not c.wide]
    print_table([[c.cell(r) for c in shown] for r in records], [c.header for c in shown])


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
    "FORMATS",
    "Column",
    "OutputOpt",
    "check_format",
    "cli_errors",
    "col",
    "echo",
    "emit",
    "emit_json",
    "err",
    "error",
    "fail",
    "out",
    "print_table",
    "print_validation_error",
    "render",
    "table",
    "table_lines",
]

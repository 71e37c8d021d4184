"""Arguments every client command shares: `-f` file lists and `tenant/name` object references.

`-f` takes files, directories (their *.yaml/*.yml/*.json files, recursively, sorted), globs (quoted, so
the shell left them alone) and `-` for stdin; the extra positional paths a shell glob expands to are
read too. One helper for `apply`, `diff`, `validate`, `compile`, `explain` and `lab up`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

# One reading of `tenant/name` for the CLI and the Python client.
from omniwall.client.api import split_ref

FILE_SUFFIXES = (".yaml", ".yml", ".json")


def expand_files(paths: Iterable[str | Path]) -> list[str]:
    """Every file the arguments name, in order. A directory or a glob matching nothing is an error
    (ValueError naming it), not a silent no-op."""
    out: list[str] = []
    for raw in paths:
        p = str(raw)
        if p == "-":
            out.append(p)
            continue
        if any(c in p for c in "*?[") and not Path(p).exists():
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise ValueError(f"{p}: no file matches")
            out.extend(expand_files(matches))
            continue
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix in FILE_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: no *.yaml, *.yml or *.json file in this directory")
            out.extend(str(f) for f in found)
        else:
            out.append(p)
    return out


__all__ = ["FILE_SUFFIXES", "expand_files", "split_ref"]

"""The command blocks of README.md and docs/*.md, for the tests that run them as written (issue 13).

A command block is a fenced block (no language, sh, bash, shell or console) with at least one line that
starts a command (`omniwall`, `sudo`, `curl`, `make`, ...). Every one runs in a test unless the line
before its fence says why it cannot:

- `<!-- illustrative: reason -->`: not run (a real second machine, systemd as PID 1, a production path,
  runs until Ctrl-C with nothing to check, ...).
- a *root block* — one with a `sudo` command or an `omniwall lab` command — runs as root in
  tests/kernel/test_docs_lab_blocks.py, in a lab whose name is unique per run: `OMNIWALL_LAB` names the
  lab when `--name` is absent, so the docs show the plain command. `sudo` there is a shim that keeps
  the environment (we are root already).
- `<!-- daemon: TEXT -->`: the block starts a daemon that runs until stopped (a manager with its
  production paths and fixed ports). tests/kernel/test_docs_lab_blocks.py runs it as root in a private
  network and mount namespace (its loopback ports are its own, a tmpfs covers /var/lib), waits until
  TEXT appears in its output, then kills its process group by PID. Such a block is self-contained: it
  makes the files it needs itself.
- every other block runs in tests/unit/test_docs_commands.py against a manager on loopback.

A new block is picked up by the next run; an unmarked one is runnable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
COMMAND = re.compile(
    r"^\s*(\$ )?([A-Z_]+=\S+ )*"
    r"(sudo |omniwall|curl |make |python3? |\.venv/bin/|T=\$\(|export |source |eval )"
)
MARKER = re.compile(r"<!--\s*illustrative:\s*(\S.*?)\s*-->")
DAEMON = re.compile(r"<!--\s*daemon:\s*(\S.*?)\s*-->")
ROOT_LINE = re.compile(r"^\s*(\$ )?(.*\bsudo |([A-Z_]+=\S+ )*omniwall lab )")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    body: list[str]
    illustrative: str | None
    daemon: str | None = None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def transcript(self) -> bool:
        return any(line.startswith("$ ") for line in self.body)

    @property
    def root(self) -> bool:
        """Runs as root in a lab (tests/kernel/test_docs_lab_blocks.py)."""
        return self.daemon is not None or any(ROOT_LINE.match(x) for x in self.body)


def command_blocks() -> list[Block]:
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body = lines[i + 1 : j]
            if m.group(1) in ("", "sh", "bash", "shell", "console") and any(COMMAND.match(x) for x in body):
                before = lines[i - 1] if i else ""
                marker, daemon = MARKER.search(before), DAEMON.search(before)
                rel = str(path.relative_to(ROOT))
                out.append(
                    Block(
                        rel,
                        i + 1,
                        body,
                        marker.group(1) if marker else None,
                        daemon.group(1) if daemon else None,
                    )
                )
            i = j + 1
    return out


def transcript(block: Block) -> list[tuple[str, list[str]]]:
    """The (command, output lines shown) pairs of a transcript block (`$ command`, then its output)."""
    out: list[tuple[str, list[str]]] = []
    for line in block.body:
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif line.strip() and out:
            out[-1][1].append(line)
    return out


def first_line_agrees(shown: list[str], printed: str) -> bool:
    """Does the first output line a transcript shows agree with the first line printed? Whitespace
    runs are equal; `...` matches any text; a first line that starts with `...` is an excerpt of
    later output, not compared (nor is a command shown without output)."""
    if not shown or shown[0].lstrip().startswith("..."):
        return True
    first = printed.splitlines()[0] if printed else ""
    parts = [r"\s+".join(map(re.escape, p.split())) for p in shown[0].strip().split("...")]
    return re.fullmatch(r"\s*" + ".*".join(parts) + r"\s*", first) is not None

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

Documents that show the same lab share it (`SHARED`, `shared_lab_runs`): a plain root block whose first
command is `lab up` and whose last is `lab down`, in a later document of the group with the very same
`lab up` command, runs on the lab the earlier block brought up: the earlier one skips its `lab down`, the
later one its `lab up` (the same command, already run). Every other line runs as written.
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
LAB_UP = re.compile(r"\bomniwall lab up\b")
LAB_DOWN = re.compile(r"\bomniwall lab down\b")
# Documents whose root blocks run in one session, in this order, sharing the labs they show alike
# (the README's lab blocks repeat docs/lab.md's; the README's run last: its blocks migrate app-1).
SHARED = [("docs/lab.md", "README.md")]


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


def command(line: str) -> str:
    """A block line as a command: without its trailing comment, white space folded."""
    return " ".join(line.split(" #")[0].split())


def sessions(docs: list[str]) -> list[tuple[str, ...]]:
    """`docs` grouped into the sessions that run them: the `SHARED` groups (those of their documents
    that are in `docs`), every other document alone, in the order of `docs`."""
    out: list[tuple[str, ...]] = []
    for doc in docs:
        group = next((g for g in SHARED if doc in g), (doc,))
        session = tuple(d for d in group if d in docs)
        if session not in out:
            out.append(session)
    return out


def shared_lab_runs(blocks: list[Block]) -> list[tuple[Block, list[str]]]:
    """The blocks of one session (in the session's document order), each with the lines it runs, in the
    order they run: a block that shares a lab runs right after the block it shares it with."""

    def up_key(b: Block) -> str | None:
        lines = [command(x) for x in b.body if command(x)]
        if b.daemon or b.transcript or len(lines) < 2:
            return None
        if LAB_UP.search(lines[0]) and LAB_DOWN.search(lines[-1]):
            return lines[0]
        return None

    groups: dict[object, list[Block]] = {}
    for b in blocks:
        key = up_key(b)
        groups.setdefault(key if key is not None else b.id, []).append(b)
    out: list[tuple[Block, list[str]]] = []
    for members in groups.values():
        for i, b in enumerate(members):
            lines = list(b.body)
            if len(members) > 1:
                body = [k for k, x in enumerate(lines) if command(x)]
                drop = set()
                if i > 0:
                    drop.add(body[0])  # its `lab up`: the first block of the group ran the same
                if i < len(members) - 1:
                    drop.add(body[-1])  # its `lab down`: the last block of the group runs it
                lines = [x for k, x in enumerate(lines) if k not in drop]
            out.append((b, lines))
    return out

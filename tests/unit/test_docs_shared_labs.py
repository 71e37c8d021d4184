"""The plan by which documents that show the same lab share it (tests/docsblocks.py, run by
tests/kernel/test_docs_lab_blocks.py): only the repeated `lab up` and the earlier `lab down` are left out."""

from __future__ import annotations

from docsblocks import Block, sessions, shared_lab_runs

UP = "sudo omniwall lab up -f examples/three-tier/*.yaml"


def _block(doc: str, line: int, *body: str, daemon: str | None = None) -> Block:
    return Block(doc, line, list(body), None, daemon)


def test_a_later_block_with_the_same_lab_up_runs_on_the_earlier_ones_lab() -> None:
    first = _block(
        "docs/lab.md", 9, f"{UP}   # comment", "sudo omniwall lab matrix", "sudo omniwall lab down"
    )
    other = _block("docs/lab.md", 20, "sudo omniwall lab up -f examples/vdi/", "sudo omniwall lab down")
    daemon = _block("README.md", 60, "omniwall manager --db x.db", daemon="manager on")
    second = _block("README.md", 73, UP, "sudo omniwall lab migrate a/b --to h3", "sudo omniwall lab down")
    runs = shared_lab_runs([first, other, daemon, second])
    assert [(b.id, lines) for b, lines in runs] == [
        ("docs/lab.md:9", [f"{UP}   # comment", "sudo omniwall lab matrix"]),
        ("README.md:73", ["sudo omniwall lab migrate a/b --to h3", "sudo omniwall lab down"]),
        ("docs/lab.md:20", other.body),
        ("README.md:60", daemon.body),
    ]


def test_a_block_that_does_not_start_with_up_and_end_with_down_shares_nothing() -> None:
    a = _block("docs/lab.md", 9, UP, "sudo omniwall lab matrix")
    b = _block("README.md", 73, UP, "sudo omniwall lab down", "sudo omniwall lab status")
    assert [lines for _, lines in shared_lab_runs([a, b])] == [a.body, b.body]


def test_sessions_group_the_shared_documents_and_keep_the_others_alone() -> None:
    assert sessions(["README.md", "docs/api.md", "docs/lab.md"]) == [
        ("docs/lab.md", "README.md"),
        ("docs/api.md",),
    ]
    assert sessions(["README.md"]) == [("README.md",)]

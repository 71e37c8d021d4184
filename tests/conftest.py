"""Makes `tests/` importable for every suite (pytest puts a conftest's directory on sys.path): shared
test helpers that are not part of the package live here, e.g. `labhelpers` (kernel and e2e tests)."""

from __future__ import annotations

import pytest

try:  # pytest >= 9 keeps a node's id as an object; earlier ones as the string `_nodeid`
    from _pytest.nodes import coerce_node_id
except ImportError:  # pragma: no cover
    coerce_node_id = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker (`make test` runs tests/unit on two), tests that share a node id get
    one each: `...#2`, `#3`... in collection order, the same on every worker. schemathesis's cases
    (one per API operation) share theirs, and xdist's scheduling by file keys tests by node id: it ran
    one of the 83 and dropped the others without a word."""
    if not hasattr(config, "workerinput"):
        return
    seen: dict[str, int] = {}
    for item in items:
        n = seen[item.nodeid] = seen.get(item.nodeid, 0) + 1
        if n > 1:
            new = f"{item.nodeid}#{n}"
            if coerce_node_id is not None and hasattr(item, "_id"):
                item._id = coerce_node_id(new)
            else:
                item._nodeid = new
            if item.nodeid != new:  # pytest changed how it keeps ids: fail, never drop tests silently
                raise pytest.UsageError(f"cannot give {item.nodeid} a node id of its own under xdist")

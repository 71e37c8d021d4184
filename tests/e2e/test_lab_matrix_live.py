"""`lab matrix --expect` of a managed lab follows the manager's policy now, not the files the lab was
built from (issue 13, item 4): after a change through the API, the kernel and the expectation agree."""

from __future__ import annotations

from labhelpers import NEEDS_ROOT, TWO_HOSTS
from omniwall.lab.managed import managed_lab

pytestmark = NEEDS_ROOT


def test_matrix_expectation_follows_the_live_policy() -> None:
    with managed_lab(TWO_HOSTS) as (lab, cp):
        seen = []
        for action in ("allow", "drop"):  # the files name no Tenant: one of the two is a change
            tenant = {"kind": "Tenant", "metadata": {"name": "t1"}, "spec": {"defaultAction": action}}
            rev = cp.apply([tenant])
            cp.wait_in_sync(revision=rev)
            entries = lab.matrix("tcp/80", expect=True, timeout=0.5)
            wrong = [e.json_line() for e in entries if not e.agrees]
            assert not wrong, wrong
            seen.append(sorted(e.allowed for e in entries))
        assert seen[0] != seen[1] and all(seen[0]) and not any(seen[1])

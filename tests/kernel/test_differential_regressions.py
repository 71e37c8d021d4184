"""Fixed scenarios from what the differential fuzzer found (docs/design/differential.md), each kept
once fixed: the lab is programmed with the scenario, the probes must agree with the sim (and the
kernel must give the result noted, so a scenario keeps testing what it was found for). Findings in
the incremental compiler (the `delta` mode) are pure and need no lab; open ones are strict xfails.

How to add one: take the record from the fuzzer's mismatch log (`fuzz-mismatches.jsonl`; prefer its
`minimized_yaml`), trim the inventory to the workloads the probe needs, and add a `Scenario` below
with the probe(s) and the kernel's correct answer. `python -m omniwall.fuzz --replay FILE` re-checks a
log's records as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from labhelpers import NEEDS_ROOT
from omniwall.model.loader import load_text

INVENTORY = """
kind: Host
metadata: {name: h1}
---
kind: Host
metadata: {name: h2}
---
kind: Workload
metadata: {name: client, tenant: t1, labels: {role: client}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.88.1.10, "fd00:88:1::a"]}]
  lab: {servers: [tcp/80]}
---
kind: Workload
metadata: {name: server, tenant: t1, labels: {role: server}}
spec:
  host: h2
  vnics: [{name: eth0, ips: [10.88.2.11, "fd00:88:2::b"]}]
  lab: {servers: [tcp/80]}
---
kind: Workload
metadata: {name: neighbour, tenant: t1, labels: {role: server}}
spec:
  host: h1
  vnics: [{name: eth0, ips: [10.88.1.12, "fd00:88:1::c"]}]
  lab: {servers: [tcp/80]}
---
kind: Tenant
metadata: {name: t1}
spec: {defaultAction: allow}
---
kind: Group
metadata: {name: servers}
spec: {selector: 'role == "server"'}
---
kind: Group
metadata: {name: clients}
spec: {selector: 'role == "client"'}
"""


def _reject_at_server(stateful: bool) -> str:
    """The server's ingress rejects tcp/80; a rule at the client's egress matches (and allows) the SYN.
    Stateless: the SYN is untracked on both hosts."""
    return f"""
kind: Policy
metadata: {{name: p1}}
spec:
  category: emergency
  stateful: {str(stateful).lower()}
  rules:
  - {{name: out, appliedTo: [clients], direction: out, services: [tcp/80], action: allow}}
  - {{name: in, appliedTo: [servers], direction: in, services: [tcp/80], action: reject}}
"""


def _reset_dropped_at_client(stateful: bool) -> str:
    """The server's ingress rejects tcp/80 (a tracked SYN); a stateless rule drops tcp/1024-65535 at
    the client's ingress, which is where the reset goes (to the client's ephemeral port)."""
    return f"""
kind: Policy
metadata: {{name: p1}}
spec:
  category: emergency
  stateful: {str(stateful).lower()}
  rules:
  - {{name: in, appliedTo: [servers], direction: in, services: [tcp/80], action: reject}}
---
kind: Policy
metadata: {{name: p2}}
spec:
  category: infrastructure
  stateful: false
  rules:
  - {{name: high-ports, appliedTo: [clients], direction: in, services: [tcp/1024-65535], action: drop}}
"""


@dataclass(frozen=True)
class Scenario:
    id: str
    yaml: str
    probes: tuple[
        tuple[str, str, str, int | None, int, bool, str], ...
    ]  # src dst proto port family: allowed, how


# Found by seed 300 (lab 300, round 0), first as a false mismatch of the harness: the sim rejects the
# SYN at the server's ingress, but the client's host did not track the SYN (a stateless rule matched it
# there), so the TCP reset coming back is `ct state invalid` on the client's host and dropped: the client
# times out. The harness now follows the reset back (`compare.sim_refuses`). Same host, or a tracked SYN:
# the reset arrives.
SCENARIOS = [
    Scenario(
        "stateless-reject-reset-dropped-on-the-clients-host",
        INVENTORY + "---" + _reject_at_server(stateful=False),
        (
            ("t1/client", "t1/server", "tcp", 80, 4, False, "timeout"),
            ("t1/client", "t1/server", "tcp", 80, 6, False, "timeout"),
            ("t1/client", "t1/neighbour", "tcp", 80, 4, False, "refused"),
            ("t1/client", "t1/neighbour", "tcp", 80, 6, False, "refused"),
        ),
    ),
    # Found by seed 5000 (lab 5000, round 3), a false mismatch of the harness again: the client's host
    # tracked the SYN, but a stateless rule matches the reset at the client's ingress (raw `notrack`
    # comes before the conntrack lookup), so that hop's rules judge the reset, and drop it. On the
    # rejecting host itself the reset is never forwarded, so it arrives.
    Scenario(
        "stateless-rule-at-the-client-drops-the-reset",
        INVENTORY + "---" + _reset_dropped_at_client(stateful=True),
        (
            ("t1/client", "t1/server", "tcp", 80, 4, False, "timeout"),
            ("t1/client", "t1/server", "tcp", 80, 6, False, "timeout"),
            ("t1/client", "t1/neighbour", "tcp", 80, 4, False, "refused"),
            ("t1/client", "t1/neighbour", "tcp", 80, 6, False, "refused"),
        ),
    ),
    Scenario(
        "stateful-reject-reset-reaches-the-client",
        INVENTORY + "---" + _reject_at_server(stateful=True),
        (
            ("t1/client", "t1/server", "tcp", 80, 4, False, "refused"),
            ("t1/client", "t1/server", "tcp", 80, 6, False, "refused"),
        ),
    ),
]


@pytest.mark.kernel
@NEEDS_ROOT
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_regression(scenario: Scenario) -> None:
    from omniwall.fuzz.runner import Case, check_scenario

    cases = [Case(src, dst, proto, port, fam) for src, dst, proto, port, fam, _, _ in scenario.probes]
    outcomes = check_scenario(load_text(scenario.yaml, scenario.id), cases)
    for o, (*_, allowed, how) in zip(outcomes, scenario.probes, strict=True):
        assert o.agrees, f"{o.case}: kernel {o.kernel} ({o.detail}), sim:\n{o.to_json()['explanation']}"
        assert (o.kernel, o.detail) == (allowed, how), f"{o.case}: kernel {o.kernel} ({o.detail})"


# Found by seed 43 (lab 43, round 1 -> 2, programming mode `delta`; again by seeds 900-903): the
# incremental compiler raises KeyError when one update removes a group that nests two others together
# with both of them (removed in the order child, child, parent): removing the second child recomputes
# the parent, which still lists the first, already deleted, child (`membership.Groups._contains` for
# workload members, `_recompute_lits` for CIDRs). A full compile of the same catalog works. Pure: no
# lab needed. Fixed: `Groups.remove_group` detaches the group from its parents.
NESTED = """
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: w1}
spec: {host: h1, vnics: [{name: eth0, ips: [10.88.1.10]}]}
---
kind: Group
metadata: {name: g1}
spec: {MEMBERS1}
---
kind: Group
metadata: {name: g2}
spec: {MEMBERS2}
---
kind: Group
metadata: {name: parent}
spec: {groups: [g1, g2]}
"""
MEMBERS = {
    "workloads": ("workloads: [w1]", "workloads: [w1]"),
    "cidrs": ("cidrs: [10.0.0.0/8]", "cidrs: [192.168.0.0/16]"),
}


@pytest.mark.parametrize("members", sorted(MEMBERS))
def test_incremental_compiler_removes_a_parent_group_with_its_children(members: str) -> None:
    from omniwall.compiler.build import compile_catalog
    from omniwall.compiler.incremental import IncrementalCompiler
    from omniwall.model.validate import validate

    m1, m2 = MEMBERS[members]
    before = validate(load_text(NESTED.replace("MEMBERS1", m1).replace("MEMBERS2", m2), "nested"))
    after = validate([r for r in before if r.kind != "Group"])
    ic = IncrementalCompiler(before, 1)
    ic.update([], [("Group", "infra", "g1"), ("Group", "infra", "g2"), ("Group", "infra", "parent")], 2)
    full = compile_catalog(after, 2)
    # A host the update did not change keeps its revision; compare the contents.
    assert {h: replace(s, revision=0) for h, s in ic.states().items()} == {
        h: replace(s, revision=0) for h, s in full.items()
    }


# Found by seed 8000 (lab 8002, round 10 -> 11, mode `delta`): after one update that (1) gives a
# provider group members, (2) deletes provider policy `a`, whose rule unions it with a tenant group,
# and (3) adds tenant policy `b`, whose rule unions the same two groups (`[tg, infra/pg]`), the
# incremental compiler keeps the union set `u.<hash>` empty, while a full compile fills it. An agent fed
# deltas would enforce the rule with the stale (empty) set. Only when the new policy's name sorts
# after the removed one's (a -> b failed, b -> a worked). Fixed: a union whose last rule goes lives on
# until the whole batch of rules is reindexed, so a rule added in the same batch takes over the same
# address set (`IncrementalCompiler._release_union`).
UNION_BEFORE = """
kind: Host
metadata: {name: h1}
---
kind: Workload
metadata: {name: w1, tenant: t1}
spec: {host: h1, vnics: [{name: eth0, ips: [10.88.1.10]}]}
---
kind: Group
metadata: {name: tg, tenant: t1}
---
kind: Group
metadata: {name: pg}
---
kind: Policy
metadata: {name: a}
spec:
  category: infrastructure
  rules:
  - {name: r1, destinations: [pg, t1/tg], action: allow}
"""
UNION_CHANGES = """
kind: Group
metadata: {name: pg}
spec: {cidrs: [10.88.1.10/32], shareWith: ["*"]}
---
kind: Policy
metadata: {name: b, tenant: t1}
spec:
  rules:
  - {name: r1, sources: [tg, infra/pg], action: drop}
"""


def test_incremental_compiler_refreshes_a_union_taken_over_by_a_new_rule() -> None:
    from omniwall.compiler.build import compile_catalog
    from omniwall.compiler.incremental import IncrementalCompiler
    from omniwall.model.validate import validate

    before = validate(load_text(UNION_BEFORE, "before"))
    changes = load_text(UNION_CHANGES, "changes")
    keep = [r for r in before if r.kind != "Policy" and r.name != "pg"]
    after = validate([*keep, *changes])
    ic = IncrementalCompiler(before, 1)
    ic.update(changes, [("Policy", "infra", "a")], 2)
    full = compile_catalog(after, 2)
    assert {h: replace(s, revision=0) for h, s in ic.states().items()} == {
        h: replace(s, revision=0) for h, s in full.items()
    }

"""Differential test: random policies judged by the kernel (lab + nftables) and by the sim must agree,
verdict for verdict (docs/design/differential.md). CI runs a bounded sample; `make fuzz-dataplane`
runs 100,000 probes. Set OMNIWALL_FUZZ_SEED to explore other seeds."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import pytest

from omniwall import PROVIDER_TENANT
from omniwall.fuzz.generate import generate, generate_inventory, generate_policy, resource
from omniwall.model.loader import dump_yaml
from omniwall.model.validate import validate

ROOT = os.geteuid() == 0
SEED = int(os.environ.get("OMNIWALL_FUZZ_SEED", "20261127"))
CI_PROBES = 3000
# Every programming mode, `delta` (incremental compiler + backend.apply) included; `make fuzz-dataplane`
# runs them all too.
CI_MODES = ("fresh", "sync", "delta")


def _netns() -> set[str]:
    from labhelpers import netns_list

    return netns_list()


# ------------------------------------------------------------------------------------ generator (pure)


def test_generated_sets_are_valid_deterministic_and_cover_the_model() -> None:
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(60):
        inv = generate_inventory(seed)
        assert 2 <= len(inv.hosts) <= 3 and 4 <= len(inv.workloads) <= 8
        for rnd in range(3):
            policy = generate_policy(inv, rnd)
            validate([*inv.resources, *policy])  # raises on any invalid set
            for r in policy:
                seen[r.kind] += 1
                if r.kind == "Tenant":
                    seen[f"default:{r.spec.defaultAction}"] += 1
                    seen[f"mode:{r.spec.mode.value}"] += 1
                elif r.kind == "Group":
                    for part in ("selector", "workloads", "groups", "cidrs", "shareWith"):
                        seen[f"group:{part}"] += bool(getattr(r.spec, part))
                elif r.kind == "Service":
                    seen[f"service:{r.spec.protocol.value}"] += 1
                elif r.kind == "Policy":
                    seen[f"category:{r.spec.category.value}"] += 1
                    seen["stateless"] += not r.spec.stateful
                    seen["policy-appliedTo"] += bool(r.spec.appliedTo)
                    for rule in r.spec.rules:
                        seen[f"action:{rule.action.value}"] += 1
                        seen[f"direction:{rule.direction.value}"] += 1
                        seen["rule-appliedTo"] += bool(rule.appliedTo)
                        seen["disabled"] += rule.disabled
                        seen["log"] += rule.log
                        seen["literal-peer"] += any("." in p or ":" in p for p in rule.sources)
                        seen["inline-service"] += any(
                            "/" in s and not s.startswith("infra/") for s in rule.services
                        )
    needed = [
        *(f"default:{a}" for a in ("drop", "allow", "reject")),
        "mode:monitor",
        "mode:enforce",
        *(f"group:{p}" for p in ("selector", "workloads", "groups", "cidrs", "shareWith")),
        *(f"service:{p}" for p in ("tcp", "udp", "icmp", "icmpv6", "any")),
        *(f"category:{c}" for c in ("emergency", "infrastructure", "environment", "application", "baseline")),
        *(f"action:{a}" for a in ("allow", "drop", "reject", "pass")),
        *(f"direction:{d}" for d in ("in", "out", "both")),
        *(
            "stateless",
            "policy-appliedTo",
            "rule-appliedTo",
            "disabled",
            "log",
            "literal-peer",
            "inline-service",
        ),
    ]
    assert not [k for k in needed if not seen[k]], seen
    # Reproducible from the seed alone.
    assert dump_yaml(generate(3)) == dump_yaml(generate(3))
    assert dump_yaml(generate(3)) != dump_yaml(generate(4))


# ------------------------------------------------------------------------------------------ kernel


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root (network namespaces, nftables)")
def test_the_harness_reports_a_verdict_the_kernel_does_not_give() -> None:
    """The comparison can fail: the kernel runs the real policy, the sim a copy in which one vNIC's
    default is flipped. Exactly the probes to and from that vNIC must come back as confirmed mismatches."""
    from omniwall.fuzz.runner import FuzzLab, all_cases

    inv = generate_inventory(SEED, workloads=3, hosts=2)
    everyone_allows = [
        resource({"kind": "Tenant", "metadata": {"name": t}, "spec": {"defaultAction": "allow"}})
        for t in (PROVIDER_TENANT, *inv.tenants)
    ]
    with FuzzLab(inv.resources) as fl:
        fl.program(everyone_allows)
        victim_host, victim = next((h, s.vnics[0]) for h, s in sorted(fl.states.items()) if s.vnics)
        state = fl.states[victim_host]
        flipped = dataclasses.replace(
            victim, default_action="drop", default_monitor=False, egress=(), ingress=()
        )
        fl.states = {
            **fl.states,
            victim_host: dataclasses.replace(
                state, vnics=tuple(flipped if v.ifname == victim.ifname else v for v in state.vnics)
            ),
        }
        cases = [c for c in all_cases(fl.plan, ipv6=fl.has_ipv6) if c.src_index == 0 and c.dst_index == 0]
        outcomes = {o.case: o for o in fl.probe(cases)}
        # A probe that timed out by bad luck (a loaded machine) gets one more chance.
        again = [c for c, o in outcomes.items() if not (o.kernel or o.retry)]
        outcomes |= {o.case: o for o in fl.probe(again)}
        prefix = fl.lab.prefix if fl.lab else "?"
    assert all(o.kernel or o.retry for o in outcomes.values()), [str(c) for c in again]
    wrong = {(o.case.src, o.case.dst) for o in outcomes.values() if o.confirmed}
    expected = {(c.src, c.dst) for c in cases if victim.workload in (c.src, c.dst)}
    assert wrong == expected
    assert not [n for n in _netns() if n.startswith(prefix)]  # the lab left nothing behind


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root (network namespaces, nftables)")
def test_kernel_and_sim_agree_on_random_policies() -> None:
    from omniwall.fuzz.campaign import run_campaign

    summary = run_campaign(
        CI_PROBES,
        seed=SEED,
        rounds_per_lab=4,
        workloads=(4, 6),
        hosts=(2, 3),
        modes=CI_MODES,
        shrink_budget=60.0,
    )
    report = "\n\n".join(
        json.dumps({k: v for k, v in rec.items() if k not in ("paths",)}, indent=1)
        for rec in summary.records
        if rec.get("confirmed", True)
    )
    assert summary.errors == 0, report
    assert summary.mismatches == 0, report
    assert summary.probes >= CI_PROBES
    # the kernel's flow logs name the sim's rule (or tenant default) at every hop (fuzz/attribution.py)
    assert summary.attributed == summary.attribution_checked == summary.probes, summary.to_json()
    # Not a degenerate sample: both outcomes occur, on more than one lab.
    assert 0.1 * summary.probes < summary.allowed < 0.9 * summary.probes, summary.to_json()
    assert summary.labs >= 2
    assert not [n for n in _netns() for p in summary.prefixes if n.startswith(p)]

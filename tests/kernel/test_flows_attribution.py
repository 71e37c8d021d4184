"""Attribution, CI-sized: on random policies (provider categories, monitor mode, tenant defaults,
stateless rules, every programming mode), the kernel's flow logs name the rule the sim names, at every
hop of every probe: 100% (the differential fuzzer reports the same over `make fuzz-dataplane`)."""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.geteuid() == 0
SEED = int(os.environ.get("OMNIWALL_FUZZ_SEED", "20261206"))


@pytest.mark.kernel
@pytest.mark.skipif(not ROOT, reason="needs root (network namespaces, nftables)")
def test_flow_logs_name_the_same_rule_as_the_sim() -> None:
    from omniwall.fuzz.campaign import run_campaign

    wrong: list[dict[str, object]] = []

    def on_round(r) -> None:  # type: ignore[no-untyped-def]
        wrong.extend(o.to_json()["attribution"] | {"probe": o.case.to_json()} for o in r.result.misattributed)

    summary = run_campaign(
        600, seed=SEED, rounds_per_lab=3, workloads=(3, 5), hosts=(2, 2), shrink=False, on_round=on_round
    )
    assert summary.mismatches == 0 and summary.errors == 0
    assert summary.attribution_checked >= 600
    assert summary.attributed == summary.attribution_checked, json.dumps(wrong[:5], indent=1)

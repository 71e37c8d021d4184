"""A fuzzing campaign: labs from consecutive seeds, several random policies per lab, until N probes.

Lab seed S builds inventory S (`generate_inventory`); round R of that lab programs policy (S, R)
(`generate_policy(inventory, R)`), incrementally on top of the previous round or, one round in four,
after a teardown. Every confirmed mismatch is written (one JSON line each) to `out` with the seed,
round, probe, both verdicts, the sim's hop-by-hop explanation and the whole scenario as YAML; the first
one of a round is also shrunk (`minimize`) on the same lab into a smaller scenario that still disagrees.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniwall.fuzz.generate import generate_inventory, generate_policy
from omniwall.fuzz.runner import PROBE_TIMEOUT, FuzzLab, Outcome, RoundResult, minimize, scenario_yaml

ROUNDS_PER_LAB = 12
MAX_ERRORS = 5  # then give up: the lab itself is probably broken
FRESH_EVERY = 4  # about one round in FRESH_EVERY rebuilds the tables instead of syncing a delta


@dataclass
class Summary:
    first_seed: int
    probes: int = 0
    allowed: int = 0
    mismatches: int = 0
    flaky: int = 0
    errors: int = 0  # rounds the backend could not program (recorded like mismatches)
    labs: int = 0
    rounds: int = 0
    elapsed: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)  # mismatches (and flaky), as written
    prefixes: list[str] = field(default_factory=list)  # namespace prefix of every lab (cleanup checks)

    @property
    def failed(self) -> bool:
        return bool(self.mismatches or self.errors)

    def to_json(self) -> dict[str, Any]:
        return {
            "first_seed": self.first_seed,
            "probes": self.probes,
            "allowed": self.allowed,
            "mismatches": self.mismatches,
            "flaky": self.flaky,
            "errors": self.errors,
            "labs": self.labs,
            "rounds": self.rounds,
            "elapsed": round(self.elapsed, 1),
        }


@dataclass(frozen=True)
class RoundReport:
    lab_seed: int
    round: int
    result: RoundResult
    summary: Summary


def _record(lab_seed: int, rnd: int, result: RoundResult, o: Outcome, yaml_text: str) -> dict[str, Any]:
    return {
        "lab_seed": lab_seed,
        "round": rnd,
        "programming": result.programming,
        **o.to_json(),
        "scenario_yaml": yaml_text,
    }


def run_campaign(
    probes: int,
    *,
    seed: int = 0,
    rounds_per_lab: int = ROUNDS_PER_LAB,
    workloads: int | tuple[int, int] = (4, 8),
    hosts: int | tuple[int, int] = (2, 3),
    timeout: float = PROBE_TIMEOUT,
    out: Path | None = None,
    shrink: bool = True,
    shrink_budget: float = 120.0,
    on_round: Callable[[RoundReport], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Probe until at least `probes` probes ran. Returns the summary (mismatches = confirmed ones)."""
    summary = Summary(first_seed=seed)
    start = time.monotonic()
    lab_seed = seed
    while summary.probes < probes:
        inv = generate_inventory(lab_seed, workloads=workloads, hosts=hosts)
        pick = random.Random(f"programming/{lab_seed}")
        with FuzzLab(inv.resources, timeout=timeout) as fl:
            summary.labs += 1
            if fl.lab is not None:
                summary.prefixes.append(fl.lab.prefix)
            failed = False
            for rnd in range(rounds_per_lab):
                if summary.probes >= probes:
                    break
                policy = generate_policy(inv, rnd)
                fresh = rnd == 0 or failed or pick.randrange(FRESH_EVERY) == 0
                try:
                    result = fl.round(policy, fresh=fresh)
                except Exception as e:  # the backend refused the program, or the lab broke: a finding
                    failed = True
                    summary.errors += 1
                    rec = {
                        "lab_seed": lab_seed,
                        "round": rnd,
                        "programming": "fresh" if fresh else "incremental",
                        "error": f"{type(e).__name__}: {e}",
                        "scenario_yaml": scenario_yaml(inv.resources, policy),
                    }
                    summary.records.append(rec)
                    if out is not None:
                        with out.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                    if log:
                        log(f"ERROR lab {lab_seed} round {rnd}: {rec['error']}")
                    if summary.errors >= MAX_ERRORS:
                        raise
                    continue
                failed = False
                summary.rounds += 1
                summary.probes += result.probes
                summary.allowed += result.allowed
                summary.mismatches += len(result.mismatches)
                summary.flaky += len(result.flaky)
                summary.elapsed = time.monotonic() - start
                bad = result.mismatches + result.flaky
                if bad:
                    yaml_text = scenario_yaml(inv.resources, policy)
                    records = [_record(lab_seed, rnd, result, o, yaml_text) for o in bad]
                    if shrink and result.mismatches:
                        if log:
                            log(f"shrinking lab {lab_seed} round {rnd}: {result.mismatches[0].case}")
                        small = minimize(fl, policy, result.mismatches[0].case, budget=shrink_budget, log=log)
                        records[0]["minimized_yaml"] = scenario_yaml(inv.resources, small)
                    summary.records.extend(records)
                    if out is not None:
                        with out.open("a") as f:
                            for rec in records:
                                f.write(json.dumps(rec) + "\n")
                    summary.elapsed = time.monotonic() - start
                if on_round:
                    on_round(RoundReport(lab_seed, rnd, result, summary))
        lab_seed += 1
    summary.elapsed = time.monotonic() - start
    return summary


__all__ = ["ROUNDS_PER_LAB", "RoundReport", "Summary", "run_campaign"]

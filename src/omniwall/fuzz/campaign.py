"""A fuzzing campaign: labs from consecutive seeds, several random policies per lab, until N probes.

Lab seed S builds inventory S (`generate_inventory`); round R of that lab programs policy (S, R)
(`generate_policy(inventory, R)`) in a random programming mode: a full table after a teardown, `sync`
on top of the previous round, or the incremental compiler's deltas through `apply` (checked against a
full compile: a difference is an error). Every confirmed mismatch is written (one JSON line each) to
`out` with the seed, round, probe, both verdicts, the sim's hop-by-hop explanation and the whole
scenario as YAML; the first one of a round is also shrunk (`minimize`) on the same lab into a smaller
scenario that still disagrees. Errors also record the previous round's scenario (`previous_yaml`): a
delta goes from it to the new one.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniwall.fuzz.generate import generate_inventory, generate_policy
from omniwall.fuzz.runner import MODES, PROBE_TIMEOUT, FuzzLab, Outcome, RoundResult, minimize, scenario_yaml

ROUNDS_PER_LAB = 12
MAX_ERRORS_IN_A_ROW = 5  # then give up: the lab itself is probably broken
MODE_WEIGHTS = (1, 2, 2)  # fresh, sync, delta (runner.MODES)


@dataclass
class Summary:
    first_seed: int
    probes: int = 0
    allowed: int = 0
    mismatches: int = 0
    flaky: int = 0
    attributed: int = 0  # probes whose kernel flow logs name the sim's rules at every hop
    attribution_checked: int = 0
    errors: int = 0  # rounds the backend could not program, or incremental != full compile
    labs: int = 0
    rounds: int = 0
    elapsed: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)  # mismatches (and flaky), as written
    prefixes: list[str] = field(default_factory=list)  # namespace prefix of every lab (cleanup checks)

    @property
    def failed(self) -> bool:
        return bool(self.mismatches or self.errors)

    @property
    def attribution_pct(self) -> float | None:
        if not self.attribution_checked:
            return None
        return 100.0 * self.attributed / self.attribution_checked

    def to_json(self) -> dict[str, Any]:
        return {
            "first_seed": self.first_seed,
            "probes": self.probes,
            "allowed": self.allowed,
            "mismatches": self.mismatches,
            "flaky": self.flaky,
            "attributed": self.attributed,
            "attribution_checked": self.attribution_checked,
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


def _keep(summary: Summary, out: Path | None, records: list[dict[str, Any]]) -> None:
    summary.records.extend(records)
    if out is not None:
        with out.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


def run_campaign(
    probes: int,
    *,
    seed: int = 0,
    rounds_per_lab: int = ROUNDS_PER_LAB,
    workloads: int | tuple[int, int] = (4, 8),
    hosts: int | tuple[int, int] = (2, 3),
    modes: tuple[str, ...] = MODES,
    timeout: float = PROBE_TIMEOUT,
    out: Path | None = None,
    shrink: bool = True,
    shrink_budget: float = 120.0,
    on_round: Callable[[RoundReport], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Probe until at least `probes` probes ran. Returns the summary (mismatches = confirmed ones)."""
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"programming modes {modes!r}: use some of {', '.join(MODES)}")
    weights = [MODE_WEIGHTS[MODES.index(m)] for m in modes]
    summary = Summary(first_seed=seed)
    start = time.monotonic()
    lab_seed = seed
    while summary.probes < probes:
        inv = generate_inventory(lab_seed, workloads=workloads, hosts=hosts)
        pick = random.Random(f"programming/{lab_seed}")
        with FuzzLab(inv.resources, inv.outside_resources, timeout=timeout) as fl:
            summary.labs += 1
            if fl.lab is not None:
                summary.prefixes.append(fl.lab.prefix)
            failed, in_a_row = False, 0
            previous = ""
            for rnd in range(rounds_per_lab):
                if summary.probes >= probes:
                    break
                policy = generate_policy(inv, rnd)
                mode = "fresh" if rnd == 0 or failed else pick.choices(modes, weights)[0]
                try:
                    result = fl.round(policy, mode=mode)
                except Exception as e:  # the backend refused the program, or the lab broke: a finding
                    failed = True
                    summary.errors += 1
                    rec = {
                        "lab_seed": lab_seed,
                        "round": rnd,
                        "programming": mode,
                        "error": f"{type(e).__name__}: {e}",
                        "where": [
                            f"{f.filename}:{f.lineno} {f.name}"
                            for f in traceback.extract_tb(e.__traceback__)[-4:]
                        ],
                        "previous_yaml": previous,
                        "scenario_yaml": scenario_yaml(inv.lab_resources, policy),
                    }
                    _keep(summary, out, [rec])
                    if log:
                        log(f"ERROR lab {lab_seed} round {rnd}: {rec['error']}")
                    in_a_row += 1
                    if in_a_row >= MAX_ERRORS_IN_A_ROW:
                        raise
                    continue
                failed, in_a_row = False, 0
                if result.drift:  # incremental compile != full compile: a compiler finding
                    summary.errors += 1
                    rec = {
                        "lab_seed": lab_seed,
                        "round": rnd,
                        "programming": mode,
                        "error": f"incremental compiler state differs from a full compile on {result.drift}",
                        "previous_yaml": previous,
                        "scenario_yaml": scenario_yaml(inv.lab_resources, policy),
                    }
                    _keep(summary, out, [rec])
                    if log:
                        log(f"ERROR lab {lab_seed} round {rnd}: {rec['error']}")
                previous = scenario_yaml(inv.lab_resources, policy)  # what the kernel holds now
                summary.rounds += 1
                summary.probes += result.probes
                summary.allowed += result.allowed
                summary.mismatches += len(result.mismatches)
                summary.flaky += len(result.flaky)
                ok, checked = result.attribution
                summary.attributed += ok
                summary.attribution_checked += checked
                summary.elapsed = time.monotonic() - start
                bad = result.mismatches + result.flaky
                if bad:
                    yaml_text = scenario_yaml(inv.lab_resources, policy)
                    records = [_record(lab_seed, rnd, result, o, yaml_text) for o in bad]
                    if shrink and result.mismatches:
                        if log:
                            log(f"shrinking lab {lab_seed} round {rnd}: {result.mismatches[0].case}")
                        small = minimize(fl, policy, result.mismatches[0].case, budget=shrink_budget, log=log)
                        records[0]["minimized_yaml"] = previous = scenario_yaml(inv.lab_resources, small)
                    _keep(summary, out, records)
                    summary.elapsed = time.monotonic() - start
                if on_round:
                    on_round(RoundReport(lab_seed, rnd, result, summary))
        lab_seed += 1
    summary.elapsed = time.monotonic() - start
    return summary


__all__ = ["ROUNDS_PER_LAB", "RoundReport", "Summary", "run_campaign"]

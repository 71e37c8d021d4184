"""`python -m omniwall.fuzz --probes N [--seed S] [--json]`: the kernel-vs-sim differential fuzzer.

Prints one progress line per round and the final mismatch count; exits 1 when the kernel and the sim
disagreed on any probe (a confirmed mismatch), 2 on bad usage or a lab that cannot be built, 130 on
Ctrl-C (the lab is torn down in every case). Mismatches are appended to `--out` (JSON lines).
`--replay FILE` re-checks the recorded mismatches, each on a fresh lab, and exits 1 if any persists.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from omniwall.fuzz.campaign import ROUNDS_PER_LAB, RoundReport, run_campaign
from omniwall.fuzz.runner import MODES, PROBE_TIMEOUT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omniwall.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=2000, help="probe at least this many connections")
    p.add_argument("--seed", type=int, default=None, help="first lab seed (default: random, printed)")
    p.add_argument("--rounds-per-lab", type=int, default=ROUNDS_PER_LAB, help="policies per lab")
    p.add_argument("--workloads", default="4-8", help="workloads per lab: N or MIN-MAX (default 4-8)")
    p.add_argument(
        "--modes", default=",".join(MODES), help="programming modes to pick from: fresh,sync,delta"
    )
    p.add_argument("--timeout", type=float, default=PROBE_TIMEOUT, help="probe timeout, seconds")
    p.add_argument("--out", type=Path, default=Path("fuzz-mismatches.jsonl"), help="mismatch log")
    p.add_argument("--no-shrink", action="store_true", help="do not minimize mismatching scenarios")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    p.add_argument("--replay", type=Path, default=None, help="re-check the mismatches recorded in FILE")
    return p


def _range(text: str) -> int | tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi)) if hi else int(lo)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj) if args.json else text, flush=True)


def _replay(args: argparse.Namespace) -> int:
    from omniwall.fuzz.runner import Case, check_scenario
    from omniwall.model.loader import load_text

    persisting = 0
    for n, line in enumerate(args.replay.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "probe" not in rec:
            _emit(
                args, {"record": n, "skipped": rec.get("error")}, f"record {n}: {rec.get('error')} (no probe)"
            )
            continue
        case = Case.from_json(rec["probe"])
        for which in ("scenario_yaml", "minimized_yaml"):
            if which not in rec:
                continue
            (o,) = check_scenario(load_text(rec[which], f"{args.replay}:{n}"), [case], timeout=args.timeout)
            persisting += o.confirmed
            _emit(
                args,
                {
                    "record": n,
                    "scenario": which,
                    "probe": case.to_json(),
                    "agrees": o.agrees,
                    "kernel": o.kernel,
                    "sim": o.sim.allowed,
                },
                f"record {n} ({which}) {case}: kernel {'allowed' if o.kernel else 'denied'}, sim "
                f"{'allowed' if o.sim.allowed else 'denied'}: {'agrees' if o.agrees else 'MISMATCH'}",
            )
    _emit(args, {"persisting": persisting}, f"mismatches persisting: {persisting}")
    return 1 if persisting else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("error: the differential fuzzer needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    try:
        workloads = _range(args.workloads)
    except ValueError:
        print(f"error: --workloads {args.workloads!r} is not N or MIN-MAX", file=sys.stderr)
        return 2
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        print(f"error: --modes {args.modes!r}: use some of {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.replay is not None:
        return _replay(args)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    _emit(
        args,
        {"event": "start", "seed": seed, "probes": args.probes},
        f"fuzz: seed {seed}, {args.probes} probes",
    )

    def on_round(r: RoundReport) -> None:
        res, s = r.result, r.summary
        _emit(
            args,
            {
                "event": "round",
                "lab_seed": r.lab_seed,
                "round": r.round,
                "programming": res.programming,
                "probes": res.probes,
                "allowed": res.allowed,
                "mismatches": len(res.mismatches),
                "flaky": len(res.flaky),
                "attribution": list(res.attribution),
                "seconds": round(res.elapsed, 2),
                "total": s.to_json(),
            },
            f"lab {r.lab_seed} round {r.round} [{res.programming}]: {res.probes} probes, "
            f"{res.allowed} allowed, {len(res.mismatches)} mismatches, {len(res.flaky)} flaky, "
            f"attribution {res.attribution[0]}/{res.attribution[1]}, {res.elapsed:.1f}s | "
            f"total {s.probes}/{args.probes} probes, {s.mismatches} mismatches, {s.elapsed:.0f}s",
        )
        for o in res.mismatches:
            if not args.json:
                print(
                    f"  MISMATCH {o.case}: kernel {'allowed' if o.kernel else 'denied'} ({o.detail}), "
                    f"sim {'allowed' if o.sim.allowed else 'denied'}"
                    f"{', refused' if o.sim_refuses else ''} ({o.sim.verdict})"
                )
                print("    " + o.to_json()["explanation"].replace("\n", "\n    "))
        for o in res.misattributed[:5]:
            if not args.json:
                print(f"  MISATTRIBUTED {o.case}: kernel {o.kernel_attr} sim {o.sim_attr}")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    try:
        summary = run_campaign(
            args.probes,
            seed=seed,
            rounds_per_lab=args.rounds_per_lab,
            workloads=workloads,
            modes=modes,
            timeout=args.timeout,
            out=args.out,
            shrink=not args.no_shrink,
            on_round=on_round,
            log=log,
        )
    except KeyboardInterrupt:
        print("interrupted (lab torn down)", file=sys.stderr)
        return 130
    except Exception as e:  # a lab that cannot be built, a backend error: say so, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    _emit(
        args,
        {"event": "done", **summary.to_json()},
        f"done: {summary.probes} probes ({summary.allowed} allowed) in {summary.rounds} rounds on "
        f"{summary.labs} labs, {summary.elapsed:.0f}s; flaky: {summary.flaky}\n"
        + (f"errors (programming failed): {summary.errors}\n" if summary.errors else "")
        + (
            f"attribution: {summary.attributed}/{summary.attribution_checked} probes "
            f"({summary.attribution_pct:.2f}%) name the same rule in the kernel's flow logs and the sim\n"
            if summary.attribution_pct is not None
            else ""
        )
        + f"mismatches: {summary.mismatches}"
        + (f" (recorded in {args.out})" if summary.records else ""),
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

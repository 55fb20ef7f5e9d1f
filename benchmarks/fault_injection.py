"""The fault-injection suite (issue 16): the real training and prepare commands, run as
subprocesses at tiny sizes, faulted (SIGKILL at random moments and while a checkpoint is being
written, SIGTERM / SIGINT, bit flips and truncations in a checkpoint, a second trainer on the
same workdir, a diverging run, a killed ``prepare --overwrite``, a full disk, a truncated
metrics line), and compared with an uninterrupted run of the same command.

  python -m benchmarks.fault_injection                      # every case (~15 min on 2 cores)
  python -m benchmarks.fault_injection --cases sigkill_vae --trials 2   # seconds (the test)
  python -m benchmarks.fault_injection --out /tmp/faults.json --keep /tmp/faults

Prints the table fault / trials / outcome / steps lost / data corrupt (docs/FAULTS.md) and
writes JSON with every trial's details (default ``benchmarks/results/fault_injection.json``).
``--trials`` sets every selected case's count (for the SIGKILL cases: kills). The cases are
in ``benchmarks/fault_cases.py`` and ``fault_cases_disk.py``, the subprocess machinery in ``benchmarks/fault_harness.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import fault_cases as fc
from benchmarks import fault_cases_disk as fd

# name -> (function, default trials, the fault in a few words)
CASES = {
    "sigkill_vae": (fc.sigkill_vae, 10, "SIGKILL at a random step, PhraseVAE"),
    "sigkill_ldm": (fc.sigkill_ldm, 10, "SIGKILL at a random step, PhraseLDM"),
    "sigkill_sync_ldm": (fc.sigkill_sync_ldm, 4, "SIGKILL at a random step, PhraseLDM, sync saves"),
    "sigkill_save_vae": (fc.sigkill_save_vae, 3, "SIGKILL during a checkpoint write, PhraseVAE"),
    "sigkill_save_ldm": (fc.sigkill_save_ldm, 3, "SIGKILL during a checkpoint write, PhraseLDM"),
    "sigterm": (fc.sigterm, 2, "SIGTERM at a random step"),
    "sigint": (fc.sigint, 2, "SIGINT (Ctrl-C) at a random step"),
    "bitflip": (fc.bitflip, 3, "one bit flipped in a checkpoint's arrays"),
    "truncate": (fc.truncate, 3, "one checkpoint file truncated"),
    "two_trainers": (fc.two_trainers, 2, "a second trainer on a running one's workdir"),
    "nan": (fc.nan, 2, "a run diverging after 10 good steps (lr 1e30)"),
    "prepare_overwrite": (fd.prepare_overwrite, 2, "SIGKILL during prepare --overwrite"),
    "full_disk": (fd.full_disk, 2, "the checkpoints' disk full"),
    "truncated_metrics": (fc.truncated_metrics, 2, "a truncated last line of metrics.jsonl"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fault_injection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES)
    )
    p.add_argument("--trials", type=int, default=0, help="trials of every case (0 = its default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times and damage")
    p.add_argument("--out", default="", help="JSON path (default results/fault_injection.json)")
    p.add_argument(
        "--keep", default="", help="run in this folder and keep it (default: a temp one)"
    )
    p.add_argument(
        "--fast", action="store_true", help="shorter runs (24 steps, checkpoint every 4)"
    )
    p.add_argument("--verbose", action="store_true", help="show the libraries' log messages")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; use {', '.join(CASES)}")
    if args.trials < 0:
        p.error(f"--trials must be >= 0, got {args.trials}")
    return args, cases


def summarize(name: str, trials: list[fc.Trial]) -> dict:
    """The table row of one case and its trials' details."""
    ran = [t for t in trials if not t.not_run]
    failed = [t for t in ran if t.problems]
    lost = [t.steps_lost for t in ran if t.steps_lost is not None]
    if not ran:
        outcome = trials[0].outcome if trials else "no trials"
    elif failed:
        outcome = f"{len(failed)}/{len(ran)} failed: {failed[0].outcome}"
    else:
        outcome = "ok"
        notes = [t.note for t in ran if t.note]
        if notes:
            outcome += f" ({len(notes)} of {len(ran)}: {notes[0]})"
    return {
        "fault": CASES[name][2],
        "trials": len(ran),
        "outcome": outcome,
        "ok": bool(ran) and not failed,
        "steps_lost_max": max(lost) if lost else None,
        "steps_lost_mean": float(np.mean(lost)) if lost else None,
        "data_corrupt": sum(t.corrupt for t in ran),
        "seconds_per_trial": float(np.mean([t.seconds for t in trials])) if trials else 0.0,
        "models": sorted({t.model for t in trials}),
        "trial_details": [
            {
                "model": t.model,
                "outcome": t.outcome,
                "note": t.note,
                "steps_lost": t.steps_lost,
                "corrupt": t.corrupt,
                "seconds": t.seconds,
                **t.detail,
            }  # fmt: skip
            for t in trials
        ],
    }


def table(rows: dict[str, dict]) -> str:
    from benchmarks import common

    def lost(row):
        if row["steps_lost_max"] is None:
            return "-"
        return f"max {row['steps_lost_max']} (mean {row['steps_lost_mean']:.1f})"

    header = ("case", "fault", "trials", "outcome", "steps lost", "data corrupt", "s/trial")
    body = [
        (
            name,
            r["fault"],
            r["trials"],
            r["outcome"][:160],
            lost(r),
            r["data_corrupt"],
            f"{r['seconds_per_trial']:.0f}",
        )  # fmt: skip
        for name, r in rows.items()
    ]
    return common.markdown_table(header, body)


def machine() -> dict:
    """CPU, cores, Python and JAX of this run (no torch import: the suite does not need it)."""
    import platform

    import jax

    from benchmarks import common

    return {
        "cpu": common.cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    from benchmarks import common
    from phraseldm_jax.cli.common import quiet_logging

    args, cases = parse_args(argv)
    quiet_logging(args.verbose)
    root = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(root, exist_ok=True)
    out = args.out or os.path.join(
        common.REPO_ROOT, "benchmarks", "results", "fault_injection.json"
    )
    suite = fc.Suite(root, np.random.default_rng(args.seed), fast=args.fast)
    result = {
        "command": "python -m benchmarks.fault_injection "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "seed": args.seed,
        "cases": {},
    }
    start = time.monotonic()
    try:
        for name in cases:
            function, default, _ = CASES[name]
            print(f"== {name} ...", file=sys.stderr, flush=True)
            case_start = time.monotonic()
            try:
                trials = function(suite, args.trials or default)
            except fc.fh.CaseFailure as error:  # a reference run failed: the case cannot run
                trials = [fc.Trial("-", [str(error)])]
            result["cases"][name] = summarize(name, trials)
            result["cases"][name]["case_wall_s"] = time.monotonic() - case_start
            print(f"   {result['cases'][name]['outcome'][:200]}", file=sys.stderr, flush=True)
            common.write_json(out, result)  # after every case: a crash keeps what was measured
        result["references"] = {
            name: {"seconds": ref.seconds, "loop_seconds": ref.loop_seconds}
            for name, ref in suite.references.items()
        }
        result["wall_s"] = time.monotonic() - start
        common.write_json(out, result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + table(result["cases"]) + "\n", flush=True)
    print(f"wrote {out} ({result['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if all(r["ok"] or r["trials"] == 0 for r in result["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

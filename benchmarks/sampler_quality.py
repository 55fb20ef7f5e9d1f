"""Sampler quality on one trained PhraseLDM: PhraseFID, SRS, length accuracy, wall times.

Every run scores the same checkpoint with ``ldm_task.evaluate_checkpoint`` (the training
evaluator: the same reference songs, target length and metrics), with the same number of songs
and, unless a run names its own, the same seed, so runs differ only in the sampler. Results are
merged into ``--out`` (one entry per run name; a run already there is replaced), so a long
comparison can be split into several invocations of a few minutes each::

  flock /work/heavy.lock python -m benchmarks.sampler_quality \\
      --workdir /work/runs/ldm/ldm_lencond_small --which latest --num_songs 20 \\
      --runs ddim:10,ddim:25,ddim:50,dpmpp_2m:10,dpmpp_2m:20,dpmpp_2m:25,dpmpp_2m:50
  flock /work/heavy.lock python -m benchmarks.sampler_quality ... --runs ddpm:1000
  flock /work/heavy.lock python -m benchmarks.sampler_quality ... --runs ddpm:1000:seed=1
  python -m benchmarks.sampler_quality --out benchmarks/results/sampler_quality.json --table

A run is ``sampler:steps`` plus optional ``:key=value`` overrides of ``eval.*``: ``seed``,
``clip`` (scaled | reference | none), ``spacing`` (leading | trailing | linspace), ``eta``,
``clipped_eps`` (0 | 1, see ``diffusion.sample_loop``), ``dtype`` (the DiT's compute dtype
while sampling, e.g. ``dtype=bfloat16``) and ``decode_dtype`` (the PhraseVAE decoder's matmul
dtype); the last two are not ``eval.*`` keys.
Its name is the spec itself (e.g. ``dpmpp_2m:25:clip=none``).

Timings (seconds, this machine): ``sample`` is the denoising loop without compilation,
``decode`` the PhraseVAE greedy decoding of all 512 latents of every song.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "sampler_quality.json")
OVERRIDES = {
    "seed": int,
    "clip": str,
    "spacing": str,
    "eta": float,
    "clipped_eps": int,
    "dtype": str,
    "decode_dtype": str,
}
TABLE_COLUMNS = (
    ("run", "run"),
    ("seed", "seed"),
    ("phrase_fid", "PhraseFID"),
    ("phrase_fid_reference", "PhraseFID (orig. variant)"),
    ("srs", "SRS"),
    ("length_accuracy", "len. acc."),
    ("mean_bars", "mean bars"),
    ("t2r", "T2R"),
    ("sample_seconds", "sample s"),
    ("decode_seconds", "decode s"),
)


def parse_run(spec: str) -> dict:
    """``"dpmpp_2m:25:clip=none"`` -> ``{"sampler": "dpmpp_2m", "num_steps": 25, "clip":
    "none"}`` (keys of ``eval.*``). Raises ValueError naming the spec on bad input."""
    from phraseldm_jax import diffusion

    parts = spec.strip().split(":")
    if len(parts) < 2 or parts[0] not in diffusion.SAMPLERS:
        raise ValueError(
            f"run {spec!r}: expected sampler:steps with sampler in {diffusion.SAMPLERS}"
        )
    try:
        steps = int(parts[1])
    except ValueError:
        raise ValueError(f"run {spec!r}: steps {parts[1]!r} is not an integer") from None
    run = {"sampler": parts[0], "num_steps": steps}
    for item in parts[2:]:
        key, sep, value = item.partition("=")
        if not sep or key not in OVERRIDES:
            raise ValueError(f"run {spec!r}: bad override {item!r}; use one of {list(OVERRIDES)}")
        value = OVERRIDES[key](value)
        if key in ("dtype", "decode_dtype") and value not in ("float32", "bfloat16"):
            raise ValueError(f"run {spec!r}: {key} must be float32 or bfloat16, got {value!r}")
        run[{"spacing": "timestep_spacing", "dtype": "compute_dtype"}.get(key, key)] = (
            bool(value) if key == "clipped_eps" else value
        )
    return run


def load_results(path: str) -> dict:
    if not os.path.exists(path):
        return {"runs": {}}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data.get("runs"), dict):
        raise ValueError(f"{path}: no 'runs' object")
    return data


def markdown_table(results: dict) -> str:
    """The runs of ``results`` as a markdown table, in the order they were added."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for name, entry in results["runs"].items():
        row = dict(entry, run=name, seed=entry.get("eval", {}).get("seed"))
        lines.append("| " + " | ".join(cell(row.get(k, "")) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_quality", description=__doc__)
    p.add_argument("--workdir", help="trained LDM workdir (train_ldm.py)")
    p.add_argument("--which", default="latest", choices=("best", "latest"))
    p.add_argument("--runs", default="", help="comma-separated sampler:steps[:key=value] specs")
    p.add_argument("--num_songs", type=int, default=20)
    p.add_argument("--target_bars", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of runs that do not name one")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON (merged into)")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    args = p.parse_args(argv)

    results = load_results(args.out)
    if args.table:
        print(markdown_table(results))
        return 0
    if not args.workdir or not args.runs:
        p.error("--workdir and --runs are needed (or --table)")
    try:
        runs = {spec.strip(): parse_run(spec) for spec in args.runs.split(",") if spec.strip()}
    except ValueError as err:
        p.error(str(err))

    from phraseldm_jax import ldm_task, vae_inference

    with open(os.path.join(args.workdir, "config.json")) as f:
        vae = json.load(f)["vae"]
    decoder = vae_inference.PhraseVAEModel.from_workdir(
        vae["workdir"], vae.get("checkpoint", "best")
    )
    for name, run in runs.items():
        overrides = {
            "seed": args.seed,
            "num_songs": args.num_songs,
            "target_bars": args.target_bars,
            "loss_batches": 0,
            **run,
        }
        decoder.compute_dtype = overrides.pop("decode_dtype", None)
        started = time.perf_counter()
        entry = ldm_task.evaluate_checkpoint(args.workdir, args.which, decoder, **overrides)
        entry["decode_dtype"] = decoder.compute_dtype or "float32"
        entry["wall_seconds"] = time.perf_counter() - started
        print(f"{name}: " + json.dumps({k: v for k, v in entry.items() if k != "eval"}), flush=True)
        results = load_results(args.out)  # another invocation may have added runs meanwhile
        results["runs"][name] = entry
        from phraseldm_jax import fileio

        fileio.write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(markdown_table(load_results(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

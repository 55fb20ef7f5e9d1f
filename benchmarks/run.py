"""The benchmark suite: every case side by side with the PyTorch reference (transformers /
diffusers with the same weights, through the converter), in one process.

  python -m benchmarks.run                          # everything, paper sizes (time: docs/BENCHMARKS.md)
  python -m benchmarks.run --cases dit_step,matmul_peak --repeats 3
  python -m benchmarks.run --quick --out /tmp/b.json   # tiny sizes, seconds (the test)
  python -m benchmarks.run --vae_workdir /work/runs/vae_small_stage3 \\
      --latent_dir /work/data_cache/pop909_latents  # adds decoding of real song latents

Cases: ``dit_step`` (a), ``song_generation`` (b), ``vae_decoding`` (c), ``train_step`` (d),
``matmul_peak`` (f: machine matmul peak, the DiT step's FLOPs and where its time goes).
Every case reports compile time apart from run time (first compile, and the same program
compiled again from the persistent compilation cache, ``--cache_dir``) and peak memory (e).
Prints markdown tables and writes JSON (default ``benchmarks/results/benchmarks.json``).
On CPU the run first splits the host into one jax device per core (``--cpu_devices``,
``sharding.use_cpu_cores``); the DiT step and decoding cases add rows with their work split over
those devices, and the song case decodes over them (its sampler keeps one song on one device).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CASES = ("dit_step", "song_generation", "vae_decoding", "train_step", "matmul_peak")


def parse_args(argv):
    from benchmarks import common

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " + str(CASES))
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the test")
    p.add_argument("--out", default="", help="JSON path (default results/benchmarks[_quick].json)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--cache_dir", default=common.DEFAULT_CACHE_DIR, help="JAX compilation cache")
    p.add_argument("--vae_workdir", default="", help="trained PhraseVAE (real-latent decoding)")
    p.add_argument("--latent_dir", default="", help="its song-latent dataset (test split)")
    p.add_argument(
        "--ldm_workdir", default="", help="trained PhraseLDM: end-to-end songs, both sides"
    )
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="jax devices to split the CPU into (sharding.use_cpu_cores; 0 = one per core, "
        "1 = one device); cases add rows with the work split over them",
    )
    p.add_argument(
        "--torch_ddpm_steps", type=int, default=20, help="reference DDPM steps run (then x1000/N)"
    )
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; use {CASES}")
    if args.repeats < 1 or args.threads < 1 or args.torch_ddpm_steps < 1:
        p.error("--repeats, --threads and --torch_ddpm_steps must be >= 1")
    if args.cpu_devices < 0:
        p.error(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
    return args, cases


def main(argv=None) -> int:
    from benchmarks import common

    args, cases = parse_args(argv)
    from phraseldm_jax import sharding

    sharding.use_cpu_cores(args.cpu_devices or None)  # before any jax computation
    cached_entries = common.enable_compilation_cache(args.cache_dir)
    common.set_torch_threads(args.threads)
    opts = common.Options(
        quick=args.quick,
        repeats=2 if args.quick else args.repeats,
        threads=args.threads,
        vae_workdir=args.vae_workdir,
        latent_dir=args.latent_dir,
        ldm_workdir=args.ldm_workdir,
        torch_ddpm_steps=min(args.torch_ddpm_steps, 3) if args.quick else args.torch_ddpm_steps,
    )
    name = "benchmarks_quick.json" if args.quick else "benchmarks.json"
    out = args.out or os.path.join(opts.results_dir, name)
    result = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": common.machine_info(),
        "quick": args.quick,
        "repeats": opts.repeats,
        "compilation_cache": {"dir": args.cache_dir, "entries_before_run": cached_entries},
        "cases": {},
    }
    for case in cases:
        module = __import__(f"benchmarks.{case}", fromlist=["run"])
        print(f"== {case} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        value = module.run(opts)
        value["case_wall_s"] = time.perf_counter() - start
        result["cases"][case] = value
        print(f"\n### {case}\n\n{value['table']}\n", flush=True)
        common.write_json(out, result)  # after every case: a crash keeps what was measured
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

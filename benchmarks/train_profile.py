"""Where a training step's time goes, and its model FLOPs utilisation (MFU), per setting.

  python -m benchmarks.train_profile                      # paper sizes, every setting
  python -m benchmarks.train_profile --settings float32,fast --models vae

For the PhraseVAE stage-3 step (16 x 128 tokens) and the PhraseLDM step (4 x 512 latents) of
``benchmarks.train_step`` (the trainer's own step, paper-size models, dropout as configured),
each setting (``SETTINGS``: config overrides) is compiled once and then:

- timed (median of ``--repeats`` calls, the state donated and fed back);
- counted: XLA's FLOPs of the step (``cost_analysis``) over its time, against this machine's
  measured matmul peak in the step's compute dtype (``benchmarks.matmul_peak``): the MFU;
- profiled (``benchmarks.op_profile`` with ``phases``): seconds per step in the forward pass,
  the backward pass, random bits (dropout masks) and the update (optimiser, norms, metrics),
  each split by what the ops compute.

Writes ``benchmarks/results/train_profile.json`` and prints the tables docs/BENCHMARKS.md shows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common, matmul_peak, op_profile, train_step

# name -> (what it is, {config key: value}); applied to the paper-recipe configs.
SETTINGS = {
    "float32": ("float32 compute", {"model.dtype": "float32"}),
    "bfloat16": ("bfloat16 compute (float32 weights, norms, softmax, loss)", {
        "model.dtype": "bfloat16"}),
    "float32_rbg": ("float32 compute, rbg keys", {
        "model.dtype": "float32", "train.rng_impl": "rbg"}),
}  # fmt: skip
MODELS = ("vae", "ldm")


def _configure(config, model: str, overrides: dict[str, Any]):
    """``config`` with ``overrides``; ``model.dtype`` lands in the model's own group."""
    overrides = dict(overrides)
    if "model.dtype" in overrides:
        group = "model.t5" if model == "vae" else "model.dit"
        overrides[f"{group}.dtype"] = overrides.pop("model.dtype")
    config.update_from_flattened_dict(overrides)
    return config


def vae_setup(quick: bool):
    """(task, config, params, batch) of the stage-3 PhraseVAE step at the paper's size."""
    from phraseldm_jax import vae_task

    pair = common.vae_pair(quick)
    config = train_step.vae_train_config(pair)
    size = (4, 16) if quick else (train_step.VAE_BATCH, int(config.data.max_length))
    return vae_task.vae_task, config, pair.params, train_step.vae_batch(*size)


def ldm_setup(quick: bool):
    """(task factory, config, params, batch) of the length-conditioned PhraseLDM step."""
    from phraseldm_jax import ldm_task

    pair = common.ldm_pair(quick)
    config = train_step.ldm_train_config(pair)
    batch = train_step.ldm_batch(2 if quick else train_step.LDM_BATCH, pair.config.dit.sample_size)
    return ldm_task.make_ldm_task, config, pair.params, batch


def measure(model: str, setting: str, peaks: dict, opts) -> dict[str, Any]:
    make_task, config, params, batch = (vae_setup if model == "vae" else ldm_setup)(opts.quick)
    config = _configure(config, model, SETTINGS[setting][1])
    task = make_task(config)
    call, fields = train_step.our_step(task, config, params, batch)
    compiled = call.compiled
    timing, _ = common.time_calls(call, opts.repeats)
    dtype = SETTINGS[setting][1]["model.dtype"]
    flops = common.compiled_flops(compiled)
    peak = peaks[f"jax_{dtype}"]["flops_per_s"]
    breakdown = op_profile.profile_breakdown(compiled, call, steps=opts.profile_steps, phases=True)
    examples = len(next(iter(batch.values())))
    return {
        "model": model,
        "setting": setting,
        "what": SETTINGS[setting][0],
        "examples": examples,
        "median_s": timing.median,
        "examples_per_s": examples / timing.median,
        "flops": flops,
        "flops_per_s": flops / timing.median,
        "peak_flops_per_s": peak,
        "mfu": flops / timing.median / peak,
        **fields,
        "breakdown": breakdown,
    }


def phase_table(rows: Sequence[dict]) -> str:
    """ms per step by phase (and, inside, the matmul / attention / other split) per row."""
    header = ["model", "setting", "s/step", "op time s", *op_profile.PHASES]
    body = []
    for r in rows:
        phases = r["breakdown"]["phases"]
        cells = []
        for phase in op_profile.PHASES:
            p = phases[phase]
            total = sum(p.values())
            matmul = p["dense_matmuls"] + p["attention_products"]
            cells.append(f"{total * 1e3:.0f} ms ({matmul * 1e3:.0f} in matmuls)")
        body.append([r["model"], r["setting"], r["median_s"], r["breakdown"]["op_time_s"], *cells])
    return common.markdown_table(header, body)


def category_table(rows: Sequence[dict]) -> str:
    header = ["model", "setting", *op_profile.CATEGORIES]
    body = [
        [r["model"], r["setting"]]
        + [f"{r['breakdown'][c] * 1e3:.0f} ms" for c in op_profile.CATEGORIES]
        for r in rows
    ]
    return common.markdown_table(header, body)


def summary_table(rows: Sequence[dict]) -> str:
    header = ["model", "setting", "s/step", "examples/s", "GFLOP/step", "GFLOP/s", "peak GFLOP/s",
              "MFU", "XLA peak MiB"]  # fmt: skip
    body = [
        [r["model"], f"{r['setting']}: {r['what']}", r["median_s"], r["examples_per_s"],
         r["flops"] / 1e9, r["flops_per_s"] / 1e9, r["peak_flops_per_s"] / 1e9,
         f"{100 * r['mfu']:.0f}%", r.get("peak_mib", "-")]
        for r in rows
    ]  # fmt: skip
    return common.markdown_table(header, body)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_profile",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of vae,ldm")
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting")
    p.add_argument("--profile_steps", type=int, default=2, help="profiled calls per setting")
    p.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    p.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/train_profile.json)"
    )
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    bad = [m for m in models if m not in MODELS] + [s for s in settings if s not in SETTINGS]
    if bad:
        p.error(f"unknown models or settings: {bad}")
    return args, models, settings


def main(argv: Sequence[str] | None = None) -> int:
    args, models, settings = parse_args(argv)
    n = 256 if args.quick else 2048
    peaks = {
        "jax_float32": matmul_peak.matmul_peak(n, jnp.float32, args.repeats),
        "jax_bfloat16": matmul_peak.matmul_peak(n, jnp.bfloat16, args.repeats),
    }
    rows = []
    for model in models:
        for setting in settings:
            print(f"== {model} {setting} ...", file=sys.stderr, flush=True)
            rows.append(measure(model, setting, peaks, args))
    out = args.out or f"{common.REPO_ROOT}/benchmarks/results/train_profile.json"
    command = "python -m benchmarks.train_profile " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    common.write_json(out, {"command": command, "machine": common.machine_info(),
                            "jax": jax.__version__, "peaks": peaks, "rows": rows})  # fmt: skip
    print(summary_table(rows), phase_table(rows), category_table(rows), sep="\n\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A section-conditioned PhraseLDM on real plans: one song per held-out song's section plan.

For every song of ``--split`` whose plan fits its bars, one song is generated with that plan
(and its bar count as the length condition), decoded with the LDM's PhraseVAE and compared
with the real songs of the split (issue 19's section bar)::

  python -m benchmarks.plan_eval --workdir runs/ldm_small_seccond --latent_dir data/latents \\
      --split test [--vae_workdir runs/vae_small_stage3] [--sampler dpmpp_2m --steps 50]

Reports: ``srs`` of the generated songs (the bars before the first ``[SEP]``) and of the real
songs (``srs_real``, from their latents), ``plan_bars_match`` (share of songs whose bar count
equals the plan's), ``forced_srs`` (SRS of the plan's bars read by position, whatever the
model marked as the end), ``mean_bars`` / ``mean_plan_bars`` and PhraseFID against the real
songs. JSON to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from input_pipeline import latent_records
from phraseldm_jax import diffusion, fileio, ldm, pretrained, sampler, sections
from phraseldm_jax import songs as song_lib
from phraseldm_jax.cli import common
from phraseldm_jax.metrics import ldm as ldm_metrics
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.vae_inference import PhraseVAEModel

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "plan_eval.json")


def real_plans(latent_dir: str, split: str) -> tuple[list[str], list[np.ndarray]]:
    """The fitting plans of ``split`` and the raw latents of those songs."""
    source = latent_records.open_latent_source(latent_dir, split)
    records = source.__getitems__(list(range(len(source))))
    fitting = [r for r in records if r["plan_fits"] and str(r["section_plan"]).strip()]
    return [str(r["section_plan"]) for r in fitting], [
        np.asarray(r["latents"], np.float32) for r in fitting
    ]


def evaluate(args: argparse.Namespace, decoder=None) -> dict:
    """The metrics of the module docstring; ``decoder`` (``decode(latents) -> texts``)
    replaces the LDM's PhraseVAE."""
    model = pretrained.load_ldm(args.workdir, args.which)
    if not model.config.sec_control:
        raise ValueError(f"{args.workdir} is not a section-conditioned PhraseLDM")
    vae_workdir = args.vae_workdir or model.vae_workdir
    if decoder is None and not vae_workdir:
        raise ValueError(f"{args.workdir} names no PhraseVAE: pass --vae_workdir")
    plans, real = real_plans(args.latent_dir, args.split)
    if not plans:
        raise ValueError(f"{args.latent_dir}: no song of split {args.split!r} has a fitting plan")
    parsed = [sections.parse_plan(p) for p in plans]
    conds = [ldm.make_conditions(1, plan=p) for p in parsed]
    cond = ldm.Conditions(*(np.concatenate(parts) for parts in zip(*conds)))
    settings = sampler.SamplerSettings(
        sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance
    )
    latent_sampler = sampler.LatentSampler(model.config, settings)
    start = time.perf_counter()
    latents = latent_sampler(model.params, jax.random.PRNGKey(args.seed), cond)
    sample_seconds = time.perf_counter() - start - latent_sampler.compile_seconds
    decoder = decoder or PhraseVAEModel.from_workdir(vae_workdir)
    generated = song_lib.decode_songs(decoder, latents, reading=args.reading)
    plan_bars = np.asarray([p.n_bars for p in parsed])
    bars = np.asarray([s.n_bars for s in generated])
    natural = ldm_metrics.song_latents(latents, bars.tolist())
    forced = [latents[i, : SLOTS_PER_BAR * b] for i, b in enumerate(plan_bars)]
    return {
        "workdir": args.workdir,
        "which": args.which,
        "split": args.split,
        "songs": len(plans),
        "sampler": f"{args.sampler}:{args.steps}",
        "guidance": args.guidance,
        "seed": args.seed,
        "reading": args.reading,
        "srs": ldm_metrics.mean_section_recurrence_score(natural),
        "forced_srs": ldm_metrics.mean_section_recurrence_score(forced),
        "srs_real": ldm_metrics.mean_section_recurrence_score(real),
        "plan_bars_match": float(np.mean(bars == plan_bars)),
        "mean_bars": float(bars.mean()),
        "mean_plan_bars": float(plan_bars.mean()),
        "phrase_fid": ldm_metrics.phrase_fid(real, [z for z in natural if len(z)]),
        "phrase_fid_forced": ldm_metrics.phrase_fid(real, forced),
        "sample_seconds": sample_seconds,
        "bars": bars.tolist(),
        "plan_bars": plan_bars.tolist(),
    }


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plan_eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", type=common.path, required=True, help="PhraseLDM workdir")
    parser.add_argument("--which", default="best", help="checkpoint: best | latest")
    parser.add_argument("--latent_dir", type=common.path, required=True, help="latent dataset")
    parser.add_argument("--split", default="test", help="whose plans and real songs")
    parser.add_argument("--vae_workdir", type=common.path, default="", help="default: the LDM's")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=diffusion.SAMPLERS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale, 1 = none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reading", default="slots", choices=song_lib.READINGS, help="bars")
    parser.add_argument("--out", type=common.path, default=DEFAULT_OUT, help="JSON results")
    return parser, parser.parse_args(argv)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    try:
        result = evaluate(args)
    except (OSError, ValueError, sections.SectionPlanError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    fileio.write_json(args.out, result)
    shown = {k: v for k, v in result.items() if k not in ("bars", "plan_bars")}
    for key, value in shown.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

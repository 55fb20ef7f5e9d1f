"""``python -m phraseldm_jax.cli.evaluate``: scores a trained PhraseLDM checkpoint with any
sampler (``ldm_task.evaluate_checkpoint``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from phraseldm_jax import checkpointing, diffusion, fileio, ldm_task, sampler
from phraseldm_jax.cli import common

PROG = "python -m phraseldm_jax.cli.evaluate"
DESCRIPTION = """Scores a PhraseLDM training workdir's checkpoint: the validation diffusion loss,
then songs generated with the chosen sampler, decoded with the workdir's PhraseVAE, and their
metrics (PhraseFID, SRS, melody memorisation, length accuracy). Options left out keep the
workdir config's eval.* values.

  python -m phraseldm_jax.cli.evaluate --workdir /work/runs/ldm_small --sampler ddpm \\
      --steps 1000 --num_songs 20 [--songs_dir /work/data_cache/pop909] [--out metrics.json]
"""
KEEP = "(default: the workdir config's)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Flags without a default are absent unless given (SUPPRESS): the workdir config's eval.*
    # values stand, and --help shows no "(default: None)".
    parser.argument_default = argparse.SUPPRESS
    parser.add_argument(
        "--workdir", type=common.path, required=True, help="PhraseLDM training workdir"
    )
    parser.add_argument("--which", default="best", choices=checkpointing.WHICH, help="checkpoint")
    parser.add_argument("--out", type=common.path, help="also write the metrics to this JSON file")
    parser.add_argument("--sampler", choices=diffusion.SAMPLERS, help=f"sampler {KEEP}")
    parser.add_argument("--steps", type=int, dest="num_steps", help=f"sampler steps {KEEP}")
    parser.add_argument("--num_songs", type=int, help=f"songs to generate {KEEP}")
    parser.add_argument(
        "--guidance", type=float, dest="guidance_scale", help=f"CFG scale, 1 = none {KEEP}"
    )
    parser.add_argument("--clip", choices=sampler.CLIP_MODES, help=f"x0 clip mode {KEEP}")
    parser.add_argument("--target_bars", type=int, help=f"length condition {KEEP}")
    parser.add_argument("--seed", type=int, help=f"sampling seed {KEEP}")
    parser.add_argument(
        "--songs_dir", type=common.path, help=f"prepared songs dataset (melody memorisation) {KEEP}"
    )
    parser.add_argument("--fid_split", help=f"split of the real PhraseFID songs {KEEP}")
    parser.add_argument(
        "--loss_batches", type=int, help=f"validation-loss batches, 0 = skip {KEEP}"
    )
    parser.add_argument(
        "--reading",
        choices=("tokens", "slots"),
        help="how decoded slots make bars: tokens = one bar per b-1 before the first [SEP] "
        f"(SPEC), slots = by position up to the model's [SEP] {KEEP}",
    )


EVAL_FLAGS = (
    "sampler", "num_steps", "num_songs", "guidance_scale", "clip", "target_bars", "seed",
    "songs_dir", "fid_split", "loss_batches", "reading",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    # Only the eval.* flags: the entry point's dispatcher adds its own entries to ``args``.
    overrides = {k: getattr(args, k) for k in EVAL_FLAGS if hasattr(args, k)}
    workdir, which, out = args.workdir, args.which, getattr(args, "out", None)
    try:  # an LDM workdir, checked before anything loads
        checkpointing.read_workdir_config(workdir, "dit")
    except (FileNotFoundError, ValueError) as error:
        raise common.UsageError(f"--workdir {workdir}: {error}") from None
    result = ldm_task.evaluate_checkpoint(workdir, which, **overrides)
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        fileio.write_text(out, text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

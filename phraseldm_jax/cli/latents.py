"""``python -m phraseldm_jax.cli.latents``: builds the song-latent dataset PhraseLDM trains on
(``latent_dataset.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from phraseldm_jax import checkpointing, latent_dataset, phrases
from phraseldm_jax.cli import common

PROG = "python -m phraseldm_jax.cli.latents"
DESCRIPTION = """Builds the song-latent dataset PhraseLDM trains on, with a trained PhraseVAE.

Every song of the prepared ``songs`` dataset becomes its slot sequence (SPEC section 3), each
slot string encoded to its posterior mean; ``stats.json`` gets the scale factor, the clip
range and the special latents (see ``phraseldm_jax/latent_dataset.py``).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae_workdir",
        type=common.path,
        required=True,
        help="PhraseVAE stage-3 training workdir or original folder",
    )
    parser.add_argument(
        "--data_dir",
        type=common.path,
        required=True,
        help="datasets built by python -m phraseldm_jax.cli.prepare",
    )
    parser.add_argument(
        "--out", type=common.path, required=True, help="the latent dataset folder to write"
    )
    parser.add_argument(
        "--slot_order",
        default="pitch_order",
        choices=phrases.SLOT_ORDERS,
        help="pitch_order: remi-z order; fixed: POP909's programs 13, 25, 0 in slots 0-2",
    )
    parser.add_argument(
        "--checkpoint", default="best", choices=checkpointing.WHICH, help="VAE checkpoint"
    )
    parser.add_argument(
        "--max_bars", type=int, default=phrases.MAX_BARS, help="longer songs are left out"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    common.require_vae_folder(args.vae_workdir, "--vae_workdir")
    if not os.path.isdir(args.data_dir):
        raise common.UsageError(f"--data_dir {args.data_dir}: no such folder")
    if args.max_bars < 1:
        raise common.UsageError(f"--max_bars must be >= 1, got {args.max_bars}")
    stats = latent_dataset.build_latent_dataset(
        args.vae_workdir,
        args.data_dir,
        args.out,
        slot_order=args.slot_order,
        checkpoint=args.checkpoint,
        max_bars=args.max_bars,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}")
    for line in latent_dataset.summary_lines(stats):
        print("  " + line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

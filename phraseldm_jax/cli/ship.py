"""``ship``: training workdirs -> the models shipped in the repository.

  python -m phraseldm_jax.cli.ship --vae_workdir runs/pop909/vae_stage3 \\
      --ldm_workdir runs/pop909/ldm_lencond [--seccond_workdir runs/pop909/ldm_seccond] \\
      --out pretrained/pop909-small [--overwrite]

Exports the PhraseVAE and the PhraseLDMs (the ``--which`` checkpoint of each workdir, else the
other one) in the original's Hugging Face layout, with ``shipped.json`` (which VAE decodes each
LDM, the editing conventions, every file's size and sha256, provenance: workdirs, checkpoints
and steps, data folders and splits, latent statistics, the git commit) and a model card
``README.md`` (a template the first time; the folder's own afterwards). The folder is written
beside ``--out`` and swapped in whole; over ``--max_mb`` (default 25 MB) nothing is written.
``sample.py`` without ``--checkpoint`` then uses it (``phraseldm_jax/shipped.py``). A refusal
is one line: a flag or workdir that does not fit exits with status 2, a model that does not
fit (too large, trained on another VAE's latents) with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from phraseldm_jax import checkpointing
from phraseldm_jax.cli import common

PROG = "python -m phraseldm_jax.cli.ship"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae_workdir", type=common.path, required=True, help="stage-3 PhraseVAE workdir"
    )
    parser.add_argument(
        "--ldm_workdir",
        type=common.path,
        required=True,
        help="length-conditioned PhraseLDM workdir (the default model of sample.py)",
    )
    parser.add_argument(
        "--seccond_workdir",
        type=common.path,
        default=None,
        help="section-conditioned PhraseLDM workdir (sample.py --plan); default: none shipped",
    )
    parser.add_argument("--out", type=common.path, required=True, help="folder to write")
    parser.add_argument(
        "--which", default="best", choices=("best", "latest"), help="checkpoint of each workdir"
    )
    parser.add_argument(
        "--vae_which",
        default=None,
        choices=("best", "latest"),
        help="checkpoint of the PhraseVAE workdir (default: --which)",
    )
    parser.add_argument(
        "--max_mb", type=float, default=25.0, help="refuse a folder larger than this (10^6 B)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shipped models in --out"
    )
    parser.add_argument(
        "--allow_vae_mismatch",
        action="store_true",
        help="ship an LDM whose training names another PhraseVAE workdir or checkpoint",
    )
    parser.add_argument(
        "--train_commit",
        default=None,
        help="git commit the models were trained at, for shipped.json; default: not recorded",
    )
    parser.add_argument(
        "--readme",
        type=common.path,
        default=None,
        help="model card to write as README.md; default: the folder's own, else a template",
    )


def _require_workdir(path: str, flag: str, model_key: str) -> None:
    if not os.path.isdir(path):
        raise common.UsageError(f"{flag} {path}: no such folder")
    try:
        checkpointing.read_workdir_config(path, model_key)
    except (FileNotFoundError, ValueError) as error:
        raise common.UsageError(f"{flag} {error}") from None
    if not os.path.isdir(os.path.join(path, checkpointing.CHECKPOINTS)):
        raise common.UsageError(f"{flag} {path}: no checkpoints/ folder (has it been trained?)")


def check_args(args: argparse.Namespace) -> None:
    """Every check that loads no model (UsageError)."""
    _require_workdir(args.vae_workdir, "--vae_workdir", "t5")
    _require_workdir(args.ldm_workdir, "--ldm_workdir", "dit")
    if args.seccond_workdir is not None:
        _require_workdir(args.seccond_workdir, "--seccond_workdir", "dit")
    if args.max_mb <= 0:
        raise common.UsageError(f"--max_mb must be > 0, got {args.max_mb}")
    if args.readme is not None:
        common.require_file(args.readme, "--readme")


def command_line(args: argparse.Namespace) -> list[str]:
    """The command as shipped.json records it (the flags given, paths as typed)."""
    line = [PROG]
    for flag in ("vae_workdir", "ldm_workdir", "seccond_workdir", "out", "which", "vae_which", "max_mb",
                 "train_commit", "readme"):  # fmt: skip
        if getattr(args, flag) is not None:
            line += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("overwrite", "allow_vae_mismatch"):
        if getattr(args, flag):
            line.append(f"--{flag}")
    return line


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from phraseldm_jax import shipping

    workdirs = {"lencond": args.ldm_workdir}
    if args.seccond_workdir is not None:
        workdirs["seccond"] = args.seccond_workdir
    try:
        shipping.write_shipped(
            args.out,
            args.vae_workdir,
            workdirs,
            which=args.which,
            vae_which=args.vae_which,
            max_mb=args.max_mb,
            overwrite=args.overwrite,
            allow_vae_mismatch=args.allow_vae_mismatch,
            train_commit=args.train_commit,
            readme=args.readme,
            command=command_line(args),
            log=lambda line: print(line, file=sys.stderr),
        )
    except (OSError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

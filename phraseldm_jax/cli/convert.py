"""``convert``: the original's checkpoints <-> our training workdirs.

  python -m phraseldm_jax.cli.convert import --kind vae --src phrase-vae/ --workdir runs/vae_orig
  python -m phraseldm_jax.cli.convert import --kind ldm --src phrase-ldm-seccond/ \\
      --workdir runs/ldm_orig --vae_workdir runs/vae_orig [--section_order order.json]
  python -m phraseldm_jax.cli.convert export --kind ldm --workdir runs/ldm_orig --dst out/ldm

``--src`` is a folder in the original's Hugging Face layout (config.json + model.safetensors)
or a Lightning ``.ckpt`` (needs torch; ``--trust_pickle`` allows ``weights_only=False`` for
old files you trust). The workdir written holds config.json and an Orbax params checkpoint,
which ``checkpointing.load_trained``, sample.py and ``PhraseVAEModel.from_workdir`` read.
Export reads any of our workdirs (converted or trained here) and writes the original's layout.
Timings are printed; a conversion that fails exits with status 1 and one line saying why.
The work is ``phraseldm_jax.convert.api``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

from phraseldm_jax import fileio
from phraseldm_jax.cli import common

PROG = "python -m phraseldm_jax.cli.convert"
DESCRIPTION = __doc__
IMPORT = """original checkpoint -> our workdir

Reads a folder in the original's layout or a Lightning .ckpt and writes a workdir that
our tools read (config.json + an Orbax checkpoint checkpoints/best/0)."""
EXPORT = """our workdir -> original folder

Reads one of our workdirs (converted or trained here; the --which checkpoint, else the
other) and writes config.json + model.safetensors in the original's layout; a PhraseVAE also
gets tokenizer/ (the tokenizer as transformers' save_pretrained writes it, bos/eos/pad/unk
set as the original sets them), named by config.json's tokenizer_repo_id, so that the
original code loads the folder offline."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = common.add_subcommands(parser)
    imp = common.subcommand(commands, "import", IMPORT)
    imp.add_argument("--kind", required=True, choices=("vae", "ldm"), help="model kind")
    imp.add_argument(
        "--src", type=common.path, required=True, help="original folder or Lightning .ckpt"
    )
    imp.add_argument("--workdir", type=common.path, required=True, help="workdir to write")
    imp.add_argument(
        "--section_order", type=common.path, default=None, help="JSON file: the section id order"
    )
    imp.add_argument(
        "--vae_workdir", type=common.path, default="", help="LDM: the PhraseVAE workdir it uses"
    )
    imp.add_argument("--trust_pickle", action="store_true", help=".ckpt: weights_only=False")
    imp.add_argument("--overwrite", action="store_true", help="replace existing checkpoints")
    exp = common.subcommand(commands, "export", EXPORT)
    exp.add_argument("--kind", required=True, choices=("vae", "ldm"), help="model kind")
    exp.add_argument(
        "--workdir", type=common.path, required=True, help="our workdir (converted or trained here)"
    )
    exp.add_argument("--dst", type=common.path, required=True, help="folder to write")
    exp.add_argument(
        "--which", default="best", choices=("best", "latest"), help="checkpoint to export"
    )
    exp.add_argument(
        "--section_order", type=common.path, default=None, help="JSON file: section order to write"
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing export")


def _describe(model) -> str:
    from phraseldm_jax.convert.api import LoadedPhraseVAE
    from phraseldm_jax.trees import param_count

    n = param_count(model.params)
    if isinstance(model, LoadedPhraseVAE):
        c = model.config
        return f"PhraseVAE head={c.head} d_model={c.t5.d_model} latent={c.latent_dim}, {n:,} params"
    c = model.config
    return (
        f"PhraseLDM length_control={c.length_control} sec_control={c.sec_control} "
        f"layers={c.dit.num_layers}, {n:,} params"
    )


def run_import(args, log=print) -> None:
    from phraseldm_jax.convert import api

    start = time.perf_counter()
    if args.kind == "vae":
        if args.section_order or args.vae_workdir:
            raise ValueError("--section_order and --vae_workdir apply to --kind ldm only")
        model = api.import_phrase_vae(args.src, trust_pickle=args.trust_pickle)
    else:
        model = api.import_phrase_ldm(
            args.src, section_order=args.section_order, trust_pickle=args.trust_pickle
        )
    read_s = time.perf_counter() - start
    # Absolute in config.json, so the LDM finds its VAE from any working folder.
    vae_workdir = fileio.user_path(args.vae_workdir) if args.vae_workdir else ""
    api.save_workdir(model, args.workdir, vae_workdir=vae_workdir, overwrite=args.overwrite)
    write_s = time.perf_counter() - start - read_s
    log(f"imported {_describe(model)} from {args.src}")
    log(f"wrote {args.workdir}: read+convert {read_s:.2f} s, write {write_s:.2f} s")


def run_export(args, log=print) -> None:
    from phraseldm_jax.convert import api

    if api.is_original_folder(args.dst) and not args.overwrite:
        raise FileExistsError(f"{args.dst} already holds a checkpoint (pass --overwrite)")
    start = time.perf_counter()
    model = api.load_workdir(args.workdir, which=args.which)
    kind = "vae" if isinstance(model, api.LoadedPhraseVAE) else "ldm"
    if kind != args.kind:
        raise ValueError(f"{args.workdir} holds a {kind.upper()}, not a {args.kind.upper()}")
    read_s = time.perf_counter() - start
    if kind == "vae":
        if args.section_order:
            raise ValueError("--section_order applies to --kind ldm only")
        api.export_phrase_vae(model, args.dst, with_tokenizer=True)
    else:
        api.export_phrase_ldm(model, args.dst, section_order=args.section_order)
    write_s = time.perf_counter() - start - read_s
    files = sorted(f for f in os.listdir(args.dst) if not f.startswith("."))
    log(f"exported {_describe(model)} from {args.workdir}")
    log(
        f"wrote {args.dst} ({', '.join(files)}): read {read_s:.2f} s, convert+write {write_s:.2f} s"
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``import`` or ``export``; a failed conversion is one line on stderr, status 1."""
    warnings.simplefilter("default")  # show conversion warnings (e.g. unknown section order)
    try:
        if args.command == "import":
            run_import(args)
        else:
            run_export(args)
    except (OSError, ValueError, ImportError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

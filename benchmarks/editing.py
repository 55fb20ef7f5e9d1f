"""Editing benchmark: how well a trained PhraseLDM continues, infills, accompanies, keeps a
length and varies POP909 test songs (``sample.py --from``'s edits, ``phraseldm_jax/editing.py``).

  python -m benchmarks.editing --ldm /work/runs/ldm_lencond --songs 8
  python -m benchmarks.editing --ldm exported/ldm --vae exported/vae --data_dir data_cache/pop909
  python -m benchmarks.editing --ldm ... --quick          # 2 songs, 4 steps, 2 rounds

``--ldm``: an LDM training workdir or a folder in the original's layout; ``--vae``: a PhraseVAE
workdir or original-layout folder (default: the one the LDM workdir names), loaded as
``sample.py`` loads them (``phraseldm_jax.pretrained``). Songs: the test split only, of
``--data_dir`` (a folder ``prepare`` built, or a raw POP909 folder: ``benchmarks/editing_songs``
says how the split is chosen and what each mode keeps), or of the synthetic corpus
(``--synthetic_songs``, for tests).

Every mode runs ``plain`` sampling (no mask), ``naive`` replacement (RePaint, no resampling
rounds) and ``resample`` (``--resample_rounds`` rounds per step) from the same noise and
sampler settings; ``real`` is the test songs measured the same way. Figures (docs/EDITING.md):

- kept identity: share of kept slots of bars 1..n whose decoded phrase is the PhraseVAE's
  reconstruction of the input phrase (1.0 for every edit);
- exact length: share of songs that decode (as ``sample.py`` writes them) to exactly n bars;
- PhraseFID of the generated track slots against all test songs' track-slot latents (the real
  row: the real songs' own latents at those slots, the floor for this many songs);
- bar SSM gen-kept: mean bar self-similarity between generated and kept bars, and its gap to
  the real song's, per song;
- seam L2: distance of the bar-mean latents across each kept/generated boundary, and its gap
  to the real song's at the same bars; seam notes in spread: share of seams whose onset-density
  and pitch-range changes are within the 90th percentile of the real songs' adjacent bars;
- s / song: sampling seconds per song without compilation, and its ratio to plain sampling.

The JSON (``--out``, written atomically) holds every figure, the settings, the songs and the
comparison of resampling with naive replacement per measure; the tables are printed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from configs import paths
from phraseldm_jax.cli import common as cli_common

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "editing.json")
# Flag -> (default, --quick default).
SIZES = {"songs": (8, 2), "steps": (50, 4), "resample_rounds": (5, 2)}


def build_parser():
    from benchmarks import editing_songs

    p = cli_common.ArgumentParser(
        prog="python -m benchmarks.editing",
        description=__doc__,
        formatter_class=cli_common.HelpFormatter,
    )
    p.add_argument(
        "--ldm",
        required=True,
        type=cli_common.path,
        help="PhraseLDM workdir or original-layout folder",
    )
    p.add_argument(
        "--vae",
        type=cli_common.path,
        default=None,
        help="PhraseVAE workdir or original-layout folder; default: the LDM workdir's",
    )
    p.add_argument(
        "--which",
        default="best",
        choices=("best", "latest"),
        help="checkpoint of an LDM workdir (of the PhraseVAE: best, as sample.py loads it)",
    )
    p.add_argument(
        "--data_dir",
        type=cli_common.path,
        default=paths.RAW_POP909,
        help="prepared dataset folder (its songs' test split) or raw POP909 folder "
        "($PHRASELDM_POP909, else ../shared/data/pop909)",
    )
    p.add_argument(
        "--synthetic_songs",
        type=int,
        default=0,
        help="use the test split of the synthetic corpus of this many songs instead (tests)",
    )
    for flag, (full, quick) in SIZES.items():
        what = {"songs": "test songs", "steps": "denoising steps of every run"}.get(
            flag, "RePaint resampling rounds per step of the resample run"
        )
        p.add_argument(
            f"--{flag}", type=int, default=None, help=f"{what} (default: {full}; --quick: {quick})"
        )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument(
        "--sampler",
        default="dpmpp_2m",
        choices=("ddpm", "ddim", "dpmpp_2m"),
        help="sampler of every run (sample.py's default)",
    )
    p.add_argument("--modes", default=",".join(editing_songs.MODES), help="comma-separated")
    p.add_argument("--context_bars", type=int, default=8, help="bars a continuation keeps")
    p.add_argument("--infill_bars", type=int, default=8, help="bars an infill regenerates")
    p.add_argument("--variation", type=float, default=0.4, help="SDEdit strength, (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="noise seed (batch i: fold_in(seed, i))")
    p.add_argument("--batch_size", type=int, default=8, help="songs sampled together")
    p.add_argument("--max_decode_length", type=int, default=128, help="tokens per phrase")
    p.add_argument(
        "--slot_order",
        default=None,
        choices=("pitch_order", "fixed"),
        help="slot layout of the songs; default: the LDM's latent dataset's (as sample.py)",
    )
    p.add_argument("--out", type=cli_common.path, default=DEFAULT_OUT, help="results JSON")
    return p


def check_args(parser, args) -> None:
    """Every check that needs no model (exit 2, one line)."""
    from benchmarks import editing_songs

    for flag, (full, quick) in SIZES.items():
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else full)
    args.mode_list = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in args.mode_list if m not in editing_songs.MODES]
    if unknown or not args.mode_list:
        what = f"unknown mode {unknown[0]!r}" if unknown else "no mode given"
        parser.error(f"--modes: {what}; use {','.join(editing_songs.MODES)}")
    for flag in ("songs", "steps", "batch_size", "context_bars", "infill_bars"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.steps > 1000:
        parser.error(f"--steps must be in 1..1000, got {args.steps}")
    if args.resample_rounds < 1:
        parser.error(
            f"--resample_rounds must be >= 1 (0 is the naive run), got {args.resample_rounds}"
        )
    if not 0 < args.variation <= 1:
        parser.error(f"--variation must be in (0, 1], got {args.variation}")
    if args.synthetic_songs < 0:
        parser.error(f"--synthetic_songs must be >= 0, got {args.synthetic_songs}")
    if not args.synthetic_songs and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir}: no such folder")
    if not os.path.isdir(args.ldm):
        parser.error(f"--ldm {args.ldm}: no such folder")
    if args.vae is not None:
        try:
            cli_common.require_vae_folder(args.vae, "--vae")
        except cli_common.UsageError as err:
            parser.error(str(err))


def load_models(parser, args, vae=None):
    """(``editing_run.Models``, a record of what was loaded) as ``sample.py`` loads them;
    ``vae`` replaces the PhraseVAE (tests)."""
    import jax

    from benchmarks.editing_run import Models
    from phraseldm_jax import pretrained
    from phraseldm_jax.cli import edit_flags
    from phraseldm_jax.errors import CheckpointDamagedError
    from phraseldm_jax.phrases import SLOTS_PER_BAR
    from phraseldm_jax.vae_inference import SONG_DECODE_BATCH, PhraseVAEModel

    try:
        model = pretrained.load_ldm(args.ldm, args.which)
        fmt_original = model.format == "original"
        slot_order, reference_padding = edit_flags.model_conventions(args.ldm, fmt_original)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    except CheckpointDamagedError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    vae_path = args.vae or model.vae_workdir
    if vae is None:
        if not vae_path:
            parser.error(f"{args.ldm} names no PhraseVAE: give --vae")
        try:
            cli_common.require_vae_folder(vae_path, "the LDM's PhraseVAE")
            vae = PhraseVAEModel.from_workdir(
                vae_path, max_length=args.max_decode_length,
                decode_batch_size=SONG_DECODE_BATCH, devices=jax.local_devices(),
            )  # fmt: skip
        except cli_common.UsageError as err:
            parser.error(f"{err}; give --vae")
        except CheckpointDamagedError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    models = Models(
        model.config, model.params, model.default_clip, vae,
        args.slot_order or slot_order, reference_padding,
    )  # fmt: skip
    used = getattr(vae, "checkpoint", None)
    record = {
        "ldm": os.path.abspath(args.ldm),
        "ldm_format": model.format,
        "ldm_checkpoint": model.checkpoint.as_dict() if model.checkpoint else None,
        "vae": os.path.abspath(vae_path) if vae_path else None,
        "vae_checkpoint": used.as_dict() if used is not None else None,
        "length_control": model.config.length_control,
        "sec_control": model.config.sec_control,
        "max_bars": model.config.dit.sample_size // SLOTS_PER_BAR,
    }
    return models, record


def settings_record(args, models) -> dict:
    return {
        "sampler": args.sampler,
        "steps": args.steps,
        "clip": models.clip,
        "resample_rounds": args.resample_rounds,
        "variation": args.variation,
        "context_bars": args.context_bars,
        "infill_bars": args.infill_bars,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "slot_order": models.slot_order,
        "max_decode_length": args.max_decode_length,
        "quick": args.quick,
    }


def main(argv: Sequence[str] | None = None, vae=None) -> int:
    """Command-line entry; ``vae`` replaces the PhraseVAE (tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    started = time.perf_counter()
    import jax

    from benchmarks import common, editing_report, editing_run, editing_songs
    from phraseldm_jax import fileio
    from phraseldm_jax.phrases import SLOTS_PER_BAR

    models, loaded = load_models(parser, args, vae)
    max_bars = models.config.dit.sample_size // SLOTS_PER_BAR
    try:
        chosen, skipped = editing_songs.load_test_songs(
            args.data_dir, args.songs, models.slot_order, max_bars,
            synthetic_songs=args.synthetic_songs, needs_plan=models.config.sec_control,
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as err:
        parser.exit(2, f"{parser.prog}: error: --data_dir {args.data_dir}: {err}\n")
    if not chosen:
        parser.exit(2, f"{parser.prog}: error: no usable test songs ({len(skipped)} left out)\n")
    encoder = editing_run.CachingEncoder(models.vae)
    cases = editing_run.make_cases(encoder, chosen)
    edits = editing_songs.ModeOptions(args.context_bars, args.infill_bars, args.variation)
    options = editing_run.RunOptions(
        args.sampler, args.steps, args.resample_rounds, args.seed, args.batch_size,
        args.mode_list, edits,
    )  # fmt: skip
    result = editing_run.run(models, cases, options, encoder)
    source = f"synthetic:{args.synthetic_songs}"
    if not args.synthetic_songs:
        source = os.path.abspath(args.data_dir)
    result.update(
        benchmark="editing",
        command="python -m benchmarks.editing "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        machine={
            "cpu": common.cpu_model(),
            "jax_backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
        },
        models=loaded,
        settings=settings_record(args, models),
        songs={
            "source": source,
            "split": "test",
            "used": [{"song": c.song_id, "n_bars": c.n_bars} for c in cases],
            "skipped": skipped,
        },
    )
    result["timings"]["total_s"] = time.perf_counter() - started
    result["table"] = editing_report.tables(result)
    fileio.write_json(args.out, result)
    print(result["table"])
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

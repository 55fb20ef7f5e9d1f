"""sample.py's editing flags (``--from``, ``--keep``, ``--variation``, ``--resample``,
``--exact_length``, ``--slot_order``): their definitions, their checks before any model loads
(one line, exit 2), and the ``EditPlan`` once the PhraseVAE is there (``phraseldm_jax.editing``).
"""

from __future__ import annotations

import argparse
import os

from phraseldm_jax.cli import common

MIDI_SUFFIXES = (".mid", ".midi")  # input_pipeline.midi_folder.MIDI_SUFFIXES, without its imports


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The editing flags."""
    parser.add_argument(
        "--from",
        dest="from_midi",
        metavar="MIDI",
        type=common.path,
        default=None,
        help="edit this MIDI file (imported as prepare imports it, key normalised and put back, "
        "its tempo kept): the song is encoded with the PhraseVAE and the slots --keep names are "
        "kept at every denoising step; the song gets exactly --bars bars (default: the song's); "
        "default: none (a new song)",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="SPEC",
        help="slots of the --from song to keep, repeatable: bars:1-8 (continue to --bars), "
        "bars:1-8,17-32 (infill the rest), tracks:13 (accompaniment: keep program 13 in every "
        "bar, generate the others); nothing kept but the length when left out",
    )
    parser.add_argument(
        "--variation",
        type=float,
        default=None,
        help="SDEdit strength in (0, 1]: start from the --from song noised to t = strength * T "
        "and denoise (0.4 keeps much of it, 1 little); default: none (start from noise)",
    )
    parser.add_argument(
        "--resample",
        type=int,
        default=0,
        help="RePaint resampling rounds per step when slots are kept (each costs one more model "
        "call per step)",
    )
    parser.add_argument(
        "--exact_length",
        action="store_true",
        help="keep the [SEP] pad after bar --bars (and the b-1 slot of every bar), so the model "
        "writes a song of exactly that length (always on with --from)",
    )
    parser.add_argument(
        "--slot_order",
        default=None,
        choices=("pitch_order", "fixed"),
        help="slot layout of the --from song; default: the model's latent dataset's (its "
        "stats.json), else pitch_order",
    )


def editing(args: argparse.Namespace) -> bool:
    """Whether this run keeps slots (an edit, or only the exact length)."""
    return args.from_midi is not None or args.exact_length


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no model and no file contents."""
    from phraseldm_jax import editing as editing_lib

    args.keep_spec = editing_lib.KeepSpec()
    try:
        args.keep_spec = editing_lib.parse_keep(args.keep)
    except editing_lib.EditError as err:
        parser.error(str(err))
    if args.from_midi is None:
        for flag, given in (("--keep", args.keep), ("--variation", args.variation is not None)):
            if given:
                parser.error(f"{flag} needs --from (the song to edit)")
    else:
        try:
            common.require_file(args.from_midi, "--from", MIDI_SUFFIXES)
        except common.UsageError as err:
            parser.error(str(err))
    if args.variation is not None and not 0 < args.variation <= 1:
        parser.error(f"--variation must be in (0, 1], got {args.variation}")
    if args.resample < 0:
        parser.error(f"--resample must be >= 0, got {args.resample}")
    if args.resample and not editing(args):
        parser.error("--resample needs kept slots (--from or --exact_length)")


def model_conventions(checkpoint: str, fmt_original: bool, shipped=None) -> tuple[str, bool]:
    """(slot order, unscaled [SEP] pad) the LDM at ``checkpoint`` was trained with: its
    latent dataset's ``stats.json`` slot order (pitch_order when unreadable) and its
    ``data.reference_padding``; a shipped LDM (``shipped``, a ``ShippedLDM``): what its
    shipped.json records; another original-layout folder: pitch order, unscaled pad."""
    if shipped is not None:
        return shipped.slot_order, shipped.reference_padding
    if fmt_original:
        return "pitch_order", True
    from phraseldm_jax import checkpointing, fileio

    config = checkpointing.read_workdir_config(checkpoint)
    data = config.get("data", {})
    slot_order = "pitch_order"
    stats = os.path.join(str(data.get("latent_dir", "")), "stats.json")
    if os.path.isfile(stats):
        try:
            slot_order = str(fileio.read_json(stats).get("slot_order", slot_order))
        except (OSError, ValueError):
            pass
    return slot_order, bool(data.get("reference_padding", False))


def check_song(parser, args, ldm_cfg, fmt_original: bool) -> None:
    """Reads the --from song and checks the edit against it and the model (before any model
    loads); sets ``args.edit_song``, ``args.edit_bars`` and ``args.reference_padding``."""
    from phraseldm_jax import editing as editing_lib
    from phraseldm_jax.phrases import SLOTS_PER_BAR

    slot_order, args.reference_padding = model_conventions(
        args.checkpoint, fmt_original, getattr(args, "shipped", None)
    )
    slot_order = args.slot_order or slot_order
    max_bars = ldm_cfg.dit.sample_size // SLOTS_PER_BAR
    args.edit_song = None
    plan_bars = args.section_plan.n_bars if args.section_plan is not None else None
    n_bars = args.bars or plan_bars
    try:
        if args.from_midi is not None:
            args.edit_song = editing_lib.import_song(args.from_midi, slot_order)
            n_bars = n_bars or min(args.edit_song.n_bars, max_bars)
            if n_bars > max_bars:
                raise editing_lib.EditError(
                    f"{n_bars} bars requested but {args.checkpoint} generates at most {max_bars}"
                )
            editing_lib.check_keep(args.keep_spec, args.edit_song, n_bars)
    except editing_lib.EditError as err:
        parser.error(f"--from {err}" if str(err).startswith(args.from_midi) else str(err))
    if n_bars is None and ldm_cfg.length_control:
        n_bars = min(64, max_bars)
    if n_bars is None:
        parser.error("--exact_length needs --bars or --plan (the model has no length condition)")
    args.edit_bars = n_bars


def build_plan(parser, args, encoder, ldm_cfg):
    """The ``EditPlan`` of the checked flags, with the PhraseVAE ``encoder``."""
    from phraseldm_jax import editing as editing_lib

    try:
        return editing_lib.plan_edit(
            encoder,
            length=ldm_cfg.dit.sample_size,
            scale_factor=ldm_cfg.scale_factor,
            n_bars=args.edit_bars,
            song=args.edit_song,
            keep=args.keep_spec,
            reference_padding=args.reference_padding,
        )
    except editing_lib.EditError as err:
        parser.error(str(err))


def summary(args, plan) -> dict:
    """summary.json's ``edit`` record."""
    song = args.edit_song
    return {
        "from": os.path.abspath(args.from_midi) if song is not None else None,
        "song_bars": song.n_bars if song is not None else None,
        "slot_order": song.slot_order if song is not None else None,
        "key_shift": song.key_shift if song is not None else 0,
        "keep": list(args.keep),
        "kept_slots": plan.kept_slots,
        "n_bars": plan.n_bars,
        "variation": args.variation,
        "resample": args.resample,
    }

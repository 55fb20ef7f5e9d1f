"""Generates songs with a trained PhraseLDM and writes them as MIDI, plus a JSON summary.

  python sample.py --out /tmp/songs --num_songs 4 --bars 64      # the shipped models
  python sample.py --checkpoint /work/runs/ldm_lencond --out /tmp/songs --num_songs 4 --bars 64
  python sample.py --checkpoint /work/runs/ldm_seccond --out /tmp/songs \\
      --plan "i-8 A-8 B-8 X-4" --sampler dpmpp_2m --steps 25 --key Eb --tempo 100

``--checkpoint`` is an LDM training workdir (Orbax, ``train_ldm.py`` or ``python -m
phraseldm_jax.cli.convert import``) or a folder in the original's layout (``config.json`` +
``model.safetensors``, read by ``convert.api``; give ``--vae_workdir`` with it, a PhraseVAE
workdir or original-layout folder). Without it, the models shipped in the repository are used
(``pretrained/pop909-small``, or the folder ``$PHRASELDM_PRETRAINED`` names; written by
``python -m phraseldm_jax.cli.ship``): the length-conditioned PhraseLDM, or with ``--plan``
the section-conditioned one, each decoded by the PhraseVAE its ``shipped.json`` names. Songs
come out in C major / A minor; ``--key`` transposes them (``D``: +2 from C major; ``Bm``: the
same shift, from A minor). Every option is checked before anything is loaded or computed; a
bad one exits with status 2 and says why.

Output: ``song_000.mid`` ... (the original writes 90 bpm), ``song_000.txt`` ... (the REMI-z
song strings, untransposed) and ``summary.json`` (bars per song, settings, seed, timings, and
the checkpoints asked for and used). Sampling again into the same ``--out`` first removes the
songs an earlier run wrote there (``song_<n>.mid`` / ``.txt``); other files are left alone.

Song length: as in the original (SPEC section 7), a song is the bars before the first decoded
``[SEP]``, so it can be shorter than ``--bars`` when the model ends it early (an undertrained
model does). Every song gets one line on stderr; a shorter one says so (``song_001: 7 bars,
asked for 32 (ended at [SEP])``) and its summary entry has ``requested_bars``, ``n_bars`` and
``short: true``. A song without bars (its ``[SEP]`` comes before the first ``b-1``) gets no
MIDI file: ``"written": false`` and a ``reason`` in the summary, its ``.txt`` kept; a song of
silent bars lasts to the end of its last bar. Repeated
notes are dropped and notes held past the last bar cut (``songs.clean_notes``; counted per
song). ``--force_length`` (off by default)
instead reads exactly the requested bars by position from the 4-latents-per-bar layout, whatever
the model marked as the end: no note is invented, bars past the model's end are usually
silent, and the MIDI file lasts to the end of the last bar; ``bars_before_sep`` in the summary
keeps the length the model generated.

Editing (``phraseldm_jax/editing.py``): ``--from song.mid`` encodes a MIDI song with the
PhraseVAE and keeps slots of it at every denoising step (RePaint; ``--resample N`` more rounds
per step): ``--keep bars:1-8 --bars 32`` continues it, ``--keep bars:1-8,17-32`` infills bars
9-16, ``--keep tracks:13`` writes the other tracks for its melody, ``--variation 0.4`` starts
from the song noised to t = 0.4 T (SDEdit). An edited song has exactly ``--bars`` bars
(default: the song's): the ``[SEP]`` pad after it and every bar's ``b-1`` slot are kept, as
``--exact_length`` does for a new song. It is written in the song's key and tempo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from phraseldm_jax import fileio, sections
from phraseldm_jax.cli import common, edit_flags
from phraseldm_jax.errors import CheckpointDamagedError
from phraseldm_jax.phrases import SLOTS_PER_BAR

KEY_PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
DEFAULT_SAMPLER = "dpmpp_2m"  # the best measured sampler (docs/LDM_RESULTS.md)
DEFAULT_FAST_STEPS = 50
SONG_FILE = re.compile(r"song_\d+\.(mid|txt)")  # the names this script writes into --out


def parse_key(text: str) -> int:
    """Semitones from C major / A minor to key ``text`` ("D", "Bb", "F#m", "c minor"), in
    -6..5. Raises ValueError for anything else."""
    name = text.strip()
    minor = False
    for suffix, is_minor in (("minor", True), ("min", True), ("major", False), ("maj", False)):
        if name.lower().endswith(suffix):
            name, minor = name[: -len(suffix)].strip(), is_minor
            break
    else:
        if len(name) >= 2 and name.endswith("m"):
            name, minor = name[:-1], True
    if not name or name[0].upper() not in KEY_PITCH_CLASSES or len(name) > 2:
        raise ValueError(f"unknown key {text!r} (expected e.g. C, F#, Bb, Am, C# minor)")
    pitch = KEY_PITCH_CLASSES[name[0].upper()]
    if len(name) == 2:
        if name[1] not in "#b":
            raise ValueError(f"unknown key {text!r}: accidental must be '#' or 'b'")
        pitch += 1 if name[1] == "#" else -1
    shift = (pitch - (9 if minor else 0)) % 12
    return shift - 12 if shift > 5 else shift


def build_parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument(
        "--checkpoint",
        default=None,
        type=common.path,
        help="LDM training workdir or original-layout folder (relative paths and ~ work); "
        "default: the shipped models (pretrained/pop909-small, or $PHRASELDM_PRETRAINED): "
        "the length-conditioned PhraseLDM, with --plan the section-conditioned one, each "
        "with its PhraseVAE",
    )
    p.add_argument(
        "--which",
        default="best",
        choices=("best", "latest"),
        help="checkpoint of an LDM workdir: the newest intact one of this kind, else of the "
        "other kind; the one used (LDM and VAE) is printed and in summary.json",
    )
    p.add_argument(
        "--vae_workdir",
        type=common.path,
        default=None,
        help="PhraseVAE workdir or original-layout folder; default: the one the LDM workdir "
        "names (its config.json's vae.workdir), for a shipped LDM the one shipped.json names",
    )
    p.add_argument(
        "--out",
        required=True,
        type=common.path,
        help="output folder for the MIDI files, REMI-z texts and summary.json; the song_<n> "
        "files of an earlier run there are removed first",
    )
    p.add_argument("--num_songs", type=int, default=4, help="songs to generate")
    p.add_argument(
        "--bars",
        type=int,
        default=None,
        help="length condition, 1..128 bars; default: the plan's length, else 64 (the "
        "paper's evaluation length) for a length-conditioned model, else none",
    )
    p.add_argument(
        "--plan",
        default=None,
        help='section plan, e.g. "i-8 A-8 B-8 X-4" (section-conditioned models only, which '
        "need one); default: none",
    )
    p.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        choices=("ddpm", "ddim", "dpmpp_2m"),
        help=f"{DEFAULT_SAMPLER} at {DEFAULT_FAST_STEPS} steps is the best measured setting "
        "(docs/LDM_RESULTS.md: lowest PhraseFID of the samplers on the same model and noise); "
        "ddpm runs the original's 1000 steps",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps, 1..1000; default: 1000 for ddpm, {DEFAULT_FAST_STEPS} for ddim "
        "and dpmpp_2m",
    )
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale; 1 = none")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise (0 = deterministic)")
    p.add_argument(
        "--clip",
        default=None,
        choices=("scaled", "reference", "none"),
        help="clipping of the predicted clean latents x0: scaled (the raw clip range divided "
        "by the scale factor), reference (the raw value applied to scaled latents, as the "
        "original), none; default: the checkpoint's (scaled for models trained here, "
        "reference for the original's weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="rng seed (batch i uses fold_in(seed, i))")
    p.add_argument(
        "--key", default=None, help="transpose to this key, e.g. D, Bb, F#m; default: C / Am"
    )
    p.add_argument(
        "--tempo",
        type=float,
        default=None,
        help="bpm written into the MIDI files; default: the --from song's, else 90",
    )
    p.add_argument("--batch_size", type=int, default=8, help="songs sampled together")
    p.add_argument("--max_decode_length", type=int, default=128, help="tokens per phrase")
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="on CPU, jax devices to split the host into (songs and decode rows run one program "
        "per device at once); 0 = one per core, 1 = a single device",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="matmul dtype of the DiT and the PhraseVAE decoder; bfloat16 is faster on "
        "CPUs with AMX and on accelerators (decoded tokens can differ where two logits nearly "
        "tie); default: the DiT in bfloat16 (PhraseFID as float32's), the decoder in float32",
    )
    p.add_argument(
        "--force_length",
        action="store_true",
        help="write exactly the requested bars, read by position from the latent layout, even "
        "where the model ended the song earlier (those bars are usually silent); off: a song "
        "ends at its first [SEP] as in the original",
    )
    p.add_argument(
        "--reading",
        choices=("slots", "tokens"),  # songs.READINGS (not imported before the flags parse)
        default="slots",
        help="how decoded latents make bars: slots = by position (4 latents a bar) up to the "
        "model's first [SEP], so a bar-line latent decoded as a phrase does not merge two bars; "
        "tokens = one bar per b-1 token before the first [SEP], as the original reads songs",
    )
    edit_flags.add_flags(p)
    common.add_verbose_flag(p)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no model: exits through ``parser.error`` (status 2)."""
    if args.num_songs < 1:
        parser.error(f"--num_songs must be >= 1, got {args.num_songs}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.bars is not None and not 1 <= args.bars <= sections.MAX_PLAN_BARS:
        parser.error(f"--bars must be in 1..{sections.MAX_PLAN_BARS}, got {args.bars}")
    args.section_plan = None
    if args.plan is not None:
        try:
            args.section_plan = sections.parse_plan(args.plan, source="--plan")
        except sections.SectionPlanError as err:
            parser.error(str(err))
        if args.bars is not None and args.section_plan.n_bars != args.bars:
            parser.error(
                f"--plan {args.plan!r} covers {args.section_plan.n_bars} bars but --bars is "
                f"{args.bars}"
            )
    if args.steps is None:
        args.steps = 1000 if args.sampler == "ddpm" else DEFAULT_FAST_STEPS
    if not 1 <= args.steps <= 1000:
        parser.error(f"--steps must be in 1..1000, got {args.steps}")
    if args.tempo is not None and args.tempo <= 0:
        parser.error(f"--tempo must be > 0, got {args.tempo}")
    if args.max_decode_length < 2:
        parser.error(f"--max_decode_length must be >= 2, got {args.max_decode_length}")
    if args.cpu_devices < 0:
        parser.error(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
    args.semitones = 0
    if args.key is not None:
        try:
            args.semitones = parse_key(args.key)
        except ValueError as err:
            parser.error(str(err))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} exists and is not a folder")
    edit_flags.check_args(parser, args)
    find_shipped(parser, args)
    if args.vae_workdir is not None:
        try:
            common.require_vae_folder(args.vae_workdir, "--vae_workdir")
        except common.UsageError as err:
            parser.error(str(err))


def find_shipped(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.shipped``: without ``--checkpoint`` the shipped LDM (``shipped.for_sampling``)
    and its VAE, or one line (status 2) saying what is missing; a ``--checkpoint`` that is a
    shipped LDM's folder gets its VAE the same way; else None."""
    from configs import paths
    from phraseldm_jax import shipped

    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such folder")
    try:
        args.shipped = shipped.for_sampling(
            args.checkpoint, args.plan is not None, paths.pretrained_dir()
        )
    except shipped.ShippedModelsError as err:
        parser.error(str(err))
    if args.shipped is not None:
        args.checkpoint = args.checkpoint or args.shipped.folder
        args.vae_workdir = args.vae_workdir or args.shipped.vae_folder


def check_model(parser, args, ldm_cfg, fmt_original: bool = False) -> None:
    """Conditions the model cannot take are errors, not silently ignored options."""
    if args.plan is not None and not ldm_cfg.sec_control:
        parser.error(f"--plan given but {args.checkpoint} is not section-conditioned")
    if ldm_cfg.sec_control and args.plan is None:
        parser.error(f"{args.checkpoint} is section-conditioned: give --plan")
    if args.bars is not None and not ldm_cfg.length_control and not edit_flags.editing(args):
        parser.error(f"--bars given but {args.checkpoint} is not length-conditioned")
    if args.guidance != 1.0 and not (ldm_cfg.length_control or ldm_cfg.sec_control):
        parser.error("--guidance needs a conditional model")
    if args.force_length and args.bars is None and args.plan is None and not ldm_cfg.length_control:
        parser.error("--force_length needs --bars or --plan (the model has no length condition)")
    max_bars = ldm_cfg.dit.sample_size // SLOTS_PER_BAR
    bars = args.section_plan.n_bars if args.section_plan is not None else args.bars
    if bars is not None and bars > max_bars:
        parser.error(f"{bars} bars requested but {args.checkpoint} generates at most {max_bars}")
    if edit_flags.editing(args):
        edit_flags.check_song(parser, args, ldm_cfg, fmt_original)


def clear_earlier_songs(out: str) -> list[str]:
    """Removes the songs an earlier run wrote into ``out`` (files named ``song_<n>.mid`` /
    ``.txt``, and those its summary.json lists), so that the folder holds this run's songs and
    its summary lists all of them; other files stay. Returns the names removed."""
    names = set()
    if os.path.isdir(out):
        names = {n for n in os.listdir(out) if SONG_FILE.fullmatch(n)}
        summary_path = os.path.join(out, "summary.json")
        if os.path.isfile(summary_path):
            try:
                listed = json.load(open(summary_path)).get("songs", [])
            except (OSError, ValueError, AttributeError):
                listed = []
            for entry in listed if isinstance(listed, list) else []:
                for key in ("file", "text_file"):
                    name = entry.get(key) if isinstance(entry, dict) else None
                    if isinstance(name, str) and name == os.path.basename(name):
                        names.add(name)
    removed = []
    for name in sorted(names):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
            removed.append(name)
    return removed


def describe_checkpoint(used) -> str:
    """``latest/6`` plus why, when it is not what was asked for (``--which best`` on a workdir
    without a best checkpoint, damaged steps skipped)."""
    notes = []
    if used.which_used != used.which_asked:
        notes.append(
            f"asked for {used.which_asked}: the workdir has no intact {used.which_asked} one"
        )
    if used.skipped:
        notes.append("skipped damaged " + ", ".join(label for label, _ in used.skipped))
    return used.label + (f" ({'; '.join(notes)})" if notes else "")


def checkpoint_record(path: str, used) -> dict:
    """summary.json's record of one model: the folder, and for a workdir the checkpoint asked
    for and the one used."""
    record = {"path": fileio.user_path(path)}
    if used is not None:
        record.update(used.as_dict())
    return record


def song_entry(name: str, song, requested: int | None, forced: bool) -> dict:
    """A song's ``summary.json`` entry: its files, bars against ``requested``, whether its
    MIDI file is written and, when not, why (a song without bars is never written as a MIDI
    file; its ``.txt`` keeps what the model decoded)."""
    entry = {
        "file": f"{name}.mid",
        "text_file": f"{name}.txt",
        "requested_bars": requested,
        "n_bars": song.n_bars,
        "bars_before_sep": song.bars_before_sep,
        "short": requested is not None and song.n_bars < requested,
        "long": requested is not None and song.n_bars > requested,
        "ended_at_sep": song.ended_at_sep,
        "written": False,
        "reason": None,
        "n_notes": song.n_notes,
        "duplicate_notes_removed": song.cleanup.duplicates,
        "notes_cut_at_end": song.cleanup.cut_at_end,
        "error": song.error,
    }
    if song.multitrack is None:
        entry["reason"] = f"remi-z cannot read the decoded text ({song.error})"
    elif song.n_bars == 0:
        end = "the model ended the song ([SEP]) before" if song.ended_at_sep else "no slot holds"
        tokens = len(song.text.split())
        entry["reason"] = f"no bars: {end} its first b-1" + (
            f"; the {tokens} tokens of its unfinished bar are kept in {entry['text_file']}"
            if tokens
            else ""
        )
    else:
        entry["written"] = True
    if not entry["written"]:
        entry["file"] = None
    if forced and song.bars_before_sep < song.n_bars:
        entry["note"] = (
            f"forced to {song.n_bars} bars; the model ended it at bar {song.bars_before_sep}"
        )
    return entry


def song_line(entry: dict) -> str:
    """One plain line per song: its bars, what was asked, and what was written."""
    name = entry["text_file"][: -len(".txt")]
    line = f"{name}: {entry['n_bars']} bar{'' if entry['n_bars'] == 1 else 's'}"
    if entry["short"]:
        why = "ended at [SEP]" if entry["ended_at_sep"] else "no [SEP], fewer b-1 in its slots"
        line += f", asked for {entry['requested_bars']} ({why})"
    elif entry.get("long"):
        line += f", asked for {entry['requested_bars']} (the model ended it later)"
    if entry.get("note"):
        line += f" ({entry['note']})"
    if entry["written"] and not entry["n_notes"]:
        line += f", no notes (silent bars) -> {entry['file']}"
    elif entry["written"]:
        line += f", {entry['n_notes']} notes -> {entry['file']}"
        if entry["duplicate_notes_removed"]:
            dropped = entry["duplicate_notes_removed"]
            line += f" ({dropped} repeated note{'' if dropped == 1 else 's'} dropped)"
    else:
        line += f"; no MIDI file written: {entry['reason']}"
    return line


def run(args, model, decoder, log=print) -> dict:
    """Samples ``args.num_songs`` songs in batches and writes them; returns the summary."""
    # Imported here, not at the top: jax and the models are heavy, and every option is checked
    # (and --help answered) before they load.
    import jax
    import numpy as np
    import tqdm

    from phraseldm_jax import ldm, sharding, songs
    from phraseldm_jax.sampler import LatentSampler, SamplerSettings

    ldm_cfg, params = model.config, model.params
    ldm_cfg = ldm.with_compute_dtype(ldm_cfg, args.dtype or ldm.INFERENCE_DIT_DTYPE)
    settings = SamplerSettings(
        sampler=args.sampler,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        clip=args.clip or model.default_clip,
        resample=args.resample,
        strength=args.variation or 1.0,
    )
    edit = getattr(args, "edit_plan", None)  # editing (edit_flags.build_plan)
    target = edit.n_bars if edit is not None else args.bars
    if target is None and ldm_cfg.length_control:  # the paper's evaluation length
        target = (
            args.section_plan.n_bars
            if args.section_plan
            else min(64, ldm_cfg.dit.sample_size // SLOTS_PER_BAR)
        )
    forced_bars = None
    if args.force_length:
        forced_bars = target if target is not None else args.section_plan.n_bars
    if edit is not None and edit.exact_length:  # the kept bar layout says where bars are
        forced_bars = edit.n_bars
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    sampler = LatentSampler(ldm_cfg, settings, mesh)
    os.makedirs(args.out, exist_ok=True)
    timings = {"compile_s": 0.0, "sample_s": 0.0, "decode_s": 0.0, "write_s": 0.0}
    songs_out = []
    bar = tqdm.tqdm(total=args.num_songs, desc="songs", unit="song", file=sys.stderr)
    for index, start in enumerate(range(0, args.num_songs, args.batch_size)):
        n = min(args.batch_size, args.num_songs - start)
        cond = ldm.make_conditions(n, target, args.section_plan)
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), index)
        if edit is None:
            latents = sampler(params, key, cond)
        else:  # the kept slots get the encoded latents back: they decode as the VAE's
            latents = edit.restore(sampler(params, key, cond, *edit.batch(n)))
        t1 = time.perf_counter()
        decoded = songs.decode_songs(decoder, latents, forced_bars, reading=args.reading)
        t2 = time.perf_counter()
        for offset, song in enumerate(decoded):
            name = f"song_{start + offset:03d}"
            entry = song_entry(name, song, target, args.force_length)
            fileio.write_text(os.path.join(args.out, entry["text_file"]), song.text + "\n")
            if entry["written"]:
                songs.write_midi(
                    song.multitrack,
                    os.path.join(args.out, entry["file"]),
                    tempo=args.tempo,
                    semitones=args.semitones - getattr(args, "key_shift", 0),
                    keep_silent_bars=args.force_length or not song.n_notes,
                )
            songs_out.append(entry)
        t3 = time.perf_counter()
        timings["compile_s"] += sampler.compile_seconds
        timings["sample_s"] += t1 - t0 - sampler.compile_seconds
        timings["decode_s"] += t2 - t1
        timings["write_s"] += t3 - t2
        bar.update(n)
        bar.set_postfix(bars=[s.n_bars for s in decoded][:8])
    bar.close()
    for entry in songs_out:  # after the progress bar, which would break the lines
        log(song_line(entry))
    bars = [s["n_bars"] for s in songs_out]
    written = sum(s["written"] for s in songs_out)
    short = sum(s["short"] for s in songs_out)
    log(
        f"{written} of {len(songs_out)} songs written to {args.out}, bars {bars}"
        + (f", {short} shorter than the requested {target}" if short else "")
        + (f", {long_} longer" if (long_ := sum(s["long"] for s in songs_out)) else "")
    )
    if short:
        log(
            "the model ended those songs early (its [SEP] came before the requested length); "
            "--force_length writes the requested bars by position"
        )
    return {
        "checkpoint": os.path.abspath(args.checkpoint),
        "format": model.format,
        "model": {"length_control": ldm_cfg.length_control, "sec_control": ldm_cfg.sec_control},
        "settings": {
            "sampler": settings.sampler,
            "steps": settings.num_steps,
            "guidance": settings.guidance_scale,
            "eta": settings.eta,
            "clip": settings.clip,
            "target_bars": target,
            "force_length": args.force_length,
            "reading": args.reading,
            "plan": args.section_plan.to_string() if args.section_plan else None,
            "key": args.key,
            "semitones": args.semitones,
            "tempo": args.tempo,
            "batch_size": args.batch_size,
            "edit": edit_flags.summary(args, edit) if edit is not None else None,
            "devices": int(mesh.size),
            "dit_dtype": ldm_cfg.dit.dtype,
            "decode_dtype": getattr(decoder, "compute_dtype", None) or "float32",
        },
        "seed": args.seed,
        "songs": songs_out,
        "written": written,
        "short": short,
        "duplicate_notes_removed": sum(s["duplicate_notes_removed"] for s in songs_out),
        "bars": {"mean": float(np.mean(bars)), "min": int(min(bars)), "max": int(max(bars))},
        "timings": timings,
    }


def main(argv=None, decoder=None) -> int:
    """Command-line entry; ``decoder`` replaces the PhraseVAE decoder (tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    common.quiet_logging(getattr(args, "verbose", False))
    check_args(parser, args)
    # Imported after the checks (see ``run``); use_cpu_cores before any jax computation.
    from phraseldm_jax import pretrained, sharding

    sharding.use_cpu_cores(args.cpu_devices or None)
    import jax

    from phraseldm_jax.vae_inference import SONG_DECODE_BATCH, PhraseVAEModel

    started = time.perf_counter()
    try:
        ldm_cfg = pretrained.read_ldm_config(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    fmt_original = not os.path.isdir(os.path.join(args.checkpoint, "checkpoints"))
    if args.shipped is not None:
        print(f"using {args.shipped.describe()}", file=sys.stderr)
    check_model(parser, args, ldm_cfg, fmt_original)
    try:
        model = pretrained.load_ldm(args.checkpoint, args.which)
    except CheckpointDamagedError as err:  # the flags were fine: one line, no usage
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if model.checkpoint is not None:
        print(f"LDM checkpoint: {describe_checkpoint(model.checkpoint)}", file=sys.stderr)
    vae_workdir = args.vae_workdir or model.vae_workdir
    if decoder is None:
        if not vae_workdir:
            parser.error(f"{args.checkpoint} names no PhraseVAE: give --vae_workdir")
        try:
            common.require_vae_folder(vae_workdir, "the LDM's PhraseVAE workdir")
        except common.UsageError as err:
            parser.error(f"{err}; give --vae_workdir")
        try:
            decoder = PhraseVAEModel.from_workdir(
                vae_workdir,
                max_length=args.max_decode_length,
                decode_batch_size=SONG_DECODE_BATCH,
                devices=jax.local_devices(),
                compute_dtype=args.dtype,
            )
        except CheckpointDamagedError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    args.edit_plan, args.key_shift = None, 0
    if edit_flags.editing(args):  # the VAE encodes the song and the special slots
        args.edit_plan = edit_flags.build_plan(parser, args, decoder, model.config)
        song = args.edit_song
        if song is not None:
            args.key_shift = song.key_shift if args.key is None else 0
            args.tempo = args.tempo or song.tempo
    args.tempo = args.tempo or 90.0
    vae_used = getattr(decoder, "checkpoint", None)
    if vae_used is not None:
        print(f"VAE checkpoint: {describe_checkpoint(vae_used)}", file=sys.stderr)
    loaded = time.perf_counter()
    removed = clear_earlier_songs(args.out)
    if removed:
        print(f"removed {len(removed)} files of an earlier run from {args.out}", file=sys.stderr)
    summary = run(args, model, decoder, log=lambda m: print(m, file=sys.stderr))
    summary["checkpoints"] = {"ldm": checkpoint_record(args.checkpoint, model.checkpoint)}
    if args.shipped is not None:
        summary["shipped"] = args.shipped.summary()
    if vae_workdir and getattr(decoder, "source", None) is not None:
        summary["checkpoints"]["vae"] = checkpoint_record(vae_workdir, vae_used)
    summary["timings"]["load_s"] = loaded - started
    summary["timings"]["total_s"] = time.perf_counter() - started
    summary_path = os.path.join(args.out, "summary.json")
    fileio.write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

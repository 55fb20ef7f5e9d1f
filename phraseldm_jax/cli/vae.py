"""``python -m phraseldm_jax.cli.vae encode|decode|reconstruct``: a trained PhraseVAE on files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from phraseldm_jax import fileio, phrases, songs, vocab
from phraseldm_jax.cli import common
from phraseldm_jax.metrics import f1 as f1_lib
from phraseldm_jax.vae_inference import PhraseVAEModel

PROG = "python -m phraseldm_jax.cli.vae"
DESCRIPTION = """A trained PhraseVAE (stage 3) on files: phrases <-> latents, MIDI round trips.

  encode       one phrase per line -> mean and logvar [N, 64] in a .npz
  decode       a .npy array (or the 'mean' of a .npz) -> one phrase per line
  reconstruct  a MIDI file through the VAE (every track phrase of every bar) -> MIDI + scores
"""
ENCODE = """Phrases (one per line) -> a .npz of their posterior means and log-variances.

--output gets 'mean' and 'logvar' [N, 64]; --sample writes posterior samples in place of the
means."""
DECODE = """Latents (.npy, or 'mean' / 'latents' of a .npz) -> one decoded phrase per line.

--song also writes the rows as a song's slot latents to a MIDI file."""
RECONSTRUCT = """A MIDI file through the VAE -> MIDI, and how well it came back.

--input is read by the importer the datasets are prepared with (python -m phraseldm_jax.cli
.prepare): a POP909 song (NNN/NNN.mid beside beat_midi.txt) by the POP909 importer (bars from
the beat tracking; MELODY, BRIDGE, PIANO as programs 13, 25, 0), any other file by the
MIDI-folder importer (4/4 only; every track with notes, drums included). A file it cannot
represent (another meter, two tracks with one program, no notes) is refused with the reason.
Every track phrase of every bar is encoded and decoded; --output gets the result with the
input's bar layout, key and tempo; the scores (F1, exact match) are printed."""
SOURCES = ("auto", "pop909", "midi")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    common.add_vae_flags(parser)
    parser.add_argument(
        "--decode_dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="matmul dtype of decoding (default: the model's)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = common.add_subcommands(parser)
    encode = common.subcommand(commands, "encode", ENCODE)
    _add_model_flags(encode)
    encode.add_argument("--input", type=common.path, required=True, help="phrases, one per line")
    encode.add_argument("--output", type=common.path, required=True, help="the .npz to write")
    encode.add_argument("--sample", action="store_true", help="posterior samples, not means")
    encode.add_argument("--seed", type=int, default=0, help="rng seed of --sample")
    decode = common.subcommand(commands, "decode", DECODE)
    _add_model_flags(decode)
    decode.add_argument(
        "--input", type=common.path, required=True, help="latents: .npy, or .npz with 'mean'"
    )
    decode.add_argument("--output", type=common.path, required=True, help="the text file to write")
    decode.add_argument(
        "--song", type=common.path, default="", help="also write the rows as a song to this MIDI"
    )
    decode.add_argument("--tempo", type=float, default=songs.REFERENCE_TEMPO, help="bpm of --song")
    reconstruct = common.subcommand(commands, "reconstruct", RECONSTRUCT)
    _add_model_flags(reconstruct)
    reconstruct.add_argument(
        "--input", type=common.path, required=True, help="the MIDI file to reconstruct"
    )
    reconstruct.add_argument(
        "--output", type=common.path, required=True, help="the MIDI file to write"
    )
    reconstruct.add_argument(
        "--slot_order",
        default="pitch_order",
        choices=phrases.SLOT_ORDERS,
        help="the bar layout --input is read into: pitch_order (remi-z order) or fixed "
        "(POP909's programs 13, 25, 0 in slots 0-2)",
    )
    reconstruct.add_argument(
        "--source",
        default="auto",
        choices=SOURCES,
        help="importer: pop909, midi, or auto (pop909 for NNN/NNN.mid beside beat_midi.txt)",
    )


def load_latents(path: str) -> np.ndarray:
    """A .npy array, or the ``mean`` (else ``latents``) array of a .npz: [N, latent_dim]."""
    common.require_file(path, "--input", (".npy", ".npz"))
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise common.UsageError(f"--input {path}: not a NumPy .npy/.npz file ({error})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        key = next((k for k in ("mean", "latents") if k in data.files), None)
        if key is None:
            raise common.UsageError(
                f"{path}: expected an array 'mean' or 'latents', found {data.files}"
            )
        data = data[key]
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.floating):
        raise common.UsageError(
            f"--input {path}: expected float latents [N, latent_dim], got {data.dtype} "
            f"{list(data.shape)}"
        )
    return data


def _is_pop909_song(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(folder)
    return os.path.basename(path) == f"{name}.mid" and os.path.isfile(
        os.path.join(folder, "beat_midi.txt")
    )


def import_midi(path: str, source: str = "auto", flag: str = "--input") -> dict:
    """The song record of MIDI file ``path``, by the importer ``prepare`` uses for it (see
    ``RECONSTRUCT``); a ``UsageError`` with the reason when it cannot be represented."""
    from input_pipeline import midi_folder, pop909

    common.require_file(path, flag, midi_folder.MIDI_SUFFIXES)
    if source == "pop909" or (source == "auto" and _is_pop909_song(path)):
        try:
            return pop909.import_song(os.path.dirname(os.path.abspath(path)))
        except ValueError as error:
            raise common.UsageError(f"{flag} {error}") from None
    try:
        shared = midi_folder.shared_programs(path)
        if shared:
            program, names = next(iter(shared.items()))
            raise common.UsageError(
                f"{flag} {path}: tracks {names} share program {program}; a bar keeps one "
                "phrase per program, so they would merge (give each track its own program, or "
                "--source pop909 for a POP909 song)"
            )
        return midi_folder.import_file(path, normalize_key=False)
    except midi_folder.MidiSkip as error:
        raise common.UsageError(f"{flag} {error}") from None


def record_slots(record: dict, slot_order: str) -> list[str]:
    """Per bar the record's phrases (every one: as many slots as the fullest bar needs, at
    least 3), then ``b-1``."""
    n_slots = phrases.DEFAULT_N_SLOTS
    if slot_order == "pitch_order":
        n_slots = max(n_slots, *(len(bar) for bar in phrases.song_bars(record)))
    return phrases.slot_phrases(record, slot_order, n_slots=n_slots)


def reconstruct(model: PhraseVAEModel, record: dict, output: str, slot_order: str) -> dict:
    """A song record -> every track phrase through the VAE -> MIDI with the input's bar
    layout, key (the record's key shift undone) and tempo."""
    slots, tempo = record_slots(record, slot_order), float(record["tempo"])
    per_bar = slots.index(phrases.BAR_TOKEN) + 1
    real = [i for i, s in enumerate(slots) if s.startswith("i-")]
    decoded = model.reconstruct([slots[i] for i in real]) if real else []
    out = list(slots)
    for i, text in zip(real, decoded):
        out[i] = text
    song = phrases.slots_to_remiz(songs.bars_as_song(out, per_bar))
    songs.write_midi(
        song, output, tempo=tempo, semitones=-int(record["key_shift"]), allow_empty=False
    )
    scores = f1_lib.reconstruction_f1(decoded, [slots[i] for i in real])
    exact = float(np.mean([d == slots[i] for i, d in zip(real, decoded)])) if real else 0.0
    return {
        "bars": len(slots) // per_bar,
        "phrases": len(real),
        "exact_match": exact,
        **scores,
        "output": output,
    }


def check_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model, before it loads; returns the inputs read."""
    common.require_vae_folder(args.workdir, "--workdir")
    common.require_output(args.output, "--output")
    if args.command == "encode":
        common.require_file(args.input, "--input")
        try:
            with open(args.input, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError:
            raise common.UsageError(
                f"--input {args.input}: not a text file (one phrase per line)"
            ) from None
        for number, text in enumerate(texts, 1):
            unknown = [t for t in text.split() if t not in vocab.PHRASE_VOCAB]
            if unknown:
                raise common.UsageError(
                    f"--input {args.input} line {number}: unknown tokens {unknown[:5]}"
                )
        return {"texts": texts}
    if args.command == "decode":
        if args.song:
            common.require_output(args.song, "--song")
            if args.tempo <= 0:
                raise common.UsageError(f"--tempo must be > 0, got {args.tempo}")
        return {"latents": load_latents(args.input)}
    return {"record": import_midi(args.input, args.source)}


def run(args: argparse.Namespace) -> int:
    inputs = check_args(args)
    model = PhraseVAEModel.from_workdir(
        args.workdir, args.checkpoint, compute_dtype=args.decode_dtype
    )
    if args.command == "encode":
        texts = inputs["texts"]
        mean, logvar = model.encode(texts, args.sample, jax.random.PRNGKey(args.seed))

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
                np.savez(f, mean=mean, logvar=logvar)

        fileio.atomic_write(args.output, save)
        summary = {"phrases": len(texts), "output": args.output}
    elif args.command == "decode":
        latents = inputs["latents"]
        if latents.shape[1] != model.config.latent_dim:
            raise common.UsageError(
                f"--input {args.input}: latents have {latents.shape[1]} dimensions, the model "
                f"{model.config.latent_dim}"
            )
        texts = model.decode(latents)
        summary = {"latents": len(texts), "output": args.output}
        if args.song:  # the song first: when it cannot be written, nothing is
            song = phrases.slots_to_multitrack(texts)
            try:
                songs.write_midi(song, args.song, tempo=args.tempo, allow_empty=False)
            except ValueError as error:
                raise common.UsageError(f"--song: {error}") from None
            summary["song"] = args.song
        fileio.write_text(args.output, "".join(line + "\n" for line in texts))
    else:
        summary = reconstruct(model, inputs["record"], args.output, args.slot_order)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m phraseldm_jax.cli.vae encode|decode|reconstruct``: a trained PhraseVAE on files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax
import numpy as np

from phraseldm_jax import checkpointing, fileio, phrases, songs
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

Every track phrase of every bar of --input is encoded and decoded; --output gets the result
with the input's bar layout; the scores (F1, exact match) are printed."""


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=common.path,
        required=True,
        help="PhraseVAE (stage 3) training workdir or original folder",
    )
    parser.add_argument(
        "--checkpoint", default="best", choices=checkpointing.WHICH, help="checkpoint to load"
    )
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


def load_latents(path: str) -> np.ndarray:
    """A .npy array, or the ``mean`` (else ``latents``) array of a .npz."""
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        key = next((k for k in ("mean", "latents") if k in data.files), None)
        if key is None:
            raise common.UsageError(
                f"{path}: expected an array 'mean' or 'latents', found {data.files}"
            )
        return data[key]
    return data


def reconstruct(model: PhraseVAEModel, path: str, output: str, slot_order: str) -> dict:
    """MIDI -> every track phrase through the VAE -> MIDI with the input's bar layout."""
    slots, tempo = songs.midi_slots(path, slot_order)
    per_bar = slots.index(phrases.BAR_TOKEN) + 1
    real = [i for i, s in enumerate(slots) if s.startswith("i-")]
    decoded = model.reconstruct([slots[i] for i in real]) if real else []
    out = list(slots)
    for i, text in zip(real, decoded):
        out[i] = text
    song = phrases.slots_to_remiz(songs.bars_as_song(out, per_bar))
    songs.write_midi(song, output, tempo=tempo, allow_empty=False)
    scores = f1_lib.reconstruction_f1(decoded, [slots[i] for i in real])
    exact = float(np.mean([d == slots[i] for i, d in zip(real, decoded)])) if real else 0.0
    return {
        "bars": len(slots) // per_bar,
        "phrases": len(real),
        "exact_match": exact,
        **scores,
        "output": output,
    }


def run(args: argparse.Namespace) -> int:
    model = PhraseVAEModel.from_workdir(
        args.workdir, args.checkpoint, compute_dtype=args.decode_dtype
    )
    if args.command == "encode":
        with open(args.input) as f:
            texts = [line.strip() for line in f if line.strip()]
        mean, logvar = model.encode(texts, args.sample, jax.random.PRNGKey(args.seed))

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
                np.savez(f, mean=mean, logvar=logvar)

        fileio.atomic_write(args.output, save)
        summary = {"phrases": len(texts), "output": args.output}
    elif args.command == "decode":
        texts = model.decode(load_latents(args.input))
        fileio.write_text(args.output, "".join(line + "\n" for line in texts))
        summary = {"latents": len(texts), "output": args.output}
        if args.song:
            song = phrases.slots_to_multitrack(texts)
            songs.write_midi(song, args.song, tempo=args.tempo, allow_empty=False)
            summary["song"] = args.song
    else:
        summary = reconstruct(model, args.input, args.output, args.slot_order)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

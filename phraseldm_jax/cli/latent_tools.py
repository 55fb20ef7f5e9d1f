"""``python -m phraseldm_jax.cli.latent_tools prior|phrases|bars``: the PhraseVAE latent space
as MIDI (``latent_tools.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from phraseldm_jax import latent_tools, phrases, songs
from phraseldm_jax.cli import common, vae
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.vae_inference import PhraseVAEModel

PROG = "python -m phraseldm_jax.cli.latent_tools"
DESCRIPTION = """Exploring the PhraseVAE latent space: prior samples and interpolations as MIDI,
one bar per step.

  prior    phrases decoded from z ~ N(0, temperature^2 I)
  phrases  interpolation between two phrases' posterior means
  bars     interpolation between two bars of a MIDI file, slot by slot
"""
PRIOR = "Phrases decoded from prior samples z ~ N(0, temperature^2 I), one bar each."
PHRASES = "Decoded phrases along the path between the posterior means of --a and --b."
BARS = "Decoded bars along the path between bars --bar_a and --bar_b of --midi, slot by slot."


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    common.add_vae_flags(parser)
    parser.add_argument("--output", type=common.path, required=True, help="MIDI file to write")
    parser.add_argument("--tempo", type=float, default=songs.REFERENCE_TEMPO, help="bpm")


def _add_path_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="points on the path, both ends in")
    parser.add_argument(
        "--method", default="slerp", choices=latent_tools.METHODS, help="interpolation"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = common.add_subcommands(parser)
    prior = common.subcommand(commands, "prior", PRIOR)
    _add_common_flags(prior)
    prior.add_argument("--n", type=int, default=16, help="phrases to sample")
    prior.add_argument("--temperature", type=float, default=1.0, help="std of z")
    prior.add_argument("--seed", type=int, default=0, help="rng seed")
    between = common.subcommand(commands, "phrases", PHRASES)
    _add_common_flags(between)
    between.add_argument("--a", required=True, help="the first phrase")
    between.add_argument("--b", required=True, help="the last phrase")
    _add_path_flags(between)
    bars = common.subcommand(commands, "bars", BARS)
    _add_common_flags(bars)
    bars.add_argument("--midi", type=common.path, required=True, help="the song holding both bars")
    bars.add_argument("--bar_a", type=int, default=0, help="the first bar (0-based)")
    bars.add_argument("--bar_b", type=int, default=1, help="the last bar (0-based)")
    _add_path_flags(bars)


def run(args: argparse.Namespace) -> int:
    common.require_vae_folder(args.workdir, "--workdir")
    common.require_output(args.output, "--output")
    if args.tempo <= 0:
        raise common.UsageError(f"--tempo must be > 0, got {args.tempo}")
    if args.command == "bars":  # read and checked before the model loads
        record = vae.import_midi(args.midi, flag="--midi")
        song_slots = phrases.slot_phrases(record, n_slots=phrases.DEFAULT_N_SLOTS)
        try:
            bar_a = latent_tools.bar_slots(song_slots, args.bar_a, args.midi)
            bar_b = latent_tools.bar_slots(song_slots, args.bar_b, args.midi)
        except ValueError as error:
            raise common.UsageError(str(error)) from None
    model = PhraseVAEModel.from_workdir(args.workdir, args.checkpoint)
    if args.command == "prior":
        rng = jax.random.PRNGKey(args.seed)
        _, texts = latent_tools.sample_prior(model, args.n, rng, args.temperature)
        slots = latent_tools.phrases_as_song(texts)
    elif args.command == "phrases":
        texts = latent_tools.interpolate_phrases(model, args.a, args.b, args.steps, args.method)
        slots = latent_tools.phrases_as_song(texts)
    else:
        decoded = latent_tools.interpolate_bars(model, bar_a, bar_b, args.steps, args.method)
        slots = songs.bars_as_song(decoded)
        texts = [
            " | ".join(decoded[i : i + SLOTS_PER_BAR])
            for i in range(0, len(decoded), SLOTS_PER_BAR)
        ]
    song = phrases.slots_to_remiz(slots)
    songs.write_midi(song, args.output, tempo=args.tempo, allow_empty=False)
    print(json.dumps({"output": args.output, "bars": texts}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_command(PROG, add_arguments, run, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())

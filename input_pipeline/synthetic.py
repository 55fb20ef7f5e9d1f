"""A small built-in corpus: deterministic synthetic 3-track songs with section structure.

Made by the project (no downloads) for the README's first run and for tests. Each song
follows a section plan drawn from a few templates (16-64 bars, e.g. ``i-4 A-8 B-8 A-8
o-4``); every section type of a song gets its own 4-chord progression and patterns, and
repeats them wherever it appears, so the plan describes the music. Tracks are POP909's:
melody (program 13, only in the upper-case, melodic sections), bridge (25, in B and x
sections) and piano (0, always: a bass note and a chord pattern), in separate registers
so their remi-z (pitch) order is always melody, bridge, piano. The pattern vocabulary
is small (4 progressions, a handful of rhythms) so that a tiny model learns it fast.
Everything is in C major / A minor already (``key_shift`` 0) and on the 16th grid.

``synthetic_records`` returns song records directly; ``write_midi_folder`` writes the same
songs as MIDI files that ``input_pipeline.midi_folder`` imports back to the same phrases.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from input_pipeline import records
from phraseldm_jax import fileio
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.sections import parse_plan

MELODY, BRIDGE, PIANO = 13, 25, 0

PLAN_TEMPLATES = (
    "i-2 A-4 B-4 A-4 o-2",
    "i-4 A-8 B-8 A-8 o-4",
    "A-8 B-8 A-8 B-8",
    "i-4 A-4 A-4 B-4 x-2 A-4 B-4 o-2",
    "i-4 A-8 B-8 x-4 A-8 B-8 B-8 o-4",
    "i-2 A-8 B-4 B-4 x-2 A-8 B-4 B-4 X-4 o-2",
)

# Chords as pitch classes (root first), in C major / A minor.
CHORDS = {
    "C": (0, 4, 7),
    "Dm": (2, 5, 9),
    "Em": (4, 7, 11),
    "F": (5, 9, 0),
    "G": (7, 11, 2),
    "Am": (9, 0, 4),
}
PROGRESSIONS = (
    ("C", "G", "Am", "F"),
    ("Am", "F", "C", "G"),
    ("F", "G", "C", "Am"),
    ("Dm", "G", "C", "Em"),
)
# One-bar melody rhythms: (onset, duration) in 48ths.
MELODY_RHYTHMS = (
    ((0, 12), (12, 12), (24, 12), (36, 12)),
    ((0, 18), (18, 6), (24, 24)),
    ((0, 6), (6, 6), (12, 12), (24, 6), (30, 6), (36, 12)),
    ((0, 24), (24, 12), (36, 12)),
)
PIANO_RHYTHMS = (
    ((0, 24), (24, 24)),  # two half-note chords
    ((0, 12), (12, 12), (24, 12), (36, 12)),  # four quarter-note chords
    ((0, 36), (36, 12)),
)
BRIDGE_RHYTHMS = (
    ((0, 48),),
    ((0, 24), (24, 24)),
)


def _pitch(pitch_class: int, low: int) -> int:
    """The lowest pitch of ``pitch_class`` at or above ``low``."""
    return low + (pitch_class - low) % 12


def _section_style(rng: np.random.RandomState) -> dict:
    """Progression, rhythms and melody contour of one section type."""
    return {
        "progression": PROGRESSIONS[rng.randint(len(PROGRESSIONS))],
        "melody": [MELODY_RHYTHMS[rng.randint(len(MELODY_RHYTHMS))] for _ in range(2)],
        "contour": rng.randint(0, 3, size=(4, 6)),  # chord-tone index of each melody note
        "piano": PIANO_RHYTHMS[rng.randint(len(PIANO_RHYTHMS))],
        "bridge": BRIDGE_RHYTHMS[rng.randint(len(BRIDGE_RHYTHMS))],
    }


def _bar_notes(kind: str, style: dict, bar_in_section: int, bar: int) -> list[records.GridNote]:
    """Notes of one bar of a section of type ``kind``: (bar, pos, dur, pitch, program)."""
    chord = CHORDS[style["progression"][bar_in_section % 4]]
    notes = [(bar, 0, 48, _pitch(chord[0], 36), PIANO)]  # bass, 36-47
    for onset, duration in style["piano"]:
        notes.extend((bar, onset, duration, _pitch(pc, 48), PIANO) for pc in chord)  # 48-59
    if kind.isupper():
        rhythm = style["melody"][bar_in_section % 2]
        for j, (onset, duration) in enumerate(rhythm):
            tone = chord[int(style["contour"][bar_in_section % 4, j])]
            notes.append((bar, onset, duration, _pitch(tone, 72), MELODY))  # 72-83
    if kind in "Bx":
        for onset, duration in style["bridge"]:
            notes.append((bar, onset, duration, _pitch(chord[1], 60), BRIDGE))  # 60-71
    return notes


def synthetic_song(index: int, seed: int = 0) -> tuple[MultiTrack, str, float]:
    """Song ``index`` of the corpus: (MultiTrack, canonical plan, tempo in bpm)."""
    rng = np.random.RandomState([seed, index])
    plan = parse_plan(PLAN_TEMPLATES[rng.randint(len(PLAN_TEMPLATES))])
    styles = {kind: _section_style(rng) for kind in sorted({s.type for s in plan.sections})}
    tempo = float(rng.choice([80.0, 96.0, 110.0, 120.0]))
    notes = []
    for (start, end), section in zip(plan.section_bounds(), plan.sections):
        for bar in range(start, end):
            notes.extend(_bar_notes(section.type, styles[section.type], bar - start, bar))
    song = records.notes_to_multitrack(notes, plan.n_bars, tempo)
    return song, plan.to_string(), tempo


def synthetic_records(n_songs: int = 48, seed: int = 0) -> list[dict]:
    """The corpus as song records (``song_id`` ``synthetic/000`` ...), all fitting their plan."""
    out = []
    for index in range(n_songs):
        song, plan, tempo = synthetic_song(index, seed)
        out.append(
            records.make_record(
                f"synthetic/{index:03d}", song, section_plan=plan, plan_fits=True, tempo=tempo
            )
        )
    return out


def _write_midi(song: MultiTrack, tempo: float, path: str) -> None:
    song.to_midi(path, tempo=tempo, verbose=False)


def write_midi_folder(folder: str, n_songs: int = 48, seed: int = 0) -> list[str]:
    """Writes the corpus as ``folder/synthetic_000.mid`` ...; returns the paths.

    Each file is written to a temporary name and renamed into place.
    """
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(n_songs):
        song, _, tempo = synthetic_song(index, seed)
        path = os.path.join(folder, f"synthetic_{index:03d}.mid")
        fileio.atomic_write(path, functools.partial(_write_midi, song, tempo))
        paths.append(path)
    return paths

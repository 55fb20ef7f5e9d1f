"""POP909 raw folder -> song records (docs/ARCHITECTURE.md "songs").

Each song folder ``NNN/`` holds ``NNN.mid`` (tracks MELODY, BRIDGE, PIANO, all program 0,
performance-aligned: the notes follow the recording, not a tempo grid), ``beat_midi.txt``
(per tracked beat: time in seconds, a 2-beat downbeat flag, a 4/4 downbeat flag),
``human_label1.txt`` (the section plan, e.g. ``i8A8A8B4B4x4...``) and ``analyzed_key.txt``.

Import, per song:
1. Beats: a note's time becomes a beat coordinate by linear interpolation between the
   tracked beats (extrapolated with the first/last beat length outside them), so the
   grid follows the performance's tempo. Bars are 4 beats long and start on the beats
   the 4/4 flag marks most often (its phase, mod 4): isolated flags that break the
   4-beat pattern (a few per song are common: 2- and 6-beat "bars" from downbeat
   tracking glitches) are ignored. Songs in triple meter (the 2-beat flag column then
   comes every 3 beats) do not fit the 48-per-4/4-bar grid and are rejected.
2. Grid: onsets and offsets are rounded to 16ths (positions multiples of 3 of remi-z's 48
   per bar); durations are multiples of 3, at least 3, at most 127. MELODY -> program 13,
   BRIDGE -> 25, PIANO -> 0.
3. Plan alignment (``align_plan``): the plan's first bar is the bar that best lines the
   melody up with the melodic (upper-case) sections: the score is the share of melody
   notes that fall in melodic sections plus a quarter of the share of melodic-section
   bars with a melody note (a melody note up to one beat early counts for the next bar,
   so pickups into a section do not shift it). The plan fits when the melody agrees
   (>= 90% of its notes in melodic sections), at most 2 bars with notes lie outside the
   plan (typically the final chord ringing out, or a bar of intro the annotators did not
   count; a pickup of at most 2 beats before the plan is not counted) and at most 2
   bars of the plan are past the last note. On all of POP909 the most common case is
   exactly one such bar, the last one. A fitting song is cut to exactly the plan's bars
   (``plan_note`` says what was cut); any other song keeps all its bars from the first
   to the last note, is marked ``plan_mismatch`` and says why in ``plan_note``.
   Most songs that do not fit have 3 or more bars with notes outside the plan
   (unannotated intros or outros); a few have a melody that disagrees. The counts on
   POP909 are in README.md and in every build's ``prepare_summary.json``.
4. Key: remi-z ``normalize_pitch()`` per song (shift recorded in ``key_shift``), checked
   against ``analyzed_key.txt`` (``key_mismatch`` flag when the shift does not bring any
   annotated key to C major / A minor).
5. Tempo: 60 / median beat length, in bpm.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence

import miditoolkit
import numpy as np

from input_pipeline import records
from phraseldm_jax.sections import SectionPlan, SectionPlanError, parse_plan

TRACK_PROGRAMS = {"MELODY": 13, "BRIDGE": 25, "PIANO": 0}
STEPS_PER_BEAT = 4  # 16th notes
STEPS_PER_BAR = 16
MIN_MELODY_AGREEMENT = 0.9  # share of melody notes that must fall in melodic sections
MAX_PICKUP_STEPS = 8  # notes before the plan: only in its last 2 beats
MAX_CUT_BARS = 2  # bars with notes outside the plan (pickup aside) that may be cut
MAX_SILENT_PLAN_BARS = 2  # plan bars past the last note that are kept empty
SEARCH_BARS = 16  # plan starts tried after the first bar with notes
RECALL_WEIGHT = 0.25  # melody placement decides; coverage only breaks near-ties

_KEY = re.compile(r"([A-G])([b#]?):(maj|min)")
_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


class Pop909Error(ValueError):
    """A POP909 song folder that cannot be imported (the message names it and says why)."""


@dataclasses.dataclass(frozen=True)
class StepNote:
    """A note on the song's global 16th grid (step 0 = first beat of bar 0)."""

    start: int
    end: int
    pitch: int
    program: int


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Where a plan sits in the song and whether it fits.

    ``first_bar`` is the grid bar where the plan starts; ``fits`` says whether the song,
    cut to ``[first_bar, first_bar + plan.n_bars)``, is the plan; ``note`` says what was
    cut (fits) or why it does not fit.
    """

    first_bar: int
    fits: bool
    note: str
    melody_agreement: float


def read_beats(path: str) -> np.ndarray:
    """``beat_midi.txt`` -> [n_beats, 3] float64 (time s, 2-beat flag, 4/4 flag)."""
    try:
        beats = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as e:
        raise Pop909Error(f"{path}: cannot read beats ({e})") from None
    if beats.shape[1] != 3 or len(beats) < 8:
        raise Pop909Error(f"{path}: expected rows 'time flag flag', got shape {beats.shape}")
    if np.any(np.diff(beats[:, 0]) <= 0):
        raise Pop909Error(f"{path}: beat times are not increasing")
    return beats


def _dominant_gap(flags: np.ndarray) -> int:
    rows = np.flatnonzero(flags > 0.5)
    if len(rows) < 2:
        return 0
    return int(collections.Counter(np.diff(rows).tolist()).most_common(1)[0][0])


def bar_phase(beats: np.ndarray, path: str = "beat_midi.txt") -> int:
    """Beat index (0..3) on which bars start: the 4/4 flags' most common row mod 4.

    Raises Pop909Error for a song in triple meter (2-beat flags every 3 beats).
    """
    if _dominant_gap(beats[:, 1]) == 3:
        raise Pop909Error(f"{path}: triple meter (downbeats every 3 beats); only 4/4 is supported")
    rows = np.flatnonzero(beats[:, 2] > 0.5)
    if len(rows) == 0:
        raise Pop909Error(f"{path}: no 4/4 downbeat flags")
    return int(collections.Counter((rows % 4).tolist()).most_common(1)[0][0])


def beat_coordinate(times: np.ndarray, beat_times: np.ndarray) -> np.ndarray:
    """Seconds -> fractional beat index, piecewise linear between tracked beats."""
    times = np.asarray(times, np.float64)
    out = np.interp(times, beat_times, np.arange(len(beat_times), dtype=np.float64))
    before, after = times < beat_times[0], times > beat_times[-1]
    out[before] = (times[before] - beat_times[0]) / (beat_times[1] - beat_times[0])
    last = beat_times[-1] - beat_times[-2]
    out[after] = len(beat_times) - 1 + (times[after] - beat_times[-1]) / last
    return out


def read_notes(midi_path: str, beat_times: np.ndarray, phase: int) -> list[StepNote]:
    """The three tracks' notes on the 16th grid whose bar 0 starts at beat ``phase``."""
    try:
        midi = miditoolkit.MidiFile(midi_path)
    except Exception as e:  # miditoolkit/mido raise many types for corrupt files
        raise Pop909Error(f"{midi_path}: {records.unreadable_midi_reason(midi_path, e)}") from None
    by_name = {inst.name.strip().upper(): inst for inst in midi.instruments}
    if not any(name in by_name for name in TRACK_PROGRAMS):
        raise Pop909Error(
            f"{midi_path}: none of the tracks {list(TRACK_PROGRAMS)} (found {sorted(by_name)})"
        )
    tick_seconds = np.asarray(midi.get_tick_to_time_mapping())
    out = []
    for name, program in TRACK_PROGRAMS.items():
        notes = by_name[name].notes if name in by_name else []  # a track may be absent
        if not notes:
            continue
        starts = np.array([n.start for n in notes])
        ends = np.array([n.end for n in notes])
        last_tick = len(tick_seconds) - 1
        start_beats = beat_coordinate(tick_seconds[np.minimum(starts, last_tick)], beat_times)
        end_beats = beat_coordinate(tick_seconds[np.minimum(ends, last_tick)], beat_times)
        start_steps = np.round((start_beats - phase) * STEPS_PER_BEAT).astype(int)
        end_steps = np.round((end_beats - phase) * STEPS_PER_BEAT).astype(int)
        for note, s, e in zip(notes, start_steps, end_steps):
            out.append(StepNote(int(s), int(max(e, s + 1)), int(note.pitch), program))
    if not out:
        raise Pop909Error(f"{midi_path}: no notes")
    return out


def _plan_scores(
    melody_bars: np.ndarray, melodic: np.ndarray, first_bar: int
) -> tuple[float, float]:
    """(share of melody notes in melodic plan bars, share of melodic bars with melody)."""
    index = melody_bars - first_bar
    inside = (index >= 0) & (index < len(melodic))
    in_melodic = np.zeros(len(index), bool)
    in_melodic[inside] = melodic[index[inside]]
    precision = float(in_melodic.mean()) if len(index) else 0.0
    covered = np.zeros(len(melodic), bool)
    covered[index[inside]] = True
    recall = float(covered[melodic].mean()) if melodic.any() else 0.0
    return precision, recall


def align_plan(plan: SectionPlan, notes: Sequence[StepNote]) -> Alignment:
    """Finds the plan's first bar and checks that the song fits it (module docstring, 3)."""
    starts = np.array([n.start for n in notes])
    bars = starts // STEPS_PER_BAR
    melody = np.array([n.start for n in notes if n.program == TRACK_PROGRAMS["MELODY"]])
    # A melody note up to one beat before a bar line belongs to the next bar here.
    melody_bars = (melody + STEPS_PER_BEAT) // STEPS_PER_BAR
    melodic = np.concatenate([np.full(s.length, s.type.isupper()) for s in plan.sections])
    first_note_bar = int(bars.min())
    candidates = range(first_note_bar, first_note_bar + SEARCH_BARS + 1)
    if len(melody):
        scored = []
        for k in candidates:
            precision, recall = _plan_scores(melody_bars, melodic, k)
            scored.append((precision + RECALL_WEIGHT * recall, -(k - first_note_bar), k, precision))
        _, _, first_bar, agreement = max(scored)
    else:
        first_bar, agreement = first_note_bar, 0.0
    plan_start = first_bar * STEPS_PER_BAR
    plan_end = plan_start + plan.n_bars * STEPS_PER_BAR
    pickup = starts[(starts < plan_start) & (starts >= plan_start - MAX_PICKUP_STEPS)]
    outside = starts[(starts < plan_start - MAX_PICKUP_STEPS) | (starts >= plan_end)]
    early_bars = sorted(set((outside[outside < plan_start] // STEPS_PER_BAR).tolist()))
    late_bars = sorted(set((outside[outside >= plan_end] // STEPS_PER_BAR).tolist()))
    silent = first_bar + plan.n_bars - 1 - int(bars.max())
    problems = []
    if agreement < MIN_MELODY_AGREEMENT:
        problems.append(
            f"melody does not follow the plan: best alignment puts {agreement:.0%} of "
            "melody notes in melodic sections"
        )
    if len(early_bars) + len(late_bars) > MAX_CUT_BARS:
        problems.append(
            f"{len(early_bars) + len(late_bars)} bar(s) with notes outside the plan "
            f"({len(early_bars)} before, {len(late_bars)} after)"
        )
    if silent > MAX_SILENT_PLAN_BARS:
        problems.append(f"plan is {silent} bar(s) longer than the music")
    if problems:
        return Alignment(first_bar, False, "; ".join(problems), agreement)
    cut = []
    if len(pickup):
        cut.append(f"dropped a pickup of {len(pickup)} note(s)")
    if early_bars:
        cut.append(
            f"dropped {len(early_bars)} leading bar(s) ({int(np.sum(outside < plan_start))} note(s))"
        )
    if late_bars:
        cut.append(
            f"dropped {len(late_bars)} trailing bar(s) ({int(np.sum(outside >= plan_end))} note(s))"
        )
    return Alignment(first_bar, True, "; ".join(cut), agreement)


def read_keys(path: str) -> list[tuple[int, bool]]:
    """``analyzed_key.txt`` -> [(tonic pitch class, is_major)] (several if it modulates)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    keys = []
    for letter, accidental, mode in _KEY.findall(text):
        pitch_class = _PITCH_CLASS[letter] + {"b": -1, "#": 1, "": 0}[accidental]
        keys.append((pitch_class % 12, mode == "maj"))
    return keys


def key_matches(shift: int, keys: Iterable[tuple[int, bool]]) -> bool:
    """Whether transposing by ``shift`` brings one of ``keys`` to C major / A minor."""
    return any((tonic + shift) % 12 == (0 if major else 9) for tonic, major in keys)


def _window(notes: Sequence[StepNote], first_bar: int, n_bars: int) -> list[records.GridNote]:
    lo, hi = first_bar * STEPS_PER_BAR, (first_bar + n_bars) * STEPS_PER_BAR
    return [
        records.grid_note(n.start - lo, n.end - lo, n.pitch, n.program)
        for n in notes
        if lo <= n.start < hi
    ]


def import_song(song_dir: str, song_id: str | None = None) -> dict:
    """One POP909 song folder -> its song record.

    Raises:
      Pop909Error: the folder cannot be imported (missing/corrupt files, triple meter).
    """
    name = os.path.basename(os.path.normpath(song_dir))
    song_id = song_id or f"pop909/{name}"
    beats = read_beats(os.path.join(song_dir, "beat_midi.txt"))
    phase = bar_phase(beats, os.path.join(song_dir, "beat_midi.txt"))
    notes = read_notes(os.path.join(song_dir, f"{name}.mid"), beats[:, 0], phase)
    tempo = float(60.0 / np.median(np.diff(beats[:, 0])))

    flags: list[str] = []
    plan_text, plan_note, fits = "", "", False
    label_path = os.path.join(song_dir, "human_label1.txt")
    try:
        with open(label_path, encoding="utf-8") as f:
            plan = parse_plan(f.read(), max_bars=10**6, source=label_path)
    except (OSError, SectionPlanError) as e:
        plan = None
        plan_note = f"no usable plan: {e}"
        flags.append("plan_error")
    if plan is not None:
        plan_text = plan.to_string()
        alignment = align_plan(plan, notes)
        fits, plan_note = alignment.fits, alignment.note
    if fits:
        first_bar, n_bars = alignment.first_bar, plan.n_bars
    else:
        first_bar = min(n.start for n in notes) // STEPS_PER_BAR
        n_bars = max(n.start for n in notes) // STEPS_PER_BAR - first_bar + 1
        if plan is not None:
            flags.append("plan_mismatch")

    song = records.notes_to_multitrack(_window(notes, first_bar, n_bars), n_bars, tempo)
    shift = records.normalize_key(song)
    keys = read_keys(os.path.join(song_dir, "analyzed_key.txt"))
    if keys and not key_matches(shift, keys):
        flags.append("key_mismatch")
    return records.make_record(
        song_id,
        song,
        section_plan=plan_text,
        plan_fits=fits,
        plan_note=plan_note,
        key_shift=shift,
        tempo=tempo,
        flags=flags,
    )


def song_dirs(root: str) -> list[str]:
    """The song folders of a POP909 root (``001`` ... ``909``), sorted."""
    if not os.path.isdir(root):
        raise Pop909Error(f"{root}: not a folder")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    dirs = [os.path.join(root, n) for n in names if n.isdigit()]
    if not dirs:
        raise Pop909Error(f"{root}: no POP909 song folders (expected 001, 002, ...)")
    return dirs


def import_folder(
    root: str, workers: int = 1, progress: bool = False, limit: int | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Imports every song folder of a POP909 root.

    Args:
      root: folder holding ``001/`` ... ``909/``.
      workers: processes to use.
      progress: show a tqdm progress bar.
      limit: import only the first ``limit`` songs (tests, quick looks).

    Returns:
      (records sorted by song id, [(song folder, reason)] of every rejected song).
    """
    dirs = song_dirs(root)[:limit]
    return records.import_many(import_song, dirs, workers=workers, progress=progress, desc="pop909")

"""Any folder of MIDI files (Lakh, Groove, Bach chorales, ...) -> song records.

A file is read with miditoolkit on its own tick grid (the notated tempo does not move the
grid), quantised to 16ths like POP909 (positions multiples of 3 of 48 per bar; durations
multiples of 3, at least 3, at most 127) and cut into 4/4 bars from tick 0; leading empty
bars are dropped. Only 4/4 files are accepted (no time-signature event means 4/4).

Track selection (``TrackSelection``) decides which tracks become phrases and with which
program: by program, by drum flag, by track-name regex, at most ``max_tracks`` (the ones
with the most notes), then optionally remapped (``program_map``) or assigned to slot
programs (``slot_programs``: the k-th kept pitched track, by average pitch descending,
gets program ``slot_programs[k]``; tracks beyond the slots are dropped). Tracks that end
up with the same program are merged, as remi-z keys a bar's tracks by program.

A file that cannot be used (unreadable, not 4/4, no notes after selection) raises
``MidiSkip`` with the reason; ``import_folder`` counts it and goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping

import miditoolkit
import numpy as np

from input_pipeline import records

MIDI_SUFFIXES = (".mid", ".midi")
DRUM_PROGRAM = 128


class MidiSkip(ValueError):
    """A MIDI file that is skipped; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TrackSelection:
    """Which tracks of a MIDI file to keep, and their programs.

    Attributes:
      programs: keep pitched tracks with these GM programs (None: any program).
      drums: keep drum tracks (program 128).
      name_pattern: keep tracks whose name matches this regex (``re.search``, case
        insensitive; None: any name).
      max_tracks: keep at most this many tracks, those with the most notes (None: all).
      program_map: source program -> program written in the phrases.
      slot_programs: program of the k-th kept pitched track by average pitch, descending
        (applied after ``program_map``); pitched tracks beyond the slots are dropped.
    """

    programs: tuple[int, ...] | None = None
    drums: bool = False
    name_pattern: str | None = None
    max_tracks: int | None = None
    program_map: Mapping[int, int] | None = None
    slot_programs: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Track:
    name: str
    program: int  # 128 for drums
    notes: list  # miditoolkit notes


def _read_midi(path: str) -> miditoolkit.MidiFile:
    try:
        midi = miditoolkit.MidiFile(path)
    except Exception as e:  # mido/miditoolkit raise many types for corrupt files
        raise MidiSkip(path, records.unreadable_midi_reason(path, e)) from None
    if midi.ticks_per_beat <= 0:
        raise MidiSkip(path, f"bad ticks per beat {midi.ticks_per_beat}")
    for ts in midi.time_signature_changes:
        if (ts.numerator, ts.denominator) != (4, 4):
            raise MidiSkip(
                path, f"time signature {ts.numerator}/{ts.denominator} at tick {ts.time}; only 4/4"
            )
    return midi


def select_tracks(midi: miditoolkit.MidiFile, selection: TrackSelection) -> list[_Track]:
    """The tracks ``selection`` keeps, with their final programs."""
    pattern = re.compile(selection.name_pattern, re.I) if selection.name_pattern else None
    tracks = []
    for inst in midi.instruments:
        program = DRUM_PROGRAM if inst.is_drum else int(inst.program)
        if not inst.notes:
            continue
        if inst.is_drum and not selection.drums:
            continue
        if not inst.is_drum and selection.programs is not None:
            if program not in selection.programs:
                continue
        if pattern is not None and not pattern.search(inst.name or ""):
            continue
        tracks.append(_Track(inst.name or "", program, list(inst.notes)))
    if selection.max_tracks is not None:
        tracks = sorted(tracks, key=lambda t: -len(t.notes))[: selection.max_tracks]
    if selection.program_map:
        tracks = [
            dataclasses.replace(t, program=selection.program_map.get(t.program, t.program))
            if t.program != DRUM_PROGRAM
            else t
            for t in tracks
        ]
    if selection.slot_programs is not None:
        pitched = [t for t in tracks if t.program != DRUM_PROGRAM]
        pitched.sort(key=lambda t: -float(np.mean([n.pitch for n in t.notes])))
        slotted = [
            dataclasses.replace(t, program=p) for t, p in zip(pitched, selection.slot_programs)
        ]
        tracks = slotted + [t for t in tracks if t.program == DRUM_PROGRAM]
    return tracks


def shared_programs(path: str, selection: TrackSelection = TrackSelection()) -> dict[int, list]:
    """``{program: [track names]}`` of the programs that two or more kept tracks of ``path``
    end up with (``import_file`` merges such tracks). Raises MidiSkip like ``import_file``."""
    by_program: dict[int, list] = {}
    for track in select_tracks(_read_midi(path), selection):
        by_program.setdefault(track.program, []).append(track.name)
    return {p: names for p, names in by_program.items() if len(names) > 1}


def _first_tempo(midi: miditoolkit.MidiFile) -> float:
    if midi.tempo_changes:  # MIDI stores microseconds per beat: round off the noise
        return round(float(midi.tempo_changes[0].tempo), 2)
    return 120.0


def import_file(
    path: str,
    root: str | None = None,
    selection: TrackSelection = TrackSelection(),
    normalize_key: bool = True,
) -> dict:
    """One MIDI file -> its song record (``song_id = "midi/<path relative to root>"``).

    Raises:
      MidiSkip: the file cannot be used (the reason is in the message).
    """
    midi = _read_midi(path)
    tracks = select_tracks(midi, selection)
    steps_per_tick = 4.0 / midi.ticks_per_beat
    notes = []
    for track in tracks:
        for n in track.notes:
            start = int(round(n.start * steps_per_tick))
            end = int(round(n.end * steps_per_tick))
            notes.append((start, max(end, start + 1), int(n.pitch), track.program))
    if not notes:
        raise MidiSkip(path, "no notes after track selection")
    first_bar = min(start for start, _, _, _ in notes) // 16
    offset = first_bar * 16
    grid = [records.grid_note(s - offset, e - offset, p, prog) for s, e, p, prog in notes]
    n_bars = max(bar for bar, _, _, _, _ in grid) + 1
    tempo = _first_tempo(midi)
    song = records.notes_to_multitrack(grid, n_bars, tempo)
    shift = records.normalize_key(song) if normalize_key else 0
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    return records.make_record(
        f"midi/{rel.replace(os.sep, '/')}", song, key_shift=shift, tempo=tempo
    )


def list_midi_files(folder: str) -> list[str]:
    """All ``.mid``/``.midi`` files under ``folder`` (recursively), sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder")
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found.extend(
            os.path.join(dirpath, f) for f in filenames if f.lower().endswith(MIDI_SUFFIXES)
        )
    return sorted(found)


def import_folder(
    folder: str,
    selection: TrackSelection = TrackSelection(),
    normalize_key: bool = True,
    workers: int = 1,
    progress: bool = False,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Imports every MIDI file under ``folder``.

    Returns:
      (records sorted by song id, [(path, reason)] of every skipped file).
    """
    paths = list_midi_files(folder)
    task = functools.partial(
        import_file, root=folder, selection=selection, normalize_key=normalize_key
    )
    return records.import_many(task, paths, workers=workers, progress=progress, desc="midi")


def _program(text: str) -> int:
    """A GM program number 0..127; ValueError saying what is wrong otherwise."""
    item = text.strip()
    if not item.isdigit() or not 0 <= int(item) <= 127:
        raise ValueError(f"{item!r} is not a program number (0..127)")
    return int(item)


def parse_programs(text: str | None) -> tuple[int, ...] | None:
    """``"0,25,13"`` -> (0, 25, 13); empty/None -> None (command-line helper).

    Raises ValueError for an item that is not a program 0..127.
    """
    if not text:
        return None
    return tuple(_program(p) for p in text.split(","))


def parse_program_map(text: str | None) -> dict[int, int] | None:
    """``"1:0,2:0"`` -> {1: 0, 2: 0}; empty/None -> None (command-line helper).

    Raises ValueError for an item that is not ``program:program`` (0..127 each).
    """
    if not text:
        return None
    out = {}
    for item in text.split(","):
        source, colon, target = item.partition(":")
        if not colon:
            raise ValueError(f"{item!r} is not 'from:to' (e.g. 1:0)")
        out[_program(source)] = _program(target)
    return out


def check_name_pattern(pattern: str | None) -> None:
    """Raises ValueError when ``pattern`` is not a valid regular expression."""
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None

"""Song records: build them from quantised notes, check them, split them, flatten them.

A song record is the dict of docs/ARCHITECTURE.md "songs" (``song_id``, ``n_bars``,
``phrases``, ``phrase_bar``, ``phrase_program``, ``section_plan``, ``plan_fits``,
``plan_note``, ``key_shift``, ``tempo``, ``flags``). Both importers (POP909 and the generic
MIDI folder) and the synthetic corpus produce them; the TFDS builders write them and
derive the phrase-level and bar-level lines from them.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import tqdm

from phraseldm_jax import phrases as phrases_lib
from phraseldm_jax.remiz import Bar, MultiTrack
from phraseldm_jax.sections import MAX_PLAN_BARS

POSITIONS_PER_BAR = 48  # remi-z's grid for a 4/4 bar: 12 per beat
GRID_STEP = 3  # a 16th note on that grid
MAX_DURATION = 127  # largest d- token
DEFAULT_VELOCITY = 64  # velocities are not part of phrases; remi-z's key finder weights by them
SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = (90, 5, 5)

RECORD_FIELDS = (
    "song_id",
    "n_bars",
    "phrases",
    "phrase_bar",
    "phrase_program",
    "section_plan",
    "plan_fits",
    "plan_note",
    "key_shift",
    "tempo",
    "flags",
)

# One quantised note: (bar, onset position 0..47, duration, pitch, program).
GridNote = tuple[int, int, int, int, int]


class RecordError(ValueError):
    """A song record that breaks the record contract."""


def quantize_steps(beats: float) -> int:
    """A time in beats -> the nearest 16th-note step (4 per beat)."""
    return int(round(beats * 4))


def grid_note(start_step: int, end_step: int, pitch: int, program: int) -> GridNote:
    """A note given in global 16th steps -> (bar, position, duration, pitch, program).

    Durations are in 48ths of a bar: ``3 * steps``, at least 3 (one 16th), clamped to
    ``MAX_DURATION`` like remi-z does. A note keeps its full duration across the bar line.
    """
    bar, step = divmod(start_step, 16)
    duration = min(MAX_DURATION, max(1, end_step - start_step) * GRID_STEP)
    return bar, step * GRID_STEP, duration, int(pitch), int(program)


def notes_to_multitrack(notes: Iterable[GridNote], n_bars: int, tempo: float) -> MultiTrack:
    """Builds a 4/4 MultiTrack of ``n_bars`` bars from quantised notes.

    Notes outside bars ``0..n_bars-1`` must have been removed by the caller. Within one
    track, notes with the same onset and pitch are merged keeping the longest, as a piano
    roll would (the original's data came from 16th-note piano rolls). Velocities are set
    to ``DEFAULT_VELOCITY`` for the same reason.
    """
    longest: dict[tuple[int, int, int, int], int] = {}
    for bar, position, duration, pitch, program in notes:
        if not 0 <= bar < n_bars:
            raise ValueError(f"note in bar {bar} outside 0..{n_bars - 1}")
        key = (bar, program, position, pitch)
        longest[key] = max(duration, longest.get(key, 0))
    per_bar: list[dict[int, dict[int, list]]] = [defaultdict(dict) for _ in range(n_bars)]
    for (bar, program, position, pitch), duration in sorted(longest.items()):
        per_bar[bar][program].setdefault(position, []).append([pitch, duration, DEFAULT_VELOCITY])
    bars = [
        Bar(id=i, notes_of_insts=dict(tracks), time_signature=(4, 4), tempo=float(tempo))
        for i, tracks in enumerate(per_bar)
    ]
    return MultiTrack(bars=bars)


def normalize_key(song: MultiTrack) -> int:
    """remi-z's song-level key normalisation (to C major / A minor), in place.

    Returns the shift in semitones (0 for a song without pitched notes).
    """
    if not song.get_note_list(with_drum=False):
        return 0
    shift = int(song.normalize_pitch())
    for bar in song.bars:
        for track in bar.tracks.values():
            for note in track.notes:
                if note.pitch > 127:  # remi-z only folds pitches below 0
                    note.pitch -= 12
    return shift


def make_record(
    song_id: str,
    song: MultiTrack,
    *,
    section_plan: str = "",
    plan_fits: bool = False,
    plan_note: str = "",
    key_shift: int = 0,
    tempo: float = 120.0,
    flags: Sequence[str] = (),
) -> dict:
    """The song record of ``song`` (phrases in remi-z order, bar by bar).

    The flag ``too_long`` is added when the song has more than 128 bars.
    """
    texts, bars, programs = [], [], []
    for bar_index, bar in enumerate(phrases_lib.multitrack_phrases(song)):
        for program, text in bar:
            texts.append(text)
            bars.append(bar_index)
            programs.append(program)
    flags = list(dict.fromkeys(flags))
    if len(song.bars) > MAX_PLAN_BARS and "too_long" not in flags:
        flags.append("too_long")
    return {
        "song_id": song_id,
        "n_bars": len(song.bars),
        "phrases": texts,
        "phrase_bar": bars,
        "phrase_program": programs,
        "section_plan": section_plan,
        "plan_fits": bool(plan_fits),
        "plan_note": plan_note,
        "key_shift": int(key_shift),
        "tempo": float(tempo),
        "flags": flags,
    }


def check_record(record: Mapping) -> None:
    """Raises ``RecordError`` naming the song and the problem if ``record`` is malformed."""
    song_id = record.get("song_id", "<no song_id>")
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise RecordError(f"song {song_id}: missing fields {missing}")
    n = len(record["phrases"])
    if len(record["phrase_bar"]) != n or len(record["phrase_program"]) != n:
        raise RecordError(
            f"song {song_id}: phrases, phrase_bar and phrase_program differ in length"
        )
    n_bars = int(record["n_bars"])
    previous = -1
    for text, bar in zip(record["phrases"], record["phrase_bar"]):
        if not previous <= int(bar) < n_bars:
            raise RecordError(f"song {song_id}: phrase bars must be sorted within 0..{n_bars - 1}")
        previous = int(bar)
        if not phrases_lib.as_text(text).startswith("i-"):
            raise RecordError(f"song {song_id}: phrase {text!r} does not start with i-")


def record_to_multitrack(record: Mapping) -> MultiTrack:
    """The song as a MultiTrack again (bars rebuilt from the phrases; tempo from the record)."""
    bar_texts = [
        phrases_lib.bar_text(text for _, text in bar) for bar in phrases_lib.record_phrases(record)
    ]
    song = phrases_lib.remiz_to_multitrack(" ".join(bar_texts))
    song.set_tempo(float(record["tempo"]))
    return song


def split_of(song_id: str) -> str:
    """Deterministic split of a song: ``train`` 90%, ``validation`` 5%, ``test`` 5%.

    Uses a SHA-256 of the id (not Python's per-process ``hash``), so it is the same on
    every machine and run, and a song never changes split when others are added.
    """
    bucket = int.from_bytes(hashlib.sha256(song_id.encode("utf-8")).digest()[:8], "big") % 100
    upper = 0
    for split, percent in zip(SPLITS, SPLIT_PERCENT):
        upper += percent
        if bucket < upper:
            return split
    raise AssertionError("split percentages must add up to 100")


def phrase_lines(record: Mapping) -> list[dict]:
    """Phrase-level examples of one song, like the original's phrase jsonl.

    Per bar: each track phrase, then one ``[INST]`` line and one ``b-1`` line; after the
    song one ``[SEP]`` line. Fields: ``text``, ``song_id``, ``bar``, ``program`` (-1 for
    the special lines; the ``[SEP]`` line has ``bar = n_bars``).
    """
    song_id = record["song_id"]
    lines = []
    for bar_index, bar in enumerate(phrases_lib.record_phrases(record)):
        for program, text in bar:
            lines.append({"text": text, "song_id": song_id, "bar": bar_index, "program": program})
        for special in (phrases_lib.INST_TOKEN, phrases_lib.BAR_TOKEN):
            lines.append({"text": special, "song_id": song_id, "bar": bar_index, "program": -1})
    lines.append(
        {
            "text": phrases_lib.SEP_TOKEN,
            "song_id": song_id,
            "bar": int(record["n_bars"]),
            "program": -1,
        }
    )
    return lines


def bar_lines(record: Mapping) -> list[dict]:
    """Bar-level (stage-1) examples: per bar all its phrases ending in ``b-1``, then ``[SEP]``.

    Fields: ``text``, ``song_id``, ``bar`` (``n_bars`` for the ``[SEP]`` line).
    """
    song_id = record["song_id"]
    lines = [
        {
            "text": phrases_lib.bar_text(text for _, text in bar),
            "song_id": song_id,
            "bar": bar_index,
        }
        for bar_index, bar in enumerate(phrases_lib.record_phrases(record))
    ]
    lines.append({"text": phrases_lib.SEP_TOKEN, "song_id": song_id, "bar": int(record["n_bars"])})
    return lines


def unreadable_midi_reason(path: str, error: Exception) -> str:
    """Why a MIDI file could not be read, in words (mido's EOFError has no message)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    if size == 0:
        return "unreadable MIDI (empty file, 0 bytes)"
    if isinstance(error, EOFError):
        return f"unreadable MIDI (truncated: the file ends inside a chunk after {size} bytes)"
    detail = str(error).strip()
    return f"unreadable MIDI ({type(error).__name__}{': ' + detail if detail else ''})"


def _call_or_reason(fn: Callable[[str], dict], item: str) -> tuple[str, dict | None, str]:
    """Runs ``fn(item)``; any exception becomes a reason string (never crosses processes)."""
    try:
        return item, fn(item), ""
    except Exception as e:  # one bad input never stops a build
        reason = str(e)
        prefix = f"{item}: "
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
        if not isinstance(e, ValueError):
            reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        return item, None, reason


def import_many(
    fn: Callable[[str], dict],
    items: Sequence[str],
    workers: int = 1,
    progress: bool = False,
    desc: str = "songs",
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Imports every item (a file or folder path) with ``fn``, in a process pool if
    ``workers > 1``, with an optional tqdm progress bar.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    A failing item is never fatal: its exception message becomes its reason.

    Returns:
      (records sorted by song id, [(item, reason)] in item order).
    """
    call = functools.partial(_call_or_reason, fn)
    bar = tqdm.tqdm(total=len(items), desc=desc, disable=not progress, unit="song")
    results = []
    if workers > 1 and len(items) > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for result in pool.imap(call, items, chunksize=4):
                results.append(result)
                bar.update()
    else:
        for item in items:
            results.append(call(item))
            bar.update()
    bar.close()
    songs = sorted((r for _, r, _ in results if r is not None), key=lambda r: r["song_id"])
    rejected = [(item, reason) for item, r, reason in results if r is None]
    return songs, rejected

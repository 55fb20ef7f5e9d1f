"""The songs of the editing benchmark (``benchmarks/editing.py``) and the edit of each mode.

Songs: the test split only, from a folder ``python -m phraseldm_jax.cli.prepare`` built (its
``songs`` dataset), a raw POP909 folder (the song folders ``records.split_of`` puts in the test
split, imported by ``editing.import_song`` as ``sample.py --from`` imports them), or the
synthetic corpus (``input_pipeline.splits``: tests and smoke runs). Each song is edited at
``n = min(its bars, the model's)`` bars; songs under ``MIN_BARS`` are left out.

Modes (bars count from 1; ``k``, ``g`` shrink on short songs so that something is kept and
something generated):

- ``continuation``: keep bars 1..k (k = min(--context_bars, n // 2)), generate k+1..n.
- ``infill``: regenerate g = min(--infill_bars, n - 2) bars in the middle, keep the rest.
- ``accompaniment``: keep the melody track (program 13, ``metrics.ldm.MELODY_PROGRAM``) in
  every bar, generate the others; songs without a melody are left out of this mode.
- ``exact_length``: a new song of exactly n bars (nothing of the song kept).
- ``variation``: SDEdit from the song at ``--variation`` strength, nothing kept.

Every mode keeps the ``b-1`` slots and the ``[SEP]`` pad after bar n (exact length), as
``sample.py`` does for an edit.
"""

from __future__ import annotations

import dataclasses
import os

from phraseldm_jax import editing, sections
from phraseldm_jax.metrics.ldm import MELODY_PROGRAM

MODES = ("continuation", "infill", "accompaniment", "exact_length", "variation")
MIN_BARS = 4


@dataclasses.dataclass(frozen=True)
class ModeOptions:
    """The sizes of the edits: bars kept by a continuation, bars an infill regenerates, the
    SDEdit strength of a variation."""

    context_bars: int = 8
    infill_bars: int = 8
    strength: float = 0.4


@dataclasses.dataclass(frozen=True)
class Edit:
    """One mode's edit of one song: what to keep, whether it starts from the song (``song``
    None: a new song) and the SDEdit strength (1 = from noise)."""

    keep: editing.KeepSpec
    song: editing.SourceSong | None
    strength: float = 1.0


def continuation_bars(n_bars: int, options: ModeOptions) -> int:
    """k: bars 1..k are kept."""
    return max(1, min(options.context_bars, n_bars // 2))


def infill_gap(n_bars: int, options: ModeOptions) -> tuple[int, int]:
    """(first, last) regenerated bar, 1-based, centred in the song."""
    gap = max(1, min(options.infill_bars, n_bars - 2))
    first = (n_bars - gap) // 2 + 1
    return first, first + gap - 1


def mode_edit(mode: str, song: editing.SourceSong, n_bars: int, options: ModeOptions):
    """The ``Edit`` of ``mode`` on ``song`` at ``n_bars`` bars, or None where the mode does not
    apply (accompaniment of a song without a melody)."""
    if mode == "continuation":
        k = continuation_bars(n_bars, options)
        return Edit(editing.KeepSpec(tuple(range(1, k + 1))), song)
    if mode == "infill":
        first, last = infill_gap(n_bars, options)
        kept = (*range(1, first), *range(last + 1, n_bars + 1))
        return Edit(editing.KeepSpec(kept), song)
    if mode == "accompaniment":
        if MELODY_PROGRAM not in song.programs:
            return None
        return Edit(editing.KeepSpec(programs=(MELODY_PROGRAM,)), song)
    if mode == "exact_length":
        return Edit(editing.KeepSpec(), None)
    if mode == "variation":
        return Edit(editing.KeepSpec(), song, options.strength)
    raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def describe(mode: str, options: ModeOptions) -> str:
    """One line saying what ``mode`` keeps and generates (the JSON's and the table's)."""
    return {
        "continuation": f"keep bars 1..k, generate k+1..n (k = min({options.context_bars}, n/2))",
        "infill": f"regenerate {options.infill_bars} middle bars (at most n-2), keep the rest",
        "accompaniment": f"keep the melody (program {MELODY_PROGRAM}), generate the other tracks",
        "exact_length": "a new song of exactly n bars (the test song's length)",
        "variation": f"SDEdit from the song at strength {options.strength}",
    }[mode]


# --- the test songs ------------------------------------------------------------------------


def _records(data_dir: str, synthetic_songs: int):
    """The test split's song records: the synthetic corpus's, else the prepared folder's."""
    import ml_collections

    from input_pipeline import splits

    config = ml_collections.ConfigDict(
        dict(data_dir="" if synthetic_songs else data_dir, dataset="songs")
    )
    config.n_synthetic_songs = synthetic_songs
    source = splits.open_split(config, "test")
    for index in range(len(source)):
        yield source[index]


def _raw_pop909_songs(root: str, slot_order: str):
    """(song, None) or (None, skip reason) of every test-split song folder of raw POP909."""
    from input_pipeline import pop909, records

    for folder in pop909.song_dirs(root):
        name = os.path.basename(folder)
        if records.split_of(f"pop909/{name}") != "test":
            continue
        try:
            yield editing.import_song(os.path.join(folder, f"{name}.mid"), slot_order), None
        except editing.EditError as error:
            yield None, {"song": f"pop909/{name}", "reason": str(error)}


def is_prepared(data_dir: str) -> bool:
    """Whether ``data_dir`` is a folder ``prepare`` built (it has a ``songs`` dataset)."""
    return os.path.isdir(os.path.join(data_dir, "songs"))


def load_test_songs(
    data_dir: str,
    limit: int,
    slot_order: str,
    max_bars: int,
    *,
    synthetic_songs: int = 0,
    needs_plan: bool = False,
) -> tuple[list[tuple[editing.SourceSong, int]], list[dict]]:
    """(up to ``limit`` (song, n_bars) of the test split in the dataset's order, the songs left
    out with why). ``needs_plan``: a section-conditioned model, which needs a section plan
    covering the n bars edited."""
    if synthetic_songs or is_prepared(data_dir):
        found = (
            (editing.song_from_record(r, slot_order, r["song_id"]), None)
            for r in _records(data_dir, synthetic_songs)
        )
    else:
        found = _raw_pop909_songs(data_dir, slot_order)
    chosen, skipped = [], []
    for song, skip in found:
        if len(chosen) == limit:
            break
        if skip is None:
            n_bars = min(song.n_bars, max_bars)
            skip = _unusable(song, n_bars, needs_plan)
        if skip is not None:
            skipped.append(skip)
            continue
        chosen.append((song, n_bars))
    return chosen, skipped


def _unusable(song: editing.SourceSong, n_bars: int, needs_plan: bool) -> dict | None:
    song_id = str(song.record.get("song_id", song.path))
    if n_bars < MIN_BARS:
        return {"song": song_id, "reason": f"{n_bars} bars (fewer than {MIN_BARS})"}
    if needs_plan and song_plan(song, n_bars) is None:
        return {"song": song_id, "reason": f"no section plan covering its {n_bars} bars"}
    return None


def song_plan(song: editing.SourceSong, n_bars: int) -> sections.SectionPlan | None:
    """The song's section plan when it fits the song and covers exactly ``n_bars`` bars."""
    text = song.record.get("section_plan") or ""
    if not text or not song.record.get("plan_fits", False):
        return None
    try:
        return sections.parse_plan(text, n_bars=n_bars)
    except sections.SectionPlanError:
        return None

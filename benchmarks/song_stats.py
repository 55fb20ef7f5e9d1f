"""Do sampled songs look like POP909 songs? Note statistics of song sets, side by side.

Each set is parsed from REMI-z text with the project's own reader
(``phrases.remiz_to_multitrack``): a folder written by ``sample.py`` (its ``song_<n>.txt``
files, the songs as the model decoded them, before ``songs.clean_notes``), or a split of the
``songs`` dataset built by ``python -m phraseldm_jax.cli.prepare`` (each record's phrases put
back into one REMI-z string, bar by bar). Per set, over all bars of all its songs::

  python -m benchmarks.song_stats --data_dir /work/data/pop909 --split test \\
      --samples lencond=/work/notes/songs_lencond --samples seccond=/work/notes/songs_seccond

- ``notes_per_bar``: notes / bars; ``notes_per_nonempty_bar``: notes / bars with a note;
- ``pitch_range``: per program (13 melody, 25 bridge, 0 piano in POP909), the mean over the
  songs that have that track of its highest minus its lowest pitch (``songs_with_track``
  counts them);
- ``empty_bar_share``: bars without a note in any track;
- ``all_tracks_share``: bars where every one of ``--programs`` has a note;
- ``duplicate_share``: notes repeating another of the same bar, track, onset and pitch
  (``songs.clean_notes`` would drop them; 0 for good output);
- ``mean_bars``: bars per song; ``unreadable``: songs remi-z could not read (left out).

Prints a markdown table and writes all figures as JSON to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence

from phraseldm_jax import fileio, phrases
from phraseldm_jax.phrases import POP909_PROGRAMS

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "song_stats.json")
SONG_TEXT = re.compile(r"song_(\d+)\.txt")
PROGRAM_NAMES = {13: "melody", 25: "bridge", 0: "piano"}


# --------------------------------------------------------------------------------------------
# Per song.


def song_counts(multitrack, programs: Sequence[int] = POP909_PROGRAMS) -> dict:
    """The raw counts of one MultiTrack: bars, notes, non-empty bars, bars with all
    ``programs``, duplicate notes, and per program the lowest and highest pitch."""
    wanted = set(programs)
    counts = {"bars": 0, "notes": 0, "nonempty_bars": 0, "all_tracks_bars": 0, "duplicates": 0}
    pitches: dict[int, list[int]] = {}
    for bar in multitrack.bars:
        counts["bars"] += 1
        present = set()
        bar_notes = 0
        for track in bar.tracks.values():
            program = int(track.inst_id)
            seen = set()
            for note in track.notes:
                key = (int(note.onset), int(note.pitch))
                if key in seen:
                    counts["duplicates"] += 1
                seen.add(key)
                low_high = pitches.setdefault(program, [note.pitch, note.pitch])
                low_high[0] = min(low_high[0], int(note.pitch))
                low_high[1] = max(low_high[1], int(note.pitch))
            if track.notes:
                present.add(program)
                bar_notes += len(track.notes)
        counts["notes"] += bar_notes
        counts["nonempty_bars"] += int(bar_notes > 0)
        counts["all_tracks_bars"] += int(wanted <= present)
    counts["pitch_low_high"] = {p: (int(lo), int(hi)) for p, (lo, hi) in pitches.items()}
    return counts


def text_counts(text: str, programs: Sequence[int] = POP909_PROGRAMS) -> dict | None:
    """``song_counts`` of a REMI-z song string; None when remi-z cannot read it."""
    try:
        multitrack = phrases.remiz_to_multitrack(text)
    except Exception:  # noqa: BLE001 - a decoded song may be any token soup
        return None
    return song_counts(multitrack, programs)


def record_text(record: Mapping) -> str:
    """A ``songs`` record as one REMI-z string: per bar its phrases, then ``b-1``."""
    return " ".join(
        phrases.bar_text(text for _, text in bar) for bar in phrases.record_phrases(record)
    )


# --------------------------------------------------------------------------------------------
# Per set.


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def set_stats(texts: Iterable[str], programs: Sequence[int] = POP909_PROGRAMS) -> dict:
    """The figures of one song set (see the module docstring) from its REMI-z strings."""
    songs, unreadable = [], 0
    for text in texts:
        counts = text_counts(text, programs)
        if counts is None:
            unreadable += 1
        else:
            songs.append(counts)
    total = {k: sum(s[k] for s in songs) for k in ("bars", "notes", "nonempty_bars")}
    total.update({k: sum(s[k] for s in songs) for k in ("all_tracks_bars", "duplicates")})
    seen_programs = sorted({p for s in songs for p in s["pitch_low_high"]} | set(programs))
    pitch_range, with_track = {}, {}
    for program in seen_programs:
        spans = [
            hi - lo for s in songs for p, (lo, hi) in s["pitch_low_high"].items() if p == program
        ]
        pitch_range[str(program)] = sum(spans) / len(spans) if spans else None
        with_track[str(program)] = len(spans)
    return {
        "songs": len(songs),
        "unreadable": unreadable,
        "bars": total["bars"],
        "notes": total["notes"],
        "notes_per_bar": _share(total["notes"], total["bars"]),
        "notes_per_nonempty_bar": _share(total["notes"], total["nonempty_bars"]),
        "pitch_range": pitch_range,
        "songs_with_track": with_track,
        "empty_bar_share": _share(total["bars"] - total["nonempty_bars"], total["bars"]),
        "all_tracks_share": _share(total["all_tracks_bars"], total["bars"]),
        "duplicate_notes": total["duplicates"],
        "duplicate_share": _share(total["duplicates"], total["notes"]),
        "mean_bars": _share(total["bars"], len(songs)),
    }


# --------------------------------------------------------------------------------------------
# Inputs.


def sample_texts(folder: str) -> list[str]:
    """The ``song_<n>.txt`` strings of a ``sample.py`` output folder, in song order.

    Raises:
      ValueError: not a folder, or no ``song_<n>.txt`` in it (one-line message).
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    names = [n for n in os.listdir(folder) if SONG_TEXT.fullmatch(n)]
    if not names:
        has_midi = bool(glob.glob(os.path.join(glob.escape(folder), "song_*.mid")))
        hint = " (only MIDI files; their .txt are needed)" if has_midi else ""
        raise ValueError(f"{folder}: no song_<n>.txt written by sample.py{hint}")
    names.sort(key=lambda n: int(SONG_TEXT.fullmatch(n).group(1)))
    out = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            out.append(f.read().strip())
    return out


def dataset_texts(data_dir: str, split: str) -> list[str]:
    """The songs of ``split`` of the prepared ``songs`` dataset as REMI-z strings.

    Raises:
      ValueError: no finished ``songs`` dataset or no such split (one-line message).
    """
    from input_pipeline import tfds_builders

    tfds_builders.quiet()
    try:
        source = tfds_builders.open_source(data_dir, "songs", split)
    except (FileNotFoundError, KeyError) as e:
        raise ValueError(str(e).strip("'\"")) from None
    return [record_text(source[i]) for i in range(len(source))]


# --------------------------------------------------------------------------------------------
# Output.


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(sets: Mapping[str, dict], programs: Sequence[int] = POP909_PROGRAMS) -> str:
    """One row per set: the figures of the module docstring."""
    ranges = [
        f"range {p} ({PROGRAM_NAMES[p]})" if p in PROGRAM_NAMES else f"range {p}" for p in programs
    ]
    header = ["set", "songs", "mean bars", "notes/bar", "notes/non-empty bar", *ranges]
    header += ["empty bars", "all tracks", "duplicates", "unreadable"]
    rows = []
    for label, s in sets.items():
        row = [label, s["songs"], s["mean_bars"], s["notes_per_bar"], s["notes_per_nonempty_bar"]]
        row += [s["pitch_range"].get(str(p)) for p in programs]
        row += [s["empty_bar_share"], s["all_tracks_share"], s["duplicate_share"], s["unreadable"]]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.


def _labelled(spec: str) -> tuple[str, str]:
    label, sep, folder = spec.partition("=")
    if not sep:
        return os.path.basename(os.path.normpath(spec)) or spec, spec
    if not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR or DIR, got {spec!r}")
    return label, folder


def _programs(spec: str) -> tuple[int, ...]:
    try:
        out = tuple(int(p) for p in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated programs, got {spec!r}"
        ) from None
    if not out or any(not 0 <= p <= 128 for p in out):
        raise argparse.ArgumentTypeError(f"programs are 0..128, got {spec!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.song_stats",
        description="Note statistics of sampled songs next to the real songs of a prepared set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--samples",
        action="append",
        type=_labelled,
        default=[],
        metavar="LABEL=DIR",
        help="a folder written by sample.py (song_<n>.txt); repeatable; LABEL defaults to "
        "the folder's name",
    )
    parser.add_argument(
        "--data_dir", default=None, help="a folder built by python -m phraseldm_jax.cli.prepare"
    )
    parser.add_argument("--split", default="test", help="split of --data_dir's songs dataset")
    parser.add_argument(
        "--data_label",
        default=None,
        help="row label of the real songs; None: the --data_dir folder's name, ':', SPLIT",
    )
    parser.add_argument(
        "--programs",
        type=_programs,
        default=",".join(map(str, POP909_PROGRAMS)),
        metavar="P,P,P",
        help="tracks (programs) of the pitch-range columns and the all-tracks share",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file written (atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.samples and not args.data_dir:
        parser.error("nothing to measure: give --samples LABEL=DIR and/or --data_dir DIR")
    labels = [label for label, _ in args.samples]
    if len(set(labels)) != len(labels):
        parser.error(f"--samples labels must differ, got {labels}")
    sets: dict[str, dict] = {}
    sources: dict[str, str] = {}
    try:
        if args.data_dir:
            label = (
                args.data_label
                or f"{os.path.basename(os.path.normpath(args.data_dir))}:{args.split}"
            )
            if label in labels:
                parser.error(f"--data_label {label!r} is also a --samples label")
            sets[label] = set_stats(dataset_texts(args.data_dir, args.split), args.programs)
            sources[label] = f"{args.data_dir} (songs, split {args.split})"
        for label, folder in args.samples:
            sets[label] = set_stats(sample_texts(folder), args.programs)
            sources[label] = folder
    except ValueError as e:
        parser.error(str(e))
    print(markdown(sets, args.programs))
    result = {
        "command": shlex.join(
            ["python", "-m", "benchmarks.song_stats", *(sys.argv[1:] if argv is None else argv)]
        ),
        "programs": list(args.programs),
        "sources": sources,
        "sets": sets,
    }
    fileio.write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

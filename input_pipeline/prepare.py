"""Build the songs / phrases / bars datasets from a raw corpus, with a summary (``build``).

The command is ``python -m phraseldm_jax.cli.prepare`` (``--help`` lists the options).
Songs are imported in a process pool (``workers``) with a progress bar, then written
with the TFDS builders of ``input_pipeline.tfds_builders`` (ArrayRecord, under
``<data_dir>/<name>/<version>/``). The summary (songs, bars and phrases per split, songs
fitting their section plan and why the others do not, token-length percentiles, songs
over 128 bars, every rejected or marked file with its reason) is returned and saved to
``<data_dir>/prepare_summary.json``. Existing datasets are kept unless ``overwrite``; a
rebuild is written beside them and swapped in as one set (``dataset_swap``), so a build that
fails or is killed never leaves a mix of old and new datasets.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from input_pipeline import dataset_swap, midi_folder, pop909, records, synthetic, tfds_builders
from phraseldm_jax import fileio
from phraseldm_jax.sections import MAX_PLAN_BARS

SUMMARY_FILE = "prepare_summary.json"
FAILED_SUMMARY_FILE = "prepare_failed_summary.json"  # a rebuild that imported nothing
PERCENTILES = (50, 90, 99)


class NothingImported(ValueError):
    """No song of the corpus imported; ``summary`` holds every file's reason."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def import_songs(args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, str]]]:
    """Imports the corpus named by the options (``cli.prepare``'s flags): (records,
    [(file, reason)])."""
    if args.source == "synthetic":
        return synthetic.synthetic_records(args.n_songs, seed=args.seed), []
    if not args.input:
        raise ValueError(f"--input is required for --source {args.source}")
    if args.source == "pop909":
        return pop909.import_folder(
            args.input, workers=args.workers, progress=True, limit=args.limit
        )
    selection = midi_folder.TrackSelection(
        programs=midi_folder.parse_programs(args.programs),
        drums=args.drums,
        name_pattern=args.name_regex,
        max_tracks=args.max_tracks,
        program_map=midi_folder.parse_program_map(args.program_map),
        slot_programs=midi_folder.parse_programs(args.slot_programs),
    )
    return midi_folder.import_folder(
        args.input, selection, not args.no_key_norm, workers=args.workers, progress=True
    )


def _percentiles(values: Sequence[int]) -> dict[str, int]:
    if not len(values):
        return {}
    array = np.asarray(values)
    out = {f"p{p}": int(np.percentile(array, p)) for p in PERCENTILES}
    out["max"] = int(array.max())
    out["count"] = int(len(array))
    return out


def _reason_group(text: str) -> str:
    """A reason without file paths, quoted text and numbers, to group similar reasons."""
    text = re.sub(r"\S*/\S*: ", "", text)
    text = re.sub(r"'[^']*'", "'...'", text)
    return re.sub(r"\d+(\.\d+)?%?", "N", text)


def _examples(texts: Sequence[str]) -> dict[str, str]:
    """The first text of each reason group: what a group looks like with its real numbers."""
    out: dict[str, str] = {}
    for text in texts:
        out.setdefault(_reason_group(text), re.sub(r"\S*/\S*: ", "", text))
    return out


FLAG_DETAILS = {
    "too_long": "{n_bars} bars, more than " + str(MAX_PLAN_BARS),
    "key_mismatch": (
        "key normalisation shifted by {key_shift:+d} semitones, which brings no key of "
        "analyzed_key.txt to C major / A minor"
    ),
    "plan_error": "{plan_note}",
    "plan_mismatch": "{plan_note}",
}


def mark_note(song: Mapping) -> str:
    """What each flag of ``song`` means for this song, e.g. ``key_mismatch: key normalisation
    shifted by +3 semitones, ...; plan_mismatch: 3 bar(s) with notes outside the plan``."""
    fields = {
        "n_bars": int(song["n_bars"]),
        "key_shift": int(song["key_shift"]),
        "plan_note": song["plan_note"],
    }
    parts = [
        f"{flag}: {FLAG_DETAILS.get(flag, '').format(**fields)}".rstrip(": ")
        for flag in song["flags"]
    ]
    if song["section_plan"] and not song["plan_fits"] and "plan_mismatch" not in song["flags"]:
        parts.append(f"plan does not fit: {song['plan_note']}")
    return "; ".join(parts)


def summarize(songs: Sequence[Mapping], rejected: Sequence[tuple[str, str]]) -> dict:
    """Counts, plan fit, token lengths and every rejected / marked song (JSON-ready).

    ``*_reasons`` count reasons grouped without their numbers and paths; ``*_examples`` give
    the first reason of each group as it was (what ``print_summary`` shows).
    """
    per_split = {s: collections.Counter() for s in records.SPLITS}
    phrase_tokens, bar_tokens = [], []
    for song in songs:
        counts = per_split[records.split_of(song["song_id"])]
        counts["songs"] += 1
        counts["bars"] += int(song["n_bars"])
        counts["phrases"] += len(song["phrases"])
        counts["phrase_lines"] += len(records.phrase_lines(song))
        counts["bar_lines"] += len(records.bar_lines(song))
        phrase_tokens.extend(len(p.split()) for p in song["phrases"])
        bar_tokens.extend(len(line["text"].split()) for line in records.bar_lines(song)[:-1])
    with_plan = [s for s in songs if s["section_plan"]]
    not_fitting_texts = []
    for song in with_plan:
        if not song["plan_fits"]:
            not_fitting_texts.extend(song["plan_note"].split("; "))
    for song in songs:
        if not song["section_plan"]:
            not_fitting_texts.append(song["plan_note"] or "no section plan")
    not_fitting = collections.Counter(_reason_group(t) for t in not_fitting_texts)
    adjustment_texts = [s["plan_note"] or "as is" for s in songs if s["plan_fits"]]
    adjustments = collections.Counter(_reason_group(t) for t in adjustment_texts)
    # A song without a plan (every MIDI-folder song) is not marked for that alone.
    marked = [
        {"song_id": s["song_id"], "flags": list(s["flags"]), "note": mark_note(s)}
        for s in songs
        if s["flags"] or (s["section_plan"] and not s["plan_fits"])
    ]
    return {
        "songs": len(songs),
        "rejected": len(rejected),
        "rejected_reasons": dict(collections.Counter(_reason_group(r) for _, r in rejected)),
        "rejected_examples": _examples([r for _, r in rejected]),
        "splits": {split: dict(counts) for split, counts in per_split.items()},
        "bars": sum(int(s["n_bars"]) for s in songs),
        "phrases": sum(len(s["phrases"]) for s in songs),
        "songs_with_plan": len(with_plan),
        "songs_fitting_plan": sum(bool(s["plan_fits"]) for s in songs),
        "songs_fitting_plan_le_128_bars": sum(
            bool(s["plan_fits"]) and int(s["n_bars"]) <= MAX_PLAN_BARS for s in songs
        ),
        "not_fitting_reasons": dict(not_fitting.most_common()),
        "not_fitting_examples": _examples(not_fitting_texts),
        "fitting_adjustments": dict(adjustments.most_common()),
        "fitting_examples": _examples(adjustment_texts),
        "songs_over_128_bars": sum(int(s["n_bars"]) > MAX_PLAN_BARS for s in songs),
        "flags": dict(collections.Counter(f for s in songs for f in s["flags"]).most_common()),
        "phrase_tokens": _percentiles(phrase_tokens),
        "bar_tokens": _percentiles(bar_tokens),
        "phrases_over_127_tokens": int(sum(n > 127 for n in phrase_tokens)),
        "bars_over_127_tokens": int(sum(n > 127 for n in bar_tokens)),
        "rejected_files": [{"file": f, "reason": r} for f, r in rejected],
        "marked_songs": marked,
    }


def write_json(path: str, data: Mapping) -> None:
    """Writes ``data`` as JSON atomically (temporary file, then rename)."""
    fileio.write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def print_summary(summary: Mapping, file=None) -> None:
    """Human-readable summary (to stdout by default); the JSON file has the same content."""
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"songs imported: {summary['songs']}   rejected: {summary['rejected']}")

    def example(kind: str, group: str, n: int) -> str:
        text = summary.get(f"{kind}_examples", {}).get(group, group)
        more = f"  (and {n - 1} more like it)" if n > 1 and text != group else ""
        return text + more

    for reason, n in summary["rejected_reasons"].items():
        p(f"  rejected {n:4d}  {example('rejected', reason, n)}")
    for split, c in summary["splits"].items():
        p(
            f"{split:>10}: {c.get('songs', 0):5d} songs {c.get('bars', 0):7d} bars "
            f"{c.get('phrases', 0):7d} phrases {c.get('phrase_lines', 0):7d} phrase lines "
            f"{c.get('bar_lines', 0):6d} bar lines"
        )
    p(
        f"section plans: {summary['songs_fitting_plan']} of {summary['songs_with_plan']} songs "
        f"with a plan fit it ({summary['songs_fitting_plan_le_128_bars']} of them <= 128 bars)"
    )
    for reason, n in summary["not_fitting_reasons"].items():
        p(f"  not fitting {n:4d}  {example('not_fitting', reason, n)}")
    for note, n in summary["fitting_adjustments"].items():
        p(f"  fitting {n:4d}  {example('fitting', note, n)}")
    p(f"songs over 128 bars: {summary['songs_over_128_bars']}   flags: {summary['flags']}")
    p(f"phrase tokens: {summary['phrase_tokens']}  (> 127: {summary['phrases_over_127_tokens']})")
    p(f"bar tokens:    {summary['bar_tokens']}  (> 127: {summary['bars_over_127_tokens']})")
    for item in summary["rejected_files"]:
        p(f"  REJECTED {item['file']}: {item['reason']}")
    for item in summary["marked_songs"]:
        p(f"  MARKED {item['song_id']} {item['flags']}: {item['note']}")


def build(args: argparse.Namespace, command: str) -> dict:
    """Imports the corpus and writes the datasets and the summary (returned); ``args`` holds
    ``cli.prepare``'s options, ``command`` the command line recorded in the summary.

    The datasets and the summary are written in ``<data_dir>/incomplete.<pid>.<random>/`` and
    swapped in as one set at the end (``dataset_swap``): a build that fails or is killed
    leaves the previous set whole (or none), and the next build removes its leftovers.

    Raises FileExistsError when ``data_dir`` holds datasets and ``args.overwrite`` is off, and
    NothingImported (a ValueError, with the summary, also saved) when nothing imports.
    """
    start = time.time()
    for line in dataset_swap.recover(args.data_dir):
        print(line, file=sys.stderr)
    existing = existing_datasets(args.data_dir)
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{args.data_dir} already holds {existing}; pass --overwrite to rebuild them"
        )
    songs, rejected = import_songs(args)
    if not songs:  # the reasons are the whole result: save them, then fail
        summary = {
            "command": command,
            "source": args.source,
            "input": args.input,
            "data_dir": args.data_dir,
            "written": {},
            **summarize(songs, rejected),
        }
        # Beside datasets the summary would not describe them: it gets its own name.
        summary_path = os.path.join(
            args.data_dir, FAILED_SUMMARY_FILE if existing else SUMMARY_FILE
        )
        os.makedirs(args.data_dir, exist_ok=True)
        write_json(summary_path, summary)
        raise NothingImported(
            f"no songs imported from {args.input} ({len(rejected)} rejected; the reasons are "
            f"above and in {summary_path})",
            summary,
        )
    import_seconds = time.time() - start
    tfds_builders.quiet()
    with dataset_swap.staged(args.data_dir) as staging:
        tfds_builders.build(staging, songs=songs)
        summary = {
            "command": command,
            "source": args.source,
            "input": args.input,
            "data_dir": args.data_dir,
            "import_seconds": round(import_seconds, 1),
            "wall_seconds": round(time.time() - start, 1),
            "written": {
                name: tfds_builders.split_sizes(staging, name)
                for name in tfds_builders.DATASET_NAMES
            },
            **summarize(songs, rejected),
        }
        write_json(os.path.join(staging, SUMMARY_FILE), summary)
    return summary


def existing_datasets(data_dir: str) -> list[str]:
    """The finished datasets of ``data_dir`` (an interrupted build's folder does not count)."""
    return [name for name in tfds_builders.DATASET_NAMES if _has_finished_dataset(data_dir, name)]


def _has_finished_dataset(data_dir: str, name: str) -> bool:
    try:
        tfds_builders.dataset_path(data_dir, name)
    except FileNotFoundError:
        return False
    return True

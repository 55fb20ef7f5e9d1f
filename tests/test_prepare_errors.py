"""``prepare`` says why: per-file reasons even when nothing imports, flags checked before any
file is scanned, real reasons for empty and truncated files, summaries with their numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_midi_folder import PIANO, write_midi

from input_pipeline import prepare, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phraseldm_jax.cli.prepare", *args]
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _bad_folder(folder) -> None:
    write_midi(str(folder / "waltz.mid"), [PIANO], time_signatures=((3, 4),))
    write_midi(str(folder / "march.mid"), [PIANO], time_signatures=((2, 4),))
    full = write_midi(str(folder / "full.mid"), [PIANO])
    data = open(full, "rb").read()
    os.remove(full)
    (folder / "truncated.mid").write_bytes(data[:-10])
    (folder / "empty.mid").write_bytes(b"")


def test_nothing_imported_still_prints_and_saves_every_reason(tmp_path):
    _bad_folder(tmp_path / "in")
    done = _prepare("--source", "midi", "--input", str(tmp_path / "in"), "--data_dir",
                    str(tmp_path / "out"), "--workers", "1")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no songs imported" in done.stderr and "4 rejected" in done.stderr
    out = done.stdout
    assert "time signature 2/4 at tick 0; only 4/4  (and 1 more like it)" in out
    assert "REJECTED" in out and "march.mid: time signature 2/4 at tick 0; only 4/4" in out
    assert "empty.mid: unreadable MIDI (empty file, 0 bytes)" in out
    assert "truncated.mid: unreadable MIDI (truncated" in out
    assert "EOFError" not in out and "N/N" not in out
    saved = json.load(open(tmp_path / "out" / prepare.SUMMARY_FILE))
    reasons = {os.path.basename(r["file"]): r["reason"] for r in saved["rejected_files"]}
    assert reasons["waltz.mid"] == "time signature 3/4 at tick 0; only 4/4"
    assert reasons["empty.mid"] == "unreadable MIDI (empty file, 0 bytes)"
    assert saved["songs"] == 0 and saved["rejected"] == 4


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--name_regex", "([", "--name_regex ([: '([' is not a regular expression"),
        ("--programs", "300", "--programs 300: '300' is not a program number (0..127)"),
        ("--programs", "0,abc", "--programs 0,abc: 'abc' is not a program number (0..127)"),
    ],
)
def test_flags_are_checked_before_scanning(tmp_path, flag, value, message):
    """The input folder does not exist: the flag is reported first, and nothing is scanned."""
    done = _prepare("--source", "midi", "--input", str(tmp_path / "missing"), "--data_dir",
                    str(tmp_path / "out"), flag, value)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"python -m phraseldm_jax.cli.prepare: error: {message}"] or (
        len(lines) == 1 and message in lines[0]
    ), done.stderr
    assert not (tmp_path / "out").exists()


def test_summary_shows_real_numbers_and_right_details():
    song = synthetic.synthetic_records(1)[0]
    midi_song = {**song, "song_id": "midi/a.mid", "section_plan": "", "plan_fits": False}
    outside = "3 bar(s) with notes outside the plan (1 before, 2 after)"
    mismatch = {**song, "song_id": "pop909/002", "plan_fits": False, "plan_note": outside,
                "flags": ["plan_mismatch"]}  # fmt: skip
    other = {**mismatch, "song_id": "pop909/003", "plan_note": outside.replace("3", "4")}
    key = {**song, "song_id": "pop909/004", "plan_note": "dropped 1 trailing bar(s) (2 note(s))",
           "key_shift": 3, "flags": ["key_mismatch"]}  # fmt: skip
    summary = prepare.summarize([song, midi_song, mismatch, other, key], [])
    marked = {m["song_id"]: m["note"] for m in summary["marked_songs"]}
    assert "midi/a.mid" not in marked  # no plan is no reason to mark a MIDI-folder song
    assert marked["pop909/002"] == f"plan_mismatch: {outside}"
    assert marked["pop909/004"].startswith("key_mismatch: key normalisation shifted by +3")
    assert "trailing" not in marked["pop909/004"]
    lines = []
    prepare.print_summary(summary, file=type("F", (), {"write": lambda s, t: lines.append(t)})())
    text = "".join(lines)
    assert f"not fitting    2  {outside}  (and 1 more like it)" in text
    assert "N bar(s)" not in text

"""benchmarks/song_stats.py: figures of hand-made REMI-z songs with known counts, of the
synthetic corpus against its records, and the command line on a sample folder and a
prepared set."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import song_stats
from input_pipeline import records, synthetic, tfds_builders

# Bar 1: melody 72 twice at onset 0 (one duplicate) and 76, bridge 60, piano 48: all three
# tracks, 5 notes. Bar 2: empty. Bar 3: piano 40 and 52.
SONG_A = (
    "s-9 t-30 i-13 o-0 p-72 d-12 p-72 d-6 o-12 p-76 d-12 i-25 o-0 p-60 d-24 "
    "i-0 o-0 p-48 d-24 b-1 b-1 i-0 o-0 p-40 d-12 o-24 p-52 d-12 b-1"
)
SONG_B = "i-13 o-0 p-60 d-12 o-12 p-67 d-12 b-1"  # one bar, melody only
UNREADABLE = "i-0 o-0 p-x d-12 b-1"


def test_counts_of_one_song():
    counts = song_stats.text_counts(SONG_A)
    assert counts == {
        "bars": 3,
        "notes": 7,
        "nonempty_bars": 2,
        "all_tracks_bars": 1,
        "duplicates": 1,
        "pitch_low_high": {13: (72, 76), 25: (60, 60), 0: (40, 52)},
    }
    assert song_stats.text_counts(UNREADABLE) is None


def test_figures_of_a_hand_made_set():
    stats = song_stats.set_stats([SONG_A, SONG_B, UNREADABLE])
    assert stats["songs"] == 2 and stats["unreadable"] == 1
    assert stats["bars"] == 4 and stats["notes"] == 9
    assert stats["notes_per_bar"] == pytest.approx(9 / 4)
    assert stats["notes_per_nonempty_bar"] == pytest.approx(3.0)
    assert stats["pitch_range"] == {"13": 5.5, "25": 0.0, "0": 12.0}  # 13: (4 + 7) / 2
    assert stats["songs_with_track"] == {"13": 2, "25": 1, "0": 1}
    assert stats["empty_bar_share"] == pytest.approx(0.25)
    assert stats["all_tracks_share"] == pytest.approx(0.25)
    assert stats["duplicate_notes"] == 1
    assert stats["duplicate_share"] == pytest.approx(1 / 9)
    assert stats["mean_bars"] == pytest.approx(2.0)


def test_clean_song_has_no_duplicates_and_other_programs_are_kept():
    stats = song_stats.set_stats([SONG_B, "i-40 o-0 p-70 d-12 p-58 d-12 b-1"])
    assert stats["duplicate_share"] == 0.0 and stats["all_tracks_share"] == 0.0
    assert stats["pitch_range"]["40"] == 12.0 and stats["pitch_range"]["25"] is None


def test_empty_set_gives_no_figures():
    stats = song_stats.set_stats([])
    assert stats["songs"] == 0 and stats["notes_per_bar"] is None and stats["mean_bars"] is None


@pytest.fixture(scope="module")
def corpus():
    return synthetic.synthetic_records(48)


def test_synthetic_records_match_their_phrases(corpus):
    """Figures from the records' REMI-z text against counts read off the records directly."""
    songs = corpus[:8]
    stats = song_stats.set_stats([song_stats.record_text(r) for r in songs])
    n_bars = sum(int(r["n_bars"]) for r in songs)
    n_notes = sum(
        sum(t.startswith("p-") for t in song_stats.phrases.as_text(text).split())
        for r in songs
        for text in r["phrases"]
    )
    nonempty = sum(len({int(b) for b in r["phrase_bar"]}) for r in songs)
    assert stats["songs"] == 8 and stats["unreadable"] == 0
    assert stats["bars"] == n_bars and stats["notes"] == n_notes
    assert stats["empty_bar_share"] == pytest.approx((n_bars - nonempty) / n_bars)
    assert stats["duplicate_notes"] == 0
    assert stats["mean_bars"] == pytest.approx(n_bars / 8)


def _write_samples(folder, texts):
    os.makedirs(folder, exist_ok=True)
    for i, text in enumerate(texts):
        with open(os.path.join(folder, f"song_{i:03d}.txt"), "w") as f:
            f.write(text + "\n")
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"songs": [{"text_file": f"song_{i:03d}.txt"} for i in range(len(texts))]}, f)


def test_command_on_samples_and_a_prepared_set(tmp_path, corpus, capsys):
    data_dir = str(tmp_path / "data")
    tfds_builders.quiet()
    tfds_builders.build(data_dir, songs=corpus)
    test_songs = [r for r in corpus if records.split_of(r["song_id"]) == "test"]
    samples = str(tmp_path / "songs_a")
    _write_samples(samples, [SONG_B, SONG_A])
    out = str(tmp_path / "results" / "stats.json")
    argv = ["--data_dir", data_dir, "--data_label", "real", "--samples", f"model={samples}"]
    assert song_stats.main([*argv, "--out", out]) == 0
    table = capsys.readouterr().out
    assert "| real |" in table and "| model | 2 | 2 |" in table
    saved = json.load(open(out))
    assert saved["sets"]["model"] == json.loads(json.dumps(song_stats.set_stats([SONG_A, SONG_B])))
    expected = song_stats.set_stats([song_stats.record_text(r) for r in test_songs])
    assert saved["sets"]["real"] == json.loads(json.dumps(expected))
    assert saved["sets"]["real"]["songs"] == len(test_songs) > 0
    assert saved["programs"] == [13, 25, 0]


def test_bad_inputs_are_usage_errors(tmp_path, capsys):
    out = str(tmp_path / "stats.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        [],
        ["--samples", str(tmp_path / "missing")],
        ["--samples", str(empty)],
        ["--data_dir", str(empty)],
        ["--data_dir", str(empty), "--split", "nope"],
        ["--samples", "=x"],
        ["--programs", "13,x", "--samples", str(empty)],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exit_info:
            song_stats.main([*argv, "--out", out])
        assert exit_info.value.code == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("python -m benchmarks.song_stats: error: "), argv
    assert not os.path.exists(out)

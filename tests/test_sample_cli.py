"""sample.py: every bad input is refused before anything is loaded, with exit status 2 and a
message naming the problem; a run writes MIDI files that remi-z and mido read back as the
decoded songs (bars, notes, key, tempo), REMI-z texts and a JSON summary; the PhraseVAE path;
songs shorter than asked are said so, songs without bars get no MIDI file, and no written file
holds a note twice (the real command, in a subprocess, with its defaults)."""

import collections
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import ldm_fixtures
import mido
import numpy as np
import pytest

import sample
from phraseldm_jax import ldm, ldm_task, phrases, songs
from phraseldm_jax.remiz import MultiTrack

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING = "/nonexistent/ldm"  # argument errors must come before the checkpoint is opened


def _refused(capsys, argv, decoder=None):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv, decoder=decoder)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--plan", "i-8 Q-8"], "unknown section type 'Q'"),
        (["--plan", "i-8 A-0"], "0 bars long; lengths must be 1..32"),
        (["--plan", "A-8 B-33"], "33 bars long; lengths must be 1..32"),
        (["--plan", " ".join(["A-1"] * 31)], "31 sections; at most 30"),
        (["--plan", " ".join(["A-32"] * 5)], "covers 160 bars; at most 128"),
        (["--plan", "A-8 B-8", "--bars", "20"], "covers 16 bars but --bars is 20"),
        (["--plan", "A8-B"], "malformed section"),
        (["--plan", "A-8 B-40"], "section 2 (B40) of plan 'A-8 B-40' is 40 bars long"),
        (["--plan", "A-8 Q-8"], "(section 2 of plan 'A-8 Q-8')"),
        (["--bars", "0"], "--bars must be in 1..128, got 0"),
        (["--bars", "129"], "--bars must be in 1..128, got 129"),
        (["--key", "H"], "unknown key 'H'"),
        (["--num_songs", "0"], "--num_songs must be >= 1"),
        (["--steps", "1001"], "--steps must be in 1..1000"),
        (["--tempo", "0"], "--tempo must be > 0"),
        (["--sampler", "euler"], "invalid choice: 'euler'"),
    ],
)
def test_bad_arguments(capsys, tmp_path, extra, message):
    err = _refused(capsys, ["--checkpoint", MISSING, "--out", str(tmp_path / "o"), *extra])
    assert message in err
    assert not (tmp_path / "o").exists()


def test_help_describes_every_flag_with_its_default(capsys):
    """Every flag has a description; a flag without a fixed default says in words what it
    does when left out (``--steps``: by sampler, ``--clip``: the checkpoint's)."""
    parser = sample.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags and all(a.help for a in flags)
    for action in flags:
        if action.default is None and not action.required:
            assert "default" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--num_songs NUM_SONGS songs to generate (default: 4)" in text
    assert "default: 1000 for ddpm, 50 for ddim and dpmpp_2m" in text
    assert "default: the checkpoint's (scaled for models trained here" in text
    assert "the song_<n> files of an earlier run there are removed first" in text


def test_missing_checkpoint(capsys, tmp_path):
    err = _refused(capsys, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "neither an LDM training workdir" in err


@pytest.mark.parametrize(
    "key, shift",
    [("C", 0), ("D", 2), ("Bb", -2), ("F#", -6), ("Am", 0), ("Bm", 2), ("C minor", 3),
     ("Eb major", 3), ("g", -5)],
)  # fmt: skip
def test_parse_key(key, shift):
    assert sample.parse_key(key) == shift


@functools.cache
def _codebook():
    """Random latents decode to bars of one note, [INST] or b-1; the [SEP] latent is far away,
    so songs of an untrained model run through all 16 bars."""
    codebook = ldm_fixtures.Codebook(seed=3)
    codebook.latent(ldm_fixtures.ONE_NOTE_BAR)
    codebook.vectors[codebook.texts.index("[SEP]")] *= 50.0
    return codebook


@functools.cache
def _params(length, sections):
    config = _config("", length, sections)
    return ldm.init_params(ldm_fixtures.init_key(), ldm_task.ldm_config(config))


def _config(vae_workdir, length=True, sections=False):
    config = ldm_fixtures.tiny_config("", length, sections)
    config.model.dit.sample_size = 64  # 16 bars
    config.model.scale_factor, config.model.clip_range = 0.76, 3.0
    config.vae.workdir = vae_workdir
    return config


def _workdir(tmp_path, length=True, sections=False, vae_workdir="", params=None):
    config = _config(vae_workdir, length, sections)
    params = _params(length, sections) if params is None else params
    return ldm_fixtures.save_workdir(tmp_path / "ldm", config, params)


def _placeholder_workdir(tmp_path, **kwargs):
    """A workdir whose config is real and whose params are a placeholder (never used)."""
    return _workdir(tmp_path, params={"w": np.zeros(2, np.float32)}, **kwargs)


def test_model_mismatches(capsys, tmp_path):
    lencond = _placeholder_workdir(tmp_path)
    base = ["--checkpoint", lencond, "--out", str(tmp_path / "o")]
    assert "not section-conditioned" in _refused(capsys, base + ["--plan", "A-8"])
    assert "generates at most 16" in _refused(capsys, base + ["--bars", "20"])
    assert "names no PhraseVAE" in _refused(capsys, base)
    seccond = _placeholder_workdir(tmp_path / "s", sections=True)
    assert "give --plan" in _refused(capsys, ["--checkpoint", seccond, "--out", str(tmp_path)])
    uncond = _placeholder_workdir(tmp_path / "u", length=False)
    err = _refused(capsys, ["--checkpoint", uncond, "--out", str(tmp_path), "--bars", "8"])
    assert "not length-conditioned" in err


def _midi_notes(path):
    midi = mido.MidiFile(path)
    tempos = [m.tempo for t in midi.tracks for m in t if m.type == "set_tempo"]
    pitches = [m.note for t in midi.tracks for m in t if m.type == "note_on" and m.velocity > 0]
    return tempos, pitches


def test_writes_midi_text_and_summary(tmp_path):
    workdir = _workdir(tmp_path)
    out = tmp_path / "songs"
    argv = ["--checkpoint", workdir, "--out", str(out), "--num_songs", "3", "--bars", "12",
            "--sampler", "ddim", "--steps", "4", "--key", "D", "--tempo", "120",
            "--batch_size", "2", "--seed", "7"]  # fmt: skip
    assert sample.main(argv, decoder=_codebook()) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "orbax" and summary["seed"] == 7
    settings = summary["settings"]
    assert (settings["sampler"], settings["steps"], settings["target_bars"]) == ("ddim", 4, 12)
    assert (settings["semitones"], settings["tempo"], settings["clip"]) == (2, 120.0, "scaled")
    assert set(summary["timings"]) == {
        "compile_s",
        "sample_s",
        "decode_s",
        "write_s",
        "load_s",
        "total_s",
    }
    assert len(summary["songs"]) == 3

    for song in summary["songs"]:
        text = (out / song["text_file"]).read_text().strip()
        assert text.split().count(phrases.BAR_TOKEN) == song["n_bars"] > 0
        expected = MultiTrack.from_remiz_str(text, verbose=False)
        # Slots of a bar that decode to the same phrase repeat its note: written once.
        assert songs.clean_notes(expected).duplicates == song["duplicate_notes_removed"]
        last = max((i for i, bar in enumerate(expected.bars) if bar.tracks), default=-1)
        assert last >= 0  # the song has notes
        path = str(out / song["file"])
        back = MultiTrack.from_midi(path)
        assert len(back.bars) == last + 1  # MIDI keeps bars up to the last note
        tempos, pitches = _midi_notes(path)
        assert tempos == [mido.bpm2tempo(120)]
        assert sorted(pitches) == sorted(n.pitch + 2 for n in expected.get_all_notes())

    # The same seed gives the same songs; another seed others.
    again = tmp_path / "again"
    assert sample.main([*argv[:3], str(again), *argv[4:]], decoder=_codebook()) == 0
    for name in ("song_000.mid", "song_002.txt"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    assert sample.main([*argv[:3], str(other), *argv[4:-1], "8"], decoder=_codebook()) == 0
    texts = [(d / "song_000.txt").read_text() for d in (out, other)]
    assert texts[0] != texts[1]


def test_decodes_with_the_vae_of_the_workdir(tmp_path):
    from phraseldm_jax import vae

    vae_config = ldm_fixtures.tiny_config("")
    vae_config.model = dict(
        t5=dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1),
        head="vae",
        n_query_tokens=4,
        latent_dim=64,
    )
    vae_params = vae.init_params(jax.random.PRNGKey(1), vae.PhraseVAEConfig(**vae_config.model))
    vae_dir = ldm_fixtures.save_workdir(tmp_path / "vae", vae_config, vae_params)
    workdir = _workdir(tmp_path, vae_workdir=vae_dir)
    out = tmp_path / "songs"
    argv = ["--checkpoint", workdir, "--out", str(out), "--num_songs", "2", "--sampler",
            "dpmpp_2m", "--steps", "3", "--max_decode_length", "6", "--dtype", "bfloat16"]  # fmt: skip
    assert sample.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["dit_dtype"] == summary["settings"]["decode_dtype"] == "bfloat16"
    assert [s["text_file"] for s in summary["songs"]] == ["song_000.txt", "song_001.txt"]
    assert summary["settings"]["target_bars"] == 16  # 64 bars by default, capped by the model
    for song in summary["songs"]:
        assert os.path.exists(out / song["text_file"])
        assert song["file"] is None or os.path.exists(out / song["file"])
    assert np.isfinite(summary["timings"]["total_s"])


class _EarlyEndDecoder:
    """Every song: 3 one-note bars, [SEP], then 2 more one-note bars and [SEP]s (64 slots)."""

    BAR = [ldm_fixtures.ONE_NOTE_BAR, "[INST]", "[INST]", "b-1"]
    SLOTS = BAR * 3 + ["[SEP]", "[INST]", "[INST]", "b-1"] + BAR * 2 + ["[SEP]"] * 40

    def decode(self, latents):
        assert len(latents) % len(self.SLOTS) == 0
        return self.SLOTS * (len(latents) // len(self.SLOTS))


def test_songs_end_at_the_first_sep_unless_the_length_is_forced(tmp_path, capsys):
    workdir = _workdir(tmp_path)
    base = ["--checkpoint", workdir, "--num_songs", "2", "--bars", "12", "--sampler", "ddim",
            "--steps", "2", "--tempo", "120"]  # fmt: skip
    assert sample.main(base + ["--out", str(tmp_path / "plain")], _EarlyEndDecoder()) == 0
    err = capsys.readouterr().err
    assert "song_000: 3 bars, asked for 12 (ended at [SEP]), 3 notes -> song_000.mid" in err
    assert "2 shorter than the requested 12" in err
    assert (
        sample.main(
            base + ["--out", str(tmp_path / "forced"), "--force_length"], _EarlyEndDecoder()
        )
        == 0
    )
    seconds_per_bar = 4 * 60 / 120
    for name, bars in (("plain", 3), ("forced", 12)):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["settings"]["force_length"] == (name == "forced")
        assert [(s["n_bars"], s["bars_before_sep"]) for s in summary["songs"]] == [(bars, 3)] * 2
        text = (tmp_path / name / "song_000.txt").read_text().split()
        assert text.count("b-1") == bars
        # Bars 5 and 6 (after the bar with the [SEP]) are read by position only when forced.
        assert text.count("p-60") == (3 if name == "plain" else 5)
        path = str(tmp_path / name / "song_000.mid")
        assert len(_midi_notes(path)[1]) == text.count("p-60")
        length = mido.MidiFile(path).length
        if name == "forced":  # the silent bars 6..12 stay in the file
            assert length == pytest.approx(12 * seconds_per_bar, abs=1e-3)
        else:  # remi-z ends the file with the last note, in bar 3
            assert 2 * seconds_per_bar < length <= 3 * seconds_per_bar
        assert len(MultiTrack.from_midi(path).bars) == (6 if name == "forced" else 3)


class _ThreeSongsDecoder:
    """Song 0: one note, then [SEP] before any b-1 (no bars, notes in its text); song 1: 3
    bars then [SEP]; song 2: 12 bars whose first slot repeats "p-60 d-12" 20 times at o-0 and
    whose last note is held 60 positions past the song's end, then [SEP]."""

    BAR = [ldm_fixtures.ONE_NOTE_BAR, "[INST]", "[INST]", "b-1"]
    LOOPED = ["i-0 o-0" + " p-60 d-12" * 20 + " o-24 p-64 d-12", "[INST]", "[INST]", "b-1"]
    HELD = ["i-0 o-0 p-60 d-12 o-36 p-67 d-72", "[INST]", "[INST]", "b-1"]
    SONGS = [
        [ldm_fixtures.ONE_NOTE_BAR, "[SEP]"],
        BAR * 3 + ["[SEP]"],
        LOOPED * 11 + HELD + ["[SEP]"],
    ]

    def decode(self, latents):
        n = len(latents) // 64
        return [t for i in range(n) for t in (self.SONGS[i % 3] + ["[SEP]"] * 64)[:64]]


def _midi_spots(path):
    """(track, onset tick, pitch) of every note of a MIDI file, and its last note-off tick."""
    spots, end = [], 0
    for index, track in enumerate(mido.MidiFile(path).tracks):
        now = 0
        for message in track:
            now += message.time
            if message.type == "note_on" and message.velocity > 0:
                spots.append((index, now, message.note))
            elif message.type in ("note_on", "note_off"):
                end = max(end, now)
    return spots, end


def test_short_and_empty_songs_are_said_and_no_note_is_written_twice(tmp_path, capsys):
    out = tmp_path / "songs"
    argv = ["--checkpoint", _workdir(tmp_path), "--out", str(out), "--num_songs", "3",
            "--bars", "12", "--steps", "2", "--reading", "tokens"]  # fmt: skip
    assert sample.main(argv, _ThreeSongsDecoder()) == 0
    err = capsys.readouterr().err.splitlines()
    assert (
        "song_000: 0 bars, asked for 12 (ended at [SEP]); no MIDI file written: no bars: the "
        "model ended the song ([SEP]) before its first b-1; the 4 tokens of its unfinished bar "
        "are kept in song_000.txt"
    ) in err
    assert "song_001: 3 bars, asked for 12 (ended at [SEP]), 3 notes -> song_001.mid" in err
    assert "song_002: 12 bars, 24 notes -> song_002.mid (209 repeated notes dropped)" in err
    assert any(line.startswith("2 of 3 songs written") for line in err)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["settings"]["sampler"], summary["settings"]["steps"]) == ("dpmpp_2m", 2)
    assert (summary["written"], summary["short"]) == (2, 2)
    assert summary["duplicate_notes_removed"] == 209
    empty, short, full = summary["songs"]
    assert (empty["written"], empty["file"], empty["n_bars"], empty["short"]) == (
        False, None, 0, True)  # fmt: skip
    assert "no bars" in empty["reason"]
    assert not (out / "song_000.mid").exists()
    assert (out / "song_000.txt").read_text().split() == ldm_fixtures.ONE_NOTE_BAR.split()
    assert (short["requested_bars"], short["n_bars"], short["short"]) == (12, 3, True)
    assert (full["n_bars"], full["short"], full["written"], full["reason"]) == (
        12,
        False,
        True,
        None,
    )
    assert (full["duplicate_notes_removed"], full["notes_cut_at_end"]) == (209, 1)
    spots, end = _midi_spots(str(out / "song_002.mid"))
    assert len(spots) == 24 and max(collections.Counter(spots).values()) == 1
    assert end == 12 * 4 * mido.MidiFile(str(out / "song_002.mid")).ticks_per_beat


def test_the_command_with_its_defaults_in_a_subprocess(tmp_path):
    """The real sample.py with a random tiny PhraseVAE (its songs have no bars): the default
    sampler is DPM-Solver++(2M) at 50 steps, every song has a line, a song without bars has
    no MIDI file, and every written file holds each note once, none past its last bar."""
    from phraseldm_jax import vae

    vae_config = ldm_fixtures.tiny_config("")
    vae_config.model = dict(
        t5=dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1),
        head="vae",
        n_query_tokens=4,
        latent_dim=64,
    )
    vae_params = vae.init_params(jax.random.PRNGKey(1), vae.PhraseVAEConfig(**vae_config.model))
    vae_dir = ldm_fixtures.save_workdir(tmp_path / "vae", vae_config, vae_params)
    out = tmp_path / "songs"
    argv = [REPO_ROOT / "sample.py", "--checkpoint", _workdir(tmp_path, vae_workdir=vae_dir),
            "--out", out, "--num_songs", "3", "--bars", "12", "--max_decode_length", "16",
            "--cpu_devices", "1"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["settings"]["sampler"], summary["settings"]["steps"]) == ("dpmpp_2m", 50)
    lines = result.stderr.splitlines()
    for index, song in enumerate(summary["songs"]):
        name = f"song_{index:03d}"
        assert song["requested_bars"] == 12 and song["short"] == (song["n_bars"] < 12)
        assert any(line.startswith(f"{name}: {song['n_bars']} bar") for line in lines)
        assert (out / f"{name}.mid").exists() == song["written"]
        if song["n_bars"] == 0:
            assert not song["written"] and song["reason"].startswith("no bars")
        if song["written"]:
            spots, end = _midi_spots(str(out / song["file"]))
            assert max(collections.Counter(spots).values(), default=1) == 1
            assert end <= song["n_bars"] * 4 * mido.MidiFile(str(out / song["file"])).ticks_per_beat


class _SilentDecoder:
    """Every song: 3 bars without notes, then [SEP]."""

    def decode(self, latents):
        song = (["[INST]", "[INST]", "[INST]", "b-1"] * 3 + ["[SEP]"] * 64)[:64]
        return song * (len(latents) // 64)


def test_a_song_of_silent_bars_lasts_to_its_last_bar(tmp_path, capsys):
    out = tmp_path / "songs"
    argv = ["--checkpoint", _workdir(tmp_path), "--out", str(out), "--num_songs", "1",
            "--bars", "12", "--steps", "2", "--tempo", "120"]  # fmt: skip
    assert sample.main(argv, _SilentDecoder()) == 0
    err = capsys.readouterr().err
    assert "song_000: 3 bars, asked for 12 (ended at [SEP]), no notes (silent bars)" in err
    song = json.loads((out / "summary.json").read_text())["songs"][0]
    assert (song["written"], song["n_notes"]) == (True, 0)
    assert mido.MidiFile(str(out / "song_000.mid")).length == pytest.approx(3 * 2.0, abs=1e-3)


def test_a_song_longer_than_asked_is_said():
    song = songs.song_from_slots([ldm_fixtures.ONE_NOTE_BAR, "[INST]", "[INST]", "b-1"] * 3)
    entry = sample.song_entry("song_007", song, 2, forced=False)
    assert (entry["long"], entry["short"], entry["n_bars"]) == (True, False, 3)
    assert sample.song_line(entry).startswith(
        "song_007: 3 bars, asked for 2 (the model ended it later), 3 notes -> song_007.mid"
    )
    assert not sample.song_entry("song_008", song, 3, forced=False)["long"]

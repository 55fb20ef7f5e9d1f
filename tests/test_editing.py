"""Editing songs (phraseldm_jax/editing.py, sample.py --from/--keep/--variation/--resample/
--exact_length): keep specs, the kept-slot masks of each mode (the accompaniment mask follows
the track's slot from bar to bar in the pitch-order layout), the sampler keeping those slots
exactly with guidance, resampling and sharding, plain sampling unchanged, every mode end to
end through the command writing MIDI, kept slots decoding to the PhraseVAE's reconstruction,
and the bad inputs refused before anything is computed."""

import functools
import json

import jax
import ldm_fixtures
import mido
import numpy as np
import pytest

import sample
from phraseldm_jax import diffusion, editing, ldm, ldm_task, phrases, sharding, songs
from phraseldm_jax import sampler as sampler_lib
from phraseldm_jax.remiz import MultiTrack

BARS = 16  # the tiny model's songs (sample_size 64)
MELODY, BRIDGE, PIANO = (
    "i-13 o-0 p-74 d-12 o-12 p-76 d-12",
    "i-25 o-0 p-84 d-48",
    "i-0 o-0 p-50 d-24",
)


def _song_text(n_bars=6):
    """Melody, piano and (in bars 2 and 4) a bridge above the melody: the melody's pitch-order
    slot is 0, except 1 in those bars."""
    bars = []
    for bar in range(n_bars):
        tracks = [MELODY.replace("p-74", f"p-{72 + bar}"), PIANO]
        if bar in (1, 3):
            tracks.insert(0, BRIDGE)
        bars.append(" ".join(tracks) + " b-1")
    return " ".join(bars)


def _pitches(text):
    return [int(t[2:]) for t in text.split() if t.startswith("p-")]


@pytest.fixture(scope="module")
def midi_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("midi") / "song.mid")
    songs.write_midi(_song_text(), path, tempo=100.0, semitones=2)  # D major
    return path


EncodingCodebook = ldm_fixtures.EncodingCodebook


@functools.cache
def _model(length=True):
    config = ldm_fixtures.tiny_config("", length, False)
    config.model.dit.sample_size = 4 * BARS
    config.model.scale_factor, config.model.clip_range = 0.76, 3.0
    cfg = ldm_task.ldm_config(config)
    return config, cfg, ldm.init_params(ldm_fixtures.init_key(), cfg)


def _workdir(tmp_path, length=True):
    config, _, params = _model(length)
    return ldm_fixtures.save_workdir(tmp_path / "ldm", config, params)


# --- keep specs and masks --------------------------------------------------------------------


def test_parse_keep():
    assert editing.parse_keep(["bars:1-8,17-32"]).bars == (*range(1, 9), *range(17, 33))
    assert editing.parse_keep(["tracks:13,0", "bars:3"]) == editing.KeepSpec((3,), (0, 13))
    assert not editing.parse_keep([])
    for spec, message in [
        ("bar:1-8", "expected bars:<ranges> or tracks:<programs>"),
        ("bars:", "expected bars:<ranges>"),
        ("bars:8-1", "bad bar range '8-1'"),
        ("bars:0", "bad bar range '0'"),
        ("bars:1-x", "'1-x' is not a bar or a range"),
        ("tracks:piano", "'piano' is not a program"),
        ("tracks:200", "'200' is not a program"),
    ]:
        with pytest.raises(editing.EditError, match=message):
            editing.parse_keep([spec])


def test_import_song_normalises_the_key_and_keeps_the_tempo(midi_path):
    song = editing.import_song(midi_path)
    assert (song.n_bars, song.tempo) == (6, 100.0) and song.programs == [0, 13, 25]
    # the slots hold the input's phrases (written 2 semitones up) moved by the key shift
    shift = 2 + song.key_shift
    assert song.slots[2:4] == ("[INST]", "b-1")
    assert _pitches(song.slots[0]) == [p + shift for p in _pitches(MELODY.replace("74", "72"))]
    assert _pitches(song.slots[5]) == [p + shift for p in _pitches(MELODY.replace("74", "73"))]
    # the melody's slot moves where the bridge is higher (pitch order)
    melody_slot = [song.slot_programs[4 * b : 4 * b + 3].index(13) for b in range(6)]
    assert melody_slot == [0, 1, 0, 1, 0, 0]
    fixed = editing.import_song(midi_path, "fixed")
    assert fixed.slot_programs[:8] == (13, None, 0, None, 13, 25, 0, None)


def _plan(song, **kwargs):
    return editing.plan_edit(
        EncodingCodebook(), length=4 * BARS, scale_factor=0.76, song=song, **kwargs
    )


def test_song_from_record_is_import_song_without_the_file(midi_path):
    song = editing.import_song(midi_path)
    assert editing.song_from_record(song.record, path=song.path) == song
    plan = _plan(song, n_bars=8)  # the reference slots: the song, empty bars, the [SEP] pad
    empty_bar = ("[INST]",) * 3 + ("b-1",)
    assert plan.slots == song.slots + empty_bar * 2 + ("[SEP]",) * (4 * BARS - 32)
    with pytest.raises(editing.EditError, match="pop909/1: the song has no bars"):
        editing.song_from_record(dict(song.record, n_bars=0), path="pop909/1")


def test_masks_of_each_mode(midi_path):
    song = editing.import_song(midi_path)
    bar_slots = np.zeros(4 * BARS, bool)
    bar_slots[3::4] = True
    # continuation: bars 1-2 of 10, the b-1 slots, the [SEP] tail from bar 11
    plan = _plan(song, n_bars=10, keep=editing.parse_keep(["bars:1-2"]))
    expected = bar_slots.copy()
    expected[:8] = True
    expected[40:] = True
    np.testing.assert_array_equal(plan.mask, expected)
    assert plan.n_bars == 10 and plan.kept_slots == expected.sum()
    codebook = EncodingCodebook()
    np.testing.assert_array_equal(plan.latents[40], codebook.latent("[SEP]"))
    np.testing.assert_allclose(plan.model, plan.latents / np.float32(0.76), rtol=1e-7)
    np.testing.assert_array_equal(plan.latents[4 * 6 : 4 * 6 + 3], [codebook.latent("[INST]")] * 3)
    padded = _plan(song, n_bars=10, reference_padding=True)
    np.testing.assert_array_equal(padded.model[40:], padded.latents[40:])  # unscaled pad
    # accompaniment, pitch order: the melody's actual slot in each bar
    plan = _plan(song, keep=editing.parse_keep(["tracks:13"]))
    kept_tracks = [np.flatnonzero(plan.mask[4 * b : 4 * b + 3]).tolist() for b in range(6)]
    assert kept_tracks == [[0], [1], [0], [1], [0], [0]]
    assert plan.mask[24:].all() and plan.n_bars == 6
    # fixed layout: slot 0 (program 13) of every bar, and slot 1 (program 25), [INST] or not
    fixed = _plan(editing.import_song(midi_path, "fixed"), keep=editing.parse_keep(["tracks:25"]))
    assert [np.flatnonzero(fixed.mask[4 * b : 4 * b + 3]).tolist() for b in range(6)] == [[1]] * 6
    with pytest.raises(editing.EditError, match="song.mid has 6 bars"):
        _plan(song, keep=editing.parse_keep(["bars:5-7"]))
    with pytest.raises(editing.EditError, match="no track with program 40"):
        _plan(song, keep=editing.parse_keep(["tracks:40"]))
    with pytest.raises(editing.EditError, match="at most 16"):
        _plan(song, n_bars=17)


# --- the sampler -----------------------------------------------------------------------------


def _mesh(n):
    return sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:n])


@pytest.mark.parametrize(
    "settings",
    [
        sampler_lib.SamplerSettings("dpmpp_2m", 4, guidance_scale=2.0),
        sampler_lib.SamplerSettings("ddpm", 5, resample=1),
        sampler_lib.SamplerSettings("ddim", 4, strength=0.5),
    ],
    ids=["dpmpp_2m-guided", "ddpm-resample", "ddim-variation"],
)
def test_sampler_keeps_the_masked_slots_exactly(settings, midi_path):
    _, cfg, params = _model()
    plan = _plan(editing.import_song(midi_path), n_bars=8, keep=editing.parse_keep(["bars:1-2"]))
    song, mask = plan.batch(3)
    sampler = sampler_lib.LatentSampler(cfg, settings, _mesh(2))
    key, cond = jax.random.PRNGKey(2), ldm.make_conditions(3, 8)
    out = sampler(params, key, cond, song, mask)
    kept = np.broadcast_to(mask[..., None], out.shape)
    np.testing.assert_array_equal(out[kept], (song * np.float32(0.76))[kept])
    assert np.isfinite(out).all() and not np.allclose(out[~kept], (song * 0.76)[~kept])
    np.testing.assert_array_equal(
        plan.restore(out)[kept], np.repeat(plan.latents[None], 3, 0)[kept]
    )


def test_plain_sampling_is_unchanged_and_an_empty_mask_is_plain():
    """Plain sampling is today's program (the loop of ``diffusion.sample_loop`` on noise from
    the first half of the split key); an edit keeping nothing gives the same latents."""
    _, cfg, params = _model()
    settings = sampler_lib.SamplerSettings("ddpm", 4)
    sampler = sampler_lib.LatentSampler(cfg, settings, _mesh(1))
    key, cond = jax.random.PRNGKey(4), ldm.make_conditions(2, 8)
    plain = sampler(params, key, cond)

    @jax.jit
    def today(params, key, cond):
        params = ldm.inference_params(params, cfg)
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (2, 4 * BARS, 64), np.float32)
        x0 = diffusion.sample_loop(
            lambda x, t: ldm.predict_noise(params, cfg, x, t, cond), x_T, sampler="ddpm",
            num_steps=4, key=loop_key, clip_range=3.0 / 0.76,
        )  # fmt: skip
        return x0 * np.float32(0.76)

    np.testing.assert_allclose(plain, np.asarray(today(params, key, cond)), atol=1e-6)
    song = np.ones((2, 4 * BARS, 64), np.float32)
    empty = sampler(params, key, cond, song, np.zeros((2, 4 * BARS), np.float32))
    np.testing.assert_array_equal(empty, plain)
    with pytest.raises(ValueError, match="need `song` and `mask`"):
        sampler_lib.LatentSampler(cfg, sampler_lib.SamplerSettings(resample=1))(params, key, cond)
    with pytest.raises(ValueError, match="resample must be >= 0"):
        sampler_lib.SamplerSettings(resample=-1)


# --- the command -----------------------------------------------------------------------------


def _run(tmp_path, midi_path, name, *extra, decoder=None):
    out = tmp_path / name
    argv = ["--checkpoint", _workdir(tmp_path), "--out", str(out), "--num_songs", "2",
            "--steps", "3", "--from", midi_path, *extra]  # fmt: skip
    assert sample.main(argv, decoder=decoder or EncodingCodebook()) == 0
    return out, json.loads((out / "summary.json").read_text())


def _bar_tracks(multitrack, bar):
    return {
        program: sorted(n.pitch for n in track.notes)
        for program, track in multitrack.bars[bar].tracks.items()
    }


@pytest.mark.parametrize(
    "extra, bars, kept_bars, kept_programs",
    [
        (["--keep", "bars:1-4", "--bars", "10"], 10, [0, 1, 2, 3], ()),  # continuation
        (["--keep", "bars:1-2,5-6"], 6, [0, 1, 4, 5], ()),  # infill bars 3-4
        (["--keep", "tracks:13", "--resample", "1"], 6, [], (13,)),  # accompaniment
        (["--variation", "0.5", "--bars", "12"], 12, [], ()),  # variation, exact length
    ],
    ids=["continue", "infill", "accompany", "variation"],
)
def test_each_mode_writes_midi_keeping_what_it_should(
    tmp_path, midi_path, extra, bars, kept_bars, kept_programs
):
    out, summary = _run(tmp_path, midi_path, "songs", *extra)
    edit = summary["settings"]["edit"]
    assert (edit["n_bars"], edit["song_bars"], edit["slot_order"]) == (bars, 6, "pitch_order")
    assert summary["settings"]["tempo"] == 100.0  # the song's
    source = MultiTrack.from_midi(midi_path)
    for entry in summary["songs"]:
        # exact length: the kept [SEP] tail ends every song after bar `bars`
        assert (entry["n_bars"], entry["bars_before_sep"], entry["written"]) == (bars, bars, True)
        written = MultiTrack.from_midi(str(out / entry["file"]))
        assert _tempo(out / entry["file"]) == mido.bpm2tempo(100)
        for bar in kept_bars:  # kept bars come back note for note, in the input's key
            assert _bar_tracks(written, bar) == _bar_tracks(source, bar)
        for program in kept_programs:  # in every bar (a generated slot may add to the track)
            for bar in range(bars):
                kept = _bar_tracks(source, bar)[program]
                assert set(kept) <= set(_bar_tracks(written, bar)[program])


def _tempo(path):
    return next(
        m.tempo for t in mido.MidiFile(str(path)).tracks for m in t if m.type == "set_tempo"
    )


def test_exact_length_without_a_song_on_an_unconditional_model(tmp_path):
    config, _, params = _model(length=False)
    workdir = ldm_fixtures.save_workdir(tmp_path / "uncond", config, params)
    out = tmp_path / "songs"
    argv = ["--checkpoint", workdir, "--out", str(out), "--num_songs", "2", "--steps", "3",
            "--exact_length", "--bars", "5", "--resample", "1"]  # fmt: skip
    assert sample.main(argv, decoder=EncodingCodebook()) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["n_bars"] for s in summary["songs"]] == [5, 5]
    assert summary["settings"]["edit"]["from"] is None
    assert summary["settings"]["tempo"] == 90.0


def test_kept_slots_decode_to_the_vaes_reconstruction(tmp_path, midi_path):
    """With a (random, tiny) PhraseVAE encoding the song and decoding the samples, every kept
    slot decodes to the reconstruction of its input phrase, exactly."""
    from phraseldm_jax import vae, vae_inference

    vae_config = vae.PhraseVAEConfig(
        t5=dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1),
        head="vae",
        n_query_tokens=4,
        latent_dim=64,
    )
    model = vae_inference.PhraseVAEModel(
        vae_config, vae.init_params(jax.random.PRNGKey(1), vae_config), max_length=32
    )
    _, cfg, params = _model()
    song = editing.import_song(midi_path)
    plan = editing.plan_edit(
        model, length=4 * BARS, scale_factor=0.76, song=song, keep=editing.parse_keep(["bars:1-3"])
    )
    sampler = sampler_lib.LatentSampler(cfg, sampler_lib.SamplerSettings("ddim", 3))
    raw = plan.restore(
        sampler(params, jax.random.PRNGKey(0), ldm.make_conditions(1, 6), *plan.batch(1))
    )
    decoded = songs.decode_songs(model, raw, past_the_end=True)[0].slots
    kept = np.flatnonzero(plan.mask)
    inputs = [(list(song.slots) + [phrases.SEP_TOKEN] * 64)[i] for i in kept]
    assert [decoded[i] for i in kept] == model.reconstruct(inputs)


# --- bad inputs ------------------------------------------------------------------------------


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv, decoder=EncodingCodebook())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_edits_are_one_line_before_any_compute(tmp_path, capsys, midi_path, monkeypatch):
    monkeypatch.setattr(
        sampler_lib.LatentSampler, "__call__", lambda *a: pytest.fail("sampled"), raising=True
    )
    missing = ["--checkpoint", "/nonexistent/ldm", "--out", str(tmp_path / "o")]
    for extra, message in [
        (
            ["--from", str(tmp_path / "none.mid")],
            "--from " + str(tmp_path / "none.mid") + ": no such file",
        ),
        (["--from", midi_path, "--keep", "bars:3-1"], "bad bar range '3-1'"),
        (["--from", midi_path, "--keep", "tracks:x"], "'x' is not a program"),
        (["--from", midi_path, "--variation", "0"], "--variation must be in (0, 1], got 0.0"),
        (["--from", midi_path, "--variation", "1.5"], "--variation must be in (0, 1], got 1.5"),
        (["--keep", "bars:1-8"], "--keep needs --from"),
        (["--resample", "2"], "--resample needs kept slots"),
        (["--from", midi_path, "--resample", "-1"], "--resample must be >= 0"),
    ]:
        assert message in _refused(capsys, missing + extra)
    base = ["--checkpoint", _workdir(tmp_path), "--out", str(tmp_path / "o"), "--from", midi_path]
    assert "song.mid has 6 bars" in _refused(capsys, base + ["--keep", "bars:5-8"])
    assert "edited song has 4 bars" in _refused(capsys, base + ["--keep", "bars:5", "--bars", "4"])
    err = _refused(capsys, base + ["--keep", "tracks:40"])
    assert "song.mid has no track with program 40 in its slots (it has 0, 13, 25)" in err
    assert "at most 16" in _refused(capsys, base + ["--bars", "20"])
    waltz = str(tmp_path / "waltz.mid")
    _write_waltz(waltz)
    err = _refused(capsys, [*base[:-1], waltz])
    assert f"--from {waltz}: time signature 3/4 at tick 0; only 4/4" in err
    assert not (tmp_path / "o").exists()


def _write_waltz(path):
    midi = mido.MidiFile()
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("time_signature", numerator=3, denominator=4))
    track.append(mido.Message("note_on", note=60, velocity=80, time=0))
    track.append(mido.Message("note_off", note=60, velocity=0, time=480))
    midi.tracks.append(track)
    midi.save(path)

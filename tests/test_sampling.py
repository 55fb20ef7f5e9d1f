"""Sampling: determinism for a seed, sharded == single device (plain and guided), the clip
modes, decoding slots into songs, MIDI writing (tempo, transposition) and model loading from
a training workdir and from the original's folder layout."""

import functools

import jax
import jax.numpy as jnp
import ldm_fixtures
import mido
import numpy as np
import pytest

from phraseldm_jax import ldm, ldm_task, pretrained, sharding, vae_inference
from phraseldm_jax import sampler as sampler_lib
from phraseldm_jax import songs as song_lib
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.vocab import SEP_ID

LENGTH = 32  # latents per song (8 bars): small and fast; any sample_size runs


@functools.cache
def _model(length=True, sections=False, clip_range=3.0):
    config = ldm_fixtures.tiny_config("", length, sections)
    config.model.dit.sample_size = LENGTH
    config.model.scale_factor, config.model.clip_range = 0.76, clip_range
    cfg = ldm_task.ldm_config(config)
    return config, cfg, ldm.init_params(ldm_fixtures.init_key(), cfg)


def _mesh(n_devices):
    return sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:n_devices])


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_seeded_and_sharded_sampling_agree(guidance):
    _, cfg, params = _model()
    settings = sampler_lib.SamplerSettings(sampler="ddpm", num_steps=8, guidance_scale=guidance)
    cond = ldm.make_conditions(8, 24)
    sharded = sampler_lib.LatentSampler(cfg, settings, _mesh(8))
    single = sampler_lib.LatentSampler(cfg, settings, _mesh(1))
    key = jax.random.PRNGKey(5)
    a, b = sharded(params, key, cond), sharded(params, key, cond)
    assert a.shape == (8, LENGTH, 64) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # The same noise and model; only float rounding differs (per-device batch sizes change
    # the matmul blocking), slightly amplified over the steps.
    diff = np.abs(single(params, key, cond) - a)
    assert np.median(diff) < 1e-5 and diff.max() < 5e-3, (np.median(diff), diff.max())
    other = sharded(params, jax.random.PRNGKey(6), cond)
    assert not np.allclose(other, a)
    # Fewer songs than devices: padded with copies, cut back; the first song is unchanged.
    few = sharded(params, key, ldm.make_conditions(3, 24))
    assert few.shape == (3, LENGTH, 64)


def test_guidance_zero_is_the_unconditional_model():
    _, cfg, params = _model()
    settings = sampler_lib.SamplerSettings(sampler="ddim", num_steps=4, guidance_scale=0.0)
    sampler = sampler_lib.LatentSampler(cfg, settings)
    key = jax.random.PRNGKey(0)
    short, long = (
        sampler(params, key, ldm.make_conditions(2, 5)),
        sampler(params, key, ldm.make_conditions(2, 120)),
    )
    np.testing.assert_allclose(short, long, atol=1e-6)
    conditional = sampler_lib.LatentSampler(cfg, sampler_lib.SamplerSettings("ddim", 4))
    assert not np.allclose(conditional(params, key, ldm.make_conditions(2, 5)), short)
    _, uncond_cfg, _ = _model(length=False)
    with pytest.raises(ValueError, match="conditional model"):
        sampler_lib.LatentSampler(uncond_cfg, settings)


def test_clip_modes():
    _, cfg, params = _model(clip_range=0.5)
    assert sampler_lib.model_space_clip(cfg, "scaled") == pytest.approx(0.5 / 0.76)
    assert sampler_lib.model_space_clip(cfg, "reference") == 0.5
    assert sampler_lib.model_space_clip(cfg, "none") is None
    key, cond = jax.random.PRNGKey(1), ldm.make_conditions(2, 8)
    peak = {}
    for clip in sampler_lib.CLIP_MODES:  # DDIM's last step returns the clipped x0 prediction
        settings = sampler_lib.SamplerSettings(sampler="ddim", num_steps=4, clip=clip)
        peak[clip] = float(
            np.abs(sampler_lib.LatentSampler(cfg, settings)(params, key, cond)).max()
        )
    assert peak["scaled"] == pytest.approx(0.5, rel=1e-5)  # raw units, as stored
    assert peak["reference"] == pytest.approx(0.5 * 0.76, rel=1e-5)  # raw value in scaled space
    assert peak["none"] > 0.5
    with pytest.raises(ValueError, match="clip mode"):
        sampler_lib.SamplerSettings(clip="raw")
    with pytest.raises(ValueError, match="num_steps"):
        sampler_lib.SamplerSettings(num_steps=0)


def test_decoding_stops_at_each_songs_end_with_the_same_songs(monkeypatch):
    """Slots past a song's first [SEP]-led slot are not decoded, and every song (text, bars,
    MIDI or error) equals the one from decoding every slot. A tiny random PhraseVAE whose
    [SEP] embedding copies (x1.05) the one of a frequent first token starts ~1 slot in 5 with
    [SEP]."""
    import test_decoding as tiny

    params = tiny._lively_params()
    embedding = params["t5"]["shared"]["embedding"]
    params = {**params, "t5": {**params["t5"], "shared": {"embedding": embedding}}}
    params["t5"]["shared"]["embedding"] = embedding.at[SEP_ID].set(embedding[266] * 1.05)
    decoder = vae_inference.PhraseVAEModel(
        tiny.VAE, params, max_length=32, decode_batch_size=vae_inference.SONG_DECODE_BATCH
    )
    pool = tiny._latents(200, seed=1)
    first = decoder.first_tokens(pool)
    sep, other = pool[first == SEP_ID], pool[first != SEP_ID]
    assert len(sep) > 10 and len(other) > 100
    songs = np.stack(
        [
            np.concatenate([other[:10], sep[:1], other[10:23]]),  # ends at slot 10
            other[23:47],  # never ends
            np.concatenate([sep[1:2], other[47:70]]),  # ends at once
            pool[100:124],  # wherever the random pool puts its first [SEP]
        ]
    )
    ends = song_lib.song_ends(decoder.first_tokens(songs.reshape(-1, 16)).reshape(4, 24))
    assert ends[:3].tolist() == [10, 24, 0]
    decoded_rows = []
    decode = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda x: decoded_rows.append(len(x)) or decode(x))
    cut = song_lib.decode_songs(decoder, songs)
    assert decoded_rows == [ends.sum()] and ends.sum() < songs.shape[0] * songs.shape[1]
    full = song_lib.decode_songs(decoder, songs, past_the_end=True)
    assert decoded_rows[-1] == songs.shape[0] * songs.shape[1]
    for song, end, reference in zip(cut, ends, full):
        assert (song.text, song.n_bars, song.bars_before_sep, song.error) == (
            reference.text,
            reference.n_bars,
            reference.bars_before_sep,
            reference.error,
        )
        assert song.slots[:end] == reference.slots[:end]
        assert all(text == "" for text in song.slots[end + 1 :])
    assert cut[0].slots[10] == "[SEP]" and cut[2].text == "" and full[1].slots == cut[1].slots


def test_decode_songs_stop_at_the_first_sep():
    codebook = ldm_fixtures.Codebook()
    bar = [ldm_fixtures.ONE_NOTE_BAR, "[INST]", "[INST]", "b-1"]
    slots = bar * 3 + ["[SEP]"] + bar * 2 + ["[SEP]"] * 3
    songs = song_lib.decode_songs(codebook, codebook.song_latents(slots)[None])
    (song,) = songs
    assert song.n_bars == 3 and song.error == "" and len(song.slots) == len(slots)
    assert song.text == " ".join([ldm_fixtures.ONE_NOTE_BAR, "b-1"] * 3)
    assert len(song.multitrack.bars) == 3
    broken = song_lib.song_from_slots(["i-0 o-300 p-60 d-12", "b-1", "[SEP]"])
    assert broken.multitrack is None and broken.error and broken.n_bars == 1


def test_write_midi_tempo_and_key(tmp_path):
    song = song_lib.song_from_slots(["i-0 o-0 p-60 d-12 o-24 p-64 d-12", "b-1"] * 2)
    path = str(tmp_path / "song.mid")
    song_lib.write_midi(song.multitrack, path, tempo=100.0, semitones=-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.mid"]
    midi = mido.MidiFile(path)
    tempos = [m.tempo for t in midi.tracks for m in t if m.type == "set_tempo"]
    assert tempos == [mido.bpm2tempo(100)]
    pitches = sorted({m.note for t in midi.tracks for m in t if m.type == "note_on"})
    assert pitches == [57, 61]
    back = MultiTrack.from_midi(path)
    assert len(back.bars) == 2


def test_load_ldm_from_workdir_and_original_layout(tmp_path):
    pytest.importorskip("safetensors", reason="the original layout is read with safetensors")
    from phraseldm_jax.convert import ldm_weights

    config, cfg, params = _model()
    config.vae.workdir = "/some/vae"
    workdir = ldm_fixtures.save_workdir(tmp_path / "run", config, params)
    loaded = pretrained.load_ldm(workdir)
    assert (loaded.format, loaded.default_clip, loaded.vae_workdir) == (
        "orbax",
        "scaled",
        "/some/vae",
    )
    assert loaded.config == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded.params, jax.device_get(params))

    folder = tmp_path / "original"
    ldm_weights.save_hf_checkpoint(folder, jax.device_get(params), cfg)
    original = pretrained.load_ldm(str(folder))
    assert (original.format, original.default_clip) == ("original", "reference")
    assert original.config.cross_bias_mode == "additive"
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=0),
        original.params,
        jax.device_get(params),
    )
    with pytest.raises(FileNotFoundError, match="neither"):
        pretrained.read_ldm_config(str(tmp_path))


def test_vae_decoder_from_workdir(tmp_path):
    from phraseldm_jax import vae

    config = ldm_fixtures.tiny_config("")
    config.model = dict(
        t5=dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1),
        head="vae",
        n_query_tokens=4,
        latent_dim=64,
    )
    vae_config = vae.PhraseVAEConfig(**config.model)
    params = vae.init_params(jax.random.PRNGKey(0), vae_config)
    workdir = ldm_fixtures.save_workdir(tmp_path / "vae", config, params, which="latest")
    # falls back to latest
    decoder = vae_inference.PhraseVAEModel.from_workdir(workdir, max_length=6)
    texts = decoder.decode(np.random.default_rng(0).normal(size=(5, 64)))
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    assert all(len(t.split()) <= 5 for t in texts)
    assert jnp.asarray(decoder.params["post_proj"]["kernel"]).shape == (64, 64)


def test_forced_length_reads_bars_by_position():
    bar = [ldm_fixtures.ONE_NOTE_BAR, "[INST]", "[INST]", "b-1"]
    # bar 2 has a stray b-1 in a track slot and a [SEP]: both count as nothing when forced
    slots = bar + [ldm_fixtures.ONE_NOTE_BAR, "b-1", "[SEP]", "b-1"] + bar + ["[SEP]"] * 4
    natural = song_lib.song_from_slots(slots)
    assert natural.n_bars == natural.bars_before_sep == 2
    forced = song_lib.song_from_slots(slots, 4)
    assert (forced.n_bars, forced.bars_before_sep) == (4, 2)
    one = ldm_fixtures.ONE_NOTE_BAR
    assert forced.text == f"{one} b-1 {one} b-1 {one} b-1 b-1"
    assert len(forced.multitrack.bars) == 4 and not forced.multitrack.bars[3].tracks
    with pytest.raises(ValueError, match="5 bars need 20 slots, got 16"):
        song_lib.song_from_slots(slots, 5)

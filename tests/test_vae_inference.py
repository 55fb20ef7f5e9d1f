"""vae_inference: PhraseVAEModel (from a training workdir, encode/decode, songs, MIDI), its
command line, and clear errors for bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import vae_fixtures as fx

from input_pipeline import synthetic
from phraseldm_jax import decoding, phrases, songs, vae_inference
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.cli import vae as vae_cli
from phraseldm_jax.errors import CheckpointMismatchError
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.vocab import BOS_ID, EOS_ID, PHRASE_VOCAB, QUERY_IDS, UnknownTokenError

PHRASES = [
    "i-0 o-0 p-60 d-12 p-55 d-12 o-24 p-64 d-24",
    "[INST]",
    "b-1",
    "i-13 o-0 p-72 d-6 o-6 p-74 d-6",
    "[SEP]",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return fx.shared_trained_vae(tmp_path_factory)


@pytest.fixture(scope="module")
def model(workdir):
    return vae_inference.PhraseVAEModel.from_workdir(workdir, batch_size=64, decode_batch_size=8)


def test_from_workdir_takes_config_and_checkpoint(model, workdir):
    config = fx.tiny_config(3)
    assert model.config == vae_lib.PhraseVAEConfig(**config.model)
    assert model.max_length == config.data.max_length == 64
    assert "checkpoints/best" not in model.source  # trained without evaluation: latest
    fx.assert_trees_equal(jax.device_get(model.params), fx.params_of(workdir))


def test_encode_matches_the_model_row_by_row_whatever_the_batching(model):
    mean, logvar = model.encode(PHRASES)
    assert mean.shape == logvar.shape == (len(PHRASES), 64) and mean.dtype == np.float32
    net = vae_lib.PhraseVAE(model.config)
    encode = jax.jit(
        lambda p, i, m: net.apply({"params": p}, i, m, method=vae_lib.PhraseVAE.encode)
    )
    for k, text in enumerate(PHRASES):
        ids = np.asarray([[*QUERY_IDS[:4], BOS_ID, *PHRASE_VOCAB.encode(text), EOS_ID]])
        m, lv = encode(model.decode_params, ids, np.ones_like(ids))
        np.testing.assert_allclose(mean[k], m[0], atol=2e-5)
        np.testing.assert_allclose(logvar[k], lv[0], atol=2e-5)
    # Other batch sizes and orders give the same rows.
    small = vae_inference.PhraseVAEModel(model.config, model.decode_params, batch_size=2)
    again, _ = small.encode(PHRASES[::-1])
    np.testing.assert_allclose(again[::-1], mean, atol=2e-5)


def test_encode_samples_from_the_posterior(model):
    mean, logvar = model.encode(PHRASES)
    rng = jax.random.PRNGKey(7)
    z, lv = model.encode(PHRASES, sample=True, rng=rng)
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    np.testing.assert_allclose(z, mean + eps * np.exp(0.5 * logvar), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lv, logvar)
    with pytest.raises(ValueError, match="needs an rng"):
        model.encode(PHRASES, sample=True)


def test_decode_is_greedy_decoding(model):
    latents = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    texts = model.decode(latents)
    tokens = decoding.greedy_decode(model.decode_params, model.config, latents, max_length=64)
    assert texts == decoding.tokens_to_phrases(tokens)
    assert model.reconstruct(PHRASES[:2]) == model.decode(model.encode(PHRASES[:2])[0])


def test_write_midi_round_trips_through_the_datasets_importer(tmp_path):
    """``songs.write_midi`` writes what the MIDI importer of ``prepare`` (and of ``vae
    reconstruct``) reads back as the same slots."""
    song, _, tempo = synthetic.synthetic_song(3)
    slots = phrases.slot_phrases(song)
    path = str(tmp_path / "song.mid")
    songs.write_midi(phrases.slots_to_remiz(slots), path, tempo=tempo, allow_empty=False)
    record = vae_cli.import_midi(path, source="midi")
    assert vae_cli.record_slots(record, "pitch_order") == slots
    assert record["tempo"] == pytest.approx(tempo, abs=0.5)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
    with pytest.raises(ValueError, match="no bars"):
        songs.write_midi("i-0 o-0 p-60 d-12", str(tmp_path / "empty.mid"), allow_empty=False)


def test_command_line_encode_decode_reconstruct(model, workdir, tmp_path, capsys):
    (tmp_path / "phrases.txt").write_text("\n".join(PHRASES) + "\n")
    args = ["--workdir", workdir]
    vae_cli.main(["encode", *args, "--input", str(tmp_path / "phrases.txt"),
                        "--output", str(tmp_path / "z.npz")])  # fmt: skip
    saved = np.load(tmp_path / "z.npz")
    mean, logvar = model.encode(PHRASES)
    np.testing.assert_allclose(saved["mean"], mean, atol=2e-5)
    np.testing.assert_allclose(saved["logvar"], logvar, atol=2e-5)

    vae_cli.main(["decode", *args, "--input", str(tmp_path / "z.npz"),
                        "--output", str(tmp_path / "out.txt")])  # fmt: skip
    assert (tmp_path / "out.txt").read_text().split("\n")[:-1] == model.decode(saved["mean"])

    synthetic.write_midi_folder(str(tmp_path / "midi"), n_songs=1)
    capsys.readouterr()
    vae_cli.main(["reconstruct", *args, "--input", str(tmp_path / "midi/synthetic_000.mid"),
                        "--output", str(tmp_path / "rec.mid")])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    song, _, _ = synthetic.synthetic_song(0)
    assert report["bars"] == len(song.bars) and report["phrases"] > 0
    assert len(MultiTrack.from_midi(str(tmp_path / "rec.mid")).bars) <= len(song.bars)
    assert set(report) >= {"f1_op", "f1_opd", "f1_iopd", "exact_match"}
    assert (tmp_path / "rec.mid").exists()


def test_bad_input_is_a_clear_error(model):
    with pytest.raises(UnknownTokenError, match=r"'x-1'.*phrase 1"):
        model.encode(["i-0 o-0 p-60 d-12", "i-0 x-1"])
    with pytest.raises(ValueError, match="phrase 0 is empty"):
        model.encode([""])
    too_long = "i-0 " + " ".join(f"o-{k} p-60 d-3" for k in range(30))
    with pytest.warns(UserWarning, match="1 of 2 phrases were longer"):
        mean, _ = model.encode([too_long, "b-1"])
    assert np.isfinite(mean).all()
    with pytest.raises(ValueError, match=r"\[N, 64\], got shape \(3, 32\)"):
        model.decode(np.zeros((3, 32)))
    with pytest.raises(ValueError, match=r"rows \[1\] hold NaN"):
        model.decode(np.array([[0.0] * 64, [np.nan] * 64]))


def test_checkpoint_config_mismatch_and_missing_workdir(workdir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model"]["t5"]["d_ff"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"expected \(32, 48\)|expected \(48, 32\)"):
        vae_inference.PhraseVAEModel.from_workdir(str(broken))
    with pytest.raises(FileNotFoundError, match="not a PhraseVAE training workdir"):
        vae_inference.PhraseVAEModel.from_workdir(str(tmp_path / "nothing"))
    query = vae_lib.PhraseVAEConfig(t5=fx.tiny_config(2).model.t5.to_dict(), head="query")
    with pytest.raises(ValueError, match="needs a stage-3 model"):
        vae_inference.PhraseVAEModel(query, {})

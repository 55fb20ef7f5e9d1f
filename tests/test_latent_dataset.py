"""latent_dataset on a tiny trained PhraseVAE and a synthetic songs dataset: the slot layout,
the statistics, exclusions, slot orders, and device sharding (same latents as one device)."""

import jax
import numpy as np
import pytest
import vae_fixtures as fx

from input_pipeline import latent_records, synthetic, tfds_builders
from phraseldm_jax import latent_dataset, phrases, sharding, vae_inference
from phraseldm_jax.cli import latents as latents_cli

ATOL = 2e-5  # the same phrase encoded in batches of other shapes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return fx.shared_trained_vae(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fx.synthetic_songs_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def built(workdir, data_dir, tmp_path_factory):
    """The dataset written by the command line, and what it printed."""
    out = str(tmp_path_factory.mktemp("latents") / "pop")
    return out, latents_cli.main(["--vae_workdir", workdir, "--data_dir", data_dir, "--out", out])


@pytest.fixture(scope="module")
def model(workdir):
    return vae_inference.PhraseVAEModel.from_workdir(workdir)


def _songs(data_dir):
    songs = {}
    for split in ("train", "validation", "test"):
        source = tfds_builders.open_source(data_dir, "songs", split)
        songs[split] = [source[i] for i in range(len(source))]
    return songs


def test_every_song_in_the_slot_layout(built, data_dir, model):
    out, _ = built
    stats = latent_records.read_stats(out)
    for split, songs in _songs(data_dir).items():
        source = latent_records.open_latent_source(out, split)
        assert len(source) == len(songs) == stats["songs_per_split"][split]
        for song, record in zip(songs, [source[i] for i in range(len(source))]):
            assert record["song_id"] == song["song_id"] and record["n_bars"] == song["n_bars"]
            assert record["section_plan"] == song["section_plan"]
            latents, slots = record["latents"], phrases.slot_phrases(song)
            assert latents.shape == (4 * song["n_bars"], 64) and latents.dtype == np.float32
            np.testing.assert_array_equal(
                latents[3::4], np.tile(stats["bar_latent"], (song["n_bars"], 1))
            )
            for row, text in enumerate(slots):
                if text == phrases.INST_TOKEN:
                    np.testing.assert_array_equal(latents[row], stats["inst_latent"])
            assert phrases.INST_TOKEN in slots  # the synthetic songs have empty slots
    # Phrase rows are the posterior means of their phrases.
    song = _songs(data_dir)["train"][0]
    slots = phrases.slot_phrases(song)
    first = latent_records.open_latent_source(out, "train")[0]["latents"]
    np.testing.assert_allclose(first, model.encode(slots)[0], atol=ATOL)


def test_statistics_and_special_latents(built, model):
    out, _ = built
    stats = latent_records.read_stats(out)
    source = latent_records.open_latent_source(out, "train")
    rows = np.concatenate([source[i]["latents"] for i in range(len(source))]).astype(np.float64)
    assert stats["train_rows"] == len(rows)
    np.testing.assert_allclose(
        stats["scale_factor"], np.std(rows, axis=0, ddof=1).mean(), rtol=1e-9
    )
    np.testing.assert_allclose(stats["abs_p999"], np.percentile(np.abs(rows), 99.9), rtol=1e-9)
    means, _ = model.encode(["[INST]", "b-1", "[SEP]"])
    for k, key in enumerate(("inst_latent", "bar_latent", "sep_latent")):
        np.testing.assert_allclose(stats[key], means[k], atol=ATOL)
    assert stats["latent_dim"] == 64 and stats["slot_order"] == "pitch_order"
    assert stats["n_excluded"] == 0 and stats["vae_source"] == model.source


def test_the_command_line_refuses_to_overwrite(built, workdir, data_dir):
    out, code = built
    assert code == 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        latents_cli.main(["--vae_workdir", workdir, "--data_dir", data_dir, "--out", out])


def test_long_songs_are_excluded_and_fixed_slots_hold_their_program(model, tmp_path):
    songs = synthetic.synthetic_records(4)
    long_song = dict(songs[1], song_id="synthetic/long", n_bars=130)
    stats = latent_dataset.build_latent_dataset(
        "",
        "",
        str(tmp_path / "fixed"),
        slot_order="fixed",
        model=model,
        songs_by_split={"train": [songs[0], long_song, songs[2]], "test": [songs[3]]},
        progress=False,
    )
    assert stats["songs_per_split"] == {"train": 2, "test": 1}
    assert stats["n_excluded"] == 1 and stats["excluded_songs"] == {"train": ["synthetic/long"]}
    record = latent_records.open_latent_source(tmp_path / "fixed", "train")[0]
    by_program = [dict(bar) for bar in phrases.record_phrases(songs[0])]
    texts = ["[INST]"] + [text for bar in by_program for text in bar.values()]
    means = dict(zip(texts, model.encode(texts)[0]))
    for bar, programs in enumerate(by_program):
        for slot, program in enumerate(phrases.POP909_PROGRAMS):
            text = programs.get(program, "[INST]")
            np.testing.assert_allclose(record["latents"][4 * bar + slot], means[text], atol=ATOL)


def test_sharded_encoding_matches_one_device(model, data_dir):
    one = vae_inference.PhraseVAEModel(
        model.config,
        model.decode_params,
        mesh=sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1]),
    )
    assert model.mesh.devices.size == len(jax.devices()) == 8
    songs = {"train": _songs(data_dir)["train"][:3]}
    sharded, specials, _ = latent_dataset.encode_songs(model, songs, progress=False)
    single, specials_one, _ = latent_dataset.encode_songs(one, songs, progress=False)
    for a, b in zip(sharded["train"], single["train"]):
        np.testing.assert_allclose(a["latents"], b["latents"], atol=ATOL)
    for key in specials:
        np.testing.assert_allclose(specials[key], specials_one[key], atol=ATOL)

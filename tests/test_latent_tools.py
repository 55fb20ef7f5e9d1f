"""latent_tools: interpolation maths, prior samples, phrase and bar interpolation, songs made
safe to write, and the command line (MIDI out)."""

import json

import jax
import numpy as np
import pytest
import vae_fixtures as fx

from input_pipeline import synthetic
from phraseldm_jax import latent_tools, phrases, songs, vae_inference
from phraseldm_jax.cli import latent_tools as latent_tools_cli

A = "i-0 o-0 p-60 d-12 p-55 d-12 o-24 p-64 d-24"
B = "i-13 o-0 p-72 d-6 o-6 p-74 d-6"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return fx.shared_trained_vae(tmp_path_factory)


@pytest.fixture(scope="module")
def model(workdir):
    return vae_inference.PhraseVAEModel.from_workdir(workdir, batch_size=64, decode_batch_size=8)


def test_linear_and_spherical_interpolation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    for method in latent_tools.METHODS:
        path = latent_tools.interpolate(a, b, 5, method)
        assert path.shape == (5, 16) and path.dtype == np.float32
        np.testing.assert_allclose(path[0], a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(path[-1], b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        latent_tools.interpolate(a, b, 3, "linear")[1], (a + b) / 2, rtol=1e-6, atol=1e-6
    )
    # Orthogonal unit vectors: slerp stays on the unit circle, the midpoint bisects the angle.
    e0, e1 = np.eye(16)[0], np.eye(16)[1]
    arc = latent_tools.interpolate(e0, e1, 9, "slerp")
    np.testing.assert_allclose(np.linalg.norm(arc, axis=1), 1.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arc[4], (e0 + e1) / np.sqrt(2), atol=1e-6)
    # Parallel or zero vectors fall back to linear interpolation.
    np.testing.assert_allclose(
        latent_tools.slerp(a, 2 * a, np.array([0.5])), [1.5 * a], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        latent_tools.slerp(np.zeros(16), b, np.array([0.25])), [0.25 * b], rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="steps must be >= 2"):
        latent_tools.interpolate(a, b, 1)
    with pytest.raises(ValueError, match="unknown interpolation method"):
        latent_tools.interpolate(a, b, 3, "cubic")
    with pytest.raises(ValueError, match="one width"):
        latent_tools.interpolate(a, b[:8], 3)


def test_prior_samples_are_seeded_and_decoded(model):
    z, texts = latent_tools.sample_prior(model, 4, jax.random.PRNGKey(1), temperature=0.5)
    assert z.shape == (4, 64) and len(texts) == 4
    np.testing.assert_allclose(
        z, 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 64)))
    )
    assert texts == model.decode(z)
    z_again, _ = latent_tools.sample_prior(model, 4, jax.random.PRNGKey(1), temperature=0.5)
    np.testing.assert_array_equal(z, z_again)


def test_phrase_and_bar_interpolations_start_and_end_at_the_inputs(model):
    texts = latent_tools.interpolate_phrases(model, A, B, 4, "linear")
    ends = model.decode(model.encode([A, B])[0])
    assert len(texts) == 4 and [texts[0], texts[-1]] == ends

    song, _, _ = synthetic.synthetic_song(0)
    slots = phrases.slot_phrases(song)
    bar_a = latent_tools.bar_slots(slots, 0, "song")
    bar_b = latent_tools.bar_slots(slots, 5, "song")
    decoded = latent_tools.interpolate_bars(model, bar_a, bar_b, 3, "linear")
    assert len(decoded) == 12
    ends = model.decode(model.encode([*bar_a, *bar_b])[0])
    assert decoded[:4] == ends[:4] and decoded[-4:] == ends[4:]
    with pytest.raises(ValueError, match="bar_a must hold 4 slot strings"):
        latent_tools.interpolate_bars(model, bar_a[:3], bar_b, 3)
    with pytest.raises(ValueError, match="bar 99 is outside"):
        latent_tools.bar_slots(slots, 99, "song")


def test_songs_from_decoded_slots_keep_one_bar_per_step():
    decoded = [
        "[SEP]",
        "b-1 i-0 o-0 p-60 d-12",
        "",
        "x",
        "i-0 o-0 p-62 d-6",
        "[INST]",
        "[INST]",
        "b-1",
    ]
    slots = songs.bars_as_song(decoded)
    assert slots == ["[INST]", "i-0 o-0 p-60 d-12", "[INST]", "b-1",
                     "i-0 o-0 p-62 d-6", "[INST]", "[INST]", "b-1"]  # fmt: skip
    assert phrases.count_bars(slots) == 2
    one_per_phrase = latent_tools.phrases_as_song(["[SEP]", "i-0 o-0 p-60 d-12 b-1"])
    assert phrases.count_bars(one_per_phrase) == 2
    with pytest.raises(ValueError, match="not whole bars"):
        songs.bars_as_song(decoded[:5])


@pytest.mark.parametrize(
    "command",
    [
        ["prior", "--n", "3"],
        ["phrases", "--a", A, "--b", B, "--steps", "3", "--method", "linear"],
        ["bars", "--bar_a", "0", "--bar_b", "4", "--steps", "3"],
    ],
)
def test_command_line_writes_midi(workdir, tmp_path, capsys, command):
    synthetic.write_midi_folder(str(tmp_path), n_songs=1)
    out = tmp_path / "out.mid"
    extra = ["--midi", str(tmp_path / "synthetic_000.mid")] if command[0] == "bars" else []
    latent_tools_cli.main([*command, *extra, "--workdir", workdir, "--output", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert len(report["bars"]) == 3 and report["output"] == str(out)
    assert out.stat().st_size > 0 and not list(tmp_path.glob(".*tmp*"))

"""``python -m phraseldm_jax.cli.convert`` import / export round trips, and sample.py reading
original-layout folders and converted workdirs (no torch needed: the original-layout folders
are written by our exporter, which the cross-checks compare with PyTorch's files)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import ldm_fixtures
import numpy as np
import pytest

import sample
from phraseldm_jax import checkpointing, ldm, ldm_task, pretrained, sections, vae, vae_inference
from phraseldm_jax.cli import convert as cli
from phraseldm_jax.convert import api, ldm_weights, safetensors_io
from phraseldm_jax.dit import DiTConfig

TINY_VAE = vae.PhraseVAEConfig(
    t5=dict(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1),
    head="vae",
    latent_dim=64,
)
TINY_DIT = DiTConfig(
    sample_size=64,  # 16 bars
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    num_key_value_attention_heads=1,
    cross_attention_dim=16,
    time_proj_dim=8,
    global_states_input_dim=8,
    cross_attention_input_dim=16,
)
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED0_VOCAB = sections.SectionVocab.from_orders(
    "xXAEbiBcDoC", [9, 1, 8, 2, 3, 4, 5, 6, 7, *range(10, 33)]
)


def _random_params(init, seed):
    """Random params shaped as ``init`` gives (traced only; compiling the init is slow)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: rng.normal(0.0, 0.5, a.shape).astype(np.float32), jax.eval_shape(init)
    )


@functools.cache
def _vae():
    params = _random_params(lambda: vae.init_params(jax.random.key(0), TINY_VAE), 0)
    return api.LoadedPhraseVAE(TINY_VAE, params)


@functools.cache
def _ldm_parts(sec_control):
    config = ldm.PhraseLDMConfig(
        dit=TINY_DIT,
        length_control=True,
        sec_control=sec_control,
        cross_bias_mode="additive",
        train_encoders=False,
    )
    return config, _random_params(lambda: ldm.init_params(jax.random.key(1), config), 1)


def _ldm(sec_control=False, vocab=sections.DEFAULT_SECTION_VOCAB):
    config, params = _ldm_parts(sec_control)
    return api.LoadedPhraseLDM(config, params, section_vocab=vocab)


def _assert_same_folders(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        if name.endswith(".json"):
            assert json.loads(open(os.path.join(a, name)).read()) == json.loads(
                open(os.path.join(b, name)).read()
            ), name
    weights = [os.path.join(d, "model.safetensors") for d in (a, b)]
    if not os.path.exists(weights[0]):  # a tokenizer folder
        return
    tensors = [safetensors_io.read_safetensors(w) for w in weights]
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        np.testing.assert_array_equal(tensors[1][key], value, err_msg=key)
    assert safetensors_io.read_safetensors_metadata(weights[0]) == (
        safetensors_io.read_safetensors_metadata(weights[1])
    )


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_vae_round_trip(tmp_path, capsys):
    model = _vae()
    api.export_phrase_vae(model, tmp_path / "original")
    code, out, err = _run(
        capsys,
        "import",
        "--kind",
        "vae",
        "--src",
        tmp_path / "original",
        "--workdir",
        tmp_path / "w",
    )
    assert code == 0, err
    assert "imported PhraseVAE head=vae" in out and "read+convert" in out and " s, write " in out
    params = checkpointing.load_params(str(tmp_path / "w"))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    inference = vae_inference.PhraseVAEModel.from_workdir(str(tmp_path / "w"))
    assert inference.config == TINY_VAE and inference.max_length == 128
    code, out, err = _run(
        capsys, "export", "--kind", "vae", "--workdir", tmp_path / "w", "--dst", tmp_path / "back"
    )
    assert code == 0, err
    assert "config.json, model.safetensors" in out
    # The same files, plus the tokenizer folder that config.json now names (offline use).
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config.pop("tokenizer_repo_id") == str(tmp_path / "back" / "tokenizer")
    original_config = json.loads((tmp_path / "original" / "config.json").read_text())
    assert original_config.pop("tokenizer_repo_id") == "LongshenOu/phrase-vae-tokenizer"
    assert back_config == original_config
    api.export_phrase_vae(model, tmp_path / "original_tok", with_tokenizer=True)
    for folder in ("original_tok", "back"):
        os.rename(tmp_path / folder / "config.json", tmp_path / folder / "config.json.seen")
    _assert_same_folders(tmp_path / "original_tok", tmp_path / "back")
    _assert_same_folders(tmp_path / "original_tok" / "tokenizer", tmp_path / "back" / "tokenizer")
    os.rename(tmp_path / "back" / "config.json.seen", tmp_path / "back" / "config.json")

    # Errors exit with status 1 and one line.
    again = ("export", "--kind", "vae", "--workdir", tmp_path / "w", "--dst", tmp_path / "back")
    code, _, err = _run(capsys, *again)
    assert code == 1 and "already holds a checkpoint (pass --overwrite)" in err
    assert _run(capsys, *again, "--overwrite")[0] == 0
    code, _, err = _run(
        capsys, "export", "--kind", "ldm", "--workdir", tmp_path / "w", "--dst", tmp_path / "x"
    )
    assert code == 1 and "holds a VAE, not a LDM" in err
    code, _, err = _run(
        capsys, "import", "--kind", "vae", "--src", tmp_path / "none", "--workdir", tmp_path / "v"
    )
    assert code == 1 and "no such checkpoint" in err
    code, _, err = _run(
        capsys,
        "import",
        "--kind",
        "vae",
        "--src",
        tmp_path / "original",
        "--workdir",
        tmp_path / "w",
    )
    assert code == 1 and "already holds checkpoints (pass --overwrite)" in err


def test_cli_ldm_round_trip_keeps_the_section_order(tmp_path, capsys):
    model = _ldm(sec_control=True, vocab=SEED0_VOCAB)
    api.export_phrase_ldm(model, tmp_path / "original")
    code, out, err = _run(
        capsys, "import", "--kind", "ldm", "--src", tmp_path / "original",
        "--workdir", tmp_path / "w", "--vae_workdir", "/runs/vae",
    )  # fmt: skip
    assert code == 0, err
    assert "sec_control=True" in out
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["vae"]["workdir"] == "/runs/vae"
    assert config["converted_from"]["section_vocab"]["sec_type_to_id"]["x"] == 1
    code, _, err = _run(
        capsys, "export", "--kind", "ldm", "--workdir", tmp_path / "w", "--dst", tmp_path / "back"
    )
    assert code == 0, err
    _assert_same_folders(tmp_path / "original", tmp_path / "back")

    # --section_order at import overrides the folder's file (and is what export writes back).
    order = tmp_path / "ours.json"
    order.write_text(json.dumps({"type_order": "ABCDEXbciox", "length_order": list(range(1, 33))}))
    code, _, err = _run(
        capsys, "import", "--kind", "ldm", "--src", tmp_path / "original",
        "--workdir", tmp_path / "w2", "--section_order", order,
    )  # fmt: skip
    assert code == 0, err
    back = ("export", "--kind", "ldm", "--workdir", tmp_path / "w2", "--dst", tmp_path / "b2")
    assert _run(capsys, *back)[0] == 0
    written = json.loads((tmp_path / "b2" / "section_vocab.json").read_text())
    assert written["sec_type_to_id"]["A"] == 1 and written["sec_type_to_id"]["x"] == 11


def test_sampling_loads_original_folders_in_their_section_order(tmp_path):
    model = _ldm(sec_control=True, vocab=SEED0_VOCAB)
    api.export_phrase_ldm(model, tmp_path)
    loaded = pretrained.load_ldm(str(tmp_path))
    assert (loaded.format, loaded.default_clip) == ("original", "reference")
    np.testing.assert_array_equal(
        loaded.params["sec_encoder"]["type_embed"], model.params["sec_encoder"]["type_embed"]
    )
    _, raw = ldm_weights.load_hf_checkpoint(str(tmp_path))  # rows in the file's order
    assert not np.array_equal(
        raw["sec_encoder"]["type_embed"], loaded.params["sec_encoder"]["type_embed"]
    )


def test_sample_runs_on_original_folders_and_on_converted_workdirs_alike(tmp_path, capsys):
    api.export_phrase_vae(_vae(), tmp_path / "vae")
    api.export_phrase_ldm(_ldm(), tmp_path / "ldm")
    options = ["--num_songs", "2", "--bars", "12", "--sampler", "ddim", "--steps", "2",
               "--max_decode_length", "6", "--seed", "3"]  # fmt: skip
    argv = ["--checkpoint", str(tmp_path / "ldm"), "--vae_workdir", str(tmp_path / "vae")]
    assert sample.main([*argv, "--out", str(tmp_path / "songs"), *options]) == 0
    summary = json.loads((tmp_path / "songs" / "summary.json").read_text())
    assert summary["format"] == "original" and summary["settings"]["clip"] == "reference"
    assert len(summary["songs"]) == 2

    for kind in ("vae", "ldm"):
        extra = ["--vae_workdir", tmp_path / "vae_wd"] if kind == "ldm" else []
        code = cli.main(
            [str(a) for a in ("import", "--kind", kind, "--src", tmp_path / kind,
                              "--workdir", tmp_path / f"{kind}_wd", *extra)]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
    out = tmp_path / "songs_wd"
    assert sample.main(["--checkpoint", str(tmp_path / "ldm_wd"), "--out", str(out), *options]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "orbax" and summary["settings"]["clip"] == "reference"
    for name in ("song_000.txt", "song_001.txt"):  # the same model, seed and settings
        assert (out / name).read_text() == (tmp_path / "songs" / name).read_text()


def test_the_clip_mode_travels_with_an_exported_model(tmp_path):
    """A model of ours (clip "scaled", masked sections) exported to the original's layout
    records both in config.json's ``_phraseldm_jax`` group and reads them back; the
    original's own folders (no group) keep "reference" and the additive bias."""
    config, params = _ldm_parts(True)
    ours = dataclasses.replace(config, cross_bias_mode="mask")
    api.export_phrase_ldm(api.LoadedPhraseLDM(ours, params, clip="scaled"), tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written[ldm_weights.CONVENTIONS_KEY] == {
        "clip": "scaled",
        "cross_bias_mode": "mask",
        "prediction_type": "epsilon",
    }
    back = api.import_phrase_ldm(tmp_path / "ours")
    assert back.clip == "scaled" and back.config.cross_bias_mode == "mask"
    assert back.config.prediction_type == "epsilon"
    v_model = dataclasses.replace(ours, prediction_type="v_prediction")
    api.export_phrase_ldm(api.LoadedPhraseLDM(v_model, params, clip="scaled"), tmp_path / "v")
    assert api.import_phrase_ldm(tmp_path / "v").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="v_prediction PhraseLDM needs its conventions"):
        ldm_weights.hf_config_from_ldm_config(v_model)
    assert pretrained.load_ldm(str(tmp_path / "ours")).default_clip == "scaled"
    assert pretrained.read_ldm_config(str(tmp_path / "ours")).cross_bias_mode == "mask"
    api.save_workdir(back, tmp_path / "w")
    assert pretrained.load_ldm(str(tmp_path / "w")).default_clip == "scaled"

    api.export_phrase_ldm(_ldm(sec_control=True), tmp_path / "original")
    original = json.loads((tmp_path / "original" / "config.json").read_text())
    assert ldm_weights.CONVENTIONS_KEY not in original  # the original's file, unchanged
    assert api.import_phrase_ldm(tmp_path / "original").clip == "reference"
    # Workdirs converted before the clip mode was recorded hold the original's weights.
    assert api.workdir_clip({"converted_from": {"source": "x"}}) == "reference"
    assert api.workdir_clip({"model": {}}) == "scaled"


def _subprocess(*argv):
    result = subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_round_trip_samples_the_same_songs(tmp_path):
    """Export a workdir trained here with the real command, import it back, and sample the
    workdir, the exported folder and the imported workdir with one seed: the same songs
    (before the clip mode travelled, the imported model sampled with "reference")."""
    api.save_workdir(_vae(), tmp_path / "vae")
    ldm_config = ldm_fixtures.tiny_config("")
    ldm_config.model.dit.sample_size = 64
    ldm_config.model.scale_factor, ldm_config.model.clip_range = 0.76, 3.0
    ldm_config.vae.workdir = str(tmp_path / "vae")
    params = ldm.init_params(ldm_fixtures.init_key(), ldm_task.ldm_config(ldm_config))
    workdir = ldm_fixtures.save_workdir(tmp_path / "ldm", ldm_config, params)
    convert = ("-m", "phraseldm_jax.cli.convert")
    _subprocess(
        *convert, "export", "--kind", "ldm", "--workdir", workdir, "--dst", tmp_path / "exp"
    )
    _subprocess(
        *convert, "import", "--kind", "ldm", "--src", tmp_path / "exp",
        "--workdir", tmp_path / "imp", "--vae_workdir", tmp_path / "vae",
    )  # fmt: skip
    options = ["--num_songs", "2", "--bars", "12", "--sampler", "ddim", "--steps", "10",
               "--max_decode_length", "16", "--seed", "3", "--cpu_devices", "1"]  # fmt: skip
    texts = {}
    for name, checkpoint in (
        ("ldm", workdir),
        ("exp", tmp_path / "exp"),
        ("imp", tmp_path / "imp"),
    ):
        out = tmp_path / f"songs_{name}"
        _subprocess(
            REPO_ROOT / "sample.py", "--checkpoint", checkpoint, "--out", out,
            "--vae_workdir", tmp_path / "vae", *options,
        )  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["clip"] == "scaled", name
        texts[name] = [(out / s["text_file"]).read_text() for s in summary["songs"]]
    assert texts["exp"] == texts["ldm"] and texts["imp"] == texts["ldm"]

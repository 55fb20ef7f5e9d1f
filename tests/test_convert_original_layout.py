"""Original-layout folders (config.json + model.safetensors) <-> ours, without torch: exact
round trips, the files the original writes, tied-embedding aliases, section order, mismatch
errors, and our workdirs."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings

import jax
import numpy as np
import pytest

from phraseldm_jax import checkpointing, ldm, sections, t5, vae
from phraseldm_jax.convert import api, ldm_weights, original_layout, safetensors_io
from phraseldm_jax.dit import DiTConfig
from phraseldm_jax.errors import CheckpointMismatchError

TINY_T5 = t5.T5Config(d_model=16, d_ff=24, d_kv=6, num_heads=2, num_layers=2, num_decoder_layers=3)
TINY_VAE = vae.PhraseVAEConfig(t5=TINY_T5, head="vae", n_query_tokens=4, latent_dim=8)
TINY_DIT = DiTConfig(
    sample_size=16,
    in_channels=8,
    out_channels=8,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    num_key_value_attention_heads=1,
    cross_attention_dim=16,
    time_proj_dim=8,
    global_states_input_dim=8,
    cross_attention_input_dim=16,
)
VARIANTS = {"uncond": (False, False), "lencond": (True, False), "seccond": (True, True)}
# The order of one PyTorch process (PYTHONHASHSEED=0): 'x' is id 1, length "9" is id 1.
SEED0_VOCAB = sections.SectionVocab.from_orders(
    "xXAEbiBcDoC", [9, 1, 8, 2, 3, 4, 5, 6, 7] + list(range(10, 33))
)


def _random_params(init, seed: int) -> dict:
    """Random float32 params with the shapes ``init`` would give (traced, not compiled: a
    compile of the init takes longer than everything else here)."""
    abstract = jax.eval_shape(init)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(0.0, 0.5, a.shape).astype(np.float32), abstract)


@functools.cache
def _vae() -> api.LoadedPhraseVAE:
    params = _random_params(lambda: vae.init_params(jax.random.key(0), TINY_VAE), seed=0)
    return api.LoadedPhraseVAE(TINY_VAE, params)


def _ldm(variant: str, vocab=sections.DEFAULT_SECTION_VOCAB) -> api.LoadedPhraseLDM:
    config, params = _ldm_params(variant)
    return api.LoadedPhraseLDM(config, params, section_vocab=vocab)


@functools.cache
def _ldm_params(variant: str):
    length_control, sec_control = VARIANTS[variant]
    config = ldm.PhraseLDMConfig(
        dit=TINY_DIT,
        length_control=length_control,
        sec_control=sec_control,
        cross_bias_mode="additive",
        train_encoders=False,
    )
    return config, _random_params(lambda: ldm.init_params(jax.random.key(1), config), seed=1)


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(y).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read(folder):
    folder = str(folder)
    return (
        json.loads(open(os.path.join(folder, "config.json")).read()),
        safetensors_io.read_safetensors(os.path.join(folder, "model.safetensors")),
        safetensors_io.read_safetensors_metadata(os.path.join(folder, "model.safetensors")),
    )


# --- PhraseVAE ---------------------------------------------------------------------------------


def test_paper_vae_config_json_is_the_original_default():
    """The original hub class's default arguments (models/vae_inference.py PhraseVAE)."""
    config = vae.PhraseVAEConfig(t5=t5.PAPER_T5, head="vae")
    assert original_layout.original_vae_config(config) == {
        "tokenizer_repo_id": "LongshenOu/phrase-vae-tokenizer",
        "t5_config": {
            "d_model": 512,
            "d_ff": 1024,
            "num_layers": 3,
            "num_heads": 6,
            "vocab_size": 1000,
            "decoder_start_token_id": 1,
        },
        "compress_style": "first_n_tokens",
        "n_compress_tokens": 4,
        "bottleneck_dim": 64,
        "vocab_size": 1000,
    }


def test_vae_folder_round_trip_is_exact_and_stores_the_tied_embedding_once(tmp_path):
    model = _vae()
    api.export_phrase_vae(model, tmp_path / "vae")
    assert sorted(os.listdir(tmp_path / "vae")) == ["config.json", "model.safetensors"]
    hf_config, tensors, metadata = _read(tmp_path / "vae")
    assert hf_config["t5_config"]["d_kv"] == 6 and hf_config["t5_config"]["num_decoder_layers"] == 3
    embedding = [k for k in tensors if k.endswith(("shared.weight", "embed_tokens.weight"))]
    assert embedding == ["model.t5.decoder.embed_tokens.weight"]  # the alias torch keeps
    assert "model.t5.lm_head.weight" not in tensors
    assert metadata == {
        "model.t5.encoder.embed_tokens.weight": "model.t5.decoder.embed_tokens.weight",
        "model.t5.lm_head.weight": "model.t5.decoder.embed_tokens.weight",
        "model.t5.shared.weight": "model.t5.decoder.embed_tokens.weight",
    }
    np.testing.assert_array_equal(tensors["model.proj.weight"], model.params["proj"]["kernel"].T)
    loaded = api.import_phrase_vae(tmp_path / "vae")
    assert loaded.config == TINY_VAE and loaded.original_config == hf_config
    _assert_same_params(model.params, loaded.params)
    # Export of an imported model writes the same files (config.json kept as it was).
    api.export_phrase_vae(loaded, tmp_path / "again")
    again = _read(tmp_path / "again")
    assert again[0] == hf_config and again[2] == metadata
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[1][key], value)
    # The weights file alone names its folder.
    _assert_same_params(
        model.params, api.import_phrase_vae(tmp_path / "vae" / "model.safetensors").params
    )


@pytest.mark.parametrize(
    "alias",
    ["t5.shared.weight", "t5.encoder.embed_tokens.weight", "t5.lm_head.weight", "all four"],
)
def test_vae_import_accepts_any_tied_embedding_alias(tmp_path, alias):
    model = _vae()
    api.export_phrase_vae(model, tmp_path)
    hf_config, tensors, _ = _read(tmp_path)
    embedding = tensors.pop("model.t5.decoder.embed_tokens.weight")
    aliases = (
        [k for k in original_layout.vae_weights.TIED_EMBEDDING_KEYS]
        if alias == "all four"
        else [alias]
    )
    for name in aliases:
        tensors["model." + name] = embedding
    safetensors_io.write_safetensors(tmp_path / "model.safetensors", tensors)
    _assert_same_params(model.params, api.import_phrase_vae(tmp_path).params)
    if alias == "all four":  # aliases that disagree are refused
        tensors["model.t5.lm_head.weight"] = embedding + 1
        safetensors_io.write_safetensors(tmp_path / "model.safetensors", tensors)
        with pytest.raises(ValueError, match="lm_head.weight differs"):
            api.import_phrase_vae(tmp_path)


def test_vae_mismatches_are_listed_with_the_file(tmp_path):
    model = _vae()
    api.export_phrase_vae(model, tmp_path)
    hf_config, tensors, _ = _read(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = dict(tensors)
    del tensors["model.post_proj.bias"]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.t5.encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((16, 5))
    safetensors_io.write_safetensors(weights, tensors)
    with pytest.raises(CheckpointMismatchError) as info:
        api.import_phrase_vae(tmp_path)
    message = str(info.value)
    assert str(weights) in message
    assert "missing keys (1): model.post_proj.bias" in message
    assert "unexpected keys (1): model.extra.weight" in message
    assert "DenseReluDense.wo.weight: expected (16, 24), got (16, 5)" in message

    safetensors_io.write_safetensors(weights, good)
    (tmp_path / "config.json").write_text(
        json.dumps({**hf_config, "t5_config": {**hf_config["t5_config"], "d_model": 32}})
    )
    with pytest.raises(ValueError, match=r"model.safetensors.*d_model=32 but the tensors say 16"):
        api.import_phrase_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "dropout": 0.3}))
    with pytest.raises(ValueError, match=r"unknown PhraseVAE config keys \['dropout'\]"):
        api.import_phrase_vae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        api.import_phrase_vae(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        api.import_phrase_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        api.import_phrase_vae(tmp_path / "nowhere")


def test_only_stage3_vaes_have_the_original_layout(tmp_path):
    config = vae.PhraseVAEConfig(t5=TINY_T5, head="query")
    params = _random_params(lambda: vae.init_params(jax.random.key(0), config), seed=2)
    model = api.LoadedPhraseVAE(config, params)
    with pytest.raises(ValueError, match="head 'vae'.*head 'query'"):
        api.export_phrase_vae(model, tmp_path)
    assert os.listdir(tmp_path) == []


def test_loaded_vae_runs_and_checks_its_inputs():
    model = _vae()
    ids = np.array([[13, 14, 15, 16, 1, 300, 0, 5], [13, 14, 15, 16, 1, 9, 0, 5]])
    mask = (ids != 5).astype(np.int32)
    mean, logvar = model.encode(ids, mask)
    assert mean.shape == logvar.shape == (2, 8) and mean.dtype == np.float32
    assert not np.allclose(mean[0], mean[1])
    logits = model.decode_logits(mean, ids[:, 4:])
    assert logits.shape == (2, 4, 1000)
    tokens = model.greedy_decode(mean, max_length=6)
    assert tokens.shape == (2, 6) and (tokens[:, 0] == 1).all()
    with pytest.raises(ValueError, match="outside 0..999"):
        model.encode(ids + 1000, mask)
    with pytest.raises(ValueError, match="must match input_ids"):
        model.encode(ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"latent must be \[batch, 8\]"):
        model.decode_logits(mean[:, :3], ids)


# --- PhraseLDM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ldm_folder_round_trip_is_exact(tmp_path, variant):
    model = _ldm(variant)
    api.export_phrase_ldm(model, tmp_path)
    files = sorted(os.listdir(tmp_path))
    hf_config, tensors, _ = _read(tmp_path)
    assert set(hf_config) == set(ldm_weights.HF_CONFIG_KEYS)
    assert hf_config["model_config"] == TINY_DIT.to_model_config()
    assert (hf_config["length_control"], hf_config["sec_control"]) == VARIANTS[variant]
    expected = {k for e in ldm_weights.weight_table(model.config) for k in e.torch_keys}
    assert set(tensors) == expected
    if variant == "seccond":
        assert files == ["config.json", "model.safetensors", "section_vocab.json"]
    else:
        assert files == ["config.json", "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seccond: the order comes from section_vocab.json
        loaded = api.import_phrase_ldm(tmp_path)
    assert loaded.config == model.config
    assert loaded.section_vocab == sections.DEFAULT_SECTION_VOCAB
    _assert_same_params(model.params, loaded.params)


def test_section_order_is_applied_at_import_and_export(tmp_path):
    model = _ldm("seccond")
    x = np.random.default_rng(0).normal(size=(2, 12, 8)).astype(np.float32)
    plans = ["i-8 A-8 B-4", "x-9 X-1 A-32"]
    expected = model.predict_noise(x, [5, 700], n_bars=[20, 42], sections=plans)

    api.export_phrase_ldm(model, tmp_path / "seed0", section_order=SEED0_VOCAB)
    written = json.loads((tmp_path / "seed0" / "section_vocab.json").read_text())
    assert written["sec_type_to_id"]["x"] == 1 and written["sec_len_to_id"]["9"] == 1
    _, tensors, _ = _read(tmp_path / "seed0")
    ours = model.params["sec_encoder"]["type_embed"]
    their_x = tensors["sec_encoder.type_embed.weight"][SEED0_VOCAB.type_to_id["x"]]
    np.testing.assert_array_equal(their_x, ours[sections.DEFAULT_SECTION_VOCAB.type_to_id["x"]])
    np.testing.assert_array_equal(tensors["sec_encoder.type_embed.weight"][0], ours[0])  # pad

    loaded = api.import_phrase_ldm(tmp_path / "seed0")  # order from section_vocab.json
    assert loaded.section_vocab == SEED0_VOCAB
    _assert_same_params(model.params, loaded.params)
    np.testing.assert_array_equal(
        loaded.predict_noise(x, [5, 700], n_bars=[20, 42], sections=plans), expected
    )
    # Export again in the imported order: the same tensors (bitwise).
    api.export_phrase_ldm(loaded, tmp_path / "again")
    for key, value in _read(tmp_path / "again")[1].items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)

    # The argument overrides the file; the wrong order changes the model's outputs.
    (tmp_path / "order.json").write_text(
        json.dumps(original_layout.section_vocab_to_json(sections.DEFAULT_SECTION_VOCAB))
    )
    wrong = api.import_phrase_ldm(tmp_path / "seed0", section_order=tmp_path / "order.json")
    assert wrong.section_vocab == sections.DEFAULT_SECTION_VOCAB
    got = wrong.predict_noise(x, [5, 700], n_bars=[20, 42], sections=plans)
    assert np.abs(got - expected).max() > 1e-3
    # The order given as a dict of orders; no order at all warns.
    by_orders = {
        "type_order": "xXAEbiBcDoC",
        "length_order": [9, 1, 8, *range(2, 8), *range(10, 33)],
    }
    assert api.import_phrase_ldm(tmp_path / "again", section_order=by_orders).section_vocab == (
        SEED0_VOCAB
    )
    os.remove(tmp_path / "seed0" / "section_vocab.json")
    with pytest.warns(UserWarning, match="no section order given"):
        api.import_phrase_ldm(tmp_path / "seed0")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"sec_type_to_id": {"A": 1}, "sec_len_to_id": {"1": 1}}, "must list each of"),
        ({"sec_type_to_id": {"A": 1, "B": 3}, "sec_len_to_id": {}}, r"ids must be 1..2"),
        ({"types": "ABC"}, "expected keys sec_type_to_id"),
    ],
)
def test_bad_section_order_files_are_refused(tmp_path, content, message):
    path = tmp_path / "order.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as info:
        original_layout.resolve_section_vocab(path)
    assert "order.json" in str(info.value)


def test_ldm_mismatch_and_config_errors_name_the_file(tmp_path):
    model = _ldm("lencond")
    api.export_phrase_ldm(model, tmp_path)
    hf_config, tensors, _ = _read(tmp_path)
    del tensors["length_encoder.length_embedding.weight"]
    tensors["ldm.proj_in.weight"] = np.zeros((16, 9), np.float32)
    safetensors_io.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointMismatchError) as info:
        api.import_phrase_ldm(tmp_path)
    message = str(info.value)
    assert "model.safetensors" in message
    assert "missing keys (1): length_encoder.length_embedding.weight" in message
    assert "shape of ldm.proj_in.weight: expected (16, 8), got (16, 9)" in message
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "guidance": 3}))
    with pytest.raises(ValueError, match=r"model.safetensors: .*unknown keys \['guidance'\]"):
        api.import_phrase_ldm(tmp_path)


def test_ldm_export_of_a_masking_model_warns(tmp_path):
    model = _ldm("seccond")
    masked = api.LoadedPhraseLDM(
        ldm.PhraseLDMConfig(**{**model.config.__dict__, "cross_bias_mode": "mask"}), model.params
    )
    with pytest.warns(UserWarning, match="masks padded sections"):
        api.export_phrase_ldm(masked, tmp_path)


def test_loaded_ldm_checks_its_inputs():
    model = _ldm("seccond")
    x = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="n_bars is required"):
        model.predict_noise(x, 3, sections=["A-4"])
    with pytest.raises(ValueError, match="sections are required"):
        model.predict_noise(x, 3, n_bars=[4])
    with pytest.raises(ValueError, match=r"t must be in 0..999"):
        model.predict_noise(x, 1000, n_bars=[4], sections=["A-4"])
    with pytest.raises(ValueError, match=r"n_bars must be in 1..128"):
        model.predict_noise(x, 3, n_bars=[0], sections=["A-4"])
    with pytest.raises(ValueError, match="one plan string per row"):
        model.predict_noise(x, 3, n_bars=[4], sections="A-4")
    with pytest.raises(sections.SectionPlanError):
        model.predict_noise(x, 3, n_bars=[4], sections=["Q-4"])
    with pytest.raises(ValueError, match=r"x must be \[batch, length, 8\]"):
        model.predict_noise(x[0], 3, n_bars=[4], sections=["A-4"])
    with pytest.raises(ValueError, match="must be None"):
        _ldm("uncond").predict_noise(x, 3, n_bars=[4])
    ids = model.section_ids(["A-4 B-2"])
    eps = model.predict_noise(x, 3, n_bars=[4], sections=ids)
    np.testing.assert_array_equal(eps, model.predict_noise(x, 3, n_bars=4, sections=["A-4 B-2"]))


# --- our workdirs ------------------------------------------------------------------------------


def test_workdirs_hold_the_params_and_the_section_order(tmp_path):
    vae_model = _vae()
    workdir = api.save_workdir(vae_model, tmp_path / "vae")
    _assert_same_params(vae_model.params, checkpointing.load_params(workdir))
    loaded = api.load_workdir(workdir)
    assert isinstance(loaded, api.LoadedPhraseVAE) and loaded.config == TINY_VAE
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae.PhraseVAEConfig(**config["model"]) == TINY_VAE
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        api.save_workdir(vae_model, workdir)
    api.save_workdir(vae_model, workdir, overwrite=True)

    ldm_model = _ldm("seccond", SEED0_VOCAB)
    workdir = api.save_workdir(ldm_model, tmp_path / "ldm", vae_workdir="/runs/vae")
    config = json.loads((tmp_path / "ldm" / "config.json").read_text())
    assert ldm.PhraseLDMConfig(**config["model"]) == ldm_model.config
    assert config["vae"]["workdir"] == "/runs/vae"
    loaded = api.load_workdir(workdir)
    assert isinstance(loaded, api.LoadedPhraseLDM) and loaded.section_vocab == SEED0_VOCAB
    _assert_same_params(ldm_model.params, loaded.params)
    (tmp_path / "ldm" / "config.json").write_text(json.dumps({"model": {"layers": 3}}))
    with pytest.raises(ValueError, match="no PhraseVAE .* or PhraseLDM"):
        api.load_workdir(workdir)


def test_ckpt_without_torch_says_what_is_needed(tmp_path, monkeypatch):
    from phraseldm_jax.convert import lightning

    path = tmp_path / "stage3.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.")  # any file: torch is needed before it is read
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    with pytest.raises(lightning.TorchRequiredError) as info:
        api.import_phrase_vae(path)
    message = str(info.value)
    assert "stage3.ckpt" in message and "phraseldm-jax[torch]" in message
    assert "weights_only=False" in message and "trust_pickle" in message


def test_predict_noise_runs_the_dit_in_bfloat16_unless_told_float32():
    model = _ldm("seccond")
    x = np.random.default_rng(1).normal(size=(2, 12, 8)).astype(np.float32)
    kwargs = dict(n_bars=[20, 42], sections=["i-8 A-8 B-4", "x-9 X-1 A-32"])
    default = model.predict_noise(x, [5, 700], **kwargs)
    f32 = model.predict_noise(x, [5, 700], **kwargs, dtype="float32")
    bf16 = model.predict_noise(x, [5, 700], **kwargs, dtype="bfloat16")
    np.testing.assert_array_equal(default, bf16)
    assert default.dtype == np.float32 and not np.array_equal(default, f32)
    assert np.abs(default - f32).max() <= 0.05 * np.abs(f32).max()
    with pytest.raises(ValueError, match="dtype"):
        model.predict_noise(x, [5, 700], **kwargs, dtype="float16")


def test_greedy_decode_keeps_float32_and_its_buffers_between_calls():
    model = _vae()
    latents = np.random.default_rng(2).normal(size=(5, model.config.latent_dim))
    first = model.greedy_decode(latents, max_length=6)
    np.testing.assert_array_equal(first, model.greedy_decode(latents, max_length=6))
    np.testing.assert_array_equal(
        first, model.greedy_decode(latents, max_length=6, dtype="float32")
    )
    assert model.greedy_decode(latents, max_length=6, dtype="bfloat16").shape == first.shape

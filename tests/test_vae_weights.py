"""PhraseVAE weight mapping without torch: keys, aliases, round trips, errors, config inference."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from phraseldm_jax import t5, vae
from phraseldm_jax.convert import vae_weights
from phraseldm_jax.errors import CheckpointMismatchError

T5_TINY = t5.T5Config(d_model=16, d_ff=24, d_kv=6, num_heads=2, num_layers=2, num_decoder_layers=3)
VAE = vae.PhraseVAEConfig(t5=T5_TINY, head="vae", n_query_tokens=4, latent_dim=8)
ORIGINAL_CONFIG = {
    "tokenizer_repo_id": "LongshenOu/phrase-vae-tokenizer",
    "t5_config": {
        "d_model": 16,
        "d_ff": 24,
        "num_layers": 2,
        "num_decoder_layers": 3,
        "num_heads": 2,
        "d_kv": 6,
        "vocab_size": 1000,
        "decoder_start_token_id": 1,
    },
    "compress_style": "first_n_tokens",
    "n_compress_tokens": 4,
    "bottleneck_dim": 8,
    "vocab_size": 1000,
}


@functools.cache
def _params():
    params = vae.init_params(jax.random.key(0, impl="unsafe_rbg"), VAE)  # compiles fast
    return jax.tree.map(np.asarray, params)


def _state_dict(**kwargs):
    return vae_weights.vae_state_dict_from_params(_params(), VAE, **kwargs)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_state_dict_has_the_original_keys_and_pytorch_layouts():
    state_dict = _state_dict()
    # 4 tied aliases; encoder 8 per block + bias + final norm; decoder 13 per block + 2; head 6.
    assert len(state_dict) == 4 + (8 * 2 + 2) + (13 * 3 + 2) + 6
    params = _params()
    np.testing.assert_array_equal(state_dict["model.proj.weight"], params["proj"]["kernel"].T)
    q = params["t5"]["decoder"]["blocks_2"]["cross_attention"]["q"]["kernel"]
    np.testing.assert_array_equal(
        state_dict["model.t5.decoder.block.2.layer.1.EncDecAttention.q.weight"], q.T
    )
    assert state_dict["model.t5.decoder.block.2.layer.2.DenseReluDense.wi.weight"].shape == (24, 16)
    assert state_dict["model.t5.encoder.block.1.layer.1.layer_norm.weight"].shape == (16,)
    bias = "model.t5.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert state_dict[bias].shape == (32, 2)
    assert not any("block.1.layer.0.SelfAttention.relative_attention_bias" in k for k in state_dict)
    for alias in vae_weights.TIED_EMBEDDING_KEYS:
        np.testing.assert_array_equal(
            state_dict["model." + alias], params["t5"]["shared"]["embedding"]
        )
    assert all(v.dtype == np.float32 for v in state_dict.values())


def test_round_trip_is_exact():
    params = vae_weights.vae_params_from_state_dict(_state_dict(), VAE)
    _assert_trees_equal(params, _params())


@pytest.mark.parametrize("alias", vae_weights.TIED_EMBEDDING_KEYS)
def test_any_single_tied_alias_is_enough(alias):
    state_dict = _state_dict(tied_embedding_keys=[alias])
    assert (
        sum(
            k.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight"))
            for k in state_dict
        )
        == 1
    )
    _assert_trees_equal(vae_weights.vae_params_from_state_dict(state_dict, VAE), _params())


def test_disagreeing_tied_aliases_are_rejected():
    state_dict = _state_dict()
    state_dict["model.t5.lm_head.weight"] = state_dict["model.t5.lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        vae_weights.vae_params_from_state_dict(state_dict, VAE)


def test_every_problem_is_listed_at_once():
    state_dict = _state_dict()
    del state_dict["model.t5.encoder.block.1.layer.0.SelfAttention.k.weight"]
    for alias in vae_weights.TIED_EMBEDDING_KEYS:
        del state_dict["model." + alias]
    state_dict["model.t5.encoder.block.2.layer.0.layer_norm.weight"] = np.ones(16, np.float32)
    state_dict["other.weight"] = np.ones(3, np.float32)
    state_dict["model.post_proj.bias"] = np.ones(7, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        vae_weights.vae_params_from_state_dict(state_dict, VAE)
    error = info.value
    assert error.missing == [
        "model.t5.encoder.block.1.layer.0.SelfAttention.k.weight",
        "model.t5.shared.weight (or another tied alias)",
    ]
    assert error.unexpected == [
        "model.t5.encoder.block.2.layer.0.layer_norm.weight",
        "other.weight",
    ]
    assert error.shape_mismatches == [("model.post_proj.bias", (64,), (7,))]
    assert "missing keys (2)" in str(error) and "shape of model.post_proj.bias" in str(error)


def test_prefix_and_ignored_keys():
    state_dict = {k.removeprefix("model."): v for k, v in _state_dict().items()}
    state_dict["vq.embedding.weight"] = np.zeros((512, 512), np.float32)  # stage 1-2 leftovers
    state_dict["pre_vq_proj.weight"] = np.zeros((512, 512), np.float32)
    params = vae_weights.vae_params_from_state_dict(state_dict, VAE, prefix="")
    _assert_trees_equal(params, _params())
    with pytest.raises(CheckpointMismatchError, match="vq.embedding.weight"):
        vae_weights.vae_params_from_state_dict(state_dict, VAE, prefix="", ignored_prefixes=())


def test_backbone_only_heads():
    query = dataclasses.replace(VAE, head="query")
    backbone = {"t5": _params()["t5"]}
    state_dict = vae_weights.vae_state_dict_from_params(backbone, query)
    assert not any(
        k.startswith(("model.proj", "model.post_proj", "model.layer_norm")) for k in state_dict
    )
    _assert_trees_equal(vae_weights.vae_params_from_state_dict(state_dict, query), backbone)
    with pytest.raises(CheckpointMismatchError) as info:  # a stage-3 checkpoint into stage 2
        vae_weights.vae_params_from_state_dict(_state_dict(), query)
    assert "model.proj.weight" in info.value.unexpected


def test_params_that_do_not_fit_the_config_are_rejected():
    params = jax.tree.map(lambda x: x, _params())
    del params["post_proj"]
    params["t5"]["encoder"]["final_layer_norm"]["scale"] = np.ones(5, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        vae_weights.vae_state_dict_from_params(params, VAE)
    assert info.value.missing == ["post_proj/bias", "post_proj/kernel"]
    assert info.value.shape_mismatches == [("t5/encoder/final_layer_norm/scale", (16,), (5,))]


def test_infer_config_from_shapes_and_config_json():
    state_dict = _state_dict(tied_embedding_keys=["t5.decoder.embed_tokens.weight"])
    config = vae_weights.infer_vae_config(state_dict, ORIGINAL_CONFIG)
    assert config == VAE
    assert vae_weights.infer_vae_config(state_dict) == VAE  # shapes alone suffice for vae
    bf16 = vae_weights.infer_vae_config(state_dict, ORIGINAL_CONFIG, dtype="bfloat16")
    assert bf16.t5.dtype == "bfloat16"
    t5_only = {k: v for k, v in state_dict.items() if k.startswith("model.t5.")}
    stage1 = vae_weights.infer_vae_config(
        t5_only, {**ORIGINAL_CONFIG, "compress_style": "full_sequence"}
    )
    assert stage1.head == "full_sequence" and stage1.t5 == T5_TINY
    assert vae_weights.infer_vae_config(t5_only, ORIGINAL_CONFIG).head == "query"
    custom = {**ORIGINAL_CONFIG, "t5_config": {**ORIGINAL_CONFIG["t5_config"], "dropout_rate": 0.2}}
    assert vae_weights.infer_vae_config(state_dict, custom).t5.dropout_rate == 0.2


def test_infer_config_reports_conflicts_and_missing_tensors():
    state_dict = _state_dict()
    wrong = {**ORIGINAL_CONFIG, "t5_config": {**ORIGINAL_CONFIG["t5_config"], "num_heads": 4}}
    with pytest.raises(ValueError, match="t5_config.num_heads=4 but the tensors say 2"):
        vae_weights.infer_vae_config(state_dict, wrong)
    with pytest.raises(ValueError, match="bottleneck_dim=64 but the tensors say 8"):
        vae_weights.infer_vae_config(state_dict, {**ORIGINAL_CONFIG, "bottleneck_dim": 64})
    gated = {**ORIGINAL_CONFIG, "t5_config": {"feed_forward_proj": "gated-gelu"}}
    with pytest.raises(ValueError, match="gated-gelu"):
        vae_weights.infer_vae_config(state_dict, gated)
    del state_dict["model.t5.encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    with pytest.raises(CheckpointMismatchError, match="DenseReluDense.wi.weight"):
        vae_weights.infer_vae_config(state_dict, ORIGINAL_CONFIG)

"""PhraseLDM's conditioning API, freezing rule, and the checkpoint converter (round trips,
mismatch reports, config.json) without torch."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import ldm, optim
from phraseldm_jax.convert import ldm_weights
from phraseldm_jax.dit import DiTConfig
from phraseldm_jax.errors import CheckpointMismatchError

TINY_DIT = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 8,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_attention_heads": 2,
    "cross_attention_dim": 16,
    "time_proj_dim": 16,
    "global_states_input_dim": 16,
    "cross_attention_input_dim": 16,
}


def _config(length_control=True, sec_control=True, **kwargs):
    return ldm.PhraseLDMConfig(
        dit=TINY_DIT, length_control=length_control, sec_control=sec_control, **kwargs
    )


@functools.cache
def _params(config):
    return ldm.init_params(jax.random.key(0), config)


def _sections(batch):
    ids = np.zeros((batch, 30), np.int32)
    ids[:, :3] = [[2, 5, 2]] * batch
    return ids, ids.copy()


def test_config_accepts_a_mapping_and_validates():
    config = _config()
    assert isinstance(config.dit, DiTConfig) and config.dit.num_layers == 1
    import ml_collections

    from_config_dict = ldm.PhraseLDMConfig(dit=ml_collections.ConfigDict(TINY_DIT))
    assert from_config_dict.dit == config.dit
    with pytest.raises(TypeError, match="must be a DiTConfig or a mapping"):
        ldm.PhraseLDMConfig(dit=3)
    with pytest.raises(ValueError, match="cross_bias_mode"):
        _config(cross_bias_mode="add")


def test_diffusion_steps_must_match_the_schedule():
    with pytest.raises(ValueError, match="diffusion_steps=500 differs"):
        _config(diffusion_steps=500)


def test_three_variants_predict_noise_and_check_their_conditions():
    x = jnp.ones((2, 12, 8))
    t = jnp.array([5, 900])
    n_bars = jnp.array([64, 12])
    cases = {  # (length_control, sec_control): kwargs
        (False, False): {},
        (True, False): {"n_bars": n_bars},
        (True, True): {"n_bars": n_bars, "sections": _sections(2)},
    }
    for (length_control, sec_control), kwargs in cases.items():
        config = _config(length_control, sec_control)
        model = ldm.PhraseLDM(config)
        apply = jax.jit(lambda p, kw, model=model: model.apply({"params": p}, x, t, **kw))
        out = apply(_params(config), kwargs)
        assert out.shape == (2, 12, 8) and out.dtype == jnp.float32
    uncond = ldm.PhraseLDM(_config(False, False))
    with pytest.raises(ValueError, match="n_bars must be given exactly when"):
        uncond.apply({"params": _params(_config(False, False))}, x, t, n_bars=n_bars)
    full = ldm.PhraseLDM(_config())
    with pytest.raises(ValueError, match="n_bars must be given exactly when"):
        full.apply({"params": _params(_config())}, x, t, sections=_sections(2))
    with pytest.raises(ValueError, match="sections must be given exactly when"):
        full.apply({"params": _params(_config())}, x, t, n_bars=n_bars)


def test_conditions_change_the_prediction():
    config = _config()
    model, params = ldm.PhraseLDM(config), _params(config)
    apply = jax.jit(lambda p, n, s: model.apply({"params": p}, jnp.ones((1, 12, 8)), 3, n, s))
    base = apply(params, jnp.array([64]), _sections(1))
    other_length = apply(params, jnp.array([75]), _sections(1))
    other_sections = apply(params, jnp.array([64]), (np.roll(_sections(1)[0], 1), _sections(1)[1]))
    assert np.abs(np.asarray(base - other_length)).max() > 1e-4
    assert np.abs(np.asarray(base - other_sections)).max() > 1e-4


def test_inference_params_cast_dit_kernels_once_with_the_same_output():
    config = ldm.PhraseLDMConfig(
        dit={**TINY_DIT, "dtype": "bfloat16"}, length_control=True, sec_control=True
    )
    params = _params(config)
    cast = ldm.inference_params(params, config)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(cast)
    }
    kernels = [name for name in flat if name.startswith("dit/") and name.endswith("/kernel")]
    assert kernels and all(flat[name].dtype == jnp.bfloat16 for name in kernels)
    others = [name for name in flat if name not in kernels]
    assert any(n.startswith(("length_encoder", "sec_encoder")) for n in others)
    assert all(flat[name].dtype == jnp.float32 for name in others)
    model = ldm.PhraseLDM(config)
    apply = jax.jit(
        lambda p: model.apply(
            {"params": p},
            jnp.ones((2, 12, 8)),
            jnp.array([5, 900]),
            jnp.array([64, 12]),
            _sections(2),
        )
    )
    np.testing.assert_array_equal(np.asarray(apply(cast)), np.asarray(apply(params)))
    f32 = _config()
    assert ldm.inference_params(_params(f32), f32) == dict(_params(f32))


def _frozen_labels(params, config):
    """The optimiser's label of every weight under ``ldm.frozen_patterns(config)``."""
    return optim.freeze_labels(ldm.frozen_patterns(config))(params)


def test_frozen_patterns_and_frozen_encoders():
    config = _config(train_encoders=False)
    params = _params(_config())
    mask = _frozen_labels(params, config)
    assert mask["dit"]["time_proj"]["weight"] == "frozen"
    assert mask["dit"]["proj_in"]["kernel"] == "trainable"
    assert mask["length_encoder"]["embedding"] == "frozen"
    assert all(m == "frozen" for m in jax.tree_util.tree_leaves(mask["sec_encoder"]))
    trained = _frozen_labels(params, _config())
    assert trained["length_encoder"]["embedding"] == "trainable"
    assert trained["dit"]["time_proj"]["weight"] == "frozen"

    def loss(p, cfg):
        out = ldm.PhraseLDM(cfg).apply(
            {"params": p}, jnp.ones((1, 12, 8)), 3, jnp.array([64]), _sections(1)
        )
        return jnp.mean(out**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    frozen_grads = grad(params, config)
    assert np.all(np.asarray(frozen_grads["length_encoder"]["embedding"]) == 0)
    live_grads = grad(params, _config())
    assert np.abs(np.asarray(live_grads["length_encoder"]["embedding"])).max() > 0
    assert np.abs(np.asarray(live_grads["sec_encoder"]["type_embed"])).max() > 0


@pytest.mark.parametrize(
    "length_control, sec_control", [(False, False), (True, False), (True, True)]
)
def test_params_state_dict_round_trip_is_exact(length_control, sec_control):
    config = _config(length_control, sec_control)
    params = _params(config)
    state_dict = ldm_weights.ldm_state_dict_from_params(params, config)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state_dict.values())
    assert ("length_encoder.length_embedding.weight" in state_dict) == length_control
    assert (
        "sec_encoder.sec_encoder.layers.2.self_attn.in_proj_weight" in state_dict
    ) == sec_control
    assert state_dict["ldm.preprocess_conv.weight"].shape == (8, 8, 1)
    assert state_dict["ldm.transformer_blocks.0.attn2.to_k.weight"].shape == (16, 16)
    back = ldm_weights.ldm_params_from_state_dict(state_dict, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(params))
    again = ldm_weights.ldm_state_dict_from_params(back, config)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(again[key], value)


def test_mismatches_are_all_listed():
    config = _config()
    state_dict = ldm_weights.ldm_state_dict_from_params(_params(config), config)
    del state_dict["ldm.proj_in.weight"]
    del state_dict["sec_encoder.len_embed.weight"]
    state_dict["ldm.extra.weight"] = np.zeros(3, np.float32)
    state_dict["length_encoder.length_embedding.weight"] = np.zeros((100, 16), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        ldm_weights.ldm_params_from_state_dict(state_dict, config)
    err = info.value
    assert err.missing == ["ldm.proj_in.weight", "sec_encoder.len_embed.weight"]
    assert err.unexpected == ["ldm.extra.weight"]
    assert err.shape_mismatches == [
        ("length_encoder.length_embedding.weight", (128, 16), (100, 16))
    ]
    assert "ldm.proj_in.weight" in str(err) and "expected (128, 16), got (100, 16)" in str(err)


def test_param_tree_mismatch_is_reported_with_paths():
    config = _config(True, False)
    params = jax.device_get(_params(config))
    params = {**params, "dit": {**params["dit"], "proj_in": {"kernel": np.zeros((8, 3))}}}
    with pytest.raises(CheckpointMismatchError, match="shape of dit/proj_in/kernel"):
        ldm_weights.ldm_state_dict_from_params(params, config)
    with pytest.raises(CheckpointMismatchError, match="missing keys.*sec_encoder/type_embed"):
        ldm_weights.ldm_state_dict_from_params(params, _config(True, True))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*length_encoder/embedding"):
        ldm_weights.ldm_state_dict_from_params(params, _config(False, False))


def test_config_json_inference():
    config = ldm_weights.ldm_config_from_hf_config({"sec_control": True, "length_control": True})
    assert config.dit.cross_attention_dim == 256 and config.dit.cross_attention_input_dim == 256
    assert config.cross_bias_mode == "additive" and not config.train_encoders
    assert config.scale_factor == ldm.REFERENCE_SCALE_FACTOR
    uncond = ldm_weights.ldm_config_from_hf_config({})
    assert uncond.dit == DiTConfig() and not uncond.length_control and not uncond.sec_control
    ours = _config(length_control=True, sec_control=False, scale_factor=0.5, clip_range=4.0)
    hf = json.loads(json.dumps(ldm_weights.hf_config_from_ldm_config(ours)))
    back = ldm_weights.ldm_config_from_hf_config(hf, cross_bias_mode="mask", train_encoders=True)
    assert back == ours
    with pytest.raises(ValueError, match="unknown keys"):
        ldm_weights.ldm_config_from_hf_config({"length_condition": True})


def test_lightning_keys_are_renamed():
    renamed = ldm_weights.hf_state_dict_from_lightning(
        {
            "model.proj_in.weight": 1,
            "length_embedding.weight": 2,
            "sec_encoder.type_embed.weight": 3,
            "inst_conf_encoder.inst_embed.weight": 4,
        }
    )
    assert renamed == {
        "ldm.proj_in.weight": 1,
        "length_encoder.length_embedding.weight": 2,
        "sec_encoder.type_embed.weight": 3,
    }


def test_hf_folder_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="checkpoint folders need the torch extra")
    config = dataclasses.replace(_config(), cross_bias_mode="additive", train_encoders=False)
    params = jax.device_get(_params(_config()))  # same tree: the modes do not change params
    ldm_weights.save_hf_checkpoint(tmp_path / "ckpt", params, config)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded_config, loaded = ldm_weights.load_hf_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ldm_weights.load_hf_checkpoint(tmp_path / "missing")


def test_batch_sharded_over_devices_matches_one_device(monkeypatch):
    """The CPU attention scans over heads, so a batch split over devices stays split."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.fail("conftest should provide 8 host CPU devices")
    from phraseldm_jax import dit

    monkeypatch.setattr(dit, "_CPU_LOGITS_PER_CHUNK", 1)  # force the scanned path
    config = _config(True, False)
    model, params = ldm.PhraseLDM(config), _params(config)
    batch = len(devices)
    x = np.random.RandomState(0).randn(batch, 12, 8).astype(np.float32)
    t = np.arange(batch) * 100
    n_bars = np.full(batch, 64)
    apply = jax.jit(lambda p, x, t, n: model.apply({"params": p}, x, t, n))
    expected = np.asarray(apply(params, x, t, n_bars))
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = apply(params, *(jax.device_put(a, split) for a in (x, t, n_bars)))
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)

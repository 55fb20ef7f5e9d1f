"""Parity with the PyTorch reference: diffusers' StableAudioDiTModel plus a torch length
embedding and a torch nn.TransformerEncoder section encoder (FACTS section 6), run the way
the original PhraseLDM wrapper runs them (SPEC section 5), with random weights mapped by
``convert/ldm_weights.py``. Also: the original's additive section "mask", and state-dict round
trips."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the torch extra")
diffusers = pytest.importorskip("diffusers", reason="parity tests need the torch extra")

import torch_reference as ref  # noqa: E402

from phraseldm_jax import conditioning, ldm, trees  # noqa: E402
from phraseldm_jax.convert import ldm_weights  # noqa: E402
from phraseldm_jax.dit import DiTConfig  # noqa: E402

PAPER, PAPER_SECTIONS, SMALL = ref.LDM_PAPER, ref.LDM_PAPER_SECTIONS, ref.LDM_SMALL
VARIANTS = ref.LDM_VARIANTS


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with ref.one_torch_thread():
        yield


@functools.cache
def _reference(model_config_items, length_control, sec_control, seed=0):
    """The torch reference with random weights, its state dict, our config + converted params."""
    model_config = dict(model_config_items)
    torch_model = ref.build_ldm(model_config, length_control, sec_control, seed)
    state_dict = dict(torch_model.state_dict())
    config = ldm.PhraseLDMConfig(
        dit=DiTConfig(**model_config),
        length_control=length_control,
        sec_control=sec_control,
        cross_bias_mode="additive",
    )
    params = ldm_weights.ldm_params_from_state_dict(state_dict, config)
    return torch_model, state_dict, config, params


def _inputs(config, batch, length, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, length, config.dit.in_channels).astype(np.float32)
    t = np.array([999, 0, 417, 58][:batch])
    n_bars = np.array([64, 128, 1, 37][:batch])
    return x, t, n_bars, ref.ldm_section_inputs(batch)


def _torch_predict(torch_model, x, t, n_bars, sections, bool_mask=False):
    """The original wrapper's forward (conditions, rotary over L + 1 positions)."""
    return torch_model.predict_noise(x, t, n_bars, sections, bool_mask=bool_mask)


def _jax_predict(config, params, x, t, n_bars, sections):
    model = ldm.PhraseLDM(config)
    kwargs = {}
    if config.length_control:
        kwargs["n_bars"] = n_bars.astype(np.int32)
    if config.sec_control:
        kwargs["sections"] = tuple(s.astype(np.int32) for s in sections)
    apply = jax.jit(lambda p, x, t, kw: model.apply({"params": p}, x, t, **kw))
    return np.asarray(apply(params, x, t.astype(np.int32), kwargs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paper_size_matches_torch(variant):
    length_control, sec_control = VARIANTS[variant]
    model_config = PAPER_SECTIONS if sec_control else PAPER
    torch_model, _, config, params = _reference(
        tuple(model_config.items()), length_control, sec_control
    )
    inputs = _inputs(config, batch=2, length=512)
    expected = _torch_predict(torch_model, *inputs)
    got = _jax_predict(config, params, *inputs)
    diff = np.abs(got - expected).max()
    print(
        f"paper-size {variant}: max |jax - torch| = {diff:.3g} (output max {np.abs(expected).max():.3g})"
    )
    assert got.shape == (2, 512, 64)
    assert diff <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_config_matches_torch(variant):
    length_control, sec_control = VARIANTS[variant]
    torch_model, _, config, params = _reference(tuple(SMALL.items()), length_control, sec_control)
    inputs = _inputs(config, batch=4, length=19, seed=1)
    np.testing.assert_allclose(
        _jax_predict(config, params, *inputs), _torch_predict(torch_model, *inputs), atol=1e-5
    )


def test_section_encoder_matches_torch():
    torch_model, _, config, params = _reference(tuple(SMALL.items()), True, True)
    _, _, _, sections = _inputs(config, batch=4, length=8)
    with torch.no_grad():
        expected_states, expected_mask = (
            v.numpy() for v in torch_model.sec_encoder(*(torch.tensor(s) for s in sections))
        )
    encoder = conditioning.SectionEncoder(features=SMALL["cross_attention_input_dim"])
    states, mask = encoder.apply(
        {"params": params["sec_encoder"]}, *(s.astype(np.int32) for s in sections)
    )
    np.testing.assert_allclose(states, expected_states, atol=2e-5)
    np.testing.assert_array_equal(mask, expected_mask)


def test_additive_mode_is_the_original_float_mask_and_mask_mode_is_a_real_mask():
    """Torch adds the float section mask to the logits (+1 for real sections, pads kept);
    our "additive" mode reproduces that, our "mask" mode equals torch given a boolean mask."""
    torch_model, _, config, params = _reference(tuple(SMALL.items()), True, True)
    inputs = _inputs(config, batch=4, length=11, seed=2)
    float_mask = _torch_predict(torch_model, *inputs)
    bool_mask = _torch_predict(torch_model, *inputs, bool_mask=True)
    assert np.abs(float_mask - bool_mask).max() > 1e-3  # the two torch behaviours differ
    additive = _jax_predict(config, params, *inputs)
    masked_config = dataclasses.replace(config, cross_bias_mode="mask")
    masked = _jax_predict(masked_config, params, *inputs)
    np.testing.assert_allclose(additive, float_mask, atol=1e-5)
    np.testing.assert_allclose(masked, bool_mask, atol=1e-5)
    assert np.abs(masked - additive).max() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_is_exact(variant):
    length_control, sec_control = VARIANTS[variant]
    model_config = PAPER_SECTIONS if sec_control else PAPER
    _, state_dict, config, params = _reference(
        tuple(model_config.items()), length_control, sec_control
    )
    back = ldm_weights.ldm_state_dict_from_params(params, config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == np.float32 and isinstance(back[key], np.ndarray)
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    again = ldm_weights.ldm_params_from_state_dict(back, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_converted_tree_matches_the_flax_model():
    for length_control, sec_control in VARIANTS.values():
        model_config = PAPER_SECTIONS if sec_control else PAPER
        _, _, config, params = _reference(tuple(model_config.items()), length_control, sec_control)
        fresh = jax.eval_shape(functools.partial(ldm.init_params, config=config), jax.random.key(0))
        shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
        assert jax.tree_util.tree_map(lambda a: a.shape, fresh) == shapes


def test_paper_parameter_counts():
    """Parameter counts equal torch's (about 32M with sections; the paper's 45M adds the VAE)."""
    counts = {}
    for variant, (length_control, sec_control) in VARIANTS.items():
        model_config = PAPER_SECTIONS if sec_control else PAPER
        torch_model, _, _, params = _reference(
            tuple(model_config.items()), length_control, sec_control
        )
        torch_count = sum(p.numel() for p in torch_model.state_dict().values())
        counts[variant] = trees.param_count(params)
        assert counts[variant] == torch_count
    assert counts["lencond"] - counts["uncond"] == 128 * 128

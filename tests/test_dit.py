"""Unit tests of the DiT pieces: Fourier features, partial rotary, grouped attention, bias
modes, the exact skips of zero conditions, dtypes and the config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import dit

TINY = dit.DiTConfig(
    sample_size=16,
    in_channels=8,
    out_channels=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    num_key_value_attention_heads=2,
    cross_attention_dim=16,
    time_proj_dim=16,
    global_states_input_dim=12,
    cross_attention_input_dim=20,
)


@functools.cache
def _params(config, length=10, seed=0):
    """Parameters for ``config`` (any bias mode), every leaf perturbed so that LayerNorm and
    bias mapping mistakes cannot hide behind their (1, 0) initial values."""
    model = dit.DiT(config)
    x = jnp.zeros((2, length, config.in_channels))
    params = jax.jit(model.init)(jax.random.key(seed), x, jnp.zeros((2,), jnp.int32))["params"]
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda p: p + 0.05 * rng.randn(*p.shape).astype(np.float32), params
    )


@functools.cache
def _apply(model):
    """Jitted ``model.apply`` (one compile per model and argument structure)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def _init(config, cross_bias_mode="mask"):
    return dit.DiT(config, cross_bias_mode=cross_bias_mode), _params(config)


def _inputs(config, batch=2, length=10, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, length, config.in_channels).astype(np.float32)
    t = rng.randint(0, 1000, size=(batch,))
    g = rng.randn(batch, 1, config.global_states_input_dim).astype(np.float32)
    ctx = rng.randn(batch, 6, config.cross_attention_input_dim).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]][:batch], np.float32)
    return x, t, g, ctx, mask


def test_fourier_features_are_cos_first():
    w = jnp.array([0.5, -1.25, 2.0])
    t = jnp.array([0, 3, 999])
    feats = np.asarray(dit.fourier_time_features(t, w))
    assert feats.shape == (3, 6)
    np.testing.assert_array_equal(feats[0], [1, 1, 1, 0, 0, 0])  # t = 0: cos 1, sin 0
    angle = 2 * np.pi * np.array([3.0, 999.0])[:, None] * np.asarray(w)[None]
    np.testing.assert_allclose(feats[1:, :3], np.cos(angle), atol=2e-3)
    np.testing.assert_allclose(feats[1:, 3:], np.sin(angle), atol=2e-3)


def test_rotary_touches_only_the_first_half_of_each_head():
    head_dim, rot_dim, length = 32, 16, 7
    cos, sin = dit.rotary_tables(length, rot_dim)
    x = jax.random.normal(jax.random.key(0), (2, 3, length, head_dim))  # [batch, heads, len, d]
    y = np.asarray(dit.apply_partial_rotary(x, cos, sin))
    x = np.asarray(x)
    np.testing.assert_array_equal(y[..., rot_dim:], x[..., rot_dim:])
    np.testing.assert_allclose(y[:, :, 0], x[:, :, 0], atol=1e-6)  # position 0: no rotation
    # Non-interleaved pairs: channel i and i + rot_dim/2 form one complex number.
    half = rot_dim // 2
    inv_freq = 1.0 / 10000 ** (np.arange(0, rot_dim, 2) / rot_dim)
    pos = np.arange(length)[None, None, :, None]
    z = (x[..., :half] + 1j * x[..., half:rot_dim]) * np.exp(1j * pos * inv_freq)
    np.testing.assert_allclose(y[..., :half], z.real, atol=1e-4)
    np.testing.assert_allclose(y[..., half:rot_dim], z.imag, atol=1e-4)
    assert not np.allclose(y[:, :, 1:, :rot_dim], x[:, :, 1:, :rot_dim], atol=1e-3)


def _reference_attention(q, k, v):
    """Plain numpy softmax attention over [..., length, head_dim]."""
    logits = np.einsum("...th,...sh->...ts", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("...ts,...sh->...th", probs / probs.sum(-1, keepdims=True), v)


def test_self_attention_in_cache_sized_groups_matches_one_pass(monkeypatch):
    rng = np.random.RandomState(3)
    q, k, v = (rng.randn(3, 5, 11, 8).astype(np.float32) for _ in range(3))  # [b, heads, t, d]

    def self_attention(q, k, v):  # dit.self_attention takes and gives [batch, t, heads, d]
        out = dit.self_attention(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)))
        return jnp.swapaxes(out, 1, 2)

    expected = _reference_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(self_attention(q, k, v)), expected, atol=1e-5)
    # 2 heads per step: 5 heads = 2 steps and a remainder.
    monkeypatch.setattr(dit, "_CPU_LOGITS_PER_CHUNK", 2 * 3 * 11 * 11)
    grouped = jax.jit(self_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(grouped), expected, atol=1e-5)
    grads = jax.grad(lambda q: jnp.sum(self_attention(q, k, v) ** 2))(q)
    monkeypatch.setattr(dit, "_CPU_LOGITS_PER_CHUNK", 1 << 20)
    one_pass = jax.grad(lambda q: jnp.sum(self_attention(q, k, v) ** 2))(q)
    np.testing.assert_allclose(np.asarray(grads), np.asarray(one_pass), atol=1e-5)
    # a head's logits (3 x 11 x 11) over 3x the budget: queries in 4 blocks of 3 (one padded)
    monkeypatch.setattr(dit, "_CPU_LOGITS_PER_CHUNK", 3 * 11 * 11 // 4 + 1)
    blocked = jax.jit(self_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(blocked), expected, atol=1e-5)
    blocked_grads = jax.grad(lambda q: jnp.sum(self_attention(q, k, v) ** 2))(q)
    np.testing.assert_allclose(np.asarray(blocked_grads), np.asarray(one_pass), atol=1e-5)


def test_grouped_attention_maps_kv_head_j_to_query_heads_2j_and_2j_plus_1():
    batch, q_len, kv_len, heads, kv_heads, head_dim = 2, 5, 4, 8, 4, 6
    rng = np.random.RandomState(0)
    q = rng.randn(batch, q_len, heads, head_dim).astype(np.float32)
    k = rng.randn(batch, kv_len, kv_heads, head_dim).astype(np.float32)
    # Values constant per kv head (= j) so each output head reveals which kv head it read.
    v = np.broadcast_to(np.arange(kv_heads, dtype=np.float32)[None, None, :, None], k.shape)
    out = np.asarray(dit.attention(q, k, v))
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 0, 1, 1, 2, 2, 3, 3], atol=1e-6)
    # Full check against a plain repeat_interleave implementation.
    v = rng.randn(*k.shape).astype(np.float32)
    k_rep, v_rep = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k_rep) / np.sqrt(head_dim)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh->btnh", probs, v_rep)
    np.testing.assert_allclose(np.asarray(dit.attention(q, k, v)), expected, atol=1e-5)


def test_additive_bias_adds_to_logits_and_mask_excludes_keys():
    rng = np.random.RandomState(1)
    q = rng.randn(2, 3, 2, 4).astype(np.float32)
    k = rng.randn(2, 5, 2, 4).astype(np.float32)
    v = rng.randn(2, 5, 2, 4).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / 2.0 + mask[:, None, None, :]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    additive = np.asarray(dit.attention(q, k, v, key_bias=mask))
    np.testing.assert_allclose(additive, np.einsum("bnts,bsnh->btnh", probs, v), atol=1e-5)
    masked = np.asarray(dit.attention(q, k, v, key_mask=mask > 0))
    v_changed = v.copy()
    v_changed[mask == 0] = 100.0  # masked keys' values must not matter
    np.testing.assert_allclose(
        np.asarray(dit.attention(q, k, v_changed, key_mask=mask > 0)), masked, atol=1e-6
    )
    assert np.abs(masked - additive).max() > 1e-2


def test_forward_shapes_and_exact_skip_of_zero_conditions():
    model, params = _init(TINY)
    x, t, g, ctx, _ = _inputs(TINY)
    apply = _apply(model)
    out = apply(params, x, t, None, None)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # None means zeros through bias-free projections: identical to passing the zeros.
    zeros_g = np.zeros_like(g)
    zeros_ctx = np.zeros((2, 7, TINY.cross_attention_input_dim), np.float32)
    np.testing.assert_allclose(apply(params, x, t, zeros_g, zeros_ctx), out, atol=1e-6)
    # Real conditions change the prediction.
    assert np.abs(apply(params, x, t, g, None) - out).max() > 1e-3
    assert np.abs(apply(params, x, t, None, ctx) - out).max() > 1e-3


def test_bias_modes_differ_only_through_the_mask():
    x, t, g, ctx, mask = _inputs(TINY)
    outs = {}
    for mode in dit.CROSS_BIAS_MODES:
        model, params = _init(TINY, cross_bias_mode=mode)
        outs[mode] = np.asarray(_apply(model)(params, x, t, g, ctx, mask))
        no_mask = np.asarray(_apply(model)(params, x, t, g, ctx, None))
        outs[mode + "_nomask"] = no_mask
    np.testing.assert_allclose(outs["additive_nomask"], outs["mask_nomask"], atol=1e-6)
    assert np.abs(outs["additive"] - outs["mask"]).max() > 1e-3
    # Mask mode ignores what sits in the padded context positions; additive mode does not.
    model, params = _init(TINY, cross_bias_mode="mask")
    ctx_changed = ctx.copy()
    ctx_changed[mask == 0] = 5.0
    changed = np.asarray(_apply(model)(params, x, t, g, ctx_changed, mask))
    np.testing.assert_allclose(changed, outs["mask"], atol=1e-5)


def test_bfloat16_compute_runs_and_returns_float32():
    x, t, g, ctx, mask = _inputs(TINY)
    model32, params = _init(TINY)
    config16 = dit.DiTConfig(**{**TINY.to_model_config(), "dtype": "bfloat16"})
    model16 = dit.DiT(config16)
    out32 = np.asarray(_apply(model32)(params, x, t, g, ctx, mask))
    out16 = _apply(model16)(params, x, t, g, ctx, mask)
    assert out16.dtype == jnp.float32
    out16 = np.asarray(out16)
    assert np.isfinite(out16).all()
    assert np.abs(out16 - out32).max() < 0.05 * np.abs(out32).max()
    fresh = jax.eval_shape(model16.init, jax.random.key(0), x, t)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype("float32")}


def test_gradients_flow_except_into_the_fixed_fourier_frequencies():
    model, params = _init(TINY)
    x, t, g, ctx, mask = _inputs(TINY)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, g, ctx, mask) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert np.all(np.asarray(grads["time_proj"]["weight"]) == 0)
    assert np.abs(np.asarray(grads["transformer_blocks_0"]["attn1"]["qkv"]["kernel"])).max() > 0
    assert np.abs(np.asarray(grads["transformer_blocks_1"]["attn2"]["query"]["kernel"])).max() > 0
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(grads))


def test_config_from_model_config_and_validation():
    model_config = {**TINY.to_model_config(), "_class_name": "StableAudioDiTModel"}
    config = dit.DiTConfig.from_model_config(model_config, dtype="bfloat16")
    assert config.dtype == "bfloat16" and config.inner_dim == 32
    assert dit.DiTConfig(dtype=jnp.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown DiT arguments"):
        dit.DiTConfig.from_model_config({**model_config, "num_heads": 3})
    with pytest.raises(ValueError, match="multiple of num_key_value_attention_heads"):
        dit.DiTConfig(num_attention_heads=16, num_key_value_attention_heads=6)
    with pytest.raises(ValueError, match="float dtype"):
        dit.DiTConfig(dtype="int32")
    with pytest.raises(ValueError, match="cross_bias_mode"):
        model = dit.DiT(TINY, cross_bias_mode="multiply")
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 8)), jnp.zeros(1, int))

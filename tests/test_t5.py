"""T5 backbone: buckets, norms, attention, masks, dropout, bfloat16 (the cached step:
test_decoding.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import t5

TINY = t5.T5Config(
    d_model=32, d_ff=48, d_kv=12, num_heads=3, num_layers=2, num_decoder_layers=3, vocab_size=64
)


@functools.cache
def _init(config: t5.T5Config = TINY):
    """Random params, initialised once per config (compiling init is the slow part)."""
    ids = jnp.ones((1, 5), jnp.int32)
    key = jax.random.key(0, impl="unsafe_rbg")  # threefry init compiles far slower on CPU
    return jax.jit(t5.T5(config).init)(key, ids, ids, ids)["params"]


def _ids(shape, seed, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# --- relative position buckets -----------------------------------------------------------

# Hand-computed: bidirectional = 16 buckets per direction, 8 exact, then
# 8 + floor(8 * log(d / 8) / log(16)) capped at 15 (+16 for keys after the query);
# causal = 32 buckets, 16 exact, then 16 + floor(16 * log(d / 16) / log(8)) capped at 31,
# keys after the query in bucket 0.
BIDIRECTIONAL = {
    0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -23: 11, -32: 12, -64: 14,
    -90: 14, -91: 15, -127: 15, -128: 15, -1000: 15,
    1: 17, 7: 23, 8: 24, 12: 25, 16: 26, 91: 31, 128: 31, 1000: 31,
}  # fmt: skip
CAUSAL = {
    0: 0, 1: 0, 50: 0, -1: 1, -15: 15, -16: 16, -30: 20, -31: 21, -32: 21, -45: 23, -64: 26,
    -127: 31, -128: 31, -1000: 31,
}  # fmt: skip


@pytest.mark.parametrize(
    "bidirectional, expected", [(True, BIDIRECTIONAL), (False, CAUSAL)], ids=["enc", "dec"]
)
def test_relative_position_bucket_hand_computed(bidirectional, expected):
    offsets = np.array(list(expected))
    got = t5.relative_position_bucket(offsets, bidirectional=bidirectional)
    assert dict(zip(offsets.tolist(), np.asarray(got).tolist())) == expected


def test_relative_position_buckets_are_monotone_and_in_range():
    offsets = np.arange(-400, 401)
    for bidirectional in (True, False):
        buckets = np.asarray(t5.relative_position_bucket(offsets, bidirectional=bidirectional))
        assert buckets.min() == 0 and buckets.max() == 31
        before = buckets[offsets <= 0][::-1]  # distance 0, 1, 2, ... to earlier keys
        assert np.all(np.diff(before) >= 0)
        if bidirectional:
            assert np.all(np.diff(buckets[offsets > 0]) >= 0)
            assert buckets[offsets > 0].min() == 17  # distance 0 stays in bucket 0


def test_relative_position_bias_layout():
    bias_module = t5.RelativePositionBias(TINY, bidirectional=False)
    params = bias_module.init(jax.random.key(0), jnp.arange(3), jnp.arange(4))
    table = np.asarray(params["params"]["embedding"])
    assert table.shape == (32, TINY.num_heads)
    bias = np.asarray(bias_module.apply(params, jnp.arange(3), jnp.arange(4)))
    assert bias.shape == (1, TINY.num_heads, 3, 4)
    # query 2, key 0: offset -2 -> causal bucket 2; query 0, key 3: future -> bucket 0.
    np.testing.assert_array_equal(bias[0, :, 2, 0], table[2])
    np.testing.assert_array_equal(bias[0, :, 0, 3], table[0])


# --- building blocks ----------------------------------------------------------------------


def test_rms_norm_has_no_mean_subtraction_or_bias():
    x = np.random.default_rng(0).normal(3.0, 2.0, (2, 5, 8)).astype(np.float32)
    norm = t5.T5LayerNorm(1e-6)
    params = {"params": {"scale": np.linspace(0.5, 2.0, 8, dtype=np.float32)}}
    got = np.asarray(norm.apply(params, jnp.asarray(x, jnp.bfloat16)))
    assert got.dtype == np.float32
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    expected = params["params"]["scale"] * x16 / np.sqrt(np.mean(x16**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_attention_weights_are_unscaled_masked_float32_softmax():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)  # [batch, heads, q_len, d_kv]
    k = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)
    bias = rng.normal(size=(1, 4, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
    got = np.asarray(t5.attention_weights(q, k, bias, mask))
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) + bias  # no 1/sqrt(d_kv)
    scores = np.where(mask, scores, -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.all(got[0, :, :, 3:] == 0)
    half = t5.attention_weights(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16))
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half).sum(-1), 1.0, rtol=1e-6)


def test_param_tree_matches_hf_structure():
    params = _init()
    assert set(params) == {"shared", "encoder", "decoder"}
    assert params["shared"]["embedding"].shape == (64, 32)
    for stack, layers in (("encoder", 2), ("decoder", 3)):
        names = set(params[stack])
        expected = {f"blocks_{i}" for i in range(layers)}
        assert names == expected | {"relative_position_bias", "final_layer_norm"}
        block = params[stack]["blocks_1"]
        assert block["self_attention"]["q"]["kernel"].shape == (32, 36)  # inner = 3 * 12
        assert block["self_attention"]["o"]["kernel"].shape == (36, 32)
        assert block["mlp"]["wi"]["kernel"].shape == (32, 48)
        assert ("cross_attention" in block) == (stack == "decoder")
        # The bias table exists once per stack (layer 0's), never inside blocks.
        for i in range(layers):
            assert "relative_position_bias" not in params[stack][f"blocks_{i}"]["self_attention"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_logits_use_the_tied_embedding_scaled_by_d_model():
    params = _init()
    states = np.random.default_rng(2).normal(size=(2, 3, 32)).astype(np.float32)
    got = jax.jit(t5.T5(TINY).apply, static_argnames="method")(
        {"params": params}, states, method=t5.T5.logits
    )
    expected = (states * 32**-0.5) @ np.asarray(params["shared"]["embedding"]).T
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# --- masks, causality ------------------------------------------------------------------


def test_encoder_ignores_padded_positions():
    params = _init()
    model = t5.T5(TINY)
    ids = _ids((2, 7), 3)
    mask = jnp.array([[1] * 4 + [0] * 3, [1] * 7])
    changed = ids.at[0, 4:].set(_ids((3,), 4))
    encode = jax.jit(lambda i: model.apply({"params": params}, i, mask, method=t5.T5.encode))
    a, b = np.asarray(encode(ids)), np.asarray(encode(changed))
    np.testing.assert_array_equal(a[0, :4], b[0, :4])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0, 4:], b[0, 4:])


def test_decoder_is_causal_and_memory_mask_hides_memory():
    params = _init()
    model = t5.T5(TINY)
    rng = np.random.default_rng(5)
    memory = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
    memory_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ids = _ids((2, 9), 6)

    @jax.jit
    def decode(i, m):
        return model.apply({"params": params}, i, m, memory_mask, method=t5.T5.decode)

    base = np.asarray(decode(ids, memory))
    later = np.asarray(decode(ids.at[:, 5:].set(_ids((2, 4), 7)), memory))
    np.testing.assert_allclose(base[:, :5], later[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(base[:, 5:], later[:, 5:])
    masked = np.asarray(decode(ids, memory.at[0, 4:].set(100.0)))
    np.testing.assert_array_equal(base[0], masked[0])


def test_dropout_only_when_not_deterministic():
    params = _init()
    ids = _ids((2, 6), 10)

    @functools.partial(jax.jit, static_argnames=("deterministic", "rate"))
    def run(seed, deterministic, rate=TINY.dropout_rate):
        model = t5.T5(dataclasses.replace(TINY, dropout_rate=rate))
        # RngBitGenerator keys: threefry dropout masks take far longer to compile on CPU.
        rngs = {"dropout": jax.random.key(seed, impl="unsafe_rbg")}
        return model.apply({"params": params}, ids, None, ids, deterministic, rngs=rngs)

    np.testing.assert_array_equal(run(0, True), run(1, True))
    assert not np.allclose(run(0, False), run(0, True))
    assert not np.allclose(run(0, False), run(1, False))
    np.testing.assert_allclose(run(0, False, rate=0.0), run(0, True), rtol=1e-6)


# --- mixed precision ---------------------------------------------------------------------


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def test_bfloat16_computes_in_bf16_but_keeps_softmax_norms_logits_float32():
    params = _init()
    half = dataclasses.replace(TINY, dtype="bfloat16")
    ids = _ids((2, 8), 11)
    mask = jnp.ones((2, 8), jnp.int32)

    def forward(config):
        return lambda p: t5.T5(config).apply({"params": p}, ids, mask, ids)

    logits16 = jax.jit(forward(half))(params)
    logits32 = jax.jit(forward(TINY))(params)
    assert logits16.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits16)).all()
    # Same argmax almost everywhere and close values: the bf16 model computes the same thing.
    agreement = np.mean(np.argmax(logits16, -1) == np.argmax(logits32, -1))
    assert agreement > 0.8
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.25)

    eqns = list(_walk(jax.make_jaxpr(forward(half))(params).jaxpr))
    dot_inputs = [v.aval.dtype for e in eqns if e.primitive.name == "dot_general" for v in e.invars]
    assert jnp.bfloat16 in dot_inputs  # the matmuls really run in bf16
    for name in ("exp", "rsqrt", "reduce_max"):  # softmax and RMS norm
        dtypes = {v.aval.dtype for e in eqns if e.primitive.name == name for v in e.outvars}
        assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)


def test_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(TINY, dtype="int8")
    with pytest.raises(ValueError, match="num_heads"):
        dataclasses.replace(TINY, num_heads=0)
    assert t5.PAPER_T5.inner_dim == 384

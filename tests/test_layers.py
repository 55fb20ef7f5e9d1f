"""The shared linear layer and dropout (``phraseldm_jax.layers``), and the per-step key kinds."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import layers, trainer


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_dense_equals_flax_dense_on_any_leading_shape(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ours = layers.Dense(11, use_bias=True, bias_init=nn.initializers.normal(1.0))
    theirs = nn.Dense(11, use_bias=True, bias_init=nn.initializers.normal(1.0))
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(1), x)
    )
    got = ours.apply(params, x)
    assert got.shape == (*shape[:-1], 11) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, theirs.apply(params, x), rtol=1e-6, atol=1e-6)


def test_dense_in_bfloat16_rounds_once_from_a_float32_product():
    x = jax.random.normal(jax.random.key(0), (4, 3, 64))
    layer = layers.Dense(8, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(1), x)
    got = layer.apply(params, x)
    assert got.dtype == jnp.bfloat16
    kernel = params["params"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
    want = x.astype(jnp.bfloat16).astype(jnp.float32) @ kernel
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))
    f32 = layers.Dense(8, dtype=jnp.bfloat16, out_dtype=jnp.float32).apply(params, x)
    assert f32.dtype == jnp.float32


def test_dropout_keeps_the_rate_and_the_mean_and_is_off_when_deterministic():
    x = jnp.ones((400, 500))
    drop = layers.Dropout(0.1)
    out = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    dropped = float(jnp.mean(out == 0))
    assert abs(dropped - 0.1) < 0.003  # 200,000 draws: 4 standard deviations
    kept = out[out != 0]
    np.testing.assert_allclose(kept, 65536 / (65536 - 6554), rtol=1e-6)
    assert abs(float(jnp.mean(out)) - 1.0) < 0.005
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(again, out)
    other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    assert not np.array_equal(other, out)
    assert float(jnp.max(jnp.abs(layers.Dropout(1.0).apply({}, x, deterministic=False)))) == 0


def test_dropout_keeps_bfloat16():
    x = jnp.ones((8, 8), jnp.bfloat16)
    out = layers.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", trainer.RNG_IMPLS)
def test_step_keys_are_fixed_by_run_key_and_step_and_differ_between_steps(impl):
    run_key = jax.random.PRNGKey(7)
    a = trainer.step_key(run_key, jnp.int32(3), impl)
    b = trainer.step_key(run_key, jnp.int32(3), impl)
    c = trainer.step_key(run_key, jnp.int32(4), impl)
    bits = lambda k: np.asarray(jax.random.bits(k, (16,)))  # noqa: E731
    np.testing.assert_array_equal(bits(a), bits(b))
    assert not np.array_equal(bits(a), bits(c))
    if impl == "threefry":  # as before the option existed: checkpointed runs keep their keys
        np.testing.assert_array_equal(bits(a), bits(jax.random.fold_in(run_key, 3)))


def test_an_unknown_key_kind_is_named():
    with pytest.raises(ValueError, match="rng_impl"):
        trainer.step_key(jax.random.PRNGKey(0), jnp.int32(0), "mersenne")

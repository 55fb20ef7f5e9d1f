"""PhraseVAE heads, latent path, losses, gradients and mixed precision on a tiny config."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import t5, vae

T5_TINY = t5.T5Config(d_model=32, d_ff=48, d_kv=12, num_heads=3, num_layers=2, num_decoder_layers=2)
VAE = vae.PhraseVAEConfig(t5=T5_TINY, head="vae", n_query_tokens=4, latent_dim=16)
QUERY = dataclasses.replace(VAE, head="query")
FULL = dataclasses.replace(VAE, head="full_sequence")


def _dropout_key(seed: int) -> jax.Array:
    """RngBitGenerator keys: dropout and init with threefry keys compile far slower on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


@functools.cache
def _vae_params():
    return vae.init_params(_dropout_key(0), VAE)  # fast to compile, like dropout


def _params(config):
    """Params of any head: the T5 part is shared, the latent head only exists for vae."""
    params = _vae_params()
    return params if config.head == "vae" else {"t5": params["t5"]}


@functools.partial(jax.jit, static_argnames=("config", "method", "deterministic"))
def _apply(params, config, *args, method, deterministic=True, rng=None):
    rngs = None if rng is None else {"dropout": rng, "latent": jax.random.fold_in(rng, 1)}
    model = vae.PhraseVAE(config)
    fn = getattr(vae.PhraseVAE, method)
    return model.apply({"params": params}, *args, deterministic, rngs=rngs, method=fn)


def _batch(seed=0, batch=3, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(23, 1000, (batch, length)).astype(np.int32)
    ids[:, :4] = np.arange(13, 17)  # [C0]..[C3]
    lengths = np.array([length, 7, 6])[:batch]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 5)
    decoder_ids = rng.integers(23, 1000, (batch, 6)).astype(np.int32)
    decoder_ids[:, 0] = 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(decoder_ids)


def _encoder_states(ids, mask):
    model = t5.T5(T5_TINY)
    return np.asarray(
        jax.jit(model.apply, static_argnames="method")(
            {"params": _vae_params()["t5"]}, ids, mask, method=t5.T5.encode
        )
    )


def test_config_accepts_a_mapping_and_checks_fields():
    as_dict = vae.PhraseVAEConfig(t5=dataclasses.asdict(T5_TINY), head="vae", latent_dim=16)
    assert as_dict == VAE and hash(as_dict) == hash(VAE)
    assert VAE.memory_width == 128
    with pytest.raises(ValueError, match="head"):
        vae.PhraseVAEConfig(t5=T5_TINY, head="vq")
    with pytest.raises(ValueError, match="latent_dim"):
        vae.PhraseVAEConfig(t5=T5_TINY, head="vae", latent_dim=0)


def test_full_sequence_head_uses_all_states_and_the_input_mask():
    ids, mask, dec = _batch()
    params = _params(FULL)
    memory, memory_mask = _apply(params, FULL, ids, mask, method="encode_memory")
    np.testing.assert_allclose(np.asarray(memory), _encoder_states(ids, mask), rtol=1e-6)
    np.testing.assert_array_equal(memory_mask, mask)
    logits, stats = _apply(params, FULL, ids, mask, dec, method="__call__")
    assert logits.shape == (3, 6, 1000) and logits.dtype == jnp.float32 and stats is None
    # Padded encoder positions are invisible to the decoder.
    changed = ids.at[1, 7:].set(900)
    logits2, _ = _apply(params, FULL, changed, mask, dec, method="__call__")
    np.testing.assert_allclose(np.asarray(logits2)[1], np.asarray(logits)[1], rtol=1e-6)


def test_query_head_memory_is_the_query_states_all_visible():
    ids, mask, dec = _batch()
    params = _params(QUERY)
    memory, memory_mask = _apply(params, QUERY, ids, mask, method="encode_memory")
    assert memory.shape == (3, 4, 32)
    np.testing.assert_allclose(np.asarray(memory), _encoder_states(ids, mask)[:, :4], rtol=1e-6)
    np.testing.assert_array_equal(memory_mask, np.ones((3, 4)))
    logits, stats = _apply(params, QUERY, ids, mask, dec, method="__call__")
    assert stats is None
    direct = _apply(params, QUERY, memory, dec, None, method="decode_logits")
    np.testing.assert_allclose(np.asarray(direct), np.asarray(logits), rtol=1e-5, atol=1e-6)


def _layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_vae_posterior_is_layernorm_proj_of_position_major_query_states():
    ids, mask, _ = _batch()
    params = _params(VAE)
    mean, logvar = _apply(params, VAE, ids, mask, method="encode")
    assert mean.shape == logvar.shape == (3, 16) and mean.dtype == jnp.float32
    states = _encoder_states(ids, mask)[:, :4].reshape(3, 128)  # [h_C0 | h_C1 | h_C2 | h_C3]
    normed = _layer_norm(states, params["layer_norm"]["scale"], params["layer_norm"]["bias"])
    stats = normed @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    np.testing.assert_allclose(np.asarray(mean), stats[:, :16], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logvar), stats[:, 16:], rtol=1e-4, atol=1e-5)


def test_latent_to_memory_reshapes_position_major():
    params = _params(VAE)
    z = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
    model = vae.PhraseVAE(VAE)
    memory = np.asarray(model.apply({"params": params}, z, method=vae.PhraseVAE.latent_to_memory))
    flat = z @ np.asarray(params["post_proj"]["kernel"]) + np.asarray(params["post_proj"]["bias"])
    assert memory.shape == (2, 4, 32)
    for slot in range(4):
        np.testing.assert_allclose(memory[:, slot], flat[:, slot * 32 : (slot + 1) * 32], rtol=1e-5)
    with pytest.raises(ValueError, match="latents must be"):
        model.apply({"params": params}, z[:, :8], method=vae.PhraseVAE.latent_to_memory)


def test_vae_forward_uses_the_mean_unless_sampling():
    ids, mask, dec = _batch()
    params = _params(VAE)
    logits, (mean, logvar) = _apply(params, VAE, ids, mask, dec, method="__call__")
    from_mean = _apply(params, VAE, mean, dec, None, method="decode_logits")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(from_mean), rtol=1e-5, atol=1e-6)
    memory, memory_mask = _apply(params, VAE, ids, mask, method="encode_memory")
    assert memory.shape == (3, 4, 32) and np.all(np.asarray(memory_mask) == 1)

    # Training: z is sampled (and dropout is on); the same rng reproduces the same draw.
    key = _dropout_key(3)
    sampled, _ = _apply(
        params, VAE, ids, mask, dec, method="__call__", deterministic=False, rng=key
    )
    again, _ = _apply(params, VAE, ids, mask, dec, method="__call__", deterministic=False, rng=key)
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(again))
    assert not np.allclose(np.asarray(sampled), np.asarray(logits))


def test_sample_latent_draws_from_the_posterior():
    model = vae.PhraseVAE(VAE)
    mean = jnp.tile(jnp.linspace(-2.0, 2.0, 16), (4096, 1))
    logvar = jnp.full((4096, 16), np.log(0.25), jnp.float32)  # std 0.5
    z = model.apply(
        {"params": _params(VAE)},
        mean,
        logvar,
        method=vae.PhraseVAE.sample_latent,
        rngs={"latent": jax.random.key(0)},
    )
    z = np.asarray(z)
    np.testing.assert_allclose(z.mean(0), np.linspace(-2.0, 2.0, 16), atol=0.05)
    np.testing.assert_allclose(z.std(0), 0.5, rtol=0.08)


def test_heads_reject_what_they_do_not_have():
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="needs head vae"):
        vae.PhraseVAE(QUERY).apply({"params": _params(QUERY)}, ids, mask, method="encode")
    with pytest.raises(ValueError, match="shorter than the 4 query tokens"):
        vae.PhraseVAE(QUERY).apply(
            {"params": _params(QUERY)}, ids[:, :3], mask[:, :3], method="encode_memory"
        )


def test_init_follows_hf_t5_and_pytorch_defaults():
    params = _vae_params()
    assert np.std(params["t5"]["shared"]["embedding"]) == pytest.approx(1.0, rel=0.05)
    q = params["t5"]["encoder"]["blocks_0"]["self_attention"]["q"]["kernel"]
    assert np.std(q) == pytest.approx((32 * 12) ** -0.5, rel=0.1)
    wo = params["t5"]["decoder"]["blocks_1"]["mlp"]["wo"]["kernel"]
    assert np.std(wo) == pytest.approx(48**-0.5, rel=0.1)
    bound = 128**-0.5  # PyTorch Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    proj = np.asarray(params["proj"]["kernel"])
    assert proj.max() <= bound and proj.min() >= -bound and proj.max() > 0.9 * bound
    np.testing.assert_array_equal(params["layer_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["t5"]["encoder"]["final_layer_norm"]["scale"], 1.0)


# --- losses ----------------------------------------------------------------------------


def test_cross_entropy_is_a_token_mean_over_the_batch_skipping_ignored_labels():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    labels = np.array([[3, 4, 0, -100, -100], [1, 2, 3, 4, 5]])
    got = float(vae.cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), labels))
    logits16 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    log_probs = logits16 - np.log(np.exp(logits16).sum(-1, keepdims=True))
    valid = labels != -100
    per_token = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    assert got == pytest.approx(per_token[valid].mean(), rel=1e-5)
    per_row_mean = np.mean([per_token[0, :3].mean(), per_token[1].mean()])
    assert got != pytest.approx(per_row_mean, rel=1e-4)  # not a mean of per-sample means
    assert float(vae.cross_entropy_loss(logits, np.full((2, 5), -100))) == 0.0


def test_kl_is_per_dimension_nonnegative_and_zero_at_the_prior():
    zeros = jnp.zeros((3, 64))
    assert float(vae.kl_divergence(zeros, zeros)) == 0.0
    # mean 1, logvar 0: 0.5 per dimension -> summed 32, divided by 64 -> 0.5.
    assert float(vae.kl_divergence(jnp.ones((3, 64)), zeros)) == pytest.approx(0.5)
    rng = np.random.default_rng(5)
    for _ in range(5):
        mean = rng.normal(0, 2, (8, 64)).astype(np.float32)
        logvar = rng.normal(0, 2, (8, 64)).astype(np.float32)
        got = float(vae.kl_divergence(mean, logvar))
        per_sample = -0.5 * np.sum(1 + logvar - mean**2 - np.exp(logvar), -1)
        assert got >= 0.0
        assert got == pytest.approx(per_sample.mean() / 64, rel=1e-5)


def test_gradients_of_the_stage3_loss_reach_every_parameter():
    ids, mask, dec = _batch()
    labels = jnp.concatenate([dec[:, 1:], jnp.full((3, 1), -100)], axis=1)
    params = _params(VAE)

    @jax.jit
    def loss_fn(p):
        rngs = {"dropout": _dropout_key(0), "latent": _dropout_key(1)}
        logits, (mean, logvar) = vae.PhraseVAE(VAE).apply(
            {"params": p}, ids, mask, dec, deterministic=False, rngs=rngs
        )
        return vae.cross_entropy_loss(logits, labels) + 0.01 * vae.kl_divergence(mean, logvar)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isfinite(float(loss))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, grad in flat:
        grad = np.asarray(grad)
        assert np.isfinite(grad).all(), jax.tree_util.keystr(path)
        assert np.abs(grad).max() > 0, jax.tree_util.keystr(path)


def test_bfloat16_vae_keeps_latent_head_and_logits_float32():
    half = dataclasses.replace(VAE, t5=dataclasses.replace(T5_TINY, dtype="bfloat16"))
    ids, mask, dec = _batch()
    params = _params(VAE)
    logits16, (mean16, logvar16) = _apply(params, half, ids, mask, dec, method="__call__")
    logits32, (mean32, _) = _apply(params, VAE, ids, mask, dec, method="__call__")
    assert logits16.dtype == mean16.dtype == logvar16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean16), np.asarray(mean32), atol=0.1)
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.25)

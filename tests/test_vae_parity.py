"""Parity with Hugging Face T5 + the original's stage-3 head modules (torch, float32).

A PyTorch model with the original's state-dict layout (``model.t5.<HF T5>``, ``model.layer_norm``,
``model.proj``, ``model.post_proj``) gets random weights, is converted with our mapping, and
both sides are compared: posterior mean/logvar, teacher-forced logits of every head, and greedy
tokens against ``generate``. Run with ``-s`` to see the measured maxima.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity with Hugging Face needs the torch extra")
transformers = pytest.importorskip("transformers", reason="parity needs the torch extra")

import torch_reference as ref  # noqa: E402

from phraseldm_jax import decoding, t5, trees, vae  # noqa: E402
from phraseldm_jax.convert import vae_weights  # noqa: E402
from phraseldm_jax.vocab import EOS_ID  # noqa: E402

TOLERANCE = 1e-4
SIZES = ("paper", "small")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with ref.one_torch_thread():
        yield


@functools.cache
def _models(size):
    """(torch checkpoint, original state dict, our config, our params)."""
    checkpoint = ref.build_vae(size)
    state_dict = ref.numpy_state_dict(checkpoint)
    original_config = {"compress_style": "first_n_tokens", **ref.VAE_SIZES[size]}
    config = vae_weights.infer_vae_config(state_dict, original_config)
    params = vae_weights.vae_params_from_state_dict(state_dict, config)
    return checkpoint, state_dict, config, jax.device_put(params)


def _inputs(batch=6, length=24, seed=0):
    return ref.encoder_inputs(batch, length, seed)


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().double().numpy())))


def _apply(config, params, *args, method):
    fn = jax.jit(vae.PhraseVAE(config).apply, static_argnames="method")
    return fn({"params": params}, *args, method=getattr(vae.PhraseVAE, method))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (16, 64), (8, 20)])
def test_relative_position_buckets_match_hf(bidirectional, buckets, max_distance):
    offsets = np.arange(-700, 701)
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(offsets), bidirectional, buckets, max_distance
    )
    ours = t5.relative_position_bucket(
        offsets, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@pytest.mark.parametrize("size", SIZES)
def test_converted_config_and_exact_round_trip(size):
    _, state_dict, config, params = _models(size)
    sizes = ref.VAE_SIZES[size]
    hf_kwargs = sizes["t5_config"]
    assert config.head == "vae" and config.n_query_tokens == sizes["n_compress_tokens"]
    assert config.latent_dim == sizes["bottleneck_dim"]
    assert config.t5.d_model == hf_kwargs["d_model"]
    assert config.t5.d_kv == hf_kwargs.get("d_kv", 64)
    assert config.t5.num_decoder_layers == hf_kwargs.get(
        "num_decoder_layers", hf_kwargs["num_layers"]
    )
    if size == "paper":  # FACTS 1.8: 77 keys, 15,825,920 elements counting tied copies
        assert config.t5 == t5.PAPER_T5
        assert len(state_dict) == 77
        assert trees.param_count(state_dict) == 15_825_920
        assert trees.param_count(params) == 15_825_920 - 3 * 1000 * 512  # one embedding copy
    back = vae_weights.vae_state_dict_from_params(params, config)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    fresh = ref.ReferencePhraseVAE(**sizes)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize("size", SIZES)
def test_encoder_posterior_and_teacher_forced_logits_match(size):
    checkpoint, _, config, params = _models(size)
    torch_model = checkpoint.model
    ids, mask, decoder_ids = _inputs()
    with torch.no_grad():
        ids_t, mask_t, dec_t = map(torch.from_numpy, (ids, mask, decoder_ids))
        mean_t, logvar_t = torch_model.encode(ids_t, mask_t)
        z_t = mean_t + 0.5 * torch.randn(mean_t.shape, generator=torch.Generator().manual_seed(2))
        memory_t = torch_model.memory(z_t)
        logits_t = torch_model.t5(encoder_outputs=(memory_t,), decoder_input_ids=dec_t).logits
        # Stage 1 and 2 heads: all encoder states with the input mask / the 4 query states.
        full_t = torch_model.t5(input_ids=ids_t, attention_mask=mask_t, decoder_input_ids=dec_t)
        states_t = torch_model.t5.encoder(input_ids=ids_t, attention_mask=mask_t)[0]
        query_t = torch_model.t5(
            encoder_outputs=(states_t[:, : config.n_query_tokens],), decoder_input_ids=dec_t
        ).logits

    mean, logvar = _apply(config, params, ids, mask, method="encode")
    logits = _apply(config, params, z_t.numpy(), decoder_ids, method="decode_logits")
    full_config = vae.PhraseVAEConfig(t5=config.t5, head="full_sequence")
    query_config = vae.PhraseVAEConfig(t5=config.t5, head="query")
    backbone = {"t5": params["t5"]}
    full, _ = _apply(full_config, backbone, ids, mask, decoder_ids, method="__call__")
    query, _ = _apply(query_config, backbone, ids, mask, decoder_ids, method="__call__")

    diffs = {
        "mean": _max_diff(mean, mean_t),
        "logvar": _max_diff(logvar, logvar_t),
        "vae logits": _max_diff(logits, logits_t),
        "full_sequence logits": _max_diff(full, full_t.logits),
        "query logits": _max_diff(query, query_t),
    }
    print(f"\n[{size}] max |ours - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert float(logits_t.abs().max()) > 1.0  # the comparison is not of near-zero numbers
    assert all(v <= TOLERANCE for v in diffs.values()), diffs


@pytest.mark.parametrize("size", SIZES)
def test_greedy_tokens_match_generate(size):
    checkpoint, _, config, params = _models(size)
    # The small decoder is deeper than its encoder, which HF's generate cache cannot handle;
    # without a cache generate is quadratic, so the small size stops at 64 positions.
    asymmetric = config.t5.num_decoder_layers != config.t5.num_layers
    max_length = 64 if asymmetric else 128
    ids, mask, _ = _inputs(batch=6, seed=3)
    mean_t, _ = checkpoint.encode_numpy(ids, mask)
    random_latents = np.random.default_rng(4).normal(size=(10, config.latent_dim))
    latents = np.concatenate([mean_t, random_latents.astype(np.float32)])
    theirs = checkpoint.generate(latents, max_length, use_cache=not asymmetric)

    ours = decoding.greedy_decode(params, config, latents, max_length=max_length)
    stops = np.array([list(r).index(EOS_ID) if EOS_ID in r else -1 for r in theirs])
    print(f"\n[{size}] generate: [EOS] at {sorted(stops.tolist())}")
    np.testing.assert_array_equal(ours, theirs)
    # Not a degenerate comparison: varied stopping points, and some rows run to the limit.
    assert len(set(stops[stops > 0].tolist())) >= 4
    assert np.any(stops == -1)

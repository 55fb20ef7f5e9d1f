"""Our training step equals the original's (``benchmarks/train_parity.py`` at tiny sizes): for
PhraseVAE stages 1-3 and the three PhraseLDM variants, the same weights (through the
converter), the same POP909 records and the same randomness give the same batches, losses,
gradients, parameters and Adam moments as ``torch.optim`` on transformers / diffusers
(``tests/torch_training_reference.py``). Also: the seams that feed explicit randomness to our
losses give the numbers of the rng-driven training path. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="training parity needs the torch extra")
pytest.importorskip("diffusers", reason="training parity needs the torch extra")
pytest.importorskip("transformers", reason="training parity needs the torch extra")

from benchmarks import train_parity  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def songs(pop909_dir):
    found, source = train_parity.load_songs(str(pop909_dir) if pop909_dir else None, 3)
    print(f"training-parity songs: {source}")
    return found


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", train_parity.CASES)
def test_training_steps_equal_the_original(case, songs):
    batch = 4 if case.startswith("vae") else 2
    r = train_parity.run_case(case, "tiny", songs, steps=STEPS, every=1, batch_size=batch)
    first = r["step1"]
    print(f"\n{case}: loss rel {r['loss']['max_rel']:.2g}", end="")
    for key in ("grads", "params", "exp_avg", "exp_avg_sq"):
        print(f", {key} rel {first[key]['max_rel']:.2g} ({first[key]['worst']})", end="")
    assert r["batch_max_abs_diff"] == 0.0  # both sides built the same batch
    assert r["loss"]["step1_rel"] <= 1e-6 and r["loss"]["max_rel"] <= 1e-5
    assert first["grads"]["tensors"] == first["optimised_tensors"]  # every gradient compared
    for key in ("grads", "params", "exp_avg"):
        assert first[key]["max_rel"] <= 1e-5, (key, first[key])
    assert first["exp_avg_sq"]["max_rel"] <= 2e-5  # the square doubles relative errors
    assert r["params_every"][str(STEPS)]["max_rel"] <= 1e-5
    # The LDM's encoders (frozen as the original) and time_proj never move; the VAE has none.
    assert r["frozen_unchanged"] is (None if case.startswith("vae") else True)
    assert train_parity.within_targets(r)


def test_tensor_diff_is_relative_to_the_reference_norm():
    diff = train_parity.tensor_diff(
        {"a": np.array([3.0, 4.0]), "b": np.zeros(2)},
        {"a": np.array([3.0, 4.5]), "b": np.zeros(2)},
    )
    assert diff["max_abs"] == pytest.approx(0.5)
    assert diff["max_rel"] == pytest.approx(0.5 / np.hypot(3.0, 4.5))
    assert diff["worst"] == "a" and diff["tensors"] == 2
    inf = train_parity.tensor_diff({"z": np.ones(1)}, {"z": np.zeros(1)})
    assert inf["max_rel"] == float("inf")


def test_adam_moments_fill_frozen_leaves_with_zeros():
    from phraseldm_jax import optim

    params = {"frozen": jnp.ones(2), "trained": jnp.ones(3)}
    tx, _ = optim.make_optimizer({"name": "adamw", "lr": 0.1, "freeze": ["^frozen"]}, 1)
    grads = {"frozen": jnp.ones(2), "trained": jnp.full(3, 2.0)}
    _, state = tx.update(grads, tx.init(params), params)
    mu, nu = train_parity.adam_moments(state, params)
    np.testing.assert_array_equal(mu["frozen"], np.zeros(2))
    np.testing.assert_allclose(mu["trained"], np.full(3, 0.2), rtol=1e-6)
    np.testing.assert_allclose(nu["trained"], np.full(3, 0.004), rtol=1e-6)


def _tiny_vae(stage: int = 3):
    from configs import vae_common
    from phraseldm_jax import vae, vae_task

    config = vae_common.vae_config(stage, "tiny")
    config.model.t5.dropout_rate = 0.0
    model_cfg = vae_task.model_config(config)
    params = vae.init_params(train_parity.init_key(0), model_cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(23, 1000, (3, 12)).astype(np.int32)
    ids[:, :4], ids[:, 4] = [13, 14, 15, 16], 1
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "decoder_input_ids": ids,
        "labels": np.where(np.arange(12) < 9, ids, -100).astype(np.int32),
    }
    return config, vae.PhraseVAE(model_cfg), params, batch


def test_vae_loss_with_given_noise_is_the_reference_formula():
    from phraseldm_jax import vae, vae_task

    _, model, params, batch = _tiny_vae()
    eps = np.random.default_rng(1).standard_normal((3, model.config.latent_dim)).astype(np.float32)
    loss_fn = jax.jit(
        lambda p, b, e: vae_task.vae_loss(model, 0.01, p, b, train=True, latent_noise=e)
    )
    loss, metrics = loss_fn(params, batch, eps)

    @jax.jit
    def by_hand(params, batch, eps):
        variables = {"params": params}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        mean, logvar = model.apply(variables, ids, mask, method=vae.PhraseVAE.encode)
        z = mean + eps * jnp.exp(0.5 * logvar)
        decoder_ids = batch["decoder_input_ids"]
        return model.apply(variables, z, decoder_ids, method=vae.PhraseVAE.decode_logits), (
            mean,
            logvar,
        )

    logits, (mean, logvar) = by_hand(params, batch, eps)
    recon = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["labels"], 0))
    recon = jnp.sum(jnp.where(batch["labels"] >= 0, recon, 0)) / np.sum(batch["labels"] >= 0)
    kl = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), -1)) / mean.shape[-1]
    np.testing.assert_allclose(float(loss), float(recon + 0.01 * kl), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), float(kl), rtol=1e-6)


def test_training_loss_draws_the_eps_the_noise_seam_takes():
    from phraseldm_jax import vae, vae_task

    config, model, params, batch = _tiny_vae()
    rng = jax.random.PRNGKey(7)
    loss, _ = jax.jit(vae_task.make_loss_fn(config), static_argnums=4)(
        params, None, batch, rng, True
    )
    zeros = jnp.zeros((3, model.config.latent_dim))
    eps = model.apply(  # z of mean 0, logvar 0 is the eps itself
        {"params": params},
        zeros,
        zeros,
        method=vae.PhraseVAE.sample_latent,
        rngs={"latent": jax.random.fold_in(rng, 1)},
    )
    given, _ = jax.jit(
        lambda p, b, e: vae_task.vae_loss(model, 0.01, p, b, train=True, latent_noise=e)
    )(params, batch, eps)
    np.testing.assert_allclose(float(loss), float(given), rtol=1e-6)
    no_noise, _ = jax.jit(lambda p, b: vae_task.vae_loss(model, 0.01, p, b, train=False))(
        params, batch
    )
    assert float(no_noise) != float(given)


def test_diffusion_loss_is_the_noise_prediction_loss_of_its_draws():
    import ldm_fixtures

    from input_pipeline import ldm_pipeline
    from phraseldm_jax import ldm, ldm_task

    codebook = ldm_fixtures.Codebook()
    config = ldm_fixtures.tiny_config("", length_control=True)
    ldm_task.resolve_config(config, codebook.stats())
    cfg = ldm_task.ldm_config(config)
    params = ldm.init_params(train_parity.init_key(0), cfg)
    encoding = ldm_pipeline.song_encoding(codebook.stats())
    songs = ldm_fixtures.fixed_length_songs(codebook, [8, 40])
    examples = [ldm_pipeline.encode_record(s, i, encoding) for i, s in enumerate(songs)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    rng = jax.random.PRNGKey(3)
    loss, _ = jax.jit(lambda p, b, r: ldm_task.diffusion_loss(p, cfg, b, r, train=False))(
        params, batch, rng
    )
    t_key, noise_key, _, _ = jax.random.split(rng, 4)
    t = jax.random.randint(t_key, (2,), 0, 1000)
    noise = jax.random.normal(noise_key, batch["latents"].shape)
    given, _ = jax.jit(lambda p, b, t, n: ldm_task.noise_prediction_loss(p, cfg, b, t, n))(
        params, batch, t, noise
    )
    np.testing.assert_allclose(float(loss), float(given), rtol=1e-6)

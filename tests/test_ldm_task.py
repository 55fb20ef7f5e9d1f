"""The LDM task: config resolution and freezing, the model call with null conditions, the
diffusion loss (weights, padding mask, condition dropout), that training lowers it on a tiny
latent set, and the evaluation metrics of generated songs."""

import functools
import json

import jax
import jax.numpy as jnp
import ldm_fixtures
import numpy as np
import optax
import pytest

from input_pipeline import ldm_pipeline, records, synthetic, tfds_builders
from phraseldm_jax import diffusion, ldm, ldm_task, optim
from phraseldm_jax import songs as song_lib
from phraseldm_jax.metrics import ldm as ldm_metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    codebook = ldm_fixtures.Codebook()
    songs = ldm_fixtures.synthetic_songs(codebook, 12)
    path = tmp_path_factory.mktemp("ldm_task") / "latents"
    return codebook, songs, ldm_fixtures.write_dataset(path, codebook, songs[:9], songs[9:])


def _config(data_dir, length=True, sections=False, **train):
    config = ldm_fixtures.tiny_config(data_dir, length, sections, **train)
    ldm_task.resolve_config(config)
    return config


@functools.cache
def _params(data_dir, length=True, sections=False):
    """Initial params of a tiny model, shared by the tests (init compiles slowly on CPU)."""
    cfg = ldm_task.ldm_config(_config(data_dir, length, sections))
    return ldm.init_params(ldm_fixtures.init_key(), cfg)


def _batch(data_dir, n=4, seed=0):
    it = ldm_pipeline.make_iterator(data_dir, "train", batch_size=n, seed=seed, train=True)
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def test_resolve_config_and_freezing(dataset):
    _, _, data_dir = dataset
    config = _config(data_dir)
    assert (config.model.scale_factor, config.model.clip_range) == (0.76, 3.0)
    assert config.optim.freeze == [ldm.TIME_PROJ_FREEZE]
    frozen = ldm_fixtures.tiny_config(data_dir, True, True, num_steps=1)
    frozen.model.train_encoders = False
    ldm_task.resolve_config(frozen)
    assert frozen.optim.freeze[1:] == [r"^length_encoder/", r"^sec_encoder/"]

    # One optimiser step: frozen weights stay put, the rest (and trainable encoders) move.
    params = _params(data_dir, True, True)
    for cfg, encoder_moves in ((_config(data_dir, True, True), True), (frozen, False)):
        tx, _ = optim.make_optimizer(cfg.optim, 10)

        def update(params, tx=tx):
            grads = jax.tree.map(jnp.ones_like, params)
            updates, _ = tx.update(grads, tx.init(params), params)
            return optax.apply_updates(params, updates)

        new = jax.jit(update)(params)
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
        assert not moved["dit"]["time_proj"]["weight"]
        assert moved["dit"]["proj_in"]["kernel"]
        assert moved["length_encoder"]["embedding"] == encoder_moves
        assert moved["sec_encoder"]["type_embed"] == encoder_moves


def _conditions(n_bars, plan="i-2 A-4 B-4", has_plan=1, n=2):
    cond = ldm.make_conditions(n, n_bars, plan)
    return cond._replace(has_plan=np.full((n,), has_plan, np.int32))


@pytest.mark.parametrize("sections", [False, True])
def test_predict_noise_matches_the_module_and_null_is_unconditional(dataset, sections):
    _, _, data_dir = dataset
    cfg = ldm_task.ldm_config(_config(data_dir, True, sections))
    params = _params(data_dir, True, sections)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 64))
    t = jnp.array([10, 900])
    predict = jax.jit(lambda c, null=None: ldm.predict_noise(params, cfg, x, t, c, null))
    cond = _conditions(10)
    ours = predict(cond)
    module_sections = (cond.type_ids, cond.length_ids) if sections else None
    expected = jax.jit(ldm.PhraseLDM(cfg).apply)(
        {"params": params}, x, t, cond.n_bars, module_sections
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    # Null conditions: whatever the length and plan, the DiT alone with no conditions.
    null = jnp.ones((2,), bool)
    uncond = jax.jit(
        lambda p: ldm.PhraseLDM(cfg).apply({"params": p}, x, t, method=lambda m, x, t: m.dit(x, t))
    )(params)
    for other in (_conditions(10), _conditions(120, "A-8 B-8 x-2")):
        np.testing.assert_allclose(predict(other, null), uncond, atol=1e-5)
    assert not np.allclose(ours, uncond, atol=1e-4)  # the conditions do matter
    if sections:  # no plan: the section ids are ignored, the length is not
        a = predict(_conditions(10, "A-8", has_plan=0))
        b = predict(_conditions(10, "B-2 x-4", has_plan=0))
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_loss_weights_padding_mask_and_dropout(dataset):
    _, _, data_dir = dataset
    cfg = ldm_task.ldm_config(_config(data_dir))
    params = _params(data_dir)
    batch = _batch(data_dir)
    rng = jax.random.PRNGKey(3)

    @functools.partial(jax.jit, static_argnames=("train", "mask_padding", "cond_dropout"))
    def loss_fn(b, train=False, **kw):
        return ldm_task.diffusion_loss(params, cfg, b, rng, train=train, **kw)

    def loss(weight=None, **kw):
        b = dict(batch) if weight is None else {**batch, "weight": jnp.asarray(weight, jnp.float32)}
        return loss_fn(b, **kw)

    full, metrics = loss()
    first, _ = loss([1, 1, 0, 0])
    second, _ = loss([0, 0, 1, 1])
    np.testing.assert_allclose(float(full), (float(first) + float(second)) / 2, rtol=1e-5)
    one, m = loss([1, 0, 0, 0])
    rows = 4 * int(batch["n_bars"][0])
    mix = (rows * m["mse_song"] + (512 - rows) * m["mse_pad"]) / 512
    np.testing.assert_allclose(float(m["mse"]), float(mix), rtol=1e-5)
    masked, m2 = loss(mask_padding=True)
    assert float(masked) == float(m2["mse_song"]) != float(full)

    # Condition dropout (train=True): a dropped song's length does not matter.
    def with_bars(n_bars, cond_dropout):
        b = {**batch, "n_bars": jnp.full((4,), n_bars, jnp.int32)}
        return float(loss_fn(b, train=True, cond_dropout=cond_dropout)[0])

    assert with_bars(5, 0.999999) == with_bars(100, 0.999999)
    assert with_bars(5, 0.0) != with_bars(100, 0.0)


def test_v_prediction_loss_and_the_noise_it_implies(dataset):
    """A v_prediction model: the loss is the MSE of its output against v, and the samplers get
    the noise it implies, which is exact even where abar_t is about 0 (t = 999)."""
    _, _, data_dir = dataset
    config = _config(data_dir)
    config.model.prediction_type = "v_prediction"
    cfg = ldm_task.ldm_config(config)
    params, batch = _params(data_dir), _batch(data_dir)
    x0 = jnp.asarray(batch["latents"])
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.asarray([0, 400, 900, 999])
    v = diffusion.v_target(x0, noise, t)
    x_t = diffusion.add_noise(x0, noise, t)
    np.testing.assert_allclose(diffusion.eps_from_v(x_t, v, t), noise, atol=2e-5)
    abar = diffusion.reference_schedule().alphas_cumprod[np.asarray(t)][:, None, None]
    x0_back = np.sqrt(abar) * np.asarray(x_t) - np.sqrt(1 - abar) * np.asarray(v)
    np.testing.assert_allclose(x0_back, x0, atol=2e-5)

    cond = ldm.conditions_from_batch(batch)
    out = ldm.model_output(params, cfg, x_t, t, cond)
    eps = ldm.predict_noise(params, cfg, x_t, t, cond)
    np.testing.assert_allclose(eps, diffusion.eps_from_v(x_t, out, t), atol=1e-6)
    loss, metrics = ldm_task.noise_prediction_loss(params, cfg, batch, t, noise)
    expected = np.mean(np.square(np.asarray(out) - np.asarray(v)))
    np.testing.assert_allclose(float(metrics["mse"]), expected, rtol=1e-5)
    assert float(loss) == float(metrics["mse"])
    # The same weights as an epsilon model: only the output's meaning differs.
    eps_cfg = ldm_task.ldm_config(_config(data_dir))
    np.testing.assert_array_equal(ldm.model_output(params, eps_cfg, x_t, t, cond), out)
    with pytest.raises(ValueError, match="prediction_type"):
        ldm.PhraseLDMConfig(prediction_type="x0")


def test_training_lowers_the_loss(dataset):
    _, _, data_dir = dataset
    config = _config(data_dir, num_steps=40)
    task = ldm_task.make_ldm_task(config)
    cfg = ldm_task.ldm_config(config)
    tx, _ = optim.make_optimizer(config.optim, 40)
    params = _params(data_dir)
    opt_state = tx.init(params)
    it = ldm_pipeline.make_iterator(data_dir, "train", batch_size=8, seed=0, train=True)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
            params, None, batch, rng, True
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    probe = _batch(data_dir, n=8, seed=7)
    probe_loss = jax.jit(
        lambda p: ldm_task.diffusion_loss(p, cfg, probe, jax.random.PRNGKey(9), train=False)[0]
    )
    before = float(probe_loss(params))
    for i in range(40):
        params, opt_state, _ = step(params, opt_state, next(it), jax.random.PRNGKey(i))
    after = float(probe_loss(params))
    assert after < 0.8 * before, (before, after)


def test_song_metrics_of_real_songs(dataset, tmp_path):
    codebook, _, _ = dataset
    corpus = synthetic.synthetic_records(10, seed=0)
    tfds_builders.build(str(tmp_path / "songs"), names=["songs"], songs=corpus)
    melodies = ldm_task.melody_reference(str(tmp_path / "songs"))
    train_songs = [r for r in corpus if records.split_of(r["song_id"]) == "train"][:3]
    latents = ldm_fixtures.synthetic_songs(codebook, 10)
    by_id = {s["song_id"]: s for s in latents}
    real = [by_id[r["song_id"]]["latents"] for r in train_songs]
    padded = np.stack(
        [np.concatenate([z, np.tile(codebook.latent("[SEP]"), (512 - len(z), 1))]) for z in real]
    )
    songs = song_lib.decode_songs(codebook, padded)
    assert [s.n_bars for s in songs] == [r["n_bars"] for r in train_songs]

    out = ldm_task.song_metrics(
        songs, padded, real, target_bars=train_songs[0]["n_bars"], melodies=melodies
    )
    assert abs(out["phrase_fid"]) < 1e-6 and abs(out["phrase_fid_reference"]) < 0.05
    assert out["srs"] == pytest.approx(ldm_metrics.mean_section_recurrence_score(real))
    assert out["srs"] > 0  # the synthetic corpus repeats its sections
    bars = [r["n_bars"] for r in train_songs]
    expected_accuracy = np.mean([b // 10 == bars[0] // 10 for b in bars])
    assert out["length_accuracy"] == pytest.approx(expected_accuracy)
    assert out["melody_similarity"] == 1.0 and out["memorisation_rate"] == 1.0
    assert out["t2r"] == 0.0 and out["unreadable_songs"] == 0
    image = out["ssm_first_song"]
    assert image.dtype == np.uint8 and image.shape == (4 * bars[0], 4 * bars[0])
    assert (np.diag(image) == 255).all()


def test_evaluator_generates_and_scores(dataset, tmp_path):
    codebook, _, data_dir = dataset
    tfds_builders.build(
        str(tmp_path / "songs"), names=["songs"], songs=synthetic.synthetic_records(6)
    )
    config = _config(data_dir, eval_every=1)
    config.eval.num_songs = 2
    config.eval.songs_dir = str(tmp_path / "songs")
    task = ldm_task.make_ldm_task(config, decoder=codebook)
    params = _params(data_dir)
    first, second = task.evaluate(params, 1), task.evaluate(params, 2)
    expected = {"loss", "mse_song", "mse_pad", "srs", "length_accuracy", "mean_bars",
                "phrase_fid", "compile_seconds", "sample_seconds", "decode_seconds"}  # fmt: skip
    assert expected <= set(first)
    assert np.isfinite(first["loss"]) and first["loss"] == second["loss"]
    assert first["mean_bars"] == second["mean_bars"]  # the same noise at every evaluation
    assert first["compile_seconds"] > 0 and second["compile_seconds"] == 0
    with pytest.raises(ValueError, match="vae.workdir"):
        ldm_task.make_ldm_task(config)
    config.train.cond_dropout = 0.1
    uncond = _config(data_dir, length=False, cond_dropout=0.1)
    with pytest.raises(ValueError, match="conditional model"):
        ldm_task.make_ldm_task(uncond)


def test_evaluate_checkpoint_with_another_sampler(dataset, tmp_path):
    codebook, _, data_dir = dataset
    config = _config(data_dir)
    workdir = ldm_fixtures.save_workdir(tmp_path / "run", config, _params(data_dir))
    result = ldm_task.evaluate_checkpoint(
        workdir, decoder=codebook, num_songs=2, sampler="dpmpp_2m", num_steps=3, loss_batches=1
    )
    assert result["eval"]["sampler"] == "dpmpp_2m" and result["eval"]["num_steps"] == 3
    assert {"loss", "srs", "length_accuracy", "sample_seconds", "eval_seconds"} <= set(result)
    assert "ssm_first_song" not in result  # images are left out of the summary
    json.dumps(result)


def test_sampler_settings_read_optional_eval_keys(dataset):
    config = _config(dataset[2])
    config.eval.sampler, config.eval.num_steps = "dpmpp_2m", 20
    plain = ldm_task.sampler_settings(config.eval)
    assert plain.timestep_spacing is None and plain.clipped_eps is False
    config.eval.update({"timestep_spacing": "leading", "clipped_eps": True})
    settings = ldm_task.sampler_settings(config.eval)
    assert settings.timestep_spacing == "leading" and settings.clipped_eps is True
    assert settings.sampler == "dpmpp_2m" and settings.num_steps == 20

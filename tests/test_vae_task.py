"""vae_task: configs, loss, init from the previous stage (1 -> 2 -> 3), evaluation, and a
short training whose loss clearly falls."""

import importlib
import shutil

import jax
import numpy as np
import pytest
import vae_fixtures as fx

from configs import vae_common
from input_pipeline import splits, vae_pipeline
from phraseldm_jax import checkpointing, metric_writer, vae_task
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.errors import CheckpointMismatchError
from phraseldm_jax.metrics import f1 as f1_lib


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_configs_hold_the_papers_recipe(stage):
    config = importlib.import_module(f"configs.vae_stage{stage}").get_config()
    model = vae_task.model_config(config)
    assert model.t5.d_model == 512 and model.t5.d_ff == 1024 and model.t5.d_kv == 64
    assert model.t5.num_heads == 6 and model.t5.num_layers == model.t5.num_decoder_layers == 3
    assert model.head == vae_common.STAGE_HEADS[stage] and model.latent_dim == 64
    assert config.data.batch_size == 128 and config.data.max_length == 128
    assert config.data.dataset == ("bars" if stage == 1 else "phrases")
    assert config.optim.lr == 1e-4 and config.optim.clip_norm == 0.0
    assert (config.optim.name, config.optim.weight_decay) == (
        ("adamw", 1e-3) if stage == 3 else ("adam", 0.0)
    )
    assert config.train.kl_weight == (0.01 if stage == 3 else 0.0)
    assert config.train.eval_every == 250 and config.train.patience == 20
    expected = ("eval/f1_iopd", "max") if stage == 2 else ("eval/loss", "min")
    assert (config.train.best_metric, config.train.best_mode) == expected
    for size in ("small", "tiny"):
        small = importlib.import_module(f"configs.vae_stage{stage}").get_config(size)
        assert vae_task.model_config(small).t5.d_model < 512
    with pytest.raises(ValueError, match="unknown size"):
        vae_common.vae_config(stage, "huge")


def test_stage_and_head_must_agree():
    config = fx.tiny_config(3)
    config.data.stage = 2
    with pytest.raises(ValueError, match="needs config.model.head='query'"):
        vae_task.model_config(config)


def _eval_batch(config, split="train", rows=16):
    """The first ``rows`` records of ``split`` in one batch of length max_length, in order."""
    source = splits.open_split(config.data, split)
    options = {**vae_pipeline.pipeline_options(config), "bucket_lengths": None}
    subset = splits.Subset(source, np.arange(rows))
    return next(vae_pipeline.make_iterator(subset, batch_size=rows, train=False, **options))


def test_stage3_loss_is_ce_plus_weighted_kl_with_sampling_only_in_training():
    config = fx.tiny_config(3)
    params = vae_lib.init_params(jax.random.PRNGKey(0), vae_task.model_config(config))
    batch = _eval_batch(config)
    loss_fn = jax.jit(vae_task.make_loss_fn(config), static_argnums=4)
    rng = jax.random.PRNGKey(1)
    loss, metrics = loss_fn(params, None, batch, rng, False)
    model = vae_lib.PhraseVAE(vae_task.model_config(config))
    logits, (mean, logvar) = jax.jit(model.apply)(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    )
    recon = vae_lib.cross_entropy_loss(logits, batch["labels"])
    kl = vae_lib.kl_divergence(mean, logvar)
    np.testing.assert_allclose(metrics["recon"], recon, rtol=1e-6)
    np.testing.assert_allclose(loss, recon + 0.01 * kl, rtol=1e-6)
    assert set(metrics) >= {"kl", "accuracy", "latent_mean", "latent_std", "latent_max_abs"}
    np.testing.assert_allclose(metrics["latent_max_abs"], np.abs(mean).max(), rtol=1e-6)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    # Training samples z and uses dropout: different keys give different losses.
    train_a, _ = loss_fn(params, None, batch, rng, True)
    train_b, _ = loss_fn(params, None, batch, jax.random.PRNGKey(2), True)
    assert float(train_a) != float(train_b)
    again, _ = loss_fn(params, None, batch, rng, True)
    assert float(again) == float(train_a)


def test_stage2_loss_has_no_kl():
    config = fx.tiny_config(2)
    params = vae_lib.init_params(jax.random.PRNGKey(0), vae_task.model_config(config))
    loss_fn = jax.jit(vae_task.make_loss_fn(config), static_argnums=4)
    loss, metrics = loss_fn(params, None, _eval_batch(config), jax.random.PRNGKey(0), False)
    assert "kl" not in metrics and float(loss) == float(metrics["recon"])


def test_evaluator_scores_every_record_once_and_matches_a_direct_computation():
    config = fx.tiny_config(3)
    config.eval.max_examples = 0
    config.eval.max_f1_examples = 0
    config.eval.batch_size = 64  # the last batch is completed with weight-0 rows
    evaluator = vae_task.Evaluator(config, "validation")
    n = len(evaluator.source)
    assert n % 64 != 0
    params = vae_lib.init_params(jax.random.PRNGKey(3), vae_task.model_config(config))
    metrics, outputs, targets = evaluator.run(params, step=0)
    assert metrics["examples"] == n and metrics["f1_examples"] == n

    # The same numbers from one unpadded pass over the split, in source order.
    source = splits.open_split(config.data, "validation")
    batch = _eval_batch(config, "validation", rows=n)
    model = vae_lib.PhraseVAE(vae_task.model_config(config))
    logits, (mean, logvar) = jax.jit(model.apply)(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    )
    recon = float(vae_lib.cross_entropy_loss(logits, batch["labels"]))
    kl = float(vae_lib.kl_divergence(mean, logvar))
    np.testing.assert_allclose(metrics["recon"], recon, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], recon + 0.01 * kl, rtol=1e-5)
    accuracy = float(vae_task.token_accuracy(logits, batch["labels"]))
    np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(metrics["latent_std"], np.std(np.asarray(mean), ddof=1), rtol=1e-4)
    np.testing.assert_allclose(metrics["latent_max_abs"], np.abs(mean).max(), rtol=1e-5)

    # Every record decoded exactly once, and F1 scores every one of them.
    assert sorted(targets) == sorted(source[i]["text"] for i in range(n))
    expected = f1_lib.reconstruction_f1(outputs, targets)
    for key in ("f1_op", "f1_opd", "f1_iopd"):
        assert metrics[key] == expected[key]
    assert isinstance(metrics["reconstructions"], str)


def test_evaluator_limits_spread_over_the_split():
    config = fx.tiny_config(3)
    config.eval.max_examples = 40
    config.eval.max_f1_examples = 7
    evaluator = vae_task.Evaluator(config, "validation")
    params = vae_lib.init_params(jax.random.PRNGKey(0), vae_task.model_config(config))
    metrics = evaluator(params, step=0)
    assert metrics["examples"] == 40 and metrics["f1_examples"] == 7
    picked = splits.spread_indices(100, 7)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 7


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stages 1 -> 2, two steps each with an evaluation (so each has a best checkpoint)."""
    root = tmp_path_factory.mktemp("chain")
    workdirs = {}
    for stage in (1, 2):
        config = fx.tiny_config(stage, num_steps=2, eval_every=2, ckpt_every=2)
        if stage > 1:
            config.train.init_from = workdirs[stage - 1]
        workdirs[stage] = str(root / f"stage{stage}")
        fx.train(workdirs[stage], config)
    return workdirs


def _initial_params(config, seed=42):
    init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    params = vae_lib.init_params(init_rng, vae_task.model_config(config))
    return vae_task.make_warm_start(config)(params)


@pytest.mark.parametrize("stage", [2, 3])
def test_stage_init_takes_the_previous_t5_and_fresh_heads(chain, stage):
    config = fx.tiny_config(stage)
    config.train.init_from = chain[stage - 1]
    params = _initial_params(config)
    previous = checkpointing.load_params(chain[stage - 1], "best")
    fx.assert_trees_equal(params["t5"], previous["t5"])
    fresh = vae_lib.init_params(
        jax.random.split(jax.random.PRNGKey(42))[0], vae_task.model_config(config)
    )
    assert not np.array_equal(
        np.asarray(fresh["t5"]["shared"]["embedding"]),
        np.asarray(params["t5"]["shared"]["embedding"]),
    )
    for head in set(params) - {"t5"}:  # stage 3: layer_norm, proj, post_proj
        fx.assert_trees_equal(params[head], fresh[head])
    assert (set(params) - {"t5"}) == ({"layer_norm", "proj", "post_proj"} if stage == 3 else set())


def test_a_resume_reads_its_own_checkpoint_not_the_previous_stage(chain, tmp_path):
    """Once a stage has a checkpoint, its ``init_from`` workdir may be gone (moved, another
    machine): the resume restores without reading it."""
    previous = tmp_path / "stage1"
    shutil.copytree(chain[1], previous)
    config = fx.tiny_config(2, num_steps=2, eval_every=0, ckpt_every=2)
    config.train.init_from = str(previous)
    fx.train(str(tmp_path / "stage2"), config)
    shutil.rmtree(previous)
    config.train.num_steps = 3
    fx.train(str(tmp_path / "stage2"), config)
    steps = [r["step"] for r in metric_writer.read_jsonl(str(tmp_path / "stage2"))]
    assert max(steps) == 3


def test_chained_runs_evaluate_and_select_their_metric(chain):
    stage2 = [r for r in metric_writer.read_jsonl(chain[2]) if "eval/f1_iopd" in r]
    assert [r["step"] for r in stage2] == [2]
    stage1 = [r for r in metric_writer.read_jsonl(chain[1]) if "eval/loss" in r]
    assert all(np.isfinite(r["eval/f1_opd"]) for r in stage1)  # full_sequence decoding works


def test_init_from_another_size_is_a_clear_error(chain, tmp_path):
    config = fx.tiny_config(2)
    config.model.t5.d_ff = 48
    config.train.init_from = chain[1]
    with pytest.raises(CheckpointMismatchError, match="d_ff|wi|shape"):
        _initial_params(config)
    config = fx.tiny_config(2)
    config.train.init_from = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        _initial_params(config)


def test_loss_falls_clearly_in_a_short_run(tmp_path):
    config = fx.tiny_config(3, num_steps=40, log_every=10, ckpt_every=40)
    config.optim.lr = 3e-3
    config.data.batch_size = 16
    fx.train(tmp_path, config)
    losses = [r["train/loss"] for r in metric_writer.read_jsonl(tmp_path) if "train/loss" in r]
    assert len(losses) == 4
    # From about ln(1000) = 6.9 (uniform over the vocabulary), falling at every log.
    assert losses[0] > 6.0 and losses[-1] < losses[0] - 1.2, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

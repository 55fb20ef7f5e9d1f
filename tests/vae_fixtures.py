"""Helpers of the PhraseVAE training/inference tests: tiny configs and short trainings.

Everything runs on the synthetic corpus (``config.data.data_dir = ""``), so no prepared
dataset is needed; the test files build a ``songs`` dataset of their own where they need one.
"""

from __future__ import annotations

import numpy as np

from configs import vae_common
from input_pipeline import vae_pipeline
from phraseldm_jax import checkpointing, trainer, vae_task


def tiny_config(stage: int = 3, **train):
    """The ``tiny`` config of ``stage``, shrunk further so that tests compile fast (one layer
    each side, one batch length of 64, short decoding), with ``train`` fields overridden."""
    config = vae_common.vae_config(stage, "tiny")
    config.model.t5 = vae_common.t5_fields(32, 64, 16, 2, 1)
    config.data.max_length = 64  # synthetic phrases and bars all fit
    config.data.bucket_lengths = (64,)
    config.train.eval_every = 0
    config.train.ckpt_every = 10
    config.eval.max_examples = 64
    config.eval.max_f1_examples = 16
    config.eval.max_decode_length = 16
    config.eval.decode_batch_size = 8  # one decoding shape: no compaction, few compiles
    config.train.update(train)
    return config


def train(workdir, config) -> trainer.TrainResult:
    """``trainer.run`` of the VAE task of ``config`` in ``workdir``."""
    import jax

    batches = vae_pipeline.make_train_iter(config, jax.local_device_count())
    return trainer.run(config, str(workdir), vae_task.vae_task(config), batches)


def train_tiny_vae(workdir, steps: int = 6, **overrides) -> str:
    """A stage-3 tiny model trained for ``steps`` steps; returns its workdir."""
    config = tiny_config(3, num_steps=steps, **overrides)
    train(workdir, config)
    return str(workdir)


_TRAINED: dict[str, str] = {}


def shared_trained_vae(tmp_path_factory, steps: int = 4) -> str:
    """One tiny stage-3 workdir per test session (trained once, shared by the test files
    that only need *a* trained model: inference, latent tools, latent dataset)."""
    if "vae" not in _TRAINED:
        workdir = tmp_path_factory.mktemp("shared_tiny_vae")
        _TRAINED["vae"] = train_tiny_vae(workdir, steps=steps)
    return _TRAINED["vae"]


def synthetic_songs_dir(tmp_path_factory, n_songs: int = 12) -> str:
    """A ``songs`` dataset of the first ``n_songs`` synthetic songs (built once per session)."""
    if "songs" not in _TRAINED:
        from input_pipeline import synthetic, tfds_builders

        data_dir = str(tmp_path_factory.mktemp("synthetic_songs"))
        tfds_builders.quiet()
        tfds_builders.build(data_dir, names=("songs",), songs=synthetic.synthetic_records(n_songs))
        _TRAINED["songs"] = data_dir
    return _TRAINED["songs"]


def params_of(workdir, which: str = "latest"):
    return checkpointing.load_params(str(workdir), which)


def assert_trees_equal(a, b) -> None:
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

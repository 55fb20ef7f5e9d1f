"""Trains PhraseLDM on a song-latent dataset; resumes from the workdir's latest checkpoint.

  python train_ldm.py --config configs/ldm_lencond.py --workdir runs/ldm_lencond
  python train_ldm.py --config configs/ldm_lencond.py:small --workdir runs/ldm_small \\
      --config.data.latent_dir data_cache/pop909_latents \\
      --config.vae.workdir data_cache/pop909_vae

The same loop as the VAE (``trainer.run``): mesh, sharded jitted step, Orbax checkpoints of
the train state and the Grain iterator, metrics in ``<workdir>/metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from input_pipeline import ldm_pipeline
from phraseldm_jax import ldm_task, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/ldm_*.py[:size]", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def train(config: ml_collections.ConfigDict, workdir: str, decoder=None) -> trainer.TrainResult:
    """Resolves the config against the data, builds the task and runs the training loop.

    decoder: optional phrase decoder for evaluation (default: the PhraseVAE of
    ``config.vae.workdir``). To become ``ldm_task.train`` (ldm_task's owner moves it).
    """
    trainer.maybe_initialize_distributed()  # before the task touches a jax backend
    ldm_task.resolve_config(config)
    task = ldm_task.make_ldm_task(config, decoder)
    return trainer.run(config, workdir, task, ldm_pipeline.make_train_iter(config))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = train(FLAGS.config, FLAGS.workdir)
    print(f"done at step {result.step}: {result.metrics}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])  # not on import (tests import train)
    app.run(main)

"""Trains PhraseLDM on a song-latent dataset; resumes from the workdir's latest checkpoint.

  python train_ldm.py --config configs/ldm_lencond.py --workdir runs/ldm_lencond
  python train_ldm.py --config configs/ldm_lencond.py:small --workdir runs/ldm_small \\
      --config.data.latent_dir data_cache/pop909_latents \\
      --config.vae.workdir data_cache/pop909_vae

The same loop as the VAE (``trainer.run``): mesh, sharded jitted step, Orbax checkpoints of
the train state and the Grain iterator, metrics in ``<workdir>/metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from phraseldm_jax import ldm_task
from phraseldm_jax.cli import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/ldm_*.py[:size]", lock_config=True)
flags.DEFINE_bool("verbose", False, "show the log messages of absl, Orbax, JAX (hidden by default)")
flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging(FLAGS.verbose)
    result = ldm_task.train(FLAGS.config, FLAGS.workdir)
    print(f"done at step {result.step}: {result.metrics}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    common.run_absl(main, "train_ldm.py")

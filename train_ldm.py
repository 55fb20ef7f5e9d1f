"""Trains PhraseLDM on a song-latent dataset; resumes from the workdir's latest checkpoint.

  python train_ldm.py --config configs/ldm_lencond.py --workdir runs/ldm_lencond
  python train_ldm.py --config configs/ldm_lencond.py:small --workdir runs/ldm_small \\
      --config.data.latent_dir data_cache/pop909_latents \\
      --config.vae.workdir data_cache/pop909_vae

The same loop as the VAE (``trainer.run``): mesh, sharded jitted step, Orbax checkpoints of
the train state and the Grain iterator, metrics in ``<workdir>/metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from phraseldm_jax import fileio, ldm_task, trainer
from phraseldm_jax.cli import common
from phraseldm_jax.errors import (
    CheckpointDamagedError,
    CheckpointSaveError,
    ConfigError,
    NonFiniteError,
    WorkdirBusyError,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/ldm_*.py[:size]", lock_config=True)
flags.DEFINE_bool("verbose", False, "show the log messages of absl, Orbax, JAX (hidden by default)")
PATH_FIELDS = ("data.latent_dir", "vae.workdir", "eval.songs_dir")  # path fields of the config
flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging(FLAGS.verbose)
    # Relative paths and ~ work (Orbax takes absolute paths only, and config.json keeps them).
    trainer.resolve_paths(FLAGS.config, PATH_FIELDS)
    workdir = fileio.user_path(FLAGS.workdir)
    try:
        result = ldm_task.train(FLAGS.config, workdir)
    except (ConfigError, CheckpointDamagedError, WorkdirBusyError) as error:  # one line
        raise SystemExit(common.usage_error("train_ldm.py", str(error))) from None
    except (NonFiniteError, CheckpointSaveError) as error:  # diverged / disk full: one line, exit 1
        print(f"train_ldm.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if result.interrupted:  # SIGTERM / SIGINT: latest saved, exit 128 + signal
        print(result.interruption_line, file=sys.stderr)
        raise SystemExit(result.exit_status)
    print(f"done at step {result.step}: {result.metrics}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    common.run_absl(main, "train_ldm.py")

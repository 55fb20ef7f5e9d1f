"""Trains one PhraseVAE stage, then scores its best checkpoint on the test split.

  python train_vae.py --config configs/vae_stage3.py:small --workdir runs/vae_small_stage3 \
      --config.train.init_from runs/vae_small_stage2

Resumes from the workdir's latest checkpoint when there is one. Writes TensorBoard events and
metrics.jsonl (trainer), and ``test_metrics.json``: F1op / F1opd / F1iopd, loss and token
accuracy on ``eval.test_split``, training wall time and steps per second.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from phraseldm_jax import fileio, trainer, vae_task
from phraseldm_jax.cli import common
from phraseldm_jax.errors import (
    CheckpointDamagedError,
    CheckpointSaveError,
    ConfigError,
    NonFiniteError,
    WorkdirBusyError,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/vae_stage*.py[:size]", lock_config=True)
flags.DEFINE_bool("verbose", False, "show the log messages of absl, Orbax, JAX (hidden by default)")
PATH_FIELDS = ("train.init_from", "data.data_dir")  # path fields of the config
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and test_metrics.json go")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging(FLAGS.verbose)
    # Relative paths and ~ work (Orbax takes absolute paths only, and config.json keeps them).
    trainer.resolve_paths(FLAGS.config, PATH_FIELDS)
    workdir = fileio.user_path(FLAGS.workdir)
    try:
        summary = vae_task.train_and_test(FLAGS.config, workdir)
    except (ConfigError, CheckpointDamagedError, WorkdirBusyError) as error:  # one line
        raise SystemExit(common.usage_error("train_vae.py", str(error))) from None
    except (NonFiniteError, CheckpointSaveError) as error:  # diverged / disk full: one line, exit 1
        print(f"train_vae.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if summary.get("interrupted"):  # SIGTERM / SIGINT: latest saved, exit 128 + signal
        print(summary["interruption_line"], file=sys.stderr)
        raise SystemExit(summary["exit_status"])
    print(json.dumps({k: summary[k] for k in ("f1_op", "f1_opd", "f1_iopd", "loss")}, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    common.run_absl(main, "train_vae.py")

"""Trains PhraseLDM on a song-latent dataset; resumes from the workdir's latest checkpoint.

  python train_ldm.py --config configs/ldm_lencond.py --workdir runs/ldm_lencond
  python train_ldm.py --config configs/ldm_lencond.py:small --workdir runs/ldm_small \\
      --config.data.latent_dir data_cache/pop909_latents \\
      --config.vae.workdir data_cache/pop909_vae

The same loop as the VAE (``trainer.run``): mesh, sharded jitted step, Orbax checkpoints of
the train state and the Grain iterator, metrics in ``<workdir>/metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import functools

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from input_pipeline import ldm_pipeline
from phraseldm_jax import ldm_task, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "LDM config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")


def make_train_iter(config: ml_collections.ConfigDict, process_index: int, process_count: int):
    """The training iterator of one process (``trainer.run``'s ``make_train_iter``)."""
    data = config.data
    return ldm_pipeline.make_iterator(
        data.latent_dir,
        data.train_split,
        max_bars=config.model.dit.sample_size // ldm_pipeline.SLOTS_PER_BAR,
        reference_padding=data.reference_padding,
        worker_count=data.worker_count,
        batch_size=data.batch_size,
        seed=config.train.seed,
        train=True,
        augmentation=data.augmentation,
        exclude_unfit_plans=bool(data.exclude_unfit_plans and config.model.sec_control),
        process_index=process_index,
        process_count=process_count,
        read_threads=data.read_threads,
    )


def train(config: ml_collections.ConfigDict, workdir: str, decoder=None) -> trainer.TrainResult:
    """Resolves the config against the data, builds the task and runs the training loop.

    decoder: optional phrase decoder for evaluation (default: the PhraseVAE of
    ``config.vae.workdir``).
    """
    trainer.maybe_initialize_distributed()  # before the task touches a jax backend
    ldm_task.resolve_config(config)
    task = ldm_task.make_ldm_task(config, decoder)
    return trainer.run(config, workdir, task, functools.partial(make_train_iter, config))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = train(_CONFIG.value, _WORKDIR.value)
    print(f"done at step {result.step}: {result.metrics}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

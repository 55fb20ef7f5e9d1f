"""The groups every training config has (``optim``, ``train``, ``mesh``), read by
``phraseldm_jax.trainer`` and ``phraseldm_jax.optim``; ``vae_common`` and ``ldm_common`` start
from these defaults and change what their recipe needs."""

from __future__ import annotations

import ml_collections


def default_train_config() -> ml_collections.ConfigDict:
    """The ``optim``, ``train`` and ``mesh`` groups with defaults (the VAE stage-1 recipe)."""
    config = ml_collections.ConfigDict()

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"  # "adam" (torch Adam, L2 decay) | "adamw" (decoupled decay x lr)
    config.optim.lr = 1e-4  # peak learning rate
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8  # added to sqrt(v_hat), as torch does
    config.optim.weight_decay = 0.0  # stage 3: 1e-3 (adamw); LDM: 0.01 (adamw)
    config.optim.clip_norm = 0.0  # global grad-norm clip, 0 = none; LDM: 0.5
    config.optim.schedule = "constant"  # "constant" | "warmup_cosine" (cosine to 0 at num_steps)
    config.optim.warmup_steps = 0  # linear warm-up from 0 (both schedules)
    config.optim.freeze = []  # regexes over param paths ("params/sec_encoder/...") not trained
    config.optim.grad_accum_steps = 1  # micro-batches per step; the batch splits evenly

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1000  # optimiser updates in all
    config.train.log_every = 50  # train metrics are averaged over this many steps
    config.train.eval_every = 250  # task.evaluate every this many steps (0 = never)
    config.train.ckpt_every = 1000  # checkpoint every this many steps (and at the end)
    config.train.keep_last = 3  # latest checkpoints kept (+ the lowest-train-loss one; best apart)
    # True: checkpoint files are written in the background while training goes on (a kill then
    # loses at most ckpt_every steps plus those run during the write); False: each save is
    # complete on disk before the next step (at most ckpt_every steps lost).
    config.train.async_checkpoints = True
    config.train.seed = 42  # init and per-step keys
    # Kind of per-step key the loss (dropout, noise) draws from: "threefry" (JAX's default; the
    # fastest measured on CPU) | "rbg" | "unsafe_rbg" (XLA's RngBitGenerator: slower on CPU,
    # the usual choice on TPU; docs/BENCHMARKS.md).
    config.train.rng_impl = "threefry"
    config.train.best_metric = "eval/loss"  # eval metric choosing the best checkpoint ("" = off)
    config.train.best_mode = "min"  # "min" | "max"
    config.train.patience = 0  # evals without a min_delta improvement before stopping; 0 = off
    config.train.min_delta = 0.0  # improvement needed to reset the patience counter
    config.train.progress = True  # tqdm progress bar on process 0
    # A step whose loss, gradients or updated params are not finite (never saved, whatever the
    # policy): "stop" ends the run naming the step and the last good checkpoint; "skip" leaves
    # params and optimiser state as they were (train/skipped_steps counts them in the log).
    config.train.nonfinite = "stop"
    config.train.max_skipped_steps = 10  # "skip": this many skipped steps in a row end the run

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis size; -1 = all devices left
    config.mesh.fsdp = 1  # parameter-sharding axis size
    config.mesh.fsdp_min_size = 2**18  # params with fewer elements stay replicated
    return config

"""A tiny regression task and Grain input for the trainer/checkpointing/sharding tests.

Model: x [B, 16] -> frozen projection [16, 16] -> Dense(hidden) -> ReLU -> Dropout -> Dense(4).
With ``fsdp_min_size=256`` both kernels and the frozen projection are big enough to shard,
the biases stay replicated. Every batch carries its example ``index`` so tests can check the
data order through the ``train/index_sum`` metric.
"""

from __future__ import annotations

import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import train_common
from phraseldm_jax import trainer

NUM_EXAMPLES = 96
IN_DIM, OUT_DIM = 16, 4


class MLP(nn.Module):
    hidden: int = 64
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(OUT_DIM)(x)


def examples(nan_index: int | None = None) -> list[dict]:
    """The toy set; ``nan_index``: that example's inputs are NaN (its batches' loss too)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, IN_DIM)).astype(np.float32)
    w = rng.normal(size=(IN_DIM, OUT_DIM)).astype(np.float32) / 4
    y = np.tanh(x @ w).astype(np.float32)
    if nan_index is not None:
        x[nan_index] = np.nan
    return [dict(x=x[i], y=y[i], index=np.int32(i)) for i in range(NUM_EXAMPLES)]


def make_train_iter_factory(
    batch_size: int = 16,
    seed: int = 3,
    fail_after: int | None = None,
    nan_index: int | None = None,
    announce_delay: float | None = None,
):
    """``make_train_iter(process_index, process_count)`` over a shuffled, repeated toy set.

    ``fail_after``: the iterator raises after serving that many batches (a simulated crash).
    ``announce_delay``: every fetch prints ``batch <k>`` (k = 0 for the peek at start-up, else
    the step) to stdout and then sleeps that long, so a test can signal at a known point.
    """
    data = examples(nan_index)

    def make_train_iter(process_index: int, process_count: int):
        ds = (
            grain.MapDataset.source(data)[process_index::process_count]
            .shuffle(seed=seed)
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .to_iter_dataset()
        )
        it = iter(ds)
        if announce_delay is not None:
            return AnnouncingIterator(it, announce_delay)
        return it if fail_after is None else CrashingIterator(it, fail_after)

    return make_train_iter


class CrashingIterator(grain.DatasetIterator):
    """Wraps a Grain iterator; raises RuntimeError on batch ``fail_after + 1`` counted from
    creation or the last ``set_state`` (so a peek-and-rewind does not count)."""

    def __init__(self, inner, fail_after: int):
        super().__init__(inner)
        self.fail_after = self.left = fail_after

    def __next__(self):
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
        self.left = self.fail_after


class AnnouncingIterator(grain.DatasetIterator):
    """Wraps a Grain iterator; prints ``batch <k>`` before serving batch k and sleeps (k counts
    from 0, the trainer's peek at start-up, which is rewound: step s then fetches batch s)."""

    def __init__(self, inner, delay: float):
        super().__init__(inner)
        self.delay, self.count = delay, 0

    def __next__(self):
        print(f"batch {self.count}", flush=True)
        self.count += 1
        time.sleep(self.delay)
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def frozen_projection() -> dict:
    rng = np.random.default_rng(1)
    return {"proj": (np.eye(IN_DIM) + 0.1 * rng.normal(size=(IN_DIM, IN_DIM))).astype(np.float32)}


def make_task(hidden=64, dropout=0.1, evaluate=None, loss_scale=1.0) -> trainer.Task:
    """The toy task; ``evaluate(params, step)`` is passed through (None = no evaluation)."""
    model = MLP(hidden=hidden, dropout=dropout)

    def init_params(rng, batch):
        return model.init(rng, batch["x"], train=False)["params"]

    def loss_fn(params, frozen, batch, rng, train):
        x = batch["x"] @ frozen["proj"]
        pred = model.apply({"params": params}, x, train=train, rngs={"dropout": rng})
        mse = jnp.mean((pred - batch["y"]) ** 2) * loss_scale
        return mse, {"mse": mse, "index_sum": jnp.sum(batch["index"]).astype(jnp.float32)}

    return trainer.Task(
        name="toy",
        init_params=init_params,
        loss_fn=loss_fn,
        evaluate=evaluate,
        frozen=frozen_projection(),
    )


def small_config(num_steps=8, data=-1, fsdp=1, **train_overrides):
    config = train_common.default_train_config()
    config.optim.name = "adamw"
    config.optim.lr = 1e-2
    config.optim.weight_decay = 1e-2
    config.optim.clip_norm = 1.0
    config.train.num_steps = num_steps
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.ckpt_every = 2
    config.train.keep_last = 2
    config.train.seed = 0
    config.train.progress = False
    config.train.update(train_overrides)
    config.mesh.data = data
    config.mesh.fsdp = fsdp
    config.mesh.fsdp_min_size = 256
    return config


def host_tree(tree):
    """Device arrays -> numpy (a copy that survives donation)."""
    return jax.tree.map(lambda x: np.array(x), tree)

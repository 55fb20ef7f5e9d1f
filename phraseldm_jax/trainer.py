"""The one training loop for PhraseVAE and PhraseLDM.

A ``Task`` says what differs between the two trainings (init, loss, evaluation, frozen
weights); this module owns the rest: the train state, the jitted step (gradient
accumulation, optimiser update, standard metrics) and ``run`` (mesh -> iterator -> optimiser ->
abstract state -> restore or init -> jit -> loop with logging, evaluation, best checkpoint,
early stopping and checkpoints). A run resumed from its workdir continues exactly as an
uninterrupted one would, data order and logged rows included.

Faults it survives: a second trainer on the same workdir is refused (``workdir_lock``); a step
with non-finite loss or gradients is never saved (a flag computed in the jitted step, read for
every step before any save; ``train.nonfinite`` stops the run or skips such updates); the
latest checkpoints keep, besides the last ``keep_last``, the one with the lowest train loss;
``config.json`` is written only once a restore or init succeeded; SIGTERM / SIGINT save
``latest`` at the step reached and return (``interrupts``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phraseldm_jax import (
    checkpointing,
    errors,
    fileio,
    interrupts,
    metric_writer,
    optim,
    sharding,
    workdir_lock,
)
from phraseldm_jax import nonfinite_guard as guard


@dataclasses.dataclass(frozen=True)
class Task:
    """What one training needs besides the generic loop.

    init_params: ``(rng, example_batch: dict[str, np.ndarray]) -> params``, fresh; the example
        is one host-local batch. Traced for the state's shapes, so it reads no files.
    warm_start: ``params -> params`` of the same shapes, applied to a fresh init only (never
        to a resume): loads a previous stage. Traced under ``jit``, so loaded weights become
        constants of the init program.
    loss_fn: ``(params, frozen, batch, rng, train: bool) -> (scalar loss, dict[str, scalar])``.
    evaluate: ``(params, step) -> dict[str, float | np.ndarray image | str]``, host side;
        logged as ``eval/<name>``. ``params`` are only valid until the next train step.
    frozen: weights the loss reads but never trains (the LDM's VAE); an explicit jit argument
        sharded by the same FSDP rule as the params.
    """

    name: str
    init_params: Callable
    loss_fn: Callable
    evaluate: Callable | None = None
    frozen: Any = None
    warm_start: Callable | None = None


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. ``step``: updates done (int32); ``rng``: uint32[2] run key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Summary of a finished ``run``: final step, last logged metrics, best eval metric.

    interrupted: ``"SIGTERM"`` / ``"SIGINT"`` when a signal stopped the run (``latest`` then
    holds ``step``); checkpoint: the newest latest checkpoint, ``"latest/N"`` (None: none)."""

    step: int
    metrics: dict[str, float]
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    interrupted: str | None = None
    checkpoint: str | None = None
    # Step programs compiled in this run, one per batch shape (more: the loop recompiles).
    compiled_step_programs: int | None = None

    @property
    def exit_status(self) -> int:
        """What a train script exits with: 0, or 128 + the signal's number (143, 130)."""
        return interrupts.exit_status(self.interrupted) if self.interrupted else 0

    @property
    def interruption_line(self) -> str | None:
        """The one line a train script prints after an interrupted run (None otherwise)."""
        if not self.interrupted:
            return None
        if self.checkpoint is None:
            return (
                f"interrupted by {self.interrupted} at step {self.step}: no checkpoint saved "
                "yet; run the same command again to start"
            )
        return (
            f"interrupted by {self.interrupted} at step {self.step}: saved checkpoint "
            f"{self.checkpoint}; run the same command again to resume"
        )


# ----------------------------------------------------------------------------------------
# The train step.


def init_train_state(
    task: Task, tx: optax.GradientTransformation, seed: int, example_batch, warm: bool = True
):
    """Fresh ``TrainState`` (step 0); the seed is split into the init key and the run key.

    ``warm=False`` leaves out ``task.warm_start`` (same shapes, no files read): for the
    abstract state a resume restores into."""
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = task.init_params(init_rng, example_batch)
    if warm and task.warm_start is not None:
        params = task.warm_start(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=run_rng
    )


def split_micro_batches(batch: dict, num_micro: int, micro_sharding=None) -> dict:
    """``[B, ...] -> [num_micro, B / num_micro, ...]``; micro-batch k holds rows k::num_micro.

    Strided rows keep every micro-batch spread over all devices without moving data.
    """

    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        if micro_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, micro_sharding)
        return x

    return jax.tree.map(split, batch)


def _namespaced(prefix: str, metrics: dict) -> dict:
    return {k if k.startswith(prefix) else prefix + k: v for k, v in metrics.items()}


RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def step_key(run_key: jax.Array, step: jax.Array, impl: str = "threefry") -> jax.Array:
    """The key of one step: ``fold_in(run_key, step)`` (a raw threefry key, as checkpointed),
    for "threefry" as it is, else seeding a key of ``impl`` from its bits (same run key and
    step, same key)."""
    key = jax.random.fold_in(run_key, step)
    if impl == "threefry":
        return key
    if impl not in RNG_IMPLS:
        raise ValueError(f"train.rng_impl must be one of {RNG_IMPLS}, got {impl!r}")
    width = jax.random.key_data(jax.random.key(0, impl=impl)).shape[-1]
    return jax.random.wrap_key_data(jax.random.bits(key, (width,), jnp.uint32), impl=impl)


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    grad_accum_steps: int = 1,
    micro_sharding=None,
    skip_nonfinite: bool = False,
    rng_impl: str = "threefry",
) -> Callable:
    """``train_step(state, batch, frozen) -> (state, metrics)``, pure, to be jitted once.

    The step's key is ``fold_in(state.rng, state.step)`` (micro-batch i: ``fold_in(key, i)``).
    Metrics: ``train/loss``, ``train/grad_norm`` (all params, before clipping),
    ``train/param_norm`` (after the update), ``train/lr`` (of this update), the task's own and
    ``guard.FINITE`` (bool: loss, grad norm and param norm finite). With
    ``grad_accum_steps > 1`` gradients, loss and task metrics are means over micro-batches.
    ``skip_nonfinite``: a step whose flag is false keeps params and optimiser state as they
    were (``step`` still advances, so the next step sees the next batch and key).
    ``rng_impl``: the kind of key the loss gets (``step_key``): "threefry" (JAX's default),
    or "rbg" / "unsafe_rbg", whose bulk random bits (dropout masks) come from XLA's
    RngBitGenerator, several times cheaper than threefry's where it runs as plain ops (CPU).
    """
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

    def gradients(params, frozen, batch, rng):
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(params, frozen, batch, rng, True)
            return loss, aux, grads
        micro = split_micro_batches(batch, grad_accum_steps, micro_sharding)

        def one_micro_batch(i):
            mb = jax.tree.map(lambda x: x[i], micro)
            (loss, aux), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), True)
            return grads, loss, aux

        def body(total, i):
            return jax.tree.map(jnp.add, total, one_micro_batch(i)), None

        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one_micro_batch, 0)
        )
        total, _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum_steps))
        grads, loss, aux = jax.tree.map(lambda x: x / grad_accum_steps, total)
        return loss, aux, grads

    def train_step(state: TrainState, batch: dict, frozen: Any):
        rng = step_key(state.rng, state.step, rng_impl)
        loss, aux, grads = gradients(state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        if skip_nonfinite:
            keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/param_norm": param_norm,
            "train/lr": jnp.asarray(lr_fn(state.step), jnp.float32),
            **_namespaced("train/", aux),
            guard.FINITE: finite,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------
# Best checkpoint and early stopping (Lightning's ModelCheckpoint + EarlyStopping semantics).


def fresh_progress() -> dict:
    """Loop bookkeeping stored in every checkpoint, so a resumed run decides identically."""
    return dict(
        best_value=None,  # best eval metric so far (any strict improvement)
        best_step=None,
        stop_reference=None,  # value the patience counter compares against
        evals_without_improvement=0,
        stopped_early=False,
        last_metrics={},
        window=[],  # host metrics of the steps since the last logged row (exact resume)
        skipped_steps=0,  # train.nonfinite="skip": updates skipped so far
        skips_in_a_row=0,
    )


def update_progress(progress: dict, step: int, value: float, mode: str, min_delta: float):
    """Records one eval value; returns ``(progress, is_new_best)``.

    The best checkpoint follows any strict improvement; the patience counter resets only on
    an improvement of more than ``min_delta`` over its reference. NaN never improves.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"train.best_mode={mode!r}: expected 'min' or 'max'")
    sign = 1.0 if mode == "min" else -1.0

    def better(a, b, delta=0.0):  # a improves on b by more than delta
        return not math.isnan(a) and (b is None or sign * (b - a) > delta)

    progress = dict(progress)
    is_new_best = better(value, progress["best_value"])
    if is_new_best:
        progress.update(best_value=value, best_step=step)
    if better(value, progress["stop_reference"], min_delta):
        progress.update(stop_reference=value, evals_without_improvement=0)
    else:
        progress["evals_without_improvement"] += 1
    return progress, is_new_best


# ----------------------------------------------------------------------------------------
# Helpers of run().


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the environment asks for a multi-process run.

    Asked for by ``PHRASELDM_DISTRIBUTED=1`` (cluster auto-detection: TPU pods, SLURM,
    Open MPI) or by ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), with
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where no cluster is detected (jax itself reads
    only the address). Must run before anything touches a jax backend.
    """
    wanted = os.environ.get("PHRASELDM_DISTRIBUTED") == "1" or bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS")
    )
    if wanted and not jax.distributed.is_initialized():
        given = {
            name: int(os.environ[var])
            for name, var in (
                ("num_processes", "JAX_NUM_PROCESSES"),
                ("process_id", "JAX_PROCESS_ID"),
            )
            if os.environ.get(var)
        }
        jax.distributed.initialize(**given)


def peek_batch(data_iter) -> dict:
    """The iterator's next host batch, leaving its position unchanged (for shapes at init)."""
    position = data_iter.get_state()
    batch = next(data_iter)
    data_iter.set_state(position)
    return {k: np.asarray(v) for k, v in batch.items()}


def check_batch(batch: dict, grad_accum_steps: int) -> None:
    """The host batch must split evenly over local devices and micro-batches."""
    per_step = jax.local_device_count() * grad_accum_steps
    for key, value in batch.items():
        if np.ndim(value) == 0 or np.shape(value)[0] % per_step:
            raise ValueError(
                f"batch field {key!r} has shape {np.shape(value)}: the per-host batch must be a "
                f"multiple of {jax.local_device_count()} local devices x "
                f"{grad_accum_steps} grad_accum_steps = {per_step}"
            )


def select_best(progress: dict, step: int, eval_metrics: dict, train_config) -> tuple[dict, bool]:
    """Feeds ``train_config.best_metric`` of one evaluation to ``update_progress``.

    Returns ``(progress, is_new_best)``; ``progress["stopped_early"]`` is set once
    ``patience`` evaluations in a row brought no ``min_delta`` improvement.
    """
    name = train_config.best_metric
    if name not in eval_metrics:
        raise ValueError(
            f"train.best_metric={name!r} is not among the eval metrics {sorted(eval_metrics)}"
        )
    progress, is_best = update_progress(
        progress, step, float(eval_metrics[name]), train_config.best_mode, train_config.min_delta
    )
    patience = train_config.patience
    progress["stopped_early"] = bool(patience and progress["evals_without_improvement"] >= patience)
    return progress, is_best


def check_train_config(tc, task: Task) -> None:
    """Config mistakes found before the workdir is touched (each a ``ConfigError`` naming the field)."""
    if tc.patience > 0 and (task.evaluate is None or not tc.best_metric or not tc.eval_every):
        raise errors.ConfigError(
            "train.patience > 0 needs task.evaluate, train.eval_every > 0 and train.best_metric"
        )
    if guard.nonfinite_policy(tc) not in guard.NONFINITE_POLICIES:
        raise errors.ConfigError(f"train.nonfinite={tc.nonfinite!r}: expected 'stop' or 'skip'")
    if tc.get("rng_impl", "threefry") not in RNG_IMPLS:
        raise errors.ConfigError(f"train.rng_impl={tc.rng_impl!r}: expected one of {RNG_IMPLS}")
    if int(tc.get("max_skipped_steps", 10)) < 1:
        raise errors.ConfigError(f"train.max_skipped_steps={tc.max_skipped_steps} must be >= 1")


def checkpoint_label(store: checkpointing.CheckpointStore) -> str | None:
    """``"latest/N"`` for the newest latest checkpoint, None when there is none."""
    step = store.latest_step()
    return None if step is None else f"latest/{step}"


def _scalars(metrics: dict) -> dict[str, float]:
    values = {k: metric_writer.as_scalar(v) for k, v in metrics.items()}
    return {k: v for k, v in values.items() if v is not None}


def resolve_paths(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> None:
    """Makes the dotted path ``fields`` of ``config`` (``"train.init_from"``) absolute with
    ``~`` expanded, in place, so relative paths on a command line work and ``config.json``
    records where they pointed; empty fields (off) and absent ones stay as they are."""
    for dotted in fields:
        *groups, name = dotted.split(".")
        group = config
        for part in groups:
            group = group.get(part) if group is not None else None
        if group is not None and group.get(name):
            group[name] = fileio.user_path(group[name])


# ----------------------------------------------------------------------------------------
# The loop.


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    make_train_iter: Callable[[int, int], Any],
) -> TrainResult:
    """Trains ``task`` in ``workdir``, resuming from its latest checkpoint when there is one.

    ``make_train_iter(process_index, process_count)``: a checkpointable Grain iterator of
    host-local numpy batches (dict of ``[per_host_batch, ...]`` arrays); its first batch is
    peeked (and rewound) to give ``task.init_params`` its shapes.

    Evaluation happens only at multiples of ``eval_every`` and checkpoints at multiples of
    ``ckpt_every`` plus the last step (and the step a SIGTERM / SIGINT stopped at), so a run
    split in two decides and logs exactly like one. Raises ``WorkdirBusyError`` when another
    run holds the workdir and ``NonFiniteError`` when the non-finite guard stops the run. Call
    before anything else touches a jax backend when running multi-process.
    """
    maybe_initialize_distributed()
    check_train_config(config.train, task)
    workdir = fileio.user_path(workdir)  # Orbax takes absolute paths only
    # The lock comes before anything is written into the workdir; the handlers cover restore
    # and compilation too (a signal there stops before the first step).
    with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
        with interrupts.StopRequest() as stop:
            return _run_locked(config, workdir, task, make_train_iter, stop)


@dataclasses.dataclass(frozen=True)
class LoopParts:
    """What the loop drives; ``step_fn`` is None when a signal came before it was compiled."""

    tc: ml_collections.ConfigDict
    task: Task
    store: checkpointing.CheckpointStore
    writer: metric_writer.MetricWriter
    data_iter: Any
    batch_sh: Any
    frozen: Any
    step_fn: Callable | None
    stop: interrupts.StopRequest


def _run_locked(config, workdir, task, make_train_iter, stop) -> TrainResult:
    tc, accum = config.train, int(config.optim.grad_accum_steps)
    # Mesh and input.
    mesh = sharding.make_mesh(config.mesh)
    data_iter = make_train_iter(jax.process_index(), jax.process_count())
    example = peek_batch(data_iter)
    check_batch(example, accum)
    batch_sh = sharding.batch_sharding(mesh)

    # Optimiser and abstract state: shapes without allocating, then a sharding per leaf.
    tx, lr_fn = optim.make_optimizer(config.optim, tc.num_steps)
    init_fn = functools.partial(init_train_state, task, tx, tc.seed)
    abstract_state = jax.eval_shape(functools.partial(init_fn, warm=False), example)
    state_sh = sharding.tree_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)

    store = checkpointing.CheckpointStore(workdir, keep_last=tc.keep_last)
    writer = None
    try:
        state, progress, resume_step = restore_or_init(
            store, data_iter, init_fn, example, sharding.with_shardings(abstract_state, state_sh)
        )
        # Only now: a failed restore (another model size, say) leaves config.json as it was,
        # so the workdir's checkpoints stay loadable.
        checkpointing.write_workdir_config(workdir, config)
        writer = metric_writer.MetricWriter(workdir, resume_step=resume_step)

        # The step, compiled once: state donated, frozen weights an explicit sharded argument.
        frozen_sh = sharding.tree_shardings(task.frozen, mesh, config.mesh.fsdp_min_size)
        frozen = jax.device_put(task.frozen, frozen_sh)
        step_fn = None
        if not stop.agreed(sync_point=True):
            micro_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
            skip = guard.nonfinite_policy(tc) == "skip"
            jitted = jax.jit(
                make_train_step(
                    task,
                    tx,
                    lr_fn,
                    accum,
                    micro_sh,
                    skip_nonfinite=skip,
                    rng_impl=tc.get("rng_impl", "threefry"),
                ),  # fmt: skip
                in_shardings=(state_sh, batch_sh, frozen_sh),
                out_shardings=(state_sh, sharding.replicated(mesh)),
                donate_argnums=0,
            )
            # Compiled now for the first batch (jit reuses it): a signal during compilation
            # stops before step 1. Other shapes (length buckets) compile when they come.
            jitted.lower(state, sharding.global_batch(batch_sh, example), frozen).compile()
            step_fn = jitted
        parts = LoopParts(tc, task, store, writer, data_iter, batch_sh, frozen, step_fn, stop)
        return train_loop(parts, state, progress)
    finally:
        store.wait_until_finished()
        store.close()
        if writer is not None:
            writer.close()


def restore_or_init(store, data_iter, init_fn, example, target) -> tuple[Any, dict, int | None]:
    """``(state, progress, resume_step)``: the newest intact latest checkpoint (damaged newer
    ones reported), or a fresh init (``resume_step`` None) placed by ``target``'s shardings."""
    if store.latest_step() is None:
        shardings = jax.tree.map(lambda x: x.sharding, target)
        return jax.jit(init_fn, out_shardings=shardings)(example), fresh_progress(), None
    state, progress = store.restore(target, data_iter)
    resume_step = store.restored.step
    if store.restored.skipped:
        skipped = ", ".join(label for label, _ in store.restored.skipped)
        print(f"resuming from {store.restored.label}; skipped damaged {skipped}", file=sys.stderr)
    store.drop_best_after(resume_step)
    return state, {**fresh_progress(), **progress}, resume_step  # older checkpoints lack keys


def train_loop(parts: LoopParts, state: TrainState, progress: dict) -> TrainResult:
    """Steps from ``state.step`` to ``train.num_steps`` with logging, evaluation, the best
    checkpoint, early stopping, checkpoints and the non-finite guard; a signal ends it after
    the current step with ``latest`` saved there."""
    tc, task, store, writer, stop = parts.tc, parts.task, parts.store, parts.writer, parts.stop
    start = int(sharding.fetch(state.step))
    show = bool(tc.progress) and jax.process_index() == 0
    bar = tqdm.tqdm(total=tc.num_steps, initial=start, disable=not show, desc=task.name)
    last_metrics, step, interrupted = dict(progress["last_metrics"]), start, None
    window = list(progress["window"])  # host rows of the steps since the last logged row
    pending: list[dict] = []  # device metrics of the steps not fetched yet
    since_save: list[dict] = []  # host rows since the last latest checkpoint
    remaining = range(start + 1, tc.num_steps + 1) if not progress["stopped_early"] else ()
    if parts.step_fn is None or stop.agreed(sync_point=True):
        remaining, interrupted = (), stop.signal_name
    try:
        for step in remaining:
            batch = sharding.global_batch(parts.batch_sh, next(parts.data_iter))
            state, metrics = parts.step_fn(state, batch, parts.frozen)
            pending.append(metrics)
            bar.update(1)

            is_log = step % tc.log_every == 0 or step == tc.num_steps
            is_eval = bool(task.evaluate and tc.eval_every and step % tc.eval_every == 0)
            is_ckpt = bool(tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.num_steps
            stopping = stop.agreed(sync_point=is_log or is_eval or is_ckpt)
            if is_log or is_eval or is_ckpt or stopping:  # every step screened before a save
                rows = sharding.fetch(pending)
                guard.screen_steps(
                    rows, step - len(rows) + 1, progress, tc, checkpoint_label(store)
                )
                pending, window, since_save = [], window + rows, since_save + rows

            if is_log:
                train_metrics, window = (
                    guard.window_means(window, guard.nonfinite_policy(tc) == "skip"),
                    [],
                )
                writer.write(step, train_metrics)
                writer.flush()
                store.check_for_errors()  # a failed background checkpoint write: one line now
                last_metrics.update(train_metrics)
                if "train/loss" in train_metrics:
                    bar.set_postfix(loss=f"{train_metrics['train/loss']:.4g}")

            if is_eval:
                eval_metrics = _namespaced("eval/", task.evaluate(state.params, step))
                writer.write(step, eval_metrics)
                writer.flush()
                last_metrics.update(_scalars(eval_metrics))
                if tc.best_metric:
                    progress, is_best = select_best(progress, step, eval_metrics, tc)
                    if is_best:
                        progress.update(last_metrics=dict(last_metrics), window=list(window))
                        store.save("best", step, state, parts.data_iter, progress)

            if is_ckpt or stopping or progress["stopped_early"]:
                progress.update(last_metrics=dict(last_metrics), window=list(window))
                loss = guard.mean_loss(since_save)
                ranked = None if loss is None else {"train/loss": loss}
                store.save("latest", step, state, parts.data_iter, progress, metrics=ranked)
                if not tc.get("async_checkpoints", True):
                    store.wait_until_finished()
                since_save = []
            if stopping:
                store.wait_until_finished()  # complete on disk before the process exits
                interrupted = stop.signal_name
                break
            if progress["stopped_early"]:
                break
    finally:
        bar.close()

    return TrainResult(
        step=step,
        metrics=last_metrics,
        best_metric=progress["best_value"],
        best_step=progress["best_step"],
        stopped_early=bool(progress["stopped_early"]),
        interrupted=interrupted,
        checkpoint=checkpoint_label(store),
        compiled_step_programs=getattr(parts.step_fn, "_cache_size", lambda: None)(),
    )

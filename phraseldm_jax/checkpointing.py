"""Orbax checkpoints of a training run (the latest k, the best one), and the one way to load
trained parameters and the config of a workdir (``load_trained``, ``read_workdir_config``).

Layout (``<workdir>/checkpoints``)::

    latest/<step>/{state, data, progress}   every ckpt_every steps, the last ``keep_last`` kept
    best/<step>/{state, data, progress}     the step with the best eval metric so far (one)

``state`` is the train state pytree (params, opt_state, step, rng); ``data`` is the Grain
iterator state (one JSON file per process); ``progress`` is a small JSON dict the trainer uses
to resume exactly (best metric so far, early-stopping counter, last metrics).

Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it when complete;
step discovery ignores those names, so an interrupted save is never restored (checked by
SIGKILLing a process in the middle of a large save, docs/ARCHITECTURE.md; test_checkpointing
replays what it left).
The managers also delete such leftovers in the background when they open.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from phraseldm_jax import fileio, optim
from phraseldm_jax.errors import CheckpointMismatchError

CHECKPOINTS = "checkpoints"
WHICH = ("latest", "best")
CONFIG_JSON = "config.json"  # the resolved config of a workdir (trainer, converter)


def checkpoint_dir(workdir: str, which: str = "latest") -> str:
    """``<workdir>/checkpoints/<which>``."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected one of {WHICH}")
    return os.path.join(os.fspath(workdir), CHECKPOINTS, which)


def _handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain_ckpt.CheckpointHandler(),
        "progress": ocp.JsonCheckpointHandler(),
    }


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    """``{"params/dense/kernel": shape}`` for every array leaf (checkpoint metadata or target)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {optim.path_string(path): tuple(leaf.shape) for path, leaf in leaves}


def check_matches(what: str, saved_tree: Any, target_tree: Any) -> None:
    """Raises CheckpointMismatchError listing missing/unexpected paths and differing shapes."""
    saved, target = _flat_shapes(saved_tree), _flat_shapes(target_tree)
    error = CheckpointMismatchError(
        what,
        missing=set(target) - set(saved),
        unexpected=set(saved) - set(target),
        shape_mismatches=[
            (path, target[path], saved[path])
            for path in set(saved) & set(target)
            if saved[path] != target[path]
        ],
    )
    if error.any:
        raise error


def _barriers_named(which: str) -> ocp.options.MultiprocessingOptions:
    """Multi-process saves synchronise on barriers named after the step; the latest and best
    managers save the same step at once (a new best at a checkpoint step), so each gets its
    own prefix (otherwise: "Barrier _async_commit_complete.<step> is already ongoing")."""
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=which)


class CheckpointStore:
    """The two Orbax managers of one workdir (latest-k and best) behind save/restore calls."""

    def __init__(self, workdir: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be >= 1")
        self.workdir = os.fspath(workdir)
        self.latest = ocp.CheckpointManager(
            checkpoint_dir(workdir, "latest"),
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_last,
                cleanup_tmp_directories=True,
                multiprocessing_options=_barriers_named("latest"),
            ),
        )
        self.best = ocp.CheckpointManager(
            checkpoint_dir(workdir, "best"),
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                cleanup_tmp_directories=True,
                multiprocessing_options=_barriers_named("best"),
            ),
        )

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in WHICH:
            raise ValueError(f"which={which!r}: expected one of {WHICH}")
        return self.latest if which == "latest" else self.best

    def latest_step(self, which: str = "latest") -> int | None:
        return self._manager(which).latest_step()

    def save(self, which: str, step: int, state: Any, data_iter: Any, progress: dict) -> None:
        """Saves ``state`` (jax arrays), the iterator position and ``progress`` at ``step``.

        Returns once the arrays are copied off the devices and the iterator position and
        ``progress`` are captured (Orbax runs Grain's handler to completion inside ``save``;
        only the array files are written in the background), so the caller may donate
        ``state`` and advance ``data_iter`` right away. ``data_iter`` must be a
        ``grain.DatasetIterator`` (Grain's handler reads its state as a dict).
        """
        manager = self._manager(which)
        if step in manager.all_steps():
            manager.delete(step)  # a re-run of a step after resuming from an older checkpoint
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain_ckpt.CheckpointSave(data_iter),
                progress=ocp.args.JsonSave(copy.deepcopy(progress)),
            ),
            force=True,
        )

    def restore(
        self, abstract_state: Any, data_iter: Any, which: str = "latest", step: int | None = None
    ) -> tuple[Any, dict]:
        """``(state, progress)`` at ``step`` (default: newest), and ``data_iter`` repositioned.

        ``abstract_state``: ShapeDtypeStructs whose ``sharding`` says where each array lands,
        so a checkpoint written on one mesh restores onto any other.
        """
        manager = self._manager(which)
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no {which} checkpoint at step {step} in {checkpoint_dir(self.workdir, which)}"
            )
        where = os.path.join(checkpoint_dir(self.workdir, which), str(step))
        check_matches(where, manager.item_metadata(step)["state"].tree, abstract_state)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain_ckpt.CheckpointRestore(data_iter),
                progress=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["progress"])

    def drop_best_after(self, step: int) -> None:
        """Deletes best checkpoints newer than ``step`` (left by a run that is being replayed)."""
        for later in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(later)

    def wait_until_finished(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def finished_steps(workdir: str, which: str) -> list[int]:
    """Sorted steps of the completed ``which`` checkpoints of ``workdir`` (no manager opened;
    Orbax's unfinished ``<step>.orbax-checkpoint-tmp*`` folders are not steps)."""
    directory = checkpoint_dir(workdir, which)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@dataclasses.dataclass(frozen=True)
class CheckpointUsed:
    """Which checkpoint a load asked for and which it read (they differ after a fallback)."""

    which_asked: str
    which_used: str
    step: int

    @property
    def path(self) -> str:
        return os.path.join(CHECKPOINTS, self.which_used, str(self.step))


def find_checkpoint(
    workdir: str, which: str = "best", step: int | None = None, exact: bool = False
) -> CheckpointUsed:
    """The checkpoint a load of ``which`` reads: its newest step, or ``step``.

    Unless ``exact`` (or a ``step`` is given), a workdir without a ``which`` checkpoint falls
    back to the other kind (a run without evaluation has no best checkpoint). Raises
    FileNotFoundError saying what is there.
    """
    other = "latest" if which == "best" else "best"
    steps = finished_steps(workdir, which)
    if step is not None and step in steps:
        return CheckpointUsed(which, which, step)
    if step is None and steps:
        return CheckpointUsed(which, which, steps[-1])
    if step is None and not exact and finished_steps(workdir, other):
        return CheckpointUsed(which, other, finished_steps(workdir, other)[-1])
    at = "" if step is None else f" at step {step}"
    hint = f"try which={other!r}" if exact or step is not None else f"no {other} one either"
    raise FileNotFoundError(
        f"no {which} checkpoint{at} in {checkpoint_dir(workdir, which)} "
        f"(steps there: {steps}; {hint})"
    )


def load_trained(
    workdir: str,
    which: str = "best",
    *,
    step: int | None = None,
    target: Any = None,
    exact: bool = False,
) -> tuple[Any, CheckpointUsed]:
    """``(params, CheckpointUsed)`` of a finished (or running) training, without optimiser or
    iterator: the ``which`` checkpoint (``find_checkpoint``: best, else latest), or exactly
    ``step`` / ``which`` when asked.

    Returns host numpy arrays in the saved tree structure, or, when ``target`` (abstract
    params: ShapeDtypeStructs carrying a sharding) is given, jax arrays placed by that
    sharding after checking that the paths and shapes match. For the next VAE stage, the LDM's
    frozen VAE, sampling, evaluation and export.
    """
    used = find_checkpoint(workdir, which, step, exact)
    directory = checkpoint_dir(workdir, used.which_used)
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        saved = manager.item_metadata(used.step)["state"].tree["params"]
        if target is None:
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        else:
            check_matches(f"{directory}/{used.step} params", saved, target)
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = manager.restore(
            used.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"], used
    finally:
        manager.close()


def load_params(
    workdir: str, which: str = "best", step: int | None = None, target: Any = None
) -> Any:
    """The params of exactly the ``which`` checkpoint (newest, or ``step``); ``load_trained``
    with ``exact=True``, without the record."""
    return load_trained(workdir, which, step=step, target=target, exact=True)[0]


def read_workdir_config(workdir: str, model_key: str | None = None) -> dict:
    """``<workdir>/config.json`` (the trainer's resolved config, or a converted model's) as a
    dict. ``model_key`` (``"t5"``: a PhraseVAE, ``"dit"``: a PhraseLDM) requires a ``model``
    group holding that entry. Errors name the file."""
    path = os.path.join(os.fspath(workdir), CONFIG_JSON)
    if not os.path.isfile(path):
        kind = {"t5": "PhraseVAE ", "dit": "PhraseLDM "}.get(model_key or "", "")
        raise FileNotFoundError(f"{path} not found: {workdir} is not a {kind}training workdir")
    config = fileio.read_json(path)
    model = config.get("model")
    if model_key is not None and (not isinstance(model, dict) or model_key not in model):
        raise ValueError(f"{path}: no 'model' group with a {model_key!r} entry")
    return config


def write_workdir_config(workdir: str, config: Any) -> None:
    """``<workdir>/config.json`` from an ml_collections ConfigDict (or a plain dict), written
    atomically by process 0; a new start overwrites it whole."""
    if jax.process_index() != 0:
        return
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    else:
        text = fileio.json_text(config)
    fileio.write_text(os.path.join(os.fspath(workdir), CONFIG_JSON), text)

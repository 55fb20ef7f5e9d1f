"""Orbax checkpoints of a training run (the latest k, the best one), and the one way to load
trained parameters and the config of a workdir (``load_trained``, ``read_workdir_config``).

Layout (``<workdir>/checkpoints``)::

    latest/<step>/{state, data, progress}   every ckpt_every steps, the last ``keep_last`` kept
                                            and the one saved with the lowest train loss
    best/<step>/{state, data, progress}     the step with the best eval metric so far (one)

``state`` is the train state pytree (params, opt_state, step, rng); ``data`` is the Grain
iterator state (one JSON file per process); ``progress`` is a small JSON dict the trainer uses
to resume exactly (best metric so far, early-stopping counter, last metrics).

Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it when complete;
step discovery ignores those names, so an interrupted save is never restored (docs/FAULTS.md);
the managers delete such leftovers when they open.

Integrity: every save stores ``checkpoint_integrity.tree_checksums`` of the state (computed on the
devices before the arrays leave them) in ``progress`` under ``"checksums"``, and writes
``file_digests.json`` (SHA-256 of every file of the step) into the step before Orbax renames
it into place. Restores and loads check the files, then the restored arrays against the
checksums (``load_trained``: the params only). Steps written before checksums existed load
as they are, marked ``verified=False``.

A full disk stops the save before it starts (``CheckpointSaveError``, one line naming the
directory, the space needed and free) and an error of Orbax's background write is raised as
one line at the next save or ``wait_until_finished``; the previous checkpoint is kept.

Damaged steps: readers (``find_checkpoint``, ``load_trained``) and the trainer's resume
(``CheckpointStore.restore``) skip them newest-first, one warning line each, and use the
newest intact one; with none intact, ``CheckpointDamagedError`` (one line). Paths go through
``fileio.user_path`` (Orbax takes absolute paths only).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import operator
import os
import shutil
import sys
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from phraseldm_jax import checkpoint_integrity as integrity
from phraseldm_jax import fileio, optim
from phraseldm_jax.errors import (
    CheckpointDamagedError,
    CheckpointMismatchError,
    CheckpointSaveError,
)

CHECKPOINTS = "checkpoints"
_TRAIN_LOSS = operator.itemgetter("train/loss")  # what the latest manager ranks steps by
WHICH = ("latest", "best")
CONFIG_JSON = "config.json"  # the resolved config of a workdir (trainer, converter)
STEP_METADATA = integrity.STEP_METADATA  # kept for callers of this module
SPACE_MARGIN = 1 << 20  # bytes a save needs free beyond the state's own size


def checkpoint_dir(workdir: str, which: str = "latest") -> str:
    """``<workdir>/checkpoints/<which>``."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected one of {WHICH}")
    return os.path.join(fileio.user_path(workdir), CHECKPOINTS, which)


def step_damage(workdir: str, which: str, step: int) -> str | None:
    """Why the finished ``which`` step of ``workdir`` cannot be used (a metadata file missing
    or not JSON, a file that differs from ``file_digests.json``), or None when its files look
    intact (damaged array values show when they are read and checked against ``progress``'s
    checksums: ``load_trained`` and ``CheckpointStore.restore``)."""
    return integrity.inspect_step(os.path.join(checkpoint_dir(workdir, which), str(step)))[0]


def warn_skipped(label: str, reason: str, using: str | None) -> None:
    """The one warning line for a damaged step (stderr), naming the step used instead."""
    instead = f"; using {using}" if using else ""
    print(f"checkpoint {label} is damaged ({reason}){instead}", file=sys.stderr, flush=True)


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


def _retention(which: str, keep: int) -> dict:
    """Orbax options saying which steps a manager keeps: ``best`` its one step; ``latest``
    the last ``keep`` and the step saved with the lowest train/loss (a run that collapses
    without NaN keeps a good one whatever the rotation)."""
    if which == "best":
        return dict(max_to_keep=keep)
    policies = ocp.checkpoint_managers
    lowest_loss = policies.BestN(
        get_metric_fn=_TRAIN_LOSS, reverse=True, n=1, keep_checkpoints_without_metrics=False
    )
    return dict(
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(keep), lowest_loss]),
        best_fn=_TRAIN_LOSS,  # makes Orbax store the metrics passed to save
        best_mode="min",
    )


class CheckpointStore:
    """The two Orbax managers of one workdir (latest-k and best) behind save/restore calls."""

    def __init__(self, workdir: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be >= 1")
        self.workdir = fileio.user_path(workdir)
        self.restored: CheckpointUsed | None = None  # set by a restore of the newest intact
        self._verified = False  # whether the step read last carried checksums
        self._saving: dict[str, int] = {}  # the step each manager is writing
        self._needed: dict[str, int] = {}  # its estimated size on disk
        self.latest, self.best = (
            self._open(which, keep_last if which == "latest" else 1) for which in WHICH
        )

    def _open(self, which: str, max_to_keep: int) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            checkpoint_dir(self.workdir, which),
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                **_retention(which, max_to_keep),
                cleanup_tmp_directories=True,
                multiprocessing_options=_barriers_named(which),
                async_options=ocp.options.AsyncOptions(
                    post_finalization_callback=lambda: self._digest_files(which)
                ),
            ),
        )

    def _digest_files(self, which: str) -> None:
        """Orbax's callback once a step's files are written, before the rename that makes it
        a finished step: process 0 writes the step's ``file_digests.json`` into it."""
        if jax.process_index() != 0:
            return
        pattern = f"{self._saving[which]}.orbax-checkpoint-tmp*"
        for step_dir in glob.glob(os.path.join(checkpoint_dir(self.workdir, which), pattern)):
            integrity.write_file_digests(step_dir)

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in WHICH:
            raise ValueError(f"which={which!r}: expected one of {WHICH}")
        return self.latest if which == "latest" else self.best

    def latest_step(self, which: str = "latest") -> int | None:
        return self._manager(which).latest_step()

    def save(
        self,
        which: str,
        step: int,
        state: Any,
        data_iter: Any,
        progress: dict,
        metrics: dict | None = None,
    ) -> None:
        """Saves ``state`` (jax arrays), the iterator position and ``progress`` at ``step``.
        ``metrics`` (latest only): ``{"train/loss": x}`` ranks the step for keeping the
        lowest-loss one; a step without is kept only while among the last ``keep_last``.

        Returns once the arrays are copied off the devices and the iterator position and
        ``progress`` are captured (Orbax runs Grain's handler to completion inside ``save``;
        only the array files are written in the background), so the caller may donate
        ``state`` and advance ``data_iter`` right away. ``data_iter`` must be a
        ``grain.DatasetIterator`` (Grain's handler reads its state as a dict).
        """
        manager = self._manager(which)
        integrity.quiet_orbax_reports()
        self._finish(which)  # a failed background write of the previous step stops here
        self._check_space(which, step, state)
        if step in manager.all_steps():
            manager.delete(step)  # a re-run of a step after resuming from an older checkpoint
        progress = {**copy.deepcopy(progress), integrity.CHECKSUMS: integrity.tree_checksums(state)}
        self._saving[which] = step
        try:
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain_ckpt.CheckpointSave(data_iter),
                    progress=ocp.args.JsonSave(progress),
                ),
                metrics=metrics if which == "latest" else None,
                force=True,
            )
        except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            raise self._save_error(which, step, error) from None

    def _check_space(self, which: str, step: int, state: Any) -> None:
        """Raises CheckpointSaveError when the disk lacks room for ``state`` (its bytes on
        this process plus SPACE_MARGIN), before Orbax starts a write that would fail."""
        directory = checkpoint_dir(self.workdir, which)
        os.makedirs(directory, exist_ok=True)
        needed = self._needed[which] = _local_bytes(state) + SPACE_MARGIN
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise CheckpointSaveError(
                f"cannot save checkpoint {which}/{step} in {directory}: the disk is full "
                f"(needs about {_mib(needed)}, {_mib(free)} free); "
                f"{self._kept(which)}"
            )

    def _kept(self, which: str) -> str:
        steps = finished_steps(self.workdir, which)
        return f"kept {which}/{steps[-1]}" if steps else f"no {which} checkpoint yet"

    def _save_error(
        self, which: str, step: int, error: BaseException, sealing: bool = False
    ) -> CheckpointSaveError:
        """One line naming the step, the folder, why, and the free space left. ``sealing``:
        the step was written whole and kept; only the digest of its commit file failed."""
        directory = checkpoint_dir(self.workdir, which)
        free = _mib(shutil.disk_usage(directory).free) + " free"
        needed = f"needs about {_mib(self._needed[which])}, " if which in self._needed else ""
        reason = integrity.one_line_reason(error)
        what = "cannot finish" if sealing else "cannot save"
        return CheckpointSaveError(
            f"{what} checkpoint {which}/{step} in {directory}: {reason} "
            f"({needed}{free}); {self._kept(which)}"
        )

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError (one line) when a background write has failed by now;
        never waits for one still running (the trainer calls it at every logging step)."""
        for which in WHICH:
            if not self._manager(which).is_saving_in_progress():
                self._finish(which)

    def _finish(self, which: str) -> None:
        """Waits for ``which``'s background write (its error: one CheckpointSaveError), then
        seals the step written (``checkpoint_integrity.seal_step``)."""
        try:
            self._manager(which).wait_until_finished()
        except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            raise self._save_error(which, self._saving.pop(which, None), error) from None
        step = self._saving.pop(which, None)
        if step is not None and jax.process_index() == 0:
            try:
                integrity.seal_step(os.path.join(checkpoint_dir(self.workdir, which), str(step)))
            except OSError as error:  # the step is whole; only its digest update failed
                raise self._save_error(which, step, error, sealing=True) from None

    def restore(
        self, abstract_state: Any, data_iter: Any, which: str = "latest", step: int | None = None
    ) -> tuple[Any, dict]:
        """``(state, progress)`` at ``step``, and ``data_iter`` repositioned. Without ``step``:
        the newest intact step, skipping damaged ones with one warning line each (the step
        restored and those skipped are then ``self.restored``).

        ``abstract_state``: ShapeDtypeStructs whose ``sharding`` says where each array lands,
        so a checkpoint written on one mesh restores onto any other.
        """
        manager = self._manager(which)
        if step is not None:
            if step not in manager.all_steps():
                raise FileNotFoundError(
                    f"no {which} checkpoint at step {step} in {checkpoint_dir(self.workdir, which)}"
                )
            try:
                return self._restore_step(manager, which, step, abstract_state, data_iter)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
                skipped = [(f"{which}/{step}", integrity.one_line_reason(error))]
                raise CheckpointDamagedError(_none_intact(self.workdir, skipped)) from None
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}"
            )
        skipped: list[tuple[str, str]] = []
        for index, candidate in enumerate(steps):
            label = f"{which}/{candidate}"
            try:
                restored = self._restore_step(manager, which, candidate, abstract_state, data_iter)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
                reason = integrity.one_line_reason(error)
            else:
                self.restored = CheckpointUsed(
                    which, which, candidate, tuple(skipped), self._verified
                )
                return restored
            skipped.append((label, reason))
            later = steps[index + 1 :]
            warn_skipped(label, reason, f"{which}/{later[0]}" if later else None)
        raise CheckpointDamagedError(_none_intact(self.workdir, skipped))

    def _restore_step(self, manager, which, step, abstract_state, data_iter):
        """``(state, progress)`` of one step after checking its files and, once read, its
        arrays; raises StepDamaged (or Orbax's error) when the step is damaged."""
        integrity.quiet_orbax_reports()
        where = os.path.join(checkpoint_dir(self.workdir, which), str(step))
        reason, self._verified = integrity.inspect_step(where)
        if reason is not None:
            raise integrity.StepDamaged(reason)
        check_matches(where, manager.item_metadata(step)["state"].tree, abstract_state)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain_ckpt.CheckpointRestore(data_iter),
                progress=ocp.args.JsonRestore(),
            ),
        )
        progress = dict(restored["progress"])
        integrity.verify_arrays(progress, restored["state"])
        progress.pop(integrity.CHECKSUMS, None)
        return restored["state"], progress

    def drop_best_after(self, step: int) -> None:
        """Deletes best checkpoints newer than ``step`` (left by a run that is being replayed)."""
        for later in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(later)

    def wait_until_finished(self) -> None:
        """Waits for both managers' background writes; raises CheckpointSaveError (one
        line) when one failed."""
        for which in WHICH:
            self._finish(which)

    def close(self) -> None:
        """Closes both managers; raises CheckpointSaveError (one line) after closing when a
        background write failed."""
        failure = None
        for which in WHICH:
            try:
                self._finish(which)
            except CheckpointSaveError as error:
                failure = failure or error
            try:
                self._manager(which).close()
            except Exception:  # noqa: BLE001, S110 - the failed write is reported just below
                pass
        if failure is not None:
            raise failure


def _local_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays this process writes (its addressable shards, replicas
    once)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(leaf).nbytes if np.isscalar(leaf) else leaf.nbytes
    return int(total)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def finished_steps(workdir: str, which: str) -> list[int]:
    """Sorted steps of the completed ``which`` checkpoints of ``workdir`` (no manager opened;
    Orbax's unfinished ``<step>.orbax-checkpoint-tmp*`` folders are not steps)."""
    directory = checkpoint_dir(workdir, which)  # absolute, ~ expanded
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@dataclasses.dataclass(frozen=True)
class CheckpointUsed:
    """Which checkpoint a load asked for and which it read (they differ after a fallback).

    skipped: ``(("latest/300", "state/_METADATA missing"), ...)``, the damaged steps passed
    over on the way, newest first. verified: whether the step carried checksums (and so its
    files and arrays were checked); False for steps written before them."""

    which_asked: str
    which_used: str
    step: int
    skipped: tuple[tuple[str, str], ...] = ()
    verified: bool = True  # False: written before checksums, loaded unchecked

    @property
    def path(self) -> str:
        return os.path.join(CHECKPOINTS, self.which_used, str(self.step))

    @property
    def label(self) -> str:
        """``latest/200``: the kind and step, as the warnings name them."""
        return f"{self.which_used}/{self.step}"

    def as_dict(self) -> dict:
        """For a summary.json: asked, used, step and what was skipped."""
        return {
            "which_asked": self.which_asked,
            "which_used": self.which_used,
            "step": self.step,
            "skipped": [{"checkpoint": label, "reason": why} for label, why in self.skipped],
            "verified": self.verified,
        }


def _none_intact(workdir: str, skipped: list[tuple[str, str]]) -> str:
    listed = ", ".join(f"{label} ({why})" for label, why in skipped)
    return f"no intact checkpoint in {fileio.user_path(workdir)}: damaged {listed}"


def _candidates(workdir: str, which: str, step: int | None, exact: bool) -> list[tuple[str, int]]:
    """``(kind, step)`` a load tries, in order: ``step``; else the ``which`` steps newest
    first, then (unless ``exact``) the other kind's."""
    if step is not None:
        return [(which, step)] if step in finished_steps(workdir, which) else []
    kinds = (which,) if exact else (which, "latest" if which == "best" else "best")
    return [(kind, s) for kind in kinds for s in reversed(finished_steps(workdir, kind))]


def find_checkpoint(
    workdir: str,
    which: str = "best",
    step: int | None = None,
    exact: bool = False,
    skipped: tuple[tuple[str, str], ...] = (),
) -> CheckpointUsed:
    """The checkpoint a load of ``which`` reads: its newest intact step, or ``step``.

    Unless ``exact`` (or a ``step`` is given), a workdir without a ``which`` checkpoint (or
    with only damaged ones) falls back to the other kind (a run without evaluation has no best
    checkpoint). Damaged steps (``step_damage``, or listed in ``skipped`` by a caller that
    failed to read them) are passed over, newest first, with one warning line each. Raises
    FileNotFoundError saying what is there, or CheckpointDamagedError when every step is
    damaged.
    """
    other = "latest" if which == "best" else "best"
    candidates = _candidates(workdir, which, step, exact)
    known = dict(skipped)
    passed: list[tuple[str, str]] = [s for s in skipped]
    for index, (kind, candidate) in enumerate(candidates):
        label = f"{kind}/{candidate}"
        if label in known:
            continue
        reason, verified = integrity.inspect_step(
            os.path.join(checkpoint_dir(workdir, kind), str(candidate))
        )
        if reason is None:
            return CheckpointUsed(which, kind, candidate, tuple(passed), verified)
        passed.append((label, reason))
        later = [f"{k}/{s}" for k, s in candidates[index + 1 :] if f"{k}/{s}" not in known]
        warn_skipped(label, reason, later[0] if later else None)
    if candidates:
        raise CheckpointDamagedError(_none_intact(workdir, passed))
    steps = finished_steps(workdir, which)
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
    skipped: tuple[tuple[str, str], ...] = ()
    while True:
        used = find_checkpoint(workdir, which, step, exact, skipped)
        try:
            return _restore_params(workdir, used, target), used
        except CheckpointMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            reason = integrity.one_line_reason(error)
        skipped = (*used.skipped, (used.label, reason))
        intact = (
            f"{kind}/{s}"
            for kind, s in _candidates(workdir, which, step, exact)
            if f"{kind}/{s}" not in dict(skipped) and step_damage(workdir, kind, s) is None
        )
        warn_skipped(used.label, reason, next(intact, None))


def _restore_params(workdir: str, used: CheckpointUsed, target: Any) -> Any:
    """The params of one checkpoint step (host numpy arrays, or placed as ``target``)."""
    integrity.quiet_orbax_reports()
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
        params = restored["state"]["params"]
        step_dir = os.path.join(directory, str(used.step))
        if not integrity.params_only(step_dir):
            progress = integrity.read_json(os.path.join(step_dir, integrity.PROGRESS_JSON))
            integrity.verify_arrays(progress, params, prefix="params/")
        return params
    finally:
        manager.close()


def load_params(
    workdir: str, which: str = "best", step: int | None = None, target: Any = None
) -> Any:
    """The params of exactly the ``which`` checkpoint (newest, or ``step``), no fallback."""
    return load_trained(workdir, which, step=step, target=target, exact=True)[0]


def read_workdir_config(workdir: str, model_key: str | None = None) -> dict:
    """``<workdir>/config.json`` (the trainer's resolved config, or a converted model's) as a
    dict. ``model_key`` (``"t5"``: a PhraseVAE, ``"dit"``: a PhraseLDM) requires a ``model``
    group holding that entry. Errors name the file."""
    path = os.path.join(fileio.user_path(workdir), CONFIG_JSON)
    if not os.path.isfile(path):
        kind = {"t5": "PhraseVAE ", "dit": "PhraseLDM "}.get(model_key or "", "")
        raise FileNotFoundError(f"{path} not found: {workdir} is not a {kind}training workdir")
    config = fileio.read_json(path)
    model = config.get("model")
    if model_key is not None and (not isinstance(model, dict) or model_key not in model):
        raise ValueError(f"{path}: no 'model' group with a {model_key!r} entry")
    return config


def write_workdir_config(workdir: str, config: Any) -> None:
    """``<workdir>/config.json`` of a ConfigDict or dict, atomically, by process 0 only."""
    if jax.process_index() != 0:
        return
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    else:
        text = fileio.json_text(config)
    fileio.write_text(os.path.join(fileio.user_path(workdir), CONFIG_JSON), text)

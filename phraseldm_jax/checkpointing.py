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

A finished step can still be damaged (a truncated blob, a deleted ``_METADATA``): readers
(``find_checkpoint``, ``load_trained``) and the trainer's resume (``CheckpointStore.restore``)
skip such steps newest-first with one warning line each, use the newest intact one and record
what they skipped; with none intact they raise ``CheckpointDamagedError`` (one line). Every
path goes through ``fileio.user_path`` (Orbax takes absolute paths only).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from phraseldm_jax import fileio, optim
from phraseldm_jax.errors import CheckpointDamagedError, CheckpointMismatchError

CHECKPOINTS = "checkpoints"
WHICH = ("latest", "best")
CONFIG_JSON = "config.json"  # the resolved config of a workdir (trainer, converter)
# Files every finished step holds; a step without them (or with them unreadable) is damaged.
STEP_METADATA = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"))


def checkpoint_dir(workdir: str, which: str = "latest") -> str:
    """``<workdir>/checkpoints/<which>``."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected one of {WHICH}")
    return os.path.join(fileio.user_path(workdir), CHECKPOINTS, which)


def step_damage(workdir: str, which: str, step: int) -> str | None:
    """Why the finished ``which`` step of ``workdir`` cannot be read, from its metadata files
    (missing, unreadable, not JSON), or None when they look intact (a damaged array blob shows
    only when it is read: see ``load_trained`` and ``CheckpointStore.restore``)."""
    directory = os.path.join(checkpoint_dir(workdir, which), str(step))
    for name in STEP_METADATA:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} missing"
        try:
            with open(path, "rb") as f:
                json.loads(f.read())
        except (OSError, ValueError) as error:
            return f"{name} unreadable: {type(error).__name__}"
    return None


def _reason(error: BaseException) -> str:
    """One line for an error of Orbax / TensorStore reading a step (their messages can run to
    many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].split(" in OCDBT database")[0] if lines else type(error).__name__
    if text.startswith("OUT_OF_RANGE"):  # TensorStore read past the end of a blob
        text = "a data file is truncated: " + text
    return text if len(text) <= 160 else text[:157] + "..."


def _silence_leftover_reports() -> None:
    """After a failed read, Orbax's unfinished reads of the same step report themselves later,
    each with a traceback ("Event loop is closed", coroutines garbage-collected with their
    error): dozens of lines around the one warning that already says what happened. Installed
    before the first read (the reports can come before the error reaches us), it drops those
    two kinds of report and only them."""
    if getattr(sys, "_phraseldm_quiet_orbax", False):
        return
    sys._phraseldm_quiet_orbax = True
    previous = sys.unraisablehook

    def unraisable(report) -> None:
        code = getattr(report.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        if report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    sys.unraisablehook = unraisable


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


def _train_loss(metrics: dict) -> float:
    return float(metrics["train/loss"])


def _lowest_train_loss() -> ocp.checkpoint_managers.BestN:
    """Keeps the one latest step with the lowest ``train/loss`` saved with it."""
    return ocp.checkpoint_managers.BestN(
        get_metric_fn=_train_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False
    )


class CheckpointStore:
    """The two Orbax managers of one workdir (latest-k and best) behind save/restore calls."""

    def __init__(self, workdir: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be >= 1")
        self.workdir = fileio.user_path(workdir)
        self.restored: CheckpointUsed | None = None  # set by a restore of the newest intact
        self.latest = ocp.CheckpointManager(
            checkpoint_dir(self.workdir, "latest"),
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                # The last keep_last, and the step saved with the lowest train/loss (a run
                # that collapses without NaN keeps a good one whatever the rotation).
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                    [ocp.checkpoint_managers.LatestN(keep_last), _lowest_train_loss()]
                ),
                best_fn=_train_loss,  # makes Orbax store the metrics passed to save
                best_mode="min",
                cleanup_tmp_directories=True,
                multiprocessing_options=_barriers_named("latest"),
            ),
        )
        self.best = ocp.CheckpointManager(
            checkpoint_dir(self.workdir, "best"),
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
        if step in manager.all_steps():
            manager.delete(step)  # a re-run of a step after resuming from an older checkpoint
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain_ckpt.CheckpointSave(data_iter),
                progress=ocp.args.JsonSave(copy.deepcopy(progress)),
            ),
            metrics=metrics if which == "latest" else None,
            force=True,
        )

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
            return self._restore_step(manager, which, step, abstract_state, data_iter)
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}"
            )
        skipped: list[tuple[str, str]] = []
        for index, candidate in enumerate(steps):
            label = f"{which}/{candidate}"
            reason = step_damage(self.workdir, which, candidate)
            if reason is None:
                try:
                    restored = self._restore_step(
                        manager, which, candidate, abstract_state, data_iter
                    )
                except CheckpointMismatchError:
                    raise
                except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
                    reason = _reason(error)
                else:
                    self.restored = CheckpointUsed(which, which, candidate, tuple(skipped))
                    return restored
            skipped.append((label, reason))
            later = steps[index + 1 :]
            warn_skipped(label, reason, f"{which}/{later[0]}" if later else None)
        raise CheckpointDamagedError(_none_intact(self.workdir, skipped))

    def _restore_step(self, manager, which, step, abstract_state, data_iter):
        _silence_leftover_reports()
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
    directory = checkpoint_dir(workdir, which)  # absolute, ~ expanded
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@dataclasses.dataclass(frozen=True)
class CheckpointUsed:
    """Which checkpoint a load asked for and which it read (they differ after a fallback).

    skipped: ``(("latest/300", "state/_METADATA missing"), ...)``, the damaged steps passed
    over on the way, newest first."""

    which_asked: str
    which_used: str
    step: int
    skipped: tuple[tuple[str, str], ...] = ()

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
        reason = step_damage(workdir, kind, candidate)
        if reason is None:
            return CheckpointUsed(which, kind, candidate, tuple(passed))
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
            reason = _reason(error)
        skipped = (*used.skipped, (used.label, reason))
        intact = [
            f"{kind}/{s}"
            for kind, s in _candidates(workdir, which, step, exact)
            if f"{kind}/{s}" not in dict(skipped) and step_damage(workdir, kind, s) is None
        ]
        warn_skipped(used.label, reason, intact[0] if intact else None)


def _restore_params(workdir: str, used: CheckpointUsed, target: Any) -> Any:
    """The params of one checkpoint step (host numpy arrays, or placed as ``target``)."""
    _silence_leftover_reports()
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
        return restored["state"]["params"]
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
    """``<workdir>/config.json`` from an ml_collections ConfigDict (or a plain dict), written
    atomically by process 0; a new start overwrites it whole."""
    if jax.process_index() != 0:
        return
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    else:
        text = fileio.json_text(config)
    fileio.write_text(os.path.join(fileio.user_path(workdir), CONFIG_JSON), text)

"""The fault-injection suite's cases about the disk: a full disk under the checkpoints and a
killed ``prepare --overwrite`` (the training-loop cases are in ``fault_cases.py``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from benchmarks import fault_harness as fh
from benchmarks.fault_cases import Suite, Trial, alternate, finished_equal, timed

# --------------------------------------------------------------------------------------------
# A full disk under the checkpoints.

FREE_SPACE = re.compile(r"free", re.IGNORECASE)


def _fill(path: str) -> int:
    """Writes zeros into ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    for size in (4096, 512, 1):  # the last partial chunks
        try:
            with open(path, "ab", buffering=0) as f:
                while True:
                    written += f.write(b"\0" * size)
        except OSError:
            continue
    return written


@timed
def full_disk(suite: Suite, trials: int) -> list[Trial]:
    """The checkpoints' filesystem (a 16 MiB tmpfs mounted at <workdir>/checkpoints) filled up
    after the first checkpoint (VAE and LDM in turn)."""
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        suite.reference(model.name)
        workdir = suite.fresh(f"full_disk_{model.name}")
        mount = os.path.join(workdir, "checkpoints")
        os.makedirs(mount)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mount],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            done.append(
                Trial(
                    model.name,
                    not_run="cannot mount a tmpfs (needs root): " + mounted.stderr.strip()[:120],
                )
            )
            continue
        try:
            done.append(_full_disk_trial(suite, model, workdir, mount))
        finally:
            subprocess.run(["umount", "-l", mount], capture_output=True)
    return done


def _full_disk_trial(suite: Suite, model: fh.Model, workdir: str, mount: str) -> Trial:
    trial = Trial(model.name)
    launch = suite.launch(model, workdir, "full_disk")
    filler = os.path.join(mount, "filler")
    try:
        first = model.ckpt_every
        ready = lambda: fh.finished_steps(workdir) and (launch.step() or 0) > first  # noqa: E731
        if not fh.wait_until(ready, launch, timeout=300):
            raise fh.CaseFailure(f"the run ended before its first checkpoint: {launch.tail()}")
        trial.detail["filled_bytes"] = _fill(filler)
        filled_at = time.monotonic()
        rc = launch.wait(timeout=120)
        trial.detail.update(exit=rc, seconds_to_exit=round(time.monotonic() - filled_at, 2))
    except fh.CaseFailure as error:
        return Trial(model.name, [str(error)], corrupt=True)
    finally:
        launch.ensure_dead()
    stderr = launch.stderr()
    said = [line for line in stderr.splitlines() if mount in line or workdir in line]
    trial.detail["said"] = said[-2:]
    if rc == 0:
        trial.problems.append("the run ended without reporting the full disk")
    if "Traceback" in stderr or not any(FREE_SPACE.search(line) for line in said):
        trial.problems.append("no one-line report naming the directory and its free space")
    if trial.detail["seconds_to_exit"] > 30:
        trial.problems.append(f"reported {trial.detail['seconds_to_exit']} s after the disk filled")
    kept = fh.finished_steps(workdir)
    reached = fh.last_logged_step(workdir)
    trial.detail.update(kept=kept, reached=reached)
    if not kept:
        trial.problems.append("no checkpoint kept")
        trial.corrupt = True
    else:
        ref = suite.reference(model.name)
        try:
            if fh.tree_differences(fh.load_params(workdir, kept[-1])[0], ref.params_at(kept[-1])):
                trial.problems.append(f"kept checkpoint {kept[-1]} differs from the reference's")
                trial.corrupt = True
        except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is the finding
            trial.problems.append(f"kept checkpoint {kept[-1]} unreadable: {str(error)[:120]}")
            trial.corrupt = True
    os.remove(filler)
    finished_equal(suite, trial, model, workdir, "resume_full_disk")
    start = trial.detail.get("resumed_from")
    trial.steps_lost = None if start is None else reached - start
    return trial


# --------------------------------------------------------------------------------------------
# prepare --overwrite killed.


def dataset_fingerprint(data_dir: str) -> dict[str, str]:
    """Per dataset of ``data_dir``: a hash of every record of every split, or "unreadable:
    ..." when it cannot be read."""
    from input_pipeline import tfds_builders

    prints = {}
    for name in tfds_builders.DATASET_NAMES:
        digest = hashlib.sha256()
        try:
            for split, size in sorted(tfds_builders.split_sizes(data_dir, name).items()):
                source = tfds_builders.open_source(data_dir, name, split)
                digest.update(json.dumps([split, source.__getitems__(range(size))]).encode())
            prints[name] = digest.hexdigest()
        except Exception as error:  # noqa: BLE001 - any read failure means a damaged dataset
            prints[name] = f"unreadable: {str(error).splitlines()[0][:120]}"
    return prints


def dataset_state(found: dict[str, str], old: dict[str, str], new: dict[str, str]) -> str:
    """ "old", "new", or which dataset is which ("mix: songs new, phrases old, ...")."""
    each = {n: "old" if p == old[n] else "new" if p == new[n] else p for n, p in found.items()}
    kinds = set(each.values())
    if len(kinds) == 1 and kinds <= {"old", "new"}:
        return kinds.pop()
    return "mix: " + ", ".join(f"{name} {state}" for name, state in each.items())


def _listing(folder: str) -> frozenset[str]:
    return frozenset(
        os.path.relpath(os.path.join(d, n), folder)
        for d, ds, fs in os.walk(folder)
        for n in ds + fs
    )


def _wait_for_change(folder: str, before: frozenset[str], launch: fh.Launch) -> None:
    fh.wait_until(lambda: _listing(folder) != before, launch, timeout=600, interval=0.005)


def _prepare(suite: Suite, data_dir: str, *flags: str) -> fh.Launch:
    command = [sys.executable, "-m", "phraseldm_jax", "prepare", "--source", "synthetic"]
    command += ["--data_dir", data_dir, "--workers", "1", *flags]
    return fh.Launch(command, suite.env, suite.log("prepare"))


NEW_DATA = ("--n_songs", "10", "--seed", "1", "--overwrite")


def _prepare_setup(suite: Suite) -> dict:
    """The old dataset (8 songs, seed 0), a finished overwrite with the new one (10 songs,
    seed 1), their fingerprints and how long the overwrite's writing took (its first to its
    last change of the folder's listing)."""
    old = suite.fresh("dataset_old")
    build = _prepare(suite, old, "--n_songs", "8")
    if build.wait(timeout=600) != 0:
        raise fh.CaseFailure(f"prepare failed: {build.tail()}")
    new = fh.copy_workdir(old, suite.fresh("dataset_new"))
    overwrite = _prepare(suite, new, *NEW_DATA)
    changes = _watch_changes(new, overwrite)
    if overwrite.wait(timeout=600) != 0 or not changes:
        raise fh.CaseFailure(f"prepare --overwrite failed: {overwrite.tail()}")
    return dict(
        old=old,
        old_print=dataset_fingerprint(old),
        new_print=dataset_fingerprint(new),
        writing_seconds=max(changes[-1] - changes[0], 0.01),
    )


def _watch_changes(folder: str, launch: fh.Launch) -> list[float]:
    """The times the file listing of ``folder`` changed while ``launch`` ran."""
    listing, changes = _listing(folder), []
    while launch.alive():
        now = _listing(folder)
        if now != listing:
            listing = now
            changes.append(time.monotonic())
        time.sleep(0.005)
    return changes


@timed
def prepare_overwrite(suite: Suite, trials: int) -> list[Trial]:
    """``prepare --overwrite`` SIGKILLed at a random moment of its writing."""
    try:
        setup = _prepare_setup(suite)
    except fh.CaseFailure as error:
        return [Trial("prepare", [str(error)]) for _ in range(trials)]
    done = []
    for _ in range(trials):
        trial = Trial("prepare")
        data_dir = fh.copy_workdir(setup["old"], suite.fresh("dataset"))
        before = _listing(data_dir)
        launch = _prepare(suite, data_dir, *NEW_DATA)
        delay = suite.rng.uniform(0.0, setup["writing_seconds"])
        try:
            _wait_for_change(data_dir, before, launch)
            time.sleep(delay)
            killed = launch.alive()
            launch.signal(signal.SIGKILL)
            launch.proc.wait()
        finally:
            launch.ensure_dead()
        found = dataset_fingerprint(data_dir)
        state = dataset_state(found, setup["old_print"], setup["new_print"])
        trial.detail.update(delay_s=round(delay, 3), killed_while_running=killed, left=state)
        if state not in ("old", "new"):
            trial.problems.append(f"left neither the old nor the new dataset ({state[:160]})")
            trial.corrupt = True
        again = _prepare(suite, data_dir, *NEW_DATA)
        if again.wait(timeout=600) != 0 or dataset_fingerprint(data_dir) != setup["new_print"]:
            trial.problems.append(f"the re-run did not build the new dataset: {again.tail()}")
        shutil.rmtree(data_dir, ignore_errors=True)
        done.append(trial)
    return done

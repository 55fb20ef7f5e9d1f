"""The faults of the fault-injection suite, one function per case (``benchmarks/
fault_injection.py`` runs them and writes the table).

Every case function takes the ``Suite`` (sandbox, references, random generator) and a number of
trials and returns ``Trial`` records: an outcome (``"ok"`` or what went wrong), the steps lost,
whether data was lost or corrupted, and the details measured. The expected behaviour is the
one agreed for issue 16 (exit statuses, file names and one-line messages):

- SIGKILL at a random moment, or while a checkpoint is being written: the same command resumes
  and ends with the reference's params and metrics bit for bit, at most one checkpoint interval
  lost, no duplicate rows;
- SIGTERM / SIGINT: exit 128 + signal with ``interrupted by SIG... at step N: saved checkpoint
  latest/N; ...``, nothing lost;
- a bit flip or a truncation in the newest checkpoint: detected by the loader (``checkpoint
  latest/N is damaged (...); using latest/M``) and by the resume, which falls back to M;
- a second trainer on a busy workdir: exit 2, ``<script>: error: <workdir> is in use by pid P
  on ...``;
- a diverging run: exit 1, ``non-finite loss/gradients at step N; last good checkpoint
  latest/M``, no checkpoint with a non-finite value;
- ``prepare --overwrite`` killed: the old dataset or the new one, never a mix;
- a full disk under the checkpoints: one line naming the directory and the free space, at
  once, the previous checkpoint kept;
- a truncated last line of metrics.jsonl: the resume does not crash and ends equal.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import time
from typing import Any

from benchmarks import fault_harness as fh


@dataclasses.dataclass
class Trial:
    """One fault and what came of it."""

    model: str
    problems: list[str] = dataclasses.field(default_factory=list)
    steps_lost: int | None = None  # None: the fault is not about lost steps
    corrupt: bool = False  # data lost or wrong (final state, a saved NaN, a mixed dataset)
    seconds: float = 0.0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    not_run: str = ""  # why the trial could not be run on this machine
    note: str = ""  # something worth knowing about an ok trial

    @property
    def outcome(self) -> str:
        if self.not_run:
            return "not run: " + self.not_run
        return "ok" if not self.problems else "; ".join(self.problems)


class Suite:
    """The sandbox of one suite run: a temp folder, the shared compilation cache, the
    subprocess environment, the seeded generator and the reference runs (made on first use)."""

    def __init__(self, root: str, rng, fast: bool = False):
        self.root = root
        self.rng = rng
        self.fast = fast
        self.logs = self.folder("logs")
        self.env = fh.environment(self.folder("xla_cache"))
        self._models: dict[str, fh.Model] = {}
        self._references: dict[str, fh.Reference] = {}
        self._count = 0

    def folder(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def fresh(self, name: str) -> str:
        """A new, not yet existing path ``<root>/<name>-<n>``."""
        self._count += 1
        return os.path.join(self.root, f"{name}-{self._count}")

    def log(self, name: str) -> str:
        self._count += 1
        return os.path.join(self.logs, f"{self._count:03d}_{name}")

    def model(self, name: str) -> fh.Model:
        if name not in self._models:
            steps, every = (24, 4) if self.fast else (40, 5)
            if name == "vae":
                self._models[name] = fh.vae_model(steps, every)
            elif name == "ldm_sync":  # the same run, each checkpoint complete before going on
                ldm = self.model("ldm")
                sync = ("--config.train.async_checkpoints=False",)
                self._models[name] = dataclasses.replace(ldm, overrides=ldm.overrides + sync)
            else:
                latents = fh.write_ldm_dataset(os.path.join(self.root, "latents"))
                self._models[name] = fh.ldm_model(latents, steps, every)
        return self._models[name]

    @property
    def references(self) -> dict[str, fh.Reference]:
        """The reference runs made so far, by model name."""
        return dict(self._references)

    def reference(self, name: str) -> fh.Reference:
        if name not in self._references:
            model = self.model(name)
            workdir = os.path.join(self.root, f"reference_{name}")
            self._references[name] = fh.run_reference(model, workdir, self.env, self.logs)
        return self._references[name]

    def launch(self, model: fh.Model, workdir: str, label: str, *extra, **train) -> fh.Launch:
        return fh.Launch(model.command(workdir, extra, **train), self.env, self.log(label))


def timed(fn):
    """Sets each returned trial's ``seconds`` to the case's wall time per trial."""

    def wrapper(suite: Suite, trials: int, **kwargs) -> list[Trial]:
        start = time.monotonic()
        done = fn(suite, trials, **kwargs)
        for trial in done:
            trial.seconds = (time.monotonic() - start) / max(len(done), 1)
        return done

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def alternate(index: int) -> str:
    """The model of trial ``index`` in cases that cover both: vae, ldm, vae, ..."""
    return ("vae", "ldm")[index % 2]


def finished_equal(suite: Suite, trial: Trial, model: fh.Model, workdir: str, label: str):
    """Runs the same command again to the end and compares the run with the reference; the
    resume's starting step goes into ``trial.detail['resumed_from']``."""
    ref = suite.reference(model.name)
    try:
        launch = fh.finish(model, workdir, suite.env, suite.log(label))
    except fh.CaseFailure as error:
        trial.problems.append(f"resume: {error}")
        trial.corrupt = True
        return None
    trial.detail["resumed_from"] = launch.resumed_from()
    if launch.proc.returncode != 0:
        trial.problems.append(f"resume exited {launch.proc.returncode}: {launch.tail()}")
        trial.corrupt = True
        return launch
    problems = fh.compare_with_reference(workdir, ref)
    trial.problems += problems
    trial.corrupt = trial.corrupt or fh.corrupting(problems)
    return launch


# --------------------------------------------------------------------------------------------
# SIGKILL, at random moments or while a checkpoint is written.


def _kill_at_step(suite: Suite, launch: fh.Launch, workdir: str, target: int, stale=()) -> bool:
    """SIGKILLs ``launch`` once its loop has reached ``target`` (plus a random part of a
    step); False when it finished first."""
    if not fh.wait_for_step(launch, target) or not launch.alive():
        return False
    time.sleep(suite.rng.uniform(0.0, 0.15))
    launch.signal(signal.SIGKILL)
    launch.proc.wait()
    return True


def _kill_during_save(
    suite: Suite, launch: fh.Launch, workdir: str, target: int, stale: frozenset[str] = frozenset()
) -> bool:
    """SIGKILLs ``launch`` the moment an unfinished checkpoint folder of a step >= ``target``
    appears (polled every half millisecond; ``stale``: folders an earlier kill left, which
    the manager deletes when it opens); False when it finished first."""
    started = fh.wait_until(lambda: launch.step() is not None, launch, timeout=300)
    if not started:
        return False
    while launch.alive():
        names = set(fh.unfinished_saves(workdir)) - stale
        if any(int(name.split(".")[0]) >= target for name in names):
            os.kill(launch.pid, signal.SIGKILL)
            launch.proc.wait()
            return True
        time.sleep(0.0005)
    return False


def _random_targets(suite: Suite, model: fh.Model, count: int, during_save: bool) -> list[int]:
    if during_save:
        saves = list(range(model.ckpt_every, model.num_steps + 1, model.ckpt_every))
        return sorted(suite.rng.choice(saves, size=min(count, len(saves)), replace=False).tolist())
    steps = range(2, model.num_steps - 1)
    return sorted(suite.rng.choice(steps, size=min(count, len(steps)), replace=False).tolist())


def sigkill_run(suite: Suite, model: fh.Model, kills: int, during_save: bool) -> list[Trial]:
    """One workdir killed ``kills`` times (resumed each time), then run to the end and compared
    with the reference. One Trial per kill that landed."""
    workdir = suite.fresh(f"sigkill_{model.name}")
    targets = _random_targets(suite, model, kills, during_save)
    landed: list[dict] = []
    resumed = 0
    for target in targets:
        stale = frozenset(fh.unfinished_saves(workdir))
        launch = suite.launch(model, workdir, f"kill_{model.name}")
        target = max(target, resumed + 1)
        kill = _kill_during_save if during_save else _kill_at_step
        try:
            ok = kill(suite, launch, workdir, target, stale)
        finally:
            launch.ensure_dead()
        start = launch.resumed_from()
        if landed and start is not None:
            landed[-1]["resumed_from"] = start
        if not ok:
            if launch.proc.returncode != 0:
                return [Trial(model.name, [f"run ended before the kill: {launch.tail()}"])]
            break  # finished first: the comparison below still holds
        landed.append(
            dict(
                reached=max(fh.last_logged_step(workdir), launch.step() or 0),
                checkpoints_after_kill=fh.finished_steps(workdir),
                killed_mid_write=bool(set(fh.unfinished_saves(workdir)) - stale),
            )
        )
        resumed = landed[-1]["checkpoints_after_kill"][-1:] or [0]
        resumed = resumed[0]
    final = Trial(model.name)
    last = finished_equal(suite, final, model, workdir, f"finish_{model.name}")
    if landed and last is not None:
        landed[-1]["resumed_from"] = last.resumed_from()
    return [_kill_trial(model, kill, final) for kill in landed]


def _kill_trial(model: fh.Model, kill: dict, final: Trial) -> Trial:
    """The Trial of one kill of a run whose end is ``final``."""
    trial = Trial(model.name, list(final.problems), corrupt=final.corrupt, detail=dict(kill))
    start = kill.get("resumed_from")
    if start is None:
        trial.problems.append("the resume did not start its loop")
        return trial
    trial.steps_lost = kill["reached"] - start
    every = model.ckpt_every
    # The save of the last multiple of ckpt_every before the step reached had begun; only
    # it (the one being written) may be lost, so the resume starts one interval before it.
    if start < ((kill["reached"] - 1) // every) * every - every:
        trial.problems.append(
            f"killed at step {kill['reached']}, resumed from {start}: more than one "
            f"checkpoint interval ({every}) lost"
        )
    return trial


def _sigkill_case(suite: Suite, trials: int, model_name: str, during_save: bool) -> list[Trial]:
    model = suite.model(model_name)
    suite.reference(model.name)  # ldm_sync trains like ldm: the same reference
    per_run = 2 if during_save else 4
    done: list[Trial] = []
    for _ in range(trials * 2):  # runs whose kills did not all land are topped up
        if len(done) >= trials:
            break
        done += sigkill_run(suite, model, min(per_run, trials - len(done)), during_save)
    return done[:trials] if len(done) >= trials else done


@timed
def sigkill_vae(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL at random steps of PhraseVAE training."""
    return _sigkill_case(suite, trials, "vae", during_save=False)


@timed
def sigkill_ldm(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL at random steps of PhraseLDM training."""
    return _sigkill_case(suite, trials, "ldm", during_save=False)


@timed
def sigkill_sync_ldm(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL at random steps of PhraseLDM training with ``train.async_checkpoints=False``."""
    return _sigkill_case(suite, trials, "ldm_sync", during_save=False)


@timed
def sigkill_save_vae(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL while a PhraseVAE checkpoint is being written."""
    return _sigkill_case(suite, trials, "vae", during_save=True)


@timed
def sigkill_save_ldm(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL while a PhraseLDM checkpoint is being written."""
    return _sigkill_case(suite, trials, "ldm", during_save=True)


# --------------------------------------------------------------------------------------------
# SIGTERM / SIGINT.

INTERRUPTED = re.compile(
    r"interrupted by (SIG\w+) at step (\d+): saved checkpoint latest/(\d+); "
    r"run the same command again to resume"
)


def _polite_signal(suite: Suite, trials: int, signum: int) -> list[Trial]:
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        suite.reference(model.name)
        trial = Trial(model.name)
        workdir = suite.fresh(f"{fh.signal_name(signum).lower()}_{model.name}")
        launch = suite.launch(model, workdir, fh.signal_name(signum).lower())
        target = int(suite.rng.integers(2, model.num_steps - 2))
        try:
            if not fh.wait_for_step(launch, target):
                raise fh.CaseFailure(f"the run ended before step {target}: {launch.tail()}")
            time.sleep(suite.rng.uniform(0.0, 0.15))
            launch.signal(signum)
            rc = launch.wait(timeout=120)
        except fh.CaseFailure as error:
            trial.problems.append(str(error))
            done.append(trial)
            continue
        finally:
            launch.ensure_dead()
        reached = fh.last_logged_step(workdir)
        saved = fh.finished_steps(workdir)
        trial.detail.update(exit=rc, reached=reached, checkpoints=saved)
        if rc != 128 + signum:
            trial.problems.append(f"exit {rc}, expected {128 + signum}")
        line = INTERRUPTED.search(launch.stderr())
        if not line:
            trial.problems.append(f"no 'interrupted by {fh.signal_name(signum)}' line")
        elif int(line.group(2)) != reached or int(line.group(3)) != reached:
            trial.problems.append(f"says step {line.group(2)}, reached {reached}")
        if not saved or saved[-1] != reached:
            trial.problems.append(f"newest checkpoint {saved[-1:]} is not the step reached")
        if finished_equal(suite, trial, model, workdir, "resume") is not None:
            start = trial.detail.get("resumed_from")
            trial.steps_lost = None if start is None else reached - start
        done.append(trial)
    return done


@timed
def sigterm(suite: Suite, trials: int) -> list[Trial]:
    """SIGTERM at a random step (VAE and LDM in turn)."""
    return _polite_signal(suite, trials, signal.SIGTERM)


@timed
def sigint(suite: Suite, trials: int) -> list[Trial]:
    """SIGINT (Ctrl-C) at a random step (VAE and LDM in turn)."""
    return _polite_signal(suite, trials, signal.SIGINT)


# --------------------------------------------------------------------------------------------
# Damaged checkpoints.

DAMAGED = re.compile(r"checkpoint latest/(\d+) is damaged \((.+)\); using latest/(\d+)")


def _state_files(step_dir: str, data_only: bool) -> list[str]:
    """Files of a step's ``state`` item: the array blobs (``d/`` folders), and unless
    ``data_only`` the metadata and manifests restore reads."""
    found = []
    for folder, _, names in os.walk(os.path.join(step_dir, "state")):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.basename(folder) == "d" or (
                not data_only and name in ("_METADATA", "manifest.ocdbt")
            ):
                found.append(path)
    return sorted(found)


def flip_bit(suite: Suite, step_dir: str) -> dict:
    """Flips one random bit of one random byte of the step's array data."""
    files = _state_files(step_dir, data_only=True)
    sizes = [os.path.getsize(f) for f in files]
    offset = int(suite.rng.integers(0, sum(sizes)))
    index = 0
    while offset >= sizes[index]:
        offset -= sizes[index]
        index += 1
    path = files[index]
    bit = int(suite.rng.integers(0, 8))
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return dict(file=os.path.relpath(path, step_dir), offset=offset, bit=bit)


def truncate_file(suite: Suite, step_dir: str) -> dict:
    """Cuts one random file of the step's state (blob, manifest or metadata) short."""
    files = _state_files(step_dir, data_only=False)
    path = files[int(suite.rng.integers(0, len(files)))]
    size = os.path.getsize(path)
    keep = int(suite.rng.integers(0, size))
    os.truncate(path, keep)
    return dict(file=os.path.relpath(path, step_dir), size=size, kept=keep)


def _damage_case(suite: Suite, trials: int, damage) -> list[Trial]:
    """The reference's workdir cut back to a random checkpoint K (later steps deleted, as if
    the run had stopped there), step K damaged; then the loader and the resume of the same
    command. Damage is detected when either falls back to K - ckpt_every; damage that neither
    notices must have changed nothing (bytes no read uses, e.g. a superseded OCDBT node)."""
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        ref = suite.reference(model.name)
        trial = Trial(model.name)
        every = model.ckpt_every
        newest = every * int(suite.rng.integers(2, model.num_steps // every))
        previous = newest - every
        workdir = fh.copy_workdir(ref.workdir, suite.fresh(f"damaged_{model.name}"))
        for step in fh.finished_steps(workdir):
            if step > newest:
                shutil.rmtree(os.path.join(fh.checkpoint_folder(workdir), str(step)))
        step_dir = os.path.join(fh.checkpoint_folder(workdir), str(newest))
        trial.detail.update(damaged_step=newest, damage=damage(suite, step_dir))
        loader_fell_back = _check_loader(trial, ref, workdir, newest, previous)
        if finished_equal(suite, trial, model, workdir, "resume_damaged") is not None:
            start = trial.detail.get("resumed_from")
            trial.steps_lost = None if start is None else newest - start
            if start not in (newest, previous):
                trial.problems.append(f"resume started at step {start}")
            elif start == newest and trial.problems:
                trial.problems.insert(0, "not detected: the resume used the damaged step")
            elif start == newest and not loader_fell_back and not trial.problems:
                trial.note = "not detected; the damaged bytes are never read (no effect)"
            elif start == newest and not trial.problems:
                trial.note = "the resume read the step (the damage is outside what it restores)"
        done.append(trial)
    return done


def _check_loader(trial: Trial, ref: fh.Reference, workdir: str, newest: int, previous: int):
    """``load_trained`` of the damaged workdir: the damaged step's params only if they are
    intact, else one warning line and the previous step. Returns whether it fell back."""
    try:
        params, step, printed = fh.load_params(workdir)
    except Exception as error:  # noqa: BLE001 - a loader crash is the finding
        trial.problems.append(f"loader failed: {str(error).splitlines()[0][:160]}")
        return False
    trial.detail["loader_read_step"] = step
    if step not in (newest, previous):
        trial.problems.append(f"loader read step {step}, not {newest} or {previous}")
    elif step == previous:
        warned = DAMAGED.search(printed)
        if not warned or (int(warned.group(1)), int(warned.group(3))) != (newest, previous):
            trial.problems.append("no 'checkpoint latest/N is damaged (...); using latest/M' line")
    if fh.tree_differences(params, ref.params_at(step)):
        trial.problems.append(f"loader returned damaged params of step {step} without a word")
        trial.corrupt = True
    return step == previous


@timed
def bitflip(suite: Suite, trials: int) -> list[Trial]:
    """One bit flipped in the newest checkpoint's arrays (VAE and LDM in turn)."""
    return _damage_case(suite, trials, flip_bit)


@timed
def truncate(suite: Suite, trials: int) -> list[Trial]:
    """One file of the newest checkpoint's state truncated (VAE and LDM in turn)."""
    return _damage_case(suite, trials, truncate_file)


# --------------------------------------------------------------------------------------------
# Two trainers, non-finite values, a truncated metrics line.

BUSY = "{script}: error: {workdir} is in use by pid {pid} on "


@timed
def two_trainers(suite: Suite, trials: int) -> list[Trial]:
    """A second trainer started on the workdir of a running one (VAE and LDM in turn)."""
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        suite.reference(model.name)
        trial = Trial(model.name)
        workdir = suite.fresh(f"busy_{model.name}")
        first = suite.launch(model, workdir, "first_trainer")
        second = None
        try:
            if not fh.wait_for_step(first, 2):
                raise fh.CaseFailure(f"the first trainer ended early: {first.tail()}")
            second = suite.launch(model, workdir, "second_trainer")
            rc = second.wait(timeout=120)
            busy = BUSY.format(script=model.script, workdir=workdir, pid=first.pid)
            trial.detail.update(second_exit=rc, second_said=second.tail())
            if rc != 2:
                trial.problems.append(f"second trainer exited {rc}, expected 2")
            if busy not in second.stderr():
                trial.problems.append("no '<workdir> is in use by pid ...' line")
            rc_first = first.wait(timeout=600)
        except fh.CaseFailure as error:
            trial.problems.append(str(error))
            done.append(trial)
            continue
        finally:
            first.ensure_dead()
            if second is not None:
                second.ensure_dead()
        if rc_first != 0:
            trial.problems.append(f"first trainer exited {rc_first}: {first.tail()}")
        problems = fh.compare_with_reference(workdir, suite.reference(model.name))
        trial.problems += problems
        trial.corrupt = fh.corrupting(problems) or rc_first != 0
        done.append(trial)
    return done


NONFINITE = re.compile(
    r"non-finite loss/gradients at step (\d+); last good checkpoint latest/(\d+)"
)


GOOD_STEPS = 10  # steps the nan case trains normally before it diverges


@timed
def nan(suite: Suite, trials: int) -> list[Trial]:
    """A run trained normally for GOOD_STEPS steps (a checkpoint every step), then resumed with
    learning rate 1e30, logging every 5 steps: it must stop with one line naming the last good
    checkpoint and never save a non-finite state."""
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        trial = Trial(model.name)
        workdir = suite.fresh(f"nan_{model.name}")
        keep = dict(ckpt_every=1, keep_last=3)
        try:
            good = suite.launch(model, workdir, "nan_good", num_steps=GOOD_STEPS, **keep)
            if good.wait(timeout=300) != 0:
                raise fh.CaseFailure(f"the good part failed: {good.tail()}")
            launch = suite.launch(
                model, workdir, "nan", "--config.optim.lr=1e30", log_every=5, **keep
            )
            rc = launch.wait(timeout=300)
        except fh.CaseFailure as error:
            done.append(Trial(model.name, [str(error)]))
            continue
        saved = fh.finished_steps(workdir) + fh.finished_steps(workdir, "best")
        bad = [
            s
            for s in fh.finished_steps(workdir)
            if fh.nonfinite_leaves(fh.load_params(workdir, s)[0])
        ]
        trial.detail.update(exit=rc, checkpoints=saved, nonfinite_checkpoints=bad)
        if bad:
            trial.problems.append(f"non-finite params saved at steps {bad}")
            trial.corrupt = True
        if max(fh.finished_steps(workdir), default=0) != GOOD_STEPS:
            trial.problems.append(f"checkpoints after the divergence: {saved}")
        if rc != 1:
            trial.problems.append(f"exit {rc}, expected 1")
        line = NONFINITE.search(launch.stderr())
        if not line:
            trial.problems.append("no 'non-finite loss/gradients at step N; ...' line")
        elif int(line.group(2)) not in fh.finished_steps(workdir):
            trial.problems.append(f"says last good latest/{line.group(2)}, which is not there")
        if "Traceback" in launch.stderr():
            trial.problems.append("a traceback instead of one line")
        done.append(trial)
    return done


@timed
def truncated_metrics(suite: Suite, trials: int) -> list[Trial]:
    """SIGKILL after a checkpoint, then half of the last metrics.jsonl line appended (what a
    kill in the middle of a write leaves); the resume must not crash and end equal."""
    done = []
    for index in range(trials):
        model = suite.model(alternate(index))
        suite.reference(model.name)
        trial = Trial(model.name)
        workdir = suite.fresh(f"metrics_{model.name}")
        launch = suite.launch(model, workdir, "truncated_metrics")
        target = model.ckpt_every + 2
        try:
            if not _kill_at_step(suite, launch, workdir, target):
                raise fh.CaseFailure(f"the run ended before step {target}: {launch.tail()}")
        except fh.CaseFailure as error:
            done.append(Trial(model.name, [str(error)]))
            continue
        finally:
            launch.ensure_dead()
        reached = fh.last_logged_step(workdir)
        path = os.path.join(workdir, "metrics.jsonl")
        with open(path) as f:
            last = [line for line in f if line.strip()][-1]
        with open(path, "a") as f:
            f.write(last.replace(f'"step": {reached}', f'"step": {reached + 1}')[: len(last) // 2])
        trial.detail["reached"] = reached
        finished_equal(suite, trial, model, workdir, "resume_metrics")
        start = trial.detail.get("resumed_from")
        trial.steps_lost = None if start is None else reached - start
        done.append(trial)
    return done

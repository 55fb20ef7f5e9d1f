"""The machinery of the fault-injection suite (``benchmarks/fault_injection.py``): the tiny
training commands run as real subprocesses, watched by polling their files, faulted, and
compared with one uninterrupted reference run per model.

Everything here is plain ``subprocess`` + polling: a launch writes its stdout and stderr to
log files; the training loop's position is read from tqdm's counter on stderr (the config turns
the bar on; its first count is the step a launch resumed from) and from ``metrics.jsonl``
(one row per step, ``log_every=1``). Every launch shares one persistent JAX compilation cache,
so only the reference runs compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes a step into <step><TMP_MARK>... first
TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")
RESUMED_LINE = re.compile(r"resuming from latest/(\d+)")
VOLATILE = ("seconds", "per_second")  # metric names holding wall-clock time, not compared


class CaseFailure(Exception):
    """A trial could not go the way the case needs (a run that never started, a timeout)."""


# --------------------------------------------------------------------------------------------
# The two training commands.


@dataclasses.dataclass(frozen=True)
class Model:
    """One training command at a size where a run is seconds: ``script --config config
    --workdir W`` plus ``overrides`` (``--config.<field>=<value>``)."""

    name: str  # "vae" | "ldm"
    script: str
    config: str
    overrides: tuple[str, ...]
    num_steps: int
    ckpt_every: int

    def command(self, workdir: str, extra: Sequence[str] = (), **train: Any) -> list[str]:
        """The command line; ``train`` overrides the harness's train fields (``log_every``,
        ``ckpt_every``, ...), ``extra`` adds flags."""
        fields = dict(
            num_steps=self.num_steps,
            ckpt_every=self.ckpt_every,
            log_every=1,
            progress=True,  # the step counter the harness reads
        )
        fields.update(train)
        # Every checkpoint kept (no effect on training): the reference has each step.
        fields.setdefault("keep_last", fields["num_steps"] // fields["ckpt_every"] + 1)
        flags = [f"--config.train.{name}={value}" for name, value in fields.items()]
        return [
            sys.executable,
            self.script,
            "--config",
            self.config,
            "--workdir",
            workdir,
            *self.overrides,
            *flags,
            *extra,
        ]


def vae_model(num_steps: int = 40, ckpt_every: int = 5) -> Model:
    """PhraseVAE stage 1 (span infill) on the synthetic corpus, one-layer T5 of width 32."""
    overrides = (
        "--config.model.t5.d_model=32",
        "--config.model.t5.d_ff=64",
        "--config.model.t5.d_kv=16",
        "--config.model.t5.num_heads=2",
        "--config.model.t5.num_layers=1",
        "--config.model.t5.num_decoder_layers=1",
        "--config.data.max_length=64",
        "--config.data.bucket_lengths=(64,)",
        "--config.train.eval_every=0",
        "--config.eval.max_examples=16",
        "--config.eval.max_f1_examples=4",
        "--config.eval.max_decode_length=16",
        "--config.eval.decode_batch_size=8",
    )
    return Model(
        "vae", "train_vae.py", "configs/vae_stage1.py:tiny", overrides, num_steps, ckpt_every
    )


def ldm_model(latent_dir: str, num_steps: int = 40, ckpt_every: int = 5) -> Model:
    """Length-conditioned PhraseLDM (tiny DiT, 16 bars) on a fixture latent dataset, with
    per-example augmentation (randomness in the iterator state)."""
    overrides = (
        f"--config.data.latent_dir={latent_dir}",
        "--config.vae.workdir=",
        "--config.model.dit.sample_size=64",
        "--config.data.augmentation=bar_permute",
        "--config.train.eval_every=0",
        "--config.train.best_metric=eval/loss",
        "--config.eval.num_songs=0",
    )
    return Model(
        "ldm", "train_ldm.py", "configs/ldm_lencond.py:tiny", overrides, num_steps, ckpt_every
    )


def write_ldm_dataset(path: str) -> str:
    """The fixture latent dataset of tests/ldm_fixtures.py (ten one-note songs, 2-16 bars)."""
    tests_dir = os.path.join(REPO_ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import ldm_fixtures

    codebook = ldm_fixtures.Codebook()
    songs = ldm_fixtures.fixed_length_songs(codebook, [3, 5, 8, 12, 16, 7, 9, 4, 10, 2])
    return ldm_fixtures.write_dataset(path, codebook, songs[:8], songs[8:])


def environment(cache_dir: str) -> dict[str, str]:
    """The subprocesses' environment: this tree first on the path, one CPU device, and every
    compiled program kept in the shared persistent cache ``cache_dir``."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env


# --------------------------------------------------------------------------------------------
# One launch of a command, watched through its files.


def default_signal_handling() -> None:
    """Makes sure the commands get SIGINT and SIGTERM: a process started in the background by
    a shell ignores SIGINT, and its children (ours) would inherit that."""
    try:
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave the dispositions alone
        pass


class Launch:
    """A command started in the background with its output in ``<log_prefix>.out/.err``."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_prefix: str):
        default_signal_handling()
        self.command = list(command)
        self.out_path, self.err_path = log_prefix + ".out", log_prefix + ".err"
        self.started = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=env, stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def stdout(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def counts(self) -> list[int]:
        """Every step count tqdm has shown so far (the first one: the step resumed from)."""
        return [int(m.group(1)) for m in TQDM_COUNT.finditer(self.stderr())]

    def step(self) -> int | None:
        counts = self.counts()
        return counts[-1] if counts else None

    def resumed_from(self) -> int | None:
        """The step this launch started its loop at (tqdm's initial count; 0 = fresh)."""
        counts = self.counts()
        return counts[0] if counts else None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status; the process is SIGKILLed (CaseFailure) after ``timeout`` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise CaseFailure(
                f"{os.path.basename(self.command[1])} still running after {timeout:.0f} s"
            ) from None

    def ensure_dead(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 1) -> str:
        """The last ``lines`` lines of stderr, tqdm's updates left out (for reports)."""
        text = [line.split("\r")[-1].strip() for line in self.stderr().splitlines()]
        text = [line for line in text if line and not TQDM_COUNT.search(line)]
        return " | ".join(text[-lines:])[-300:]


def wait_until(
    condition: Callable[[], Any], launch: Launch | None, timeout: float, interval: float = 0.01
) -> Any:
    """Polls ``condition`` until it returns something truthy (returned); None when ``launch``
    exits first. CaseFailure after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if launch is not None and not launch.alive():
            return condition() or None
        time.sleep(interval)
    raise CaseFailure(f"timed out after {timeout:.0f} s waiting for the run")


def wait_for_step(launch: Launch, step: int, timeout: float = 300) -> bool:
    """Whether ``launch``'s loop reached ``step`` (False: it exited first)."""
    return bool(wait_until(lambda: (launch.step() or 0) >= step, launch, timeout))


# --------------------------------------------------------------------------------------------
# What a workdir holds.


def metric_rows(workdir: str) -> tuple[list[dict], int]:
    """(parsable rows of metrics.jsonl in file order, number of unparsable lines)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], 0
    rows, bad = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                bad += 1
    return rows, bad


def last_logged_step(workdir: str) -> int:
    """The step of the newest row of metrics.jsonl (0 when none)."""
    rows, _ = metric_rows(workdir)
    return int(rows[-1]["step"]) if rows else 0


def checkpoint_folder(workdir: str, which: str = "latest") -> str:
    return os.path.join(workdir, "checkpoints", which)


def finished_steps(workdir: str, which: str = "latest") -> list[int]:
    """Steps whose checkpoint folder has its final name (Orbax renames it when complete)."""
    folder = checkpoint_folder(workdir, which)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def unfinished_saves(workdir: str) -> list[str]:
    """Names of the checkpoint folders Orbax is writing (``<step>.orbax-checkpoint-tmp...``)."""
    names = []
    for which in ("latest", "best"):
        try:
            names += [n for n in os.listdir(checkpoint_folder(workdir, which)) if TMP_MARK in n]
        except FileNotFoundError:
            pass
    return names


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int, str]:
    """(host params, step read, warnings printed) of ``workdir``'s latest checkpoint (or
    exactly ``step``) through ``checkpointing.load_trained``, the loaders' one way in."""
    import contextlib
    import io

    from phraseldm_jax import checkpointing

    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        params, used = checkpointing.load_trained(workdir, "latest", step=step, exact=True)
    return params, used.step, printed.getvalue()


def leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def tree_differences(a: Any, b: Any) -> list[str]:
    """Leaf paths where ``a`` and ``b`` differ (np.array_equal, bit for bit)."""
    la, lb = dict(leaves(a)), dict(leaves(b))
    if la.keys() != lb.keys():
        return [f"different leaves: {sorted(la.keys() ^ lb.keys())[:3]}"]
    return [k for k in la if la[k].shape != lb[k].shape or not np.array_equal(la[k], lb[k])]


def nonfinite_leaves(tree: Any) -> list[str]:
    return [k for k, v in leaves(tree) if v.dtype.kind == "f" and not np.all(np.isfinite(v))]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(word in k for word in VOLATILE)}


def duplicate_steps(rows: list[dict]) -> list[int]:
    """Steps with two rows of the same metric names (a replayed step logged twice)."""
    seen, dup = set(), set()
    for row in rows:
        key = (row["step"], tuple(sorted(row)))
        (dup if key in seen else seen).add(key)
    return sorted({step for step, _ in dup})


# --------------------------------------------------------------------------------------------
# The reference run and the comparison with it.


@dataclasses.dataclass
class Reference:
    """An uninterrupted run of ``model``: its workdir, final params, rows and timings."""

    model: Model
    workdir: str
    params: Any
    rows: list[dict]
    seconds: float  # the whole command
    loop_seconds: float  # first to last metrics row

    def params_at(self, step: int) -> Any:
        return load_params(self.workdir, step)[0]


def run_reference(model: Model, workdir: str, env: dict[str, str], logs: str) -> Reference:
    """Runs ``model`` once without faults (this compiles its programs into the cache)."""
    launch = Launch(model.command(workdir), env, os.path.join(logs, f"reference_{model.name}"))
    first_row = wait_until(lambda: last_logged_step(workdir) > 0, launch, timeout=900)
    loop_start = time.monotonic()
    rc = launch.wait(timeout=900)
    if rc != 0 or not first_row:
        raise CaseFailure(f"the reference {model.name} run failed (exit {rc}): {launch.tail()}")
    seconds = time.monotonic() - launch.started
    loop_seconds = max(time.monotonic() - loop_start, 1e-3)
    rows, bad = metric_rows(workdir)
    params, step, _ = load_params(workdir)
    if bad or step != model.num_steps or duplicate_steps(rows):
        raise CaseFailure(f"the reference {model.name} run is not clean (step {step})")
    return Reference(model, workdir, params, rows, seconds, loop_seconds)


def compare_with_reference(workdir: str, ref: Reference) -> list[str]:
    """What differs between a finished faulted run in ``workdir`` and the reference: final
    params (bit for bit), metrics.jsonl rows (row by row, wall-clock entries aside), duplicate
    rows, unparsable lines. Empty when they are the same."""
    problems = []
    try:
        params, step, _ = load_params(workdir)
    except Exception as error:  # noqa: BLE001 - any failure to read is the finding
        return [f"final checkpoint unreadable: {str(error).splitlines()[0][:200]}"]
    if step != ref.model.num_steps:
        problems.append(f"newest checkpoint at step {step}, not {ref.model.num_steps}")
    differing = tree_differences(params, ref.params)
    if differing:
        problems.append(f"final params differ from the reference in {len(differing)} leaves")
    rows, bad = metric_rows(workdir)
    if bad:
        problems.append(f"{bad} unparsable metrics.jsonl lines")
    dup = duplicate_steps(rows)
    if dup:
        problems.append(f"duplicate metric rows at steps {dup[:5]}")
    mine = [comparable(r) for r in rows]
    theirs = [comparable(r) for r in ref.rows]
    if mine != theirs:
        at = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs))
        )
        problems.append(
            f"metrics.jsonl differs from the reference ({len(mine)} vs {len(theirs)} rows, "
            f"first difference at row {at})"
        )
    return problems


def corrupting(problems: list[str]) -> bool:
    """Whether a comparison's problems mean lost or wrong data (not just a missing step)."""
    return any(not p.startswith("newest checkpoint at step") for p in problems)


def copy_workdir(source: str, target: str) -> str:
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def finish(model: Model, workdir: str, env: dict[str, str], log_prefix: str) -> Launch:
    """Runs the same command again to the end (a resume); returns the finished launch."""
    launch = Launch(model.command(workdir), env, log_prefix)
    launch.wait(timeout=600)
    return launch


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

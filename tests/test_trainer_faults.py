"""trainer.run under faults: a second trainer on the workdir, non-finite steps (both
policies), a collapse that rotates good checkpoints out, a failed resume, SIGTERM / SIGINT."""

import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import toy_training as toy

from phraseldm_jax import checkpointing, metric_writer, trainer, workdir_lock
from phraseldm_jax.errors import CheckpointMismatchError, NonFiniteError, WorkdirBusyError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STEPS = 8


def run_toy(workdir, num_steps=STEPS, task=None, iter_options=None, **train):
    train.setdefault("ckpt_every", 4)
    config = toy.small_config(num_steps=num_steps, data=2, fsdp=4, **train)
    make_iter = toy.make_train_iter_factory(**(iter_options or {}))
    return trainer.run(config, str(workdir), task or toy.make_task(), make_iter)


def latest_steps(workdir):
    return checkpointing.finished_steps(workdir, "latest")


def train_rows(workdir):
    return [r for r in metric_writer.read_jsonl(workdir) if "train/loss" in r]


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def child_env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.getcwd(), TESTS_DIR]))
    return env


# ----------------------------------------------------------------------------------------
# One trainer per workdir.

HOLD_SCRIPT = """
import sys, time
from phraseldm_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def start_holder(workdir):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = start_holder(workdir)
    try:
        with pytest.raises(WorkdirBusyError) as info:
            run_toy(workdir)
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert message.startswith(f"{workdir} is in use by pid {holder.pid} on {socket.gethostname()}")
    assert " since " in message and message.endswith(f"(-c {workdir})")
    assert "\n" not in message
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]  # nothing written before the lock


def test_lock_of_a_dead_run_is_taken_over_and_nested_holds_share_it(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock
    holder.wait()
    with workdir_lock.hold(tmp_path):
        with workdir_lock.hold(tmp_path):  # the same process again (train_and_test + run)
            record = workdir_lock.read_holder(workdir_lock.lock_path(tmp_path))
            assert record["pid"] == os.getpid()
        second = start_holder_expecting_refusal(tmp_path)
        assert f"in use by pid {os.getpid()}" in second
    released = start_holder(tmp_path)  # free again once the outer block ended
    released.kill()
    released.wait()


def start_holder_expecting_refusal(workdir):
    proc = subprocess.run(
        [sys.executable, "-c", HOLD_SCRIPT, str(workdir)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------
# Non-finite steps.


def poisoned_steps(nan_index, num_steps):
    """The steps whose batch holds example ``nan_index`` (the trainer's data order)."""
    it = toy.make_train_iter_factory()(0, 1)
    return [s for s in range(1, num_steps + 1) if nan_index in next(it)["index"]]


NAN_INDEX = 56  # in the batches of steps 5 and 11 (of the first 14)


def test_poisoned_steps_are_where_the_tests_expect():
    assert poisoned_steps(NAN_INDEX, 12)[:2] == [5, 11]


def test_stop_policy_never_saves_a_nan_state(tmp_path):
    # Logged only at the end, checkpoints every 2 steps: the guard reads every step anyway.
    with pytest.raises(NonFiniteError) as info:
        run_toy(tmp_path, 12, iter_options={"nan_index": NAN_INDEX}, log_every=100, ckpt_every=2)
    assert str(info.value) == "non-finite loss/gradients at step 5; last good checkpoint latest/4"
    assert latest_steps(tmp_path) == [2, 4]
    params = checkpointing.load_params(tmp_path, "latest")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    """12 steps with NaN batches at steps 5 and 11, train.nonfinite="skip"."""
    workdir = tmp_path_factory.mktemp("skip")
    train = dict(nonfinite="skip", log_every=4, ckpt_every=2)
    result = run_toy(workdir, 12, iter_options={"nan_index": NAN_INDEX}, **train)
    return workdir, result, train


def test_skip_policy_skips_the_update_and_counts_it(skipping):
    workdir, result, _ = skipping
    assert result.step == 12
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    params = checkpointing.load_params(workdir, "latest")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_skip_policy_resumes_bit_for_bit(skipping, tmp_path):
    workdir, _, train = skipping
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies fetching step 7
        run_toy(crashed, 12, iter_options={"nan_index": NAN_INDEX, "fail_after": 6}, **train)
    run_toy(crashed, 12, iter_options={"nan_index": NAN_INDEX}, **train)
    assert train_rows(crashed) == train_rows(workdir)  # the row at 8 spans the resume
    assert_trees_equal(
        checkpointing.load_params(crashed, "latest"), checkpointing.load_params(workdir, "latest")
    )


def test_skip_policy_stops_after_max_skipped_steps_in_a_row(tmp_path):
    train = dict(nonfinite="skip", max_skipped_steps=3, log_every=2, ckpt_every=2)
    with pytest.raises(NonFiniteError) as info:
        run_toy(tmp_path, 8, task=toy.make_task(loss_scale=math.nan), **train)
    assert str(info.value) == (
        "non-finite loss/gradients at step 3 (3 steps in a row skipped, "
        "train.max_skipped_steps=3); last good checkpoint latest/2"
    )


def test_unknown_nonfinite_policy_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="train.nonfinite='ignore': expected 'stop' or 'skip'"):
        run_toy(tmp_path, nonfinite="ignore")
    assert not os.path.exists(tmp_path / "config.json")


def test_lowest_loss_checkpoint_survives_rotation(tmp_path):
    store = checkpointing.CheckpointStore(str(tmp_path), keep_last=2)
    state = {"w": np.zeros(3, np.float32)}
    it = toy.make_train_iter_factory()(0, 1)
    for step, loss in zip(range(1, 7), [3.0, 1.0, 2.0, 0.5, 4.0, 5.0]):
        store.save("latest", step, state, it, {}, metrics={"train/loss": loss})
    store.save("latest", 7, state, it, {})  # no loss: kept only while among the last two
    store.save("latest", 8, state, it, {}, metrics={"train/loss": 6.0})
    store.wait_until_finished()
    store.close()
    assert latest_steps(tmp_path) == [4, 7, 8]


def test_collapse_without_nan_keeps_the_good_checkpoint(tmp_path):
    # 4 good steps, then resumed with lr 10: the loss jumps a million-fold and stays finite;
    # the rotation (keep_last=2) would leave only collapsed checkpoints.
    config = toy.small_config(num_steps=4, data=2, fsdp=4, ckpt_every=2, keep_last=2)
    trainer.run(config, str(tmp_path), toy.make_task(), toy.make_train_iter_factory())
    config.train.num_steps, config.optim.lr = 12, 10.0
    trainer.run(config, str(tmp_path), toy.make_task(), toy.make_train_iter_factory())
    losses = [r["train/loss"] for r in train_rows(tmp_path)]
    assert all(math.isfinite(x) for x in losses) and min(losses[5:]) > 1e4 * max(losses[:5])
    assert latest_steps(tmp_path) == [4, 10, 12]  # the lowest-loss one, then the last two


# ----------------------------------------------------------------------------------------
# config.json and a failed resume.


def test_failed_resume_leaves_config_json_and_checkpoint_usable(tmp_path):
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    run_toy(tmp_path, num_steps=4)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(CheckpointMismatchError):
        run_toy(tmp_path, num_steps=STEPS, task=toy.make_task(hidden=32))
    assert (tmp_path / "config.json").read_bytes() == before
    assert checkpointing.read_workdir_config(str(tmp_path))["train"]["num_steps"] == 4


# ----------------------------------------------------------------------------------------
# SIGTERM / SIGINT.

TRAIN_SCRIPT = """
import sys
import toy_training as toy
from phraseldm_jax import trainer
config = toy.small_config(num_steps=8, data=2, fsdp=4, ckpt_every=4, log_every=3)
make_iter = toy.make_train_iter_factory(announce_delay=float(sys.argv[2]))
result = trainer.run(config, sys.argv[1], toy.make_task(), make_iter)
if result.interrupted:  # as train_vae.py / train_ldm.py do
    print(result.interruption_line, file=sys.stderr)
    raise SystemExit(result.exit_status)
"""


def train_and_signal(workdir, delay, at_batch, signals):
    """Runs TRAIN_SCRIPT, sends ``signals`` once it announces ``batch <at_batch>``."""
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(workdir), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    for line in child.stdout:
        if line.strip() == f"batch {at_batch}":
            for sig in signals:
                child.send_signal(sig)
                time.sleep(0.05)
            break
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr.strip().splitlines()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    config = toy.small_config(num_steps=8, data=2, fsdp=4, ckpt_every=4, log_every=3)
    trainer.run(config, str(workdir), toy.make_task(), toy.make_train_iter_factory())
    return workdir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_step_reached_and_resumes_bit_for_bit(straight, tmp_path, sig):
    status, stderr = train_and_signal(tmp_path, 0.3, at_batch=5, signals=[sig])
    assert status == 128 + sig, stderr
    name = signal.Signals(sig).name
    step = latest_steps(tmp_path)[-1]
    assert 5 <= step < STEPS and step != 4  # mid-window (logged at 3, 6) and off the ckpt grid
    assert stderr[-1] == (
        f"interrupted by {name} at step {step}: saved checkpoint latest/{step}; "
        "run the same command again to resume"
    )
    config = toy.small_config(num_steps=8, data=2, fsdp=4, ckpt_every=4, log_every=3)
    result = trainer.run(config, str(tmp_path), toy.make_task(), toy.make_train_iter_factory())
    assert result.step == STEPS and result.interrupted is None
    assert metric_writer.read_jsonl(tmp_path) == metric_writer.read_jsonl(straight)
    assert_trees_equal(
        checkpointing.load_params(tmp_path, "latest"), checkpointing.load_params(straight, "latest")
    )


def test_signal_during_start_up_stops_before_the_first_step(tmp_path):
    status, stderr = train_and_signal(tmp_path, 2.0, at_batch=0, signals=[signal.SIGTERM])
    assert status == 143, stderr
    assert stderr[-1] == (
        "interrupted by SIGTERM at step 0: no checkpoint saved yet; "
        "run the same command again to start"
    )
    assert latest_steps(tmp_path) == []


def test_second_sigint_exits_at_once(tmp_path):
    status, stderr = train_and_signal(tmp_path, 2.0, at_batch=0, signals=[signal.SIGINT] * 2)
    assert status == 130, stderr
    assert stderr[-1] == "second SIGINT: exiting at once, without saving"


# ----------------------------------------------------------------------------------------
# Synchronous checkpoints.


def test_sync_checkpoints_wait_for_every_save_and_train_the_same(tmp_path, monkeypatch):
    """``train.async_checkpoints=False``: every latest save is complete on disk before the
    next step (a kill then loses at most ckpt_every steps); the numbers are the same."""
    waits = []
    original = checkpointing.CheckpointStore.wait_until_finished

    def counting_wait(store):
        waits.append(store.latest.latest_step())
        return original(store)

    monkeypatch.setattr(checkpointing.CheckpointStore, "wait_until_finished", counting_wait)
    run_toy(tmp_path / "async")
    async_waits = len(waits)
    waits.clear()
    run_toy(tmp_path / "sync", async_checkpoints=False)
    assert waits[:2] == [4, 8]  # one wait right after each latest save (steps 4 and 8)
    assert len(waits) >= async_waits + 2
    got, _ = checkpointing.load_trained(tmp_path / "sync", "latest", exact=True)
    want, _ = checkpointing.load_trained(tmp_path / "async", "latest", exact=True)
    assert_trees_equal(got, want)

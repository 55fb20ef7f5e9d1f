"""trainer.run on a toy task: exact resume (config change, crash, other meshes, one device),
best checkpoint and early stopping, NaN guard, event files, clear errors."""

import math
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import toy_training as toy

from configs import train_common
from phraseldm_jax import checkpointing, metric_writer, trainer
from phraseldm_jax.errors import CheckpointMismatchError, NonFiniteError

STEPS = 8


def run_toy(workdir, num_steps=STEPS, data=2, fsdp=4, task=None, fail_after=None, **train):
    train.setdefault("ckpt_every", 4)
    config = toy.small_config(num_steps=num_steps, data=data, fsdp=fsdp, **train)
    make_iter = toy.make_train_iter_factory(fail_after=fail_after)
    return trainer.run(config, str(workdir), task or toy.make_task(), make_iter)


def copy_run(source, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def assert_params_equal(workdir, expected, atol=0.0):
    got = checkpointing.load_params(workdir, "latest")
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        if atol == 0.0:
            np.testing.assert_array_equal(a, b)
        else:
            assert np.max(np.abs(a - b)) <= atol


def train_rows(workdir):
    return [r for r in metric_writer.read_jsonl(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 uninterrupted steps on a (2, 4) mesh: workdir, result, final params."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run_toy(workdir)
    return workdir, result, checkpointing.load_params(workdir, "latest")


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """The same run stopped after 4 steps (its checkpoint is copied by the tests)."""
    workdir = tmp_path_factory.mktemp("half")
    result = run_toy(workdir, num_steps=STEPS // 2)
    assert result.step == STEPS // 2
    return workdir


def test_straight_run_trains_and_checkpoints(straight):
    workdir, result, params = straight
    assert result.step == STEPS and not result.stopped_early
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert {"train/grad_norm", "train/param_norm", "train/lr", "train/mse"} <= set(rows[0])
    assert rows[0]["train/lr"] == pytest.approx(1e-2)
    assert result.metrics["train/loss"] == rows[-1]["train/loss"]
    assert sorted(os.listdir(workdir / "checkpoints" / "latest")) == ["4", "8"]
    assert params["Dense_0"]["kernel"].shape == (16, 64)
    assert '"num_steps": 8' in (workdir / "config.json").read_text()


def test_resume_after_stop_equals_straight_run(straight, half, tmp_path):
    workdir = copy_run(half, tmp_path)
    result = run_toy(workdir)
    assert result.step == STEPS
    assert_params_equal(workdir, straight[2])
    # Same batches in the same order, same losses.
    assert train_rows(workdir) == train_rows(straight[0])


def test_resume_after_crash_equals_straight_run(straight, tmp_path):
    workdir = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_toy(workdir, fail_after=6)  # steps 1-6 run, checkpoint at 4, dies fetching 7
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 7))
    result = run_toy(workdir)
    assert result.step == STEPS
    assert_params_equal(workdir, straight[2])
    # Rows 5-6 of the crashed run were replaced by the replay: one history, identical.
    assert train_rows(workdir) == train_rows(straight[0])


def test_checkpoint_from_2x4_continues_on_8x1(straight, half, tmp_path):
    workdir = copy_run(half, tmp_path)
    run_toy(workdir, data=8, fsdp=1)
    assert_params_equal(workdir, straight[2], atol=1e-5)
    straight_rows = train_rows(straight[0])
    for got, want in zip(train_rows(workdir), straight_rows):
        assert got["train/index_sum"] == want["train/index_sum"]
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)


ONE_DEVICE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import jax
assert jax.device_count() == 1, jax.devices()
import toy_training as toy
from phraseldm_jax import trainer
config = toy.small_config(num_steps=8, data=1, fsdp=1, ckpt_every=4)
result = trainer.run(config, sys.argv[1], toy.make_task(), toy.make_train_iter_factory())
assert result.step == 8, result
"""


def test_checkpoint_from_8_devices_continues_on_1_device(straight, half, tmp_path):
    workdir = copy_run(half, tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE_SCRIPT, str(workdir), tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_params_equal(workdir, straight[2], atol=1e-5)
    assert [r["train/index_sum"] for r in train_rows(workdir)] == [
        r["train/index_sum"] for r in train_rows(straight[0])
    ]


def test_mismatched_checkpoint_is_a_clear_error(half, tmp_path):
    workdir = copy_run(half, tmp_path)
    with pytest.raises(CheckpointMismatchError) as info:
        run_toy(workdir, task=toy.make_task(hidden=32))
    message = str(info.value)
    assert "shape of params/Dense_0/kernel: expected (16, 32), got (16, 64)" in message
    assert "shape of params/Dense_1/kernel: expected (32, 4), got (64, 4)" in message


# Scripted eval metric: best at step 5 (2.995, a strict improvement but not by min_delta
# over 3.0), then steps 5, 6, 7 bring no min_delta improvement: patience 3 stops at 7.
SCRIPT = {1: 5.0, 2: 4.0, 3: 4.5, 4: 3.0, 5: 2.995, 6: 3.2, 7: 3.1, 8: 1.0, 9: 0.5, 10: 0.1}


class ScriptedEval:
    def __init__(self):
        self.params_at = {}

    def __call__(self, params, step):
        self.params_at[step] = toy.host_tree(params)
        image = np.linspace(0, 1, 12 * 8, dtype=np.float32).reshape(12, 8)
        return {"loss": SCRIPT[step], "roll": image, "sample": f"song at step {step}"}


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("early")
    evaluate = ScriptedEval()
    train = dict(eval_every=1, patience=3, min_delta=0.01, best_metric="eval/loss")
    result = run_toy(workdir, num_steps=10, task=toy.make_task(evaluate=evaluate), **train)
    return workdir, result, evaluate, train


def test_best_checkpoint_and_early_stopping(early_stopped):
    workdir, result, evaluate, _ = early_stopped
    assert result.stopped_early and result.step == 7
    assert result.best_step == 5 and result.best_metric == pytest.approx(2.995)
    assert sorted(evaluate.params_at) == [1, 2, 3, 4, 5, 6, 7]
    best = checkpointing.load_params(workdir, "best")
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(evaluate.params_at[5])):
        np.testing.assert_array_equal(a, b)
    latest = checkpointing.load_params(workdir, "latest")
    for a, b in zip(jax.tree.leaves(latest), jax.tree.leaves(evaluate.params_at[7])):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(workdir / "checkpoints" / "best")) == ["5"]
    assert sorted(os.listdir(workdir / "checkpoints" / "latest")) == ["4", "7"]


def test_rerunning_a_stopped_run_does_nothing(early_stopped):
    workdir, first, _, train = early_stopped
    evaluate = ScriptedEval()
    rows_before = metric_writer.read_jsonl(workdir)
    again = run_toy(workdir, num_steps=10, task=toy.make_task(evaluate=evaluate), **train)
    assert again.step == 7 and again.stopped_early and again.best_step == 5
    assert again.metrics == first.metrics
    assert evaluate.params_at == {}
    assert metric_writer.read_jsonl(workdir) == rows_before


def read_events(path):
    """Parses a TFRecord event file: (uint64 length, crc, payload, crc) records."""
    from tensorboardX.proto import event_pb2

    data = open(path, "rb").read()
    pos, events = 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
    return events


def test_event_files_and_jsonl_are_readable(early_stopped):
    workdir = early_stopped[0]
    tb_dir = workdir / metric_writer.TENSORBOARD_DIR
    files = [tb_dir / f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents")]
    assert files
    scalars, images, texts = {}, {}, set()
    for event in [e for f in files for e in read_events(f)]:
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = (value.image.height, value.image.width)
            elif value.HasField("simple_value"):
                scalars[(value.tag, event.step)] = value.simple_value
            elif value.metadata.plugin_data.plugin_name == "text":
                texts.add(value.tag)
    rows = metric_writer.read_jsonl(workdir)
    for row in rows:
        for tag, value in row.items():
            if tag != "step" and not isinstance(value, str):
                assert scalars[(tag, row["step"])] == pytest.approx(value, rel=1e-6)
    assert images == {"eval/roll": (12, 8)}
    assert any(tag.startswith("eval/sample") for tag in texts)
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["eval/loss"] for r in eval_rows] == [SCRIPT[s] for s in range(1, 8)]
    assert eval_rows[0]["eval/sample"] == "song at step 1"


def test_nan_guard_stops_at_the_first_step(tmp_path):
    with pytest.raises(NonFiniteError, match="^non-finite loss/gradients at step 1; no checkpoint"):
        run_toy(tmp_path, num_steps=2, task=toy.make_task(loss_scale=math.nan))
    assert not os.path.exists(tmp_path / "checkpoints" / "latest" / "1")


def test_patience_without_evaluation_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="patience > 0 needs task.evaluate"):
        run_toy(tmp_path, patience=2)


def test_update_progress_semantics():
    progress = trainer.fresh_progress()
    seen = []
    for step, value in enumerate([1.0, 1.5, 1.58, 1.55, math.nan, 1.575], start=1):
        progress, is_best = trainer.update_progress(progress, step, value, "max", 0.1)
        seen.append((is_best, progress["evals_without_improvement"]))
    # max mode: 1.5 improves by > 0.1 (reset); 1.58 is a new best but only +0.08 (no reset).
    assert seen == [(True, 0), (True, 0), (True, 1), (False, 2), (False, 3), (False, 4)]
    assert progress["best_value"] == 1.58 and progress["best_step"] == 3
    assert progress["stop_reference"] == 1.5
    with pytest.raises(ValueError, match="best_mode"):
        trainer.update_progress(progress, 7, 1.0, "lowest", 0.0)


def test_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(ValueError, match="'x' has shape \\(12, 3\\).*8 local devices x 2"):
        trainer.check_batch({"x": np.zeros((12, 3))}, grad_accum_steps=2)
    trainer.check_batch({"x": np.zeros((16, 3))}, grad_accum_steps=2)


def test_default_train_config_has_every_group_and_field():
    config = train_common.default_train_config()
    assert set(config.optim) >= {
        "name", "lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "schedule",
        "warmup_steps", "freeze", "grad_accum_steps",
    }  # fmt: skip
    assert set(config.train) >= {
        "num_steps", "log_every", "eval_every", "ckpt_every", "keep_last", "seed",
        "best_metric", "best_mode", "patience", "min_delta", "progress", "nonfinite",
        "max_skipped_steps",
    }  # fmt: skip
    assert dict(config.mesh) == {"data": -1, "fsdp": 1, "fsdp_min_size": 2**18}


def test_distributed_init_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.delenv("PHRASELDM_DISTRIBUTED", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    trainer.maybe_initialize_distributed()
    assert calls == []
    monkeypatch.setenv("PHRASELDM_DISTRIBUTED", "1")
    trainer.maybe_initialize_distributed()
    monkeypatch.delenv("PHRASELDM_DISTRIBUTED")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    trainer.maybe_initialize_distributed()
    assert calls == [1, 1]


@pytest.mark.parametrize("rng_impl", ["threefry", "rbg"])
def test_both_key_kinds_train(tmp_path, rng_impl):
    result = run_toy(tmp_path / "run", num_steps=12, rng_impl=rng_impl)
    assert result.step == 12
    losses = [r["train/loss"] for r in train_rows(tmp_path / "run")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_an_unknown_key_kind_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="train.rng_impl"):
        run_toy(tmp_path / "run", rng_impl="mersenne")

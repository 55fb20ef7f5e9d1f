"""MetricWriter: JSONL rows, resume truncation, other processes silent, config.json."""

import os

import numpy as np
import pytest

from phraseldm_jax import metric_writer


def test_rows_scalars_text_and_images(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path)
    writer.write(1, {"train/loss": np.float32(0.5), "train/lr": 1e-4})
    writer.write(2, {"eval/roll": np.zeros((8, 6, 3), np.uint8), "eval/sample": "a song"})
    writer.close()
    assert metric_writer.read_jsonl(tmp_path) == [
        {"step": 1, "train/loss": 0.5, "train/lr": 1e-4},
        {"step": 2, "eval/sample": "a song"},  # images go to TensorBoard only
    ]
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "tensorboard"))


def test_unloggable_value_is_a_clear_error(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path)
    with pytest.raises(ValueError, match="'eval/latents' at step 3.*shape \\(2, 3, 64, 5\\)"):
        writer.write(3, {"eval/latents": np.zeros((2, 3, 64, 5))})
    writer.close()


def test_resume_drops_rows_of_the_abandoned_future(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path)
    for step in range(1, 7):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    resumed = metric_writer.MetricWriter(tmp_path, resume_step=4)
    resumed.write(5, {"train/loss": 50.0})
    resumed.close()
    rows = metric_writer.read_jsonl(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
    ]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path / "run", enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "run").exists()


def _write_rows(workdir, steps):
    writer = metric_writer.MetricWriter(workdir)
    for step in steps:
        writer.write(step, {"train/loss": float(step)})
    writer.close()


def test_a_truncated_last_line_is_skipped_with_one_warning(tmp_path, capsys):
    """A write cut short (full disk, power loss) must not stop every later restart."""
    _write_rows(tmp_path, [1, 2, 3])
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-9])  # the last row cut in the middle
    capsys.readouterr()
    assert [r["step"] for r in metric_writer.read_jsonl(tmp_path)] == [1, 2]
    assert capsys.readouterr().err == (
        f"{path} line 3 is not a JSON row (a write cut short?); skipped it\n"
    )
    resumed = metric_writer.MetricWriter(tmp_path, resume_step=3)
    assert "line 3 is not a JSON row" in capsys.readouterr().err
    resumed.write(4, {"train/loss": 4.0})
    resumed.close()
    assert [r["step"] for r in metric_writer.read_jsonl(tmp_path)] == [1, 2, 4]
    assert capsys.readouterr().err == ""  # the damaged line is gone for good


def test_garbage_in_the_middle_is_skipped_too(tmp_path, capsys):
    _write_rows(tmp_path, [1, 2])
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_bytes(
        ("\n".join([lines[0], "\x00\x00\x00", '"a string"', lines[1]]) + "\n").encode()
    )
    assert [r["step"] for r in metric_writer.read_jsonl(tmp_path)] == [1, 2]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" line ")[1].split()[0] for line in err] == ["2", "3"]


def test_a_fresh_start_drops_the_rows_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    """No checkpoint restored (resume_step None or 0): the history starts again, no
    duplicate rows."""
    _write_rows(tmp_path, [1, 2, 3])
    for resume_step in (None, 0):
        writer = metric_writer.MetricWriter(tmp_path, resume_step=resume_step)
        writer.write(1, {"train/loss": 10.0})
        writer.close()
        assert metric_writer.read_jsonl(tmp_path) == [{"step": 1, "train/loss": 10.0}]


def _session_starts(workdir):
    """Steps of the SessionLog START events in the event files: TensorBoard drops the
    events of earlier files at and after such a step (``purge_step``)."""
    import struct

    from tensorboardX.proto import event_pb2

    starts = []
    for name in sorted(os.listdir(workdir / "tensorboard")):
        data, pos = (workdir / "tensorboard" / name).read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                starts.append(event.step)
    return starts


def test_tensorboard_is_told_to_purge_the_same_rows(tmp_path):
    _write_rows(tmp_path, [1, 2, 3])  # a fresh start: purge from step 1
    metric_writer.MetricWriter(tmp_path, resume_step=2).close()
    assert sorted(_session_starts(tmp_path)) == [1, 3]


def test_a_restart_after_a_kill_before_the_first_checkpoint_has_no_duplicates(tmp_path, capsys):
    """What a run killed at step 2 (no checkpoint yet, its last row half written) leaves,
    then the same command again: one history, and the trainer passes resume_step=None."""
    import toy_training as toy

    from phraseldm_jax import trainer

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 8.0}\n{"step": 3, "tr'
    )
    config = toy.small_config(num_steps=3)
    trainer.run(config, str(workdir), toy.make_task(), toy.make_train_iter_factory(batch_size=8))
    rows = metric_writer.read_jsonl(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert 9.0 not in [r["train/loss"] for r in rows]
    assert "metrics.jsonl line 3 is not a JSON row" in capsys.readouterr().err

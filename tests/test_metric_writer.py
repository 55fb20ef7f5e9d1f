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

"""train_ldm.py: the configs (the paper's sizes), a run split in two equals an uninterrupted one
(parameters, data order with augmentation, metrics), and the command line."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ldm_fixtures
import numpy as np
import pytest

from configs import ldm_lencond, ldm_seccond, ldm_uncond
from phraseldm_jax import checkpointing, ldm, ldm_task, metric_writer, trees

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "module, expected",
    # The published checkpoints' sizes: phrase-ldm-lencond 29.5M, phrase-ldm-seccond 32.4M.
    [(ldm_uncond, 29.51e6), (ldm_lencond, 29.53e6), (ldm_seccond, 32.40e6)],
)
def test_paper_configs(module, expected):
    config = module.get_config()
    assert (config.optim.lr, config.optim.eps, config.optim.weight_decay) == (5e-4, 1e-8, 0.01)
    assert (config.optim.clip_norm, config.data.batch_size) == (0.5, 128)
    assert (config.train.num_steps, config.train.eval_every, config.eval.num_songs) == (
        200_000, 5000, 20)  # fmt: skip
    assert (config.eval.sampler, config.eval.num_steps) == ("ddpm", 1000)
    ldm_task.resolve_config(config, {"scale_factor": 0.759, "abs_p999": 3.06})
    cfg = ldm_task.ldm_config(config)
    shapes = jax.eval_shape(
        lambda k: ldm.PhraseLDM(cfg).init(k, **ldm.example_inputs(cfg, 1, 8)),
        jax.random.PRNGKey(0),
    )
    n = trees.param_count(shapes)
    assert abs(n - expected) < 0.01e6, n
    for size in ("small", "tiny"):
        small = module.get_config(size)
        assert small.model.length_control == config.model.length_control
        assert small.data.batch_size < 128 and small.train.num_steps < 200_000


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    codebook = ldm_fixtures.Codebook()
    songs = ldm_fixtures.fixed_length_songs(codebook, [3, 5, 8, 12, 16, 7, 9, 4, 10, 2])
    path = tmp_path_factory.mktemp("train_ldm") / "latents"
    return ldm_fixtures.write_dataset(path, codebook, songs[:8], songs[8:])


# One tiny run, given both as command-line overrides and as a config.
OVERRIDES = {
    "vae.workdir": "",
    "model.dit.sample_size": 64,  # 16 bars: fast
    "data.augmentation": "bar_permute",  # per-example randomness in the iterator state
    "train.num_steps": 6,
    "train.log_every": 1,
    "train.ckpt_every": 3,
    "train.eval_every": 3,
    "train.best_metric": "eval/loss",
    "eval.num_songs": 0,  # evaluation = validation loss
}


def _config(latent_dir):
    config = ldm_lencond.get_config("tiny")
    config.data.latent_dir = latent_dir
    for dotted, value in OVERRIDES.items():
        group, *path, name = dotted.split(".")
        target = config[group]
        for part in path:
            target = target[part]
        target[name] = value
    return config


def test_command_line_run_and_resume(latent_dir, tmp_path):
    straight = str(tmp_path / "straight")
    args = [sys.executable, "train_ldm.py", "--config", "configs/ldm_lencond.py:tiny"]
    args += ["--workdir", straight, f"--config.data.latent_dir={latent_dir}"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.load(open(os.path.join(straight, "config.json")))
    assert saved["model"]["scale_factor"] == 0.76 and saved["model"]["clip_range"] == 3.0
    assert saved["optim"]["freeze"] == [ldm.TIME_PROJ_FREEZE]
    assert saved["data"]["augmentation"] == "bar_permute" and saved["train"]["num_steps"] == 6

    # The same run interrupted after step 3: its checkpoints up to 3 (the trainer drops the
    # metrics logged later), resumed in-process to step 6.
    split = str(tmp_path / "split")
    shutil.copytree(straight, split)
    for which in ("latest", "best"):
        for step in os.listdir(checkpointing.checkpoint_dir(split, which)):
            if step.isdigit() and int(step) > 3:
                shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(split, which), step))
    assert checkpointing.CheckpointStore(split).latest_step() == 3
    result = ldm_task.train(_config(latent_dir), split)
    assert result.step == 6

    for which in ("latest", "best"):
        a = checkpointing.load_params(straight, which)
        b = checkpointing.load_params(split, which)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    rows_a, rows_b = metric_writer.read_jsonl(straight), metric_writer.read_jsonl(split)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train/loss", "eval/loss"):
            if key in ra:
                assert ra[key] == rb[key], (ra["step"], key)
    losses = [r["train/loss"] for r in rows_a if "train/loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))

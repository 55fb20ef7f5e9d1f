"""train_vae.py: the script trains and writes test_metrics.json; through its code path
(vae_task.train_and_test) a crashed and resumed training ends with exactly the parameters of
the uninterrupted run."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import toy_training
import vae_fixtures as fx

from input_pipeline import vae_pipeline
from phraseldm_jax import checkpointing, metric_writer, vae_task

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _config():
    return fx.tiny_config(3, num_steps=STEPS, ckpt_every=3, eval_every=3, log_every=1)


def _flag_overrides(config) -> list[str]:
    """``--config.<field>=<value>`` for every field where ``config`` differs from ``:tiny``."""
    base = importlib.import_module("configs.vae_stage3").get_config("tiny").to_dict()
    flags = []

    def walk(prefix, want, have):
        for key, value in want.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value, have[key])
            elif value != have[key]:
                flags.append(f"--config.{prefix}{key}={value}")

    walk("", config.to_dict(), base)
    return flags


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of the script itself: (workdir, what it printed)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    command = [
        sys.executable,
        "train_vae.py",
        "--config",
        "configs/vae_stage3.py:tiny",
        "--workdir",
        workdir,
        *_flag_overrides(_config()),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, json.loads(done.stdout[done.stdout.index("{") :])


def test_the_script_trains_and_writes_test_metrics(straight):
    workdir, printed = straight
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(_config().to_json_best_effort())
    with open(os.path.join(workdir, vae_task.TEST_METRICS)) as f:
        written = json.load(f)
    assert printed == {k: written[k] for k in ("f1_op", "f1_opd", "f1_iopd", "loss")}
    assert written["split"] == "test" and written["checkpoint"] == "best"
    assert written["checkpoint_step"] == written["best_step"] in (3, 6)
    assert written["final_step"] == STEPS and written["steps_this_run"] == STEPS
    assert written["steps_per_second"] > 0 and written["train_wall_seconds"] > 0
    assert written["f1_examples"] == written["examples"] > 0
    assert 0.0 <= written["f1_iopd"] <= 1.0 and written["accuracy"] >= 0.0


def test_crashed_run_resumes_to_the_same_parameters(straight, tmp_path, monkeypatch):
    workdir = str(tmp_path / "crashed")
    make_train_iter = vae_pipeline.make_train_iter

    def crashing(config, local_devices=1):
        factory = make_train_iter(config, local_devices)
        return lambda index, count: toy_training.CrashingIterator(factory(index, count), 4)

    monkeypatch.setattr(vae_pipeline, "make_train_iter", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        vae_task.train_and_test(_config(), workdir)  # dies in step 5; checkpoint at step 3
    assert checkpointing.finished_steps(workdir, "latest")[-1] == 3
    monkeypatch.setattr(vae_pipeline, "make_train_iter", make_train_iter)

    summary = vae_task.train_and_test(_config(), workdir)
    assert summary["steps_this_run"] == STEPS - 3
    fx.assert_trees_equal(fx.params_of(workdir), fx.params_of(straight[0]))
    fx.assert_trees_equal(fx.params_of(workdir, "best"), fx.params_of(straight[0], "best"))
    rows = [r for r in metric_writer.read_jsonl(workdir) if "train/loss" in r]
    expected = [r for r in metric_writer.read_jsonl(straight[0]) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in expected]
    assert summary["f1_opd"] == pytest.approx(straight[1]["f1_opd"])

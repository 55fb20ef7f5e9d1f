"""Checkpoints written before the restructure (commit abe1f44) still load and resume.

``fixtures/checkpoints_v1`` holds a tiny stage-3 PhraseVAE workdir and a tiny
section-conditioned PhraseLDM workdir as ``train_vae.py`` / ``train_ldm.py`` wrote them at
that commit (one or two steps on the synthetic corpus), with the SHA-256 of every parameter
as that commit's ``checkpointing.load_params`` returned it (``expected.json``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from input_pipeline import vae_pipeline
from phraseldm_jax import checkpointing, ldm, optim, pretrained, trainer, vae_task
from phraseldm_jax.vae_inference import PhraseVAEModel

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "checkpoints_v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["params"]


def digests(params) -> dict[str, list]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {
        optim.path_string(path): [
            list(np.shape(value)),
            hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
        ]
        for path, value in leaves
    }


@pytest.mark.parametrize("name", ["vae_stage3", "ldm_seccond"])
def test_old_checkpoints_load_with_the_same_parameters(name):
    params, used = checkpointing.load_trained(str(FIXTURES / name), "best")
    assert digests(params) == EXPECTED[name]
    assert used.which_asked == "best" and used.step >= 1
    # Written before checksums existed: loaded as they are, marked unverified.
    assert used.verified is False and used.as_dict()["verified"] is False


def test_old_vae_workdir_decodes_through_the_inference_class():
    model = PhraseVAEModel.from_workdir(str(FIXTURES / "vae_stage3"), "latest")
    mean, _ = model.encode(["i-0 o-0 p-60 d-12 b-1"])
    assert mean.shape == (1, 64) and np.all(np.isfinite(mean))
    assert len(model.decode(mean)) == 1


def test_old_ldm_workdir_predicts_noise():
    loaded = pretrained.load_ldm(str(FIXTURES / "ldm_seccond"), "latest")
    assert loaded.checkpoint is not None and loaded.checkpoint.step == 1
    cond = ldm.make_conditions(2, plan="A-8 B-8")
    x = jnp.ones((2, loaded.config.dit.sample_size, 64), jnp.float32)
    eps = ldm.predict_noise(loaded.params, loaded.config, x, jnp.array([10, 500]), cond)
    assert eps.shape == x.shape and bool(jnp.all(jnp.isfinite(eps)))


def test_old_vae_workdir_resumes_training(tmp_path):
    """The whole train state (params, Adam moments, step, rng, Grain iterator) restores from
    the old layout and training continues from it."""
    workdir = tmp_path / "vae_stage3"
    shutil.copytree(FIXTURES / "vae_stage3", workdir)
    config = ml_collections.ConfigDict(checkpointing.read_workdir_config(str(workdir), "t5"))
    config.train.num_steps = 3
    config.train.progress = False
    old_step = workdir / "checkpoints" / "latest" / "1" / "_CHECKPOINT_METADATA"
    written_then = old_step.read_bytes()  # holds its save time: a fresh run would rewrite it
    result = trainer.run(
        config, str(workdir), vae_task.vae_task(config), vae_pipeline.make_train_iter(config)
    )
    assert result.step == 3
    assert checkpointing.finished_steps(str(workdir), "latest") == [1, 2, 3]
    assert old_step.read_bytes() == written_then
    # The steps saved since carry checksums; the old one still loads unverified.
    assert checkpointing.load_trained(str(workdir), "latest")[1].verified
    assert not checkpointing.load_trained(str(workdir), "latest", step=1)[1].verified

"""PhraseLDM on device meshes, through its real task (``ldm_task``) and ``ldm_task.train``.

The model is the tiny length- and section-conditioned one (every module: DiT, length and
section encoders), on 16-bar songs.

- (data=2, fsdp=4) trains like one device (2 steps each side) and shards the big kernels and
  their Adam moments over "fsdp";
- a checkpoint written on (2, 4) continues on (2, 4), (8, 1) and (1, 1) like the
  uninterrupted run;
- two processes of 4 devices each (``jax.distributed`` over localhost, gloo collectives),
  each reading its own shard of the songs, train and evaluate (validation loss, generated
  songs) like one process assembling the same global batches, write metrics once and
  checkpoints that restore in one process;
- ``model.dit.remat`` leaves gradients unchanged; ``optim.grad_accum_steps`` equals the full
  batch; sampling split over a (2, 4) mesh gives the one-device songs.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import ldm_fixtures
import mesh_helpers as mh
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from input_pipeline import ldm_pipeline
from phraseldm_jax import (
    checkpointing,
    diffusion,
    ldm,
    ldm_task,
    metric_writer,
    optim,
    sampler,
    sharding,
    trainer,
)

STEPS = 4
MIN_SIZE = 512
REPO = os.path.dirname(mh.TESTS_DIR)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    with mh.fast_compiles():
        yield


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    codebook = ldm_fixtures.Codebook()
    lengths = [3, 5, 8, 12, 16, 7, 9, 4, 10, 2, 6, 11, 13, 14]
    songs = ldm_fixtures.fixed_length_songs(codebook, lengths)
    path = tmp_path_factory.mktemp("mesh_ldm") / "latents"
    return ldm_fixtures.write_dataset(path, codebook, songs[:12], songs[12:])


def config_on(latent_dir: str, data: int, fsdp: int, num_steps: int = STEPS):
    config = ldm_fixtures.tiny_config(
        latent_dir, length_control=True, sec_control=True, num_steps=num_steps
    )
    config.model.dit.sample_size = 64  # 16 bars
    config.data.batch_size = 16
    config.train.update(log_every=1, ckpt_every=2, keep_last=2)
    config.mesh.update(data=data, fsdp=fsdp, fsdp_min_size=MIN_SIZE)
    return config


def train_rows(workdir):
    return [r for r in metric_writer.read_jsonl(workdir) if "train/loss" in r]


def truncate_to(source, target, step: int) -> str:
    """A copy of a finished run as it was when it had just saved ``step``."""
    shutil.copytree(source, target)
    directory = checkpointing.checkpoint_dir(target, "latest")
    for name in os.listdir(directory):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(directory, name))
    return str(target)


@pytest.fixture(scope="module")
def straight(latent_dir, tmp_path_factory):
    """4 uninterrupted steps on (2, 4), checkpoints at 2 and 4: (workdir, final params)."""
    workdir = str(tmp_path_factory.mktemp("ldm_straight"))
    assert ldm_task.train(config_on(latent_dir, 2, 4), workdir).step == STEPS
    return workdir, checkpointing.load_params(workdir, "latest")


ONE_DEVICE = """
import sys, jax
import test_mesh_ldm as t
from phraseldm_jax import ldm_task
assert jax.device_count() == 1, jax.devices()
for workdir in sys.argv[2:]:
    assert ldm_task.train(t.config_on(sys.argv[1], 1, 1), workdir).step == t.STEPS
"""


@pytest.fixture(scope="module")
def one_device(latent_dir, straight, tmp_path_factory):
    """In a one-device process: a fresh 4-step run, and the straight run resumed from step 2.

    Returns (fresh workdir, resumed workdir)."""
    base = tmp_path_factory.mktemp("ldm_one_device")
    fresh = str(base / "fresh")
    resumed = truncate_to(straight[0], base / "resumed", 2)
    proc = mh.run_one_device(ONE_DEVICE, latent_dir, fresh, resumed, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return fresh, resumed


def test_2x4_mesh_trains_like_one_device(straight, one_device):
    fresh = one_device[0]
    for step in (2, 4):
        mesh_params = checkpointing.load_params(straight[0], "latest", step)
        one_params = checkpointing.load_params(fresh, "latest", step)
        diff = mh.max_abs_diff(mesh_params, one_params)
        print(f"(2, 4) mesh vs one device, step {step}: max |param diff| {diff:.3g}")
        assert diff <= 1e-5
    rows, expected = train_rows(fresh), train_rows(straight[0])
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for got, want in zip(rows, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)
    moved = mh.max_abs_diff(*(checkpointing.load_params(fresh, "latest", s) for s in (2, 4)))
    assert moved > 1e-4


@pytest.mark.parametrize("data, fsdp", [(2, 4), (8, 1)])
def test_checkpoint_from_2x4_continues_on_another_mesh(latent_dir, straight, tmp_path, data, fsdp):
    workdir = truncate_to(straight[0], tmp_path / "run", 2)
    assert ldm_task.train(config_on(latent_dir, data, fsdp), workdir).step == STEPS
    diff = mh.max_abs_diff(checkpointing.load_params(workdir, "latest"), straight[1])
    print(f"restored on ({data}, {fsdp}), trained on: max |param diff| {diff:.3g}")
    assert diff <= 1e-5
    for got, want in zip(train_rows(workdir), train_rows(straight[0])):
        assert got["step"] == want["step"]
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)


def test_checkpoint_from_2x4_continues_on_one_device(straight, one_device):
    resumed = one_device[1]
    diff = mh.max_abs_diff(checkpointing.load_params(resumed, "latest"), straight[1])
    print(f"restored on (1, 1), trained on: max |param diff| {diff:.3g}")
    assert diff <= 1e-5
    assert [r["step"] for r in train_rows(resumed)] == [1, 2, 3, 4]


def _resolved(config):
    ldm_task.resolve_config(config)
    return config


def test_big_kernels_and_their_adam_moments_are_sharded_over_fsdp(latent_dir):
    config = _resolved(config_on(latent_dir, 2, 4))
    task = ldm_task.make_ldm_task(config)
    example = next(ldm_pipeline.make_train_iter(config)(0, 1))
    tx, _ = optim.make_optimizer(config.optim, STEPS)
    init_fn = functools.partial(trainer.init_train_state, task, tx, 0)
    mesh = mh.mesh(2, 4)
    shardings = sharding.tree_shardings(jax.eval_shape(init_fn, example), mesh, MIN_SIZE)
    state = jax.jit(init_fn, out_shardings=shardings)(example)
    spec = mh.specs(state)
    biggest = [path for path, _ in mh.largest_params(state.params, 3)]
    assert biggest == [
        "dit/transformer_blocks_0/ff/proj_in/kernel",  # [32, 256]
        "dit/postprocess_conv/kernel",  # [64, 64]
        "dit/preprocess_conv/kernel",  # [64, 64]
    ]
    expected = {
        "dit/transformer_blocks_0/ff/proj_in/kernel": P(None, "fsdp"),
        "dit/postprocess_conv/kernel": P("fsdp", None),
        "dit/transformer_blocks_0/attn1/qkv/kernel": P(None, "fsdp"),  # [32, 96]
        "length_encoder/embedding": P("fsdp", None),  # [128, 16]
        "sec_encoder/layers_0/linear1/kernel": P(None, "fsdp"),  # [32, 128]
    }
    for path, want in expected.items():
        assert spec[f"params/{path}"] == want, path
        moments = [p for p in spec if p.startswith("opt_state") and p.endswith("/" + path)]
        assert len(moments) == 2, moments  # AdamW's mu and nu
        assert all(spec[m] == want for m in moments), moments
    # Small arrays replicated; the frozen Fourier frequencies have no optimiser state.
    assert spec["params/dit/time_proj/weight"] == P()
    assert not [p for p in spec if p.startswith("opt_state") and "time_proj" in p]
    kernel = state.params["dit"]["transformer_blocks_0"]["ff"]["proj_in"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 64)}


def _loss_grad(loss_fn):
    rng = jax.random.PRNGKey(3)  # t, noise and the section encoder's dropout
    return jax.jit(jax.grad(lambda p, b: loss_fn(p, None, b, rng, True)[0]))


def test_remat_gives_the_same_gradients(latent_dir):
    config = _resolved(config_on(latent_dir, 1, 1))
    batch = next(ldm_pipeline.make_train_iter(config)(0, 1))
    params = ldm.init_params(jax.random.PRNGKey(0), ldm_task.ldm_config(config))
    grads, jaxprs = [], []
    for remat in (False, True):
        config.model.dit.remat = remat
        grad_fn = _loss_grad(ldm_task.make_ldm_task(config).loss_fn)
        grads.append(grad_fn(params, batch))
        jaxprs.append(str(jax.make_jaxpr(grad_fn)(params, batch)))
    assert mh.max_abs_diff(*grads) <= 1e-6
    assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]


def fixed_noise_task(config) -> trainer.Task:
    """The real model and conditions, with the timesteps and the noise read from the batch
    (``t`` [B], ``noise`` [B, L, 64]) instead of drawn from the step's key: the loss of a
    batch is then the mean of its songs' losses whatever the micro-batching."""
    ldm_cfg = ldm_task.ldm_config(config)

    def loss_fn(params, frozen, batch, rng, train):
        del frozen, rng, train
        x_t = diffusion.add_noise(batch["latents"], batch["noise"], batch["t"])
        cond = ldm.conditions_from_batch(batch)
        eps = ldm.predict_noise(params, ldm_cfg, x_t, batch["t"], cond)
        mse = jnp.mean(jnp.square(eps - batch["noise"]))
        return mse, {"mse": mse}

    def init_params(rng, example_batch):
        del example_batch
        return ldm.init_params(rng, ldm_cfg)

    return trainer.Task(name="ldm_fixed_noise", init_params=init_params, loss_fn=loss_fn)


def test_grad_accumulation_equals_the_full_batch(latent_dir):
    config = _resolved(config_on(latent_dir, 2, 2))
    config.data.batch_size = 32
    batch = dict(next(ldm_pipeline.make_train_iter(config)(0, 1)))
    rng = np.random.default_rng(0)
    batch["t"] = rng.integers(0, 1000, size=32).astype(np.int32)
    batch["noise"] = rng.normal(size=batch["latents"].shape).astype(np.float32)
    mesh = mh.mesh(2, 2)
    params, losses = [], []
    for accum in (1, 4):
        config.optim.grad_accum_steps = accum
        compiled = mh.compiled_step(fixed_noise_task(config), config, mesh, batch)
        losses.append(compiled.run(batch)["train/loss"])
        params.append(mh.host(compiled.state.params))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert mh.max_abs_diff(params[0], params[1]) <= 1e-6


def test_sampling_split_over_a_2x4_mesh_matches_one_device(latent_dir, straight):
    config = _resolved(config_on(latent_dir, 2, 4))
    ldm_cfg = ldm_task.ldm_config(config)
    settings = sampler.SamplerSettings(sampler="ddim", num_steps=4)
    cond = ldm.make_conditions(8, plan="A-4 B-4 A-8")
    key = jax.random.PRNGKey(1)
    songs = [
        sampler.LatentSampler(ldm_cfg, settings, mesh)(straight[1], key, cond)
        for mesh in (mh.mesh(2, 4), mh.mesh(1, 1))
    ]
    assert songs[0].shape == (8, 64, 64)
    # Float rounding only (per-device batch sizes change the matmul blocking), amplified where
    # the sampler divides by sqrt(alpha_bar) of the noisiest steps (as in test_sampling).
    diff = np.abs(songs[0] - songs[1])
    assert np.median(diff) < 1e-5 and diff.max() < 5e-3, (np.median(diff), diff.max())
    assert np.std(songs[0]) > 0.1


# ------------------------------------------------------------------------------------------
# Two processes.


TWO_PROCESSES = """
import sys, jax
import ldm_fixtures, test_mesh_ldm as t
from phraseldm_jax import ldm_task
latent_dir, workdir = sys.argv[1:]
config = t.two_process_config(latent_dir)
result = ldm_task.train(config, workdir, decoder=ldm_fixtures.Codebook())
assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
assert result.step == 2 and result.best_step == 2
print("process", jax.process_index(), "done")
"""


def two_process_config(latent_dir: str):
    """2 steps on (2, 4), then an evaluation: validation loss and 4 generated songs."""
    config = config_on(latent_dir, 2, 4, num_steps=2)
    config.train.update(eval_every=2, best_metric="eval/loss")
    config.eval.update(batch_size=8, num_songs=4, target_bars=8, section_plan="A-8", num_steps=2)
    return config


def test_two_processes_train_like_one(latent_dir, tmp_path):
    workdir = str(tmp_path / "two_processes")
    outputs = mh.run_processes(TWO_PROCESSES, latent_dir, workdir, cwd=REPO)
    assert [f"process {i} done" in out for i, out in enumerate(outputs)] == [True, True]

    # The same global batches in one process: both shards' host batches, process 0 first.
    reference = str(tmp_path / "one_process")
    config = _resolved(two_process_config(latent_dir))

    def make_iter(process_index, process_count):
        assert (process_index, process_count) == (0, 1)
        return mh.ProcessShards([ldm_pipeline.make_train_iter(config)(i, 2) for i in range(2)])

    task = ldm_task.make_ldm_task(config, decoder=ldm_fixtures.Codebook())
    trainer.run(config, reference, task, make_iter)
    for which in ("latest", "best"):  # both saved at step 2 (distinct multi-process barriers)
        two, one = (checkpointing.load_params(w, which) for w in (workdir, reference))
        diff = mh.max_abs_diff(two, one)
        print(f"two processes vs one, {which}: max |param diff| {diff:.3g}")
        assert diff <= 1e-5
    # Metrics written once (by process 0), with the same losses and generated songs.
    rows, expected = metric_writer.read_jsonl(workdir), metric_writer.read_jsonl(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 2]
    for got, want in zip(rows, expected):
        for key in ("train/loss", "eval/loss", "eval/mean_bars", "eval/phrase_fid"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4), key
    # Each process saved its own iterator position next to the shared state.
    data_dir = os.path.join(checkpointing.checkpoint_dir(workdir, "latest"), "2", "data")
    saved = sorted(name for name in os.listdir(data_dir) if name.endswith(".json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]

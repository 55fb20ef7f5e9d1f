"""PhraseVAE on device meshes, through its real task (``vae_task``) and the trainer's step.

- A (data=2, fsdp=4) mesh trains like one device (``trainer.run`` on both, 2 steps) and really
  shards the big kernels and their Adam moments over "fsdp".
- A checkpoint written by ``trainer.run`` on (2, 4) continues on (2, 4), (8, 1) and, in a
  one-device process, (1, 1) exactly like the uninterrupted run.
- ``model.t5.remat`` leaves the gradients unchanged; ``optim.grad_accum_steps`` equals the
  full batch; latent encoding split over a mesh gives the one-device latents.
- Two processes of 4 devices (``jax.distributed`` over localhost) train, evaluate and score
  the test split like one process assembling the same global batches.
"""

import functools
import json
import os
import shutil

import jax
import mesh_helpers as mh
import numpy as np
import pytest
import vae_fixtures as fx
from jax.sharding import PartitionSpec as P

from input_pipeline import vae_pipeline
from phraseldm_jax import checkpointing, metric_writer, optim, sharding, trainer, vae_task
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.vae_inference import PhraseVAEModel

STEPS = 4
MIN_SIZE = 1024  # the tiny model's big arrays (embedding, latent head, MLPs) get sharded


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    with mh.fast_compiles():
        yield


def config_on(data: int, fsdp: int, num_steps: int = STEPS, stage: int = 3):
    config = fx.tiny_config(stage, num_steps=num_steps, ckpt_every=2, keep_last=2, log_every=1)
    config.data.batch_size = 16
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
def straight(tmp_path_factory):
    """4 uninterrupted steps on (2, 4), checkpoints at 2 and 4: (workdir, final params)."""
    workdir = tmp_path_factory.mktemp("vae_straight")
    result = fx.train(workdir, config_on(2, 4))
    assert result.step == STEPS
    return str(workdir), checkpointing.load_params(str(workdir), "latest")


ONE_DEVICE = """
import sys, jax
import vae_fixtures as fx, test_mesh_vae as t
assert jax.device_count() == 1, jax.devices()
for workdir in sys.argv[1:]:
    assert fx.train(workdir, t.config_on(1, 1)).step == t.STEPS
"""


@pytest.fixture(scope="module")
def one_device(straight, tmp_path_factory):
    """In a one-device process: a fresh 4-step run, and the straight run resumed from step 2.

    Returns (fresh workdir, resumed workdir)."""
    base = tmp_path_factory.mktemp("vae_one_device")
    fresh = str(base / "fresh")
    resumed = truncate_to(straight[0], base / "resumed", 2)
    proc = mh.run_one_device(ONE_DEVICE, fresh, resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return fresh, resumed


def test_2x4_mesh_trains_like_one_device(straight, one_device):
    fresh = one_device[0]
    for step in (2, 4):  # the second step of each pair runs on restored Adam moments too
        mesh_params = checkpointing.load_params(straight[0], "latest", step)
        one_params = checkpointing.load_params(fresh, "latest", step)
        diff = mh.max_abs_diff(mesh_params, one_params)
        print(f"(2, 4) mesh vs one device, step {step}: max |param diff| {diff:.3g}")
        assert diff <= 1e-5
    rows, expected = train_rows(fresh), train_rows(straight[0])
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for got, want in zip(rows, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)
    # Training moved the parameters by much more than the tolerance.
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    moved = mh.max_abs_diff(*(checkpointing.load_params(fresh, "latest", s) for s in (2, 4)))
    assert moved > 1e-3


@pytest.mark.parametrize("data, fsdp", [(2, 4), (8, 1)])
def test_checkpoint_from_2x4_continues_on_another_mesh(straight, tmp_path, data, fsdp):
    workdir = truncate_to(straight[0], tmp_path / "run", 2)
    result = fx.train(workdir, config_on(data, fsdp))
    assert result.step == STEPS
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


def test_big_kernels_and_their_adam_moments_are_sharded_over_fsdp():
    config = config_on(2, 4)
    task = vae_task.vae_task(config)
    example = next(vae_pipeline.make_train_iter(config)(0, 1))
    tx, _ = optim.make_optimizer(config.optim, STEPS)
    init_fn = functools.partial(trainer.init_train_state, task, tx, 0)
    mesh = mh.mesh(2, 4)
    shardings = sharding.tree_shardings(jax.eval_shape(init_fn, example), mesh, MIN_SIZE)
    state = jax.jit(init_fn, out_shardings=shardings)(example)
    spec = mh.specs(state)
    biggest = mh.largest_params(state.params, 4)
    assert [path for path, _ in biggest] == [
        "t5/shared/embedding",  # [1000, 32]
        "proj/kernel",  # [128, 128]
        "post_proj/kernel",  # [64, 128]
        "t5/decoder/blocks_0/mlp/wi/kernel",  # [32, 64]
    ]
    expected = {
        "t5/shared/embedding": P("fsdp", None),
        "proj/kernel": P("fsdp", None),
        "post_proj/kernel": P(None, "fsdp"),
        "t5/decoder/blocks_0/mlp/wi/kernel": P(None, "fsdp"),
        "t5/encoder/blocks_0/self_attention/q/kernel": P("fsdp", None),  # [32, 32]
    }
    for path, want in expected.items():
        assert spec[f"params/{path}"] == want, path
        moments = [p for p in spec if p.startswith("opt_state") and p.endswith("/" + path)]
        assert len(moments) == 2, moments  # Adam's mu and nu
        assert all(spec[m] == want for m in moments), moments
    # Small arrays stay replicated; every device holds a quarter of the embedding.
    assert spec["params/t5/encoder/final_layer_norm/scale"] == P()
    assert spec["params/proj/bias"] == P() and spec["step"] == P()
    shards = state.params["t5"]["shared"]["embedding"].addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(250, 32)}


def _grads(config, params, batch):
    loss_fn = vae_task.make_loss_fn(config)
    rng = jax.random.PRNGKey(7)  # dropout and the posterior sample both active
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, None, b, rng, True)[0]))
    return grad_fn(params, batch), jax.make_jaxpr(grad_fn)(params, batch)


def test_remat_gives_the_same_gradients():
    config = config_on(1, 1)
    batch = next(vae_pipeline.make_train_iter(config)(0, 1))
    params = vae_lib.init_params(jax.random.PRNGKey(0), vae_task.model_config(config))
    plain, plain_jaxpr = _grads(config, params, batch)
    config.model.t5.remat = True
    remat, remat_jaxpr = _grads(config, params, batch)
    assert mh.max_abs_diff(plain, remat) <= 1e-6
    assert "remat" not in str(plain_jaxpr) and "remat" in str(remat_jaxpr)


def equal_token_batch(config, groups: int = 4, per_group: int = 4) -> dict:
    """``groups * per_group`` real rows laid out so that every strided micro-batch (rows
    ``k::per_group``) holds one row of each group; rows of a group have the same number of
    target tokens, so the token-mean loss of the full batch is the mean of the micro-batch
    losses."""
    rows_by_length: dict[int, list] = {}
    iterator = vae_pipeline.make_train_iter(config)(0, 1)
    while sum(len(v) >= per_group for v in rows_by_length.values()) < groups:
        batch = next(iterator)
        for i, n in enumerate((batch["labels"] != -100).sum(1)):
            rows_by_length.setdefault(int(n), []).append({k: v[i] for k, v in batch.items()})
    lengths = [n for n, rows in sorted(rows_by_length.items()) if len(rows) >= per_group]
    chosen = [row for n in lengths[:groups] for row in rows_by_length[n][:per_group]]
    return {k: np.stack([row[k] for row in chosen]) for k in chosen[0]}


def test_grad_accumulation_equals_the_full_batch():
    """Stage 2 without dropout (no randomness): 4 micro-batches of 4 = one batch of 16."""
    config = config_on(2, 2, stage=2)
    config.model.t5.dropout_rate = 0.0
    config.data.batch_size = 32
    batch = equal_token_batch(config)
    mesh = mh.mesh(2, 2)
    params, losses = [], []
    for accum in (1, 4):
        config.optim.grad_accum_steps = accum
        compiled = mh.compiled_step(vae_task.vae_task(config), config, mesh, batch)
        losses.append(compiled.run(batch)["train/loss"])
        params.append(mh.host(compiled.state.params))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert mh.max_abs_diff(params[0], params[1]) <= 1e-6


def test_latent_encoding_split_over_a_mesh_matches_one_device(straight):
    from input_pipeline import synthetic
    from phraseldm_jax import latent_dataset, phrases

    songs = synthetic.synthetic_records(2)
    texts = sorted({text for song in songs for text in phrases.slot_phrases(song)})
    config = config_on(2, 4)
    model_config = vae_task.model_config(config)
    outputs = []
    for mesh in (mh.mesh(2, 4), mh.mesh(8, 1), mh.mesh(1, 1)):
        model = PhraseVAEModel(model_config, straight[1], max_length=64, mesh=mesh)
        outputs.append(model.encode(texts))
        records, specials, _ = latent_dataset.encode_songs(model, {"train": songs}, progress=False)
        outputs.append(np.concatenate([r["latents"] for r in records["train"]]))
    assert len(texts) > 8  # more rows than devices
    for sharded, single in ((outputs[0], outputs[4]), (outputs[2], outputs[4])):
        np.testing.assert_allclose(sharded[0], single[0], atol=1e-5)  # means
        np.testing.assert_allclose(sharded[1], single[1], atol=1e-5)  # log-variances
    for sharded in (outputs[1], outputs[3]):
        np.testing.assert_allclose(sharded, outputs[5], atol=1e-5)


# ------------------------------------------------------------------------------------------
# Two processes.

TWO_PROCESSES = """
import sys, jax
import test_mesh_vae as t
from phraseldm_jax import vae_task
summary = vae_task.train_and_test(t.two_process_config(), sys.argv[1])
assert (jax.process_count(), jax.local_device_count()) == (2, 4)
assert summary["final_step"] == 2 and summary["best_step"] == 2
print("process", jax.process_index(), "done")
"""


def two_process_config():
    """2 steps on (2, 4), an evaluation at step 2, then the test split scored."""
    config = config_on(2, 4, num_steps=2)
    config.train.eval_every = 2
    config.eval.update(batch_size=16, max_examples=48, max_f1_examples=16)
    return config


def test_two_processes_train_evaluate_and_test_like_one(tmp_path, monkeypatch):
    """Each process reads its own shard of the data and of the eval split; the FSDP-sharded
    params are gathered for decoding; test_metrics.json is written by process 0."""
    workdir = str(tmp_path / "two_processes")
    outputs = mh.run_processes(TWO_PROCESSES, workdir)
    assert [f"process {i} done" in out for i, out in enumerate(outputs)] == [True, True]

    reference = str(tmp_path / "one_process")
    make_train_iter = vae_pipeline.make_train_iter

    def both_shards(config, local_devices=1):
        factory = make_train_iter(config, local_devices)
        return lambda index, count: mh.ProcessShards([factory(i, 2) for i in range(2)])

    monkeypatch.setattr(vae_pipeline, "make_train_iter", both_shards)
    vae_task.train_and_test(two_process_config(), reference)
    for which in ("latest", "best"):
        two, one = (checkpointing.load_params(w, which) for w in (workdir, reference))
        diff = mh.max_abs_diff(two, one)
        print(f"two processes vs one, {which}: max |param diff| {diff:.3g}")
        assert diff <= 1e-5
    rows, expected = metric_writer.read_jsonl(workdir), metric_writer.read_jsonl(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 2]
    assert rows[2]["eval/examples"] == expected[2]["eval/examples"] == 48
    assert rows[2]["eval/loss"] == pytest.approx(expected[2]["eval/loss"], rel=1e-5)
    tested = []
    for w in (workdir, reference):
        with open(os.path.join(w, vae_task.TEST_METRICS)) as f:
            tested.append(json.load(f))
    for key in ("loss", "examples", "f1_op", "f1_iopd", "exact_match"):
        assert tested[0][key] == pytest.approx(tested[1][key], rel=1e-5), key

"""Mesh parsing, the FSDP rule, batches, and one sharded train step against one device."""

import functools

import jax
import numpy as np
import pytest
import toy_training as toy
from jax.sharding import PartitionSpec as P

from phraseldm_jax import optim, sharding, trainer


@pytest.mark.parametrize(
    "data, fsdp, expected",
    [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 4, (2, 4)), (8, 1, (8, 1)), (1, 8, (1, 8))],
)
def test_mesh_shape_fills_one_axis(data, fsdp, expected):
    assert sharding.mesh_shape(data, fsdp, 8) == expected


@pytest.mark.parametrize(
    "data, fsdp, message",
    [
        (3, -1, "not a multiple of 3"),
        (2, 2, "= 4 devices, but 8 are available"),
        (-1, -1, "only one axis may be -1"),
        (0, 8, "must be positive or -1"),
        (-2, 4, "must be positive or -1"),
    ],
)
def test_bad_mesh_is_a_clear_error(data, fsdp, message):
    with pytest.raises(sharding.MeshConfigError, match=message):
        sharding.mesh_shape(data, fsdp, 8)


def test_make_mesh_uses_auto_axes_over_all_devices():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert mesh.devices.size == jax.device_count() == 8


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((512, 64), P("fsdp", None)),  # largest dimension
        ((64, 512), P(None, "fsdp")),
        ((6, 512, 10), P(None, "fsdp", None)),
        ((1004, 64), P(None, "fsdp")),  # 1004 is not divisible by 8: next-largest
        ((64, 64), P("fsdp", None)),  # ties: the first dimension
        ((1001, 3), P()),  # nothing divisible: replicated
        ((64,), P()),  # below min_size: replicated
        ((), P()),
    ],
)
def test_fsdp_rule(shape, expected):
    assert sharding.fsdp_spec(shape, fsdp_size=8, min_size=256) == expected


def test_fsdp_size_one_replicates_everything():
    assert sharding.fsdp_spec((4096, 4096), fsdp_size=1, min_size=1) == P()


def _toy_state_and_step(mesh, grad_accum_steps=1, dropout=0.1):
    task = toy.make_task(dropout=dropout)
    config = toy.small_config()
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.num_steps)
    batch = next(toy.make_train_iter_factory(batch_size=16)(0, 1))
    init_fn = functools.partial(trainer.init_train_state, task, tx, 0)
    abstract = jax.eval_shape(init_fn, batch)
    state_sh = sharding.tree_shardings(abstract, mesh, min_size=256)
    state = jax.jit(init_fn, out_shardings=state_sh)(batch)
    frozen_sh = sharding.tree_shardings(task.frozen, mesh, min_size=256)
    micro_sh = jax.sharding.NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    step = jax.jit(
        trainer.make_train_step(task, tx, lr_fn, grad_accum_steps, micro_sh),
        in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    frozen = jax.device_put(task.frozen, frozen_sh)
    global_batch = sharding.global_batch(sharding.batch_sharding(mesh), batch)
    return state, step, global_batch, frozen


def test_state_shardings_put_big_params_and_their_adam_moments_on_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    state, _, _, _ = _toy_state_and_step(mesh)
    specs = {
        optim.path_string(path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    assert specs["params/Dense_0/kernel"] == P(None, "fsdp")  # [16, 64]
    assert specs["params/Dense_1/kernel"] == P("fsdp", None)  # [64, 4]
    assert specs["params/Dense_0/bias"] == P()  # 64 elements < 256
    moments = [p for p in specs if p.startswith("opt_state") and p.endswith("Dense_0/kernel")]
    assert len(moments) == 2 and all(specs[p] == P(None, "fsdp") for p in moments)
    assert specs["step"] == P() and specs["rng"] == P()
    kernel = state.params["Dense_0"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}


def test_sharded_step_equals_single_device_step():
    big = sharding.make_mesh({"data": 2, "fsdp": 4})
    one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    results = []
    for mesh in (big, one):
        state, step, batch, frozen = _toy_state_and_step(mesh)
        start = toy.host_tree(state.params)
        for _ in range(2):  # the second step also exercises the restored Adam moments
            state, metrics = step(state, batch, frozen)
        results.append((toy.host_tree(state.params), sharding.fetch(metrics)))
        assert state.params["Dense_0"]["kernel"].sharding.mesh.shape == mesh.shape
    (params_big, metrics_big), (params_one, metrics_one) = results
    for a, b in zip(jax.tree.leaves(params_big), jax.tree.leaves(params_one)):
        assert np.max(np.abs(a - b)) <= 1e-5
    assert metrics_big["train/loss"] == pytest.approx(metrics_one["train/loss"], rel=1e-5)
    assert metrics_big["train/index_sum"] == metrics_one["train/index_sum"]
    # ...and the steps really changed the params (the comparison is not vacuous).
    assert np.max(np.abs(params_one["Dense_0"]["kernel"] - start["Dense_0"]["kernel"])) > 1e-3


def test_grad_accumulation_matches_one_big_batch():
    """Without dropout, 4 micro-batches of 4 give the full batch of 16's mean gradient."""
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    params = []
    for accum in (1, 4):
        state, step, batch, frozen = _toy_state_and_step(mesh, grad_accum_steps=accum, dropout=0.0)
        state, metrics = step(state, batch, frozen)
        params.append(toy.host_tree(state.params))
        assert sharding.fetch(metrics)["train/index_sum"] == pytest.approx(
            float(np.sum(np.asarray(batch["index"]))) / accum
        )
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_split_micro_batches_takes_strided_rows():
    batch = {"index": np.arange(8)}
    micro = trainer.split_micro_batches(batch, 4)
    np.testing.assert_array_equal(micro["index"], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_global_batch_and_fetch():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    batch_sh = sharding.batch_sharding(mesh)
    local = {"x": np.arange(32, dtype=np.float32).reshape(16, 2)}
    arrays = sharding.global_batch(batch_sh, local)
    assert arrays["x"].shape == (16, 2)
    assert arrays["x"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in arrays["x"].addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(arrays["x"]), local["x"])
    with pytest.raises(ValueError, match="'x' has shape \\(12, 2\\).*multiple of the 8"):
        sharding.global_batch(batch_sh, {"x": np.zeros((12, 2), np.float32)})
    total = jax.jit(lambda b: {"sum": b["x"].sum()}, out_shardings=sharding.replicated(mesh))
    assert sharding.fetch(total(arrays)) == {"sum": float(np.sum(local["x"]))}
    with pytest.raises(ValueError, match="replicated"):
        sharding.fetch(arrays)


_HOST_DEVICES_PROBE = """
import json, os, sys
from phraseldm_jax import sharding
count = sharding.use_cpu_cores(int(sys.argv[1]))
import jax
devices = len(jax.devices("cpu"))  # initialises the backends
late = sharding.use_cpu_cores(5)  # too late now: left alone
print(json.dumps([count, devices, late, len(jax.devices("cpu"))]))
"""


@pytest.mark.parametrize(
    "xla_flags, expected",
    [("", [3, 3, None, 3]), ("--xla_force_host_platform_device_count=2", [None, 2, None, 2])],
    ids=["splits-the-cpu", "xla-flags-win"],
)
def test_use_cpu_cores_in_a_fresh_process(xla_flags, expected):
    """A fresh process gets the asked host devices, unless XLA_FLAGS already sets them; after
    the backends exist the call changes nothing (and does not raise)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _HOST_DEVICES_PROBE, "3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected

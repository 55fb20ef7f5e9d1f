"""Orbax checkpoint store: round trip across meshes with the Grain iterator, keep-last-k,
best checkpoints, interrupted saves, clear mismatch errors and ``load_params``."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import toy_training as toy
from jax.sharding import PartitionSpec as P

from phraseldm_jax import checkpointing, optim, sharding, trainer
from phraseldm_jax.errors import CheckpointMismatchError

MIN_SIZE = 256


def make_state(hidden=64, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": rng.normal(size=(16, hidden)).astype(np.float32)},
        "head": {"bias": rng.normal(size=(4,)).astype(np.float32)},
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # One update so the moments are not all zero.
    grads = jax.tree.map(lambda p: np.ones_like(p), params)
    _, opt_state = tx.update(grads, opt_state, params)
    return trainer.TrainState(
        step=jnp.asarray(7, jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed),
    )


def placed(state, mesh):
    """``state`` on ``mesh`` by the FSDP rule, and the matching abstract restore target."""
    shardings = sharding.tree_shardings(state, mesh, MIN_SIZE)
    abstract = sharding.with_shardings(jax.eval_shape(lambda: state), shardings)
    return jax.device_put(state, shardings), abstract


def make_iter():
    return toy.make_train_iter_factory(batch_size=8)(0, 1)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_across_meshes_with_iterator_position(tmp_path):
    mesh_24 = sharding.make_mesh({"data": 2, "fsdp": 4})
    state, _ = placed(make_state(), mesh_24)
    data_iter = make_iter()
    for _ in range(3):
        next(data_iter)
    store = checkpointing.CheckpointStore(tmp_path, keep_last=2)
    store.save("latest", 7, state, data_iter, {"note": "hello", "best_value": 1.5})
    store.wait_until_finished()
    expected_next = next(data_iter)["index"]

    for shape, devices in [((2, 4), None), ((8, 1), None), ((1, 1), jax.devices()[:1])]:
        mesh = sharding.make_mesh({"data": shape[0], "fsdp": shape[1]}, devices=devices)
        _, abstract = placed(make_state(seed=1), mesh)  # other values, same shapes
        fresh_iter = make_iter()
        restored, progress = checkpointing.CheckpointStore(tmp_path).restore(abstract, fresh_iter)
        assert_trees_equal(restored, state)
        assert progress == {"note": "hello", "best_value": 1.5}
        kernel = restored.params["dense"]["kernel"]
        assert kernel.sharding.mesh.shape == mesh.shape
        assert kernel.sharding.spec == (P() if shape[1] == 1 else P(None, "fsdp"))
        np.testing.assert_array_equal(next(fresh_iter)["index"], expected_next)
    store.close()


def test_save_captures_the_position_before_the_loop_moves_on(tmp_path):
    """Arrays are written in the background; position and progress are those at save time."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    state, abstract = placed(make_state(), mesh)
    data_iter = make_iter()
    next(data_iter)
    store = checkpointing.CheckpointStore(tmp_path)
    progress = {"evals": 1}
    store.save("latest", 1, state, data_iter, progress)
    expected_next = next(data_iter)["index"]
    for _ in range(20):  # the loop goes on at once, while the save may still be running
        next(data_iter)
    progress["evals"] = 2
    store.wait_until_finished()
    fresh_iter = make_iter()
    _, restored_progress = store.restore(abstract, fresh_iter)
    np.testing.assert_array_equal(next(fresh_iter)["index"], expected_next)
    assert restored_progress == {"evals": 1}
    store.close()


def test_keep_last_and_separate_best(tmp_path):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    state, abstract = placed(make_state(), mesh)
    store = checkpointing.CheckpointStore(tmp_path, keep_last=2)
    data_iter = make_iter()
    for step in (2, 4, 6, 8):
        store.save("latest", step, state, data_iter, {"step": step})
    store.save("best", 4, state, data_iter, {"step": 4})
    store.save("best", 6, state, data_iter, {"step": 6})
    store.wait_until_finished()
    assert store.latest.all_steps() == [6, 8]
    assert store.best.all_steps() == [6]  # one best checkpoint
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best", "latest"]
    # Saving a step again (a replay after resuming from an older checkpoint) replaces it.
    store.save("best", 6, state, data_iter, {"step": 6, "again": True})
    store.wait_until_finished()
    _, progress = store.restore(abstract, make_iter(), which="best")
    assert progress == {"step": 6, "again": True}
    store.drop_best_after(5)
    assert store.best.all_steps() == []
    store.close()


def test_interrupted_save_is_never_restored(tmp_path):
    """Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it only when complete.

    The partial directory below is what a process killed (SIGKILL) during a 400 MB save left
    behind when tried by hand with orbax-checkpoint 0.12.8.
    """
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    state, abstract = placed(make_state(), mesh)
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("latest", 7, state, make_iter(), {"step": 7})
    store.wait_until_finished()
    store.close()
    latest = tmp_path / "checkpoints" / "latest"
    partial = latest / "9.orbax-checkpoint-tmp"
    shutil.copytree(latest / "7", partial)
    shutil.rmtree(partial / "state")

    reopened = checkpointing.CheckpointStore(tmp_path)
    assert reopened.latest_step() == 7
    restored, progress = reopened.restore(abstract, make_iter())
    assert progress == {"step": 7}
    assert_trees_equal(restored, state)
    assert checkpointing.load_params(tmp_path, "latest")["dense"]["kernel"].shape == (16, 64)
    # The run goes on and saves that step for real.
    reopened.save("latest", 9, state, make_iter(), {"step": 9})
    reopened.wait_until_finished()
    assert reopened.restore(abstract, make_iter())[1] == {"step": 9}
    reopened.close()


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    state, _ = placed(make_state(hidden=64), mesh)
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("latest", 7, state, make_iter(), {})
    store.wait_until_finished()
    other = make_state(hidden=32)
    other.params["head"]["kernel"] = np.zeros((3, 4), np.float32)  # not in the checkpoint
    _, abstract = placed(other, mesh)
    with pytest.raises(CheckpointMismatchError) as info:
        store.restore(abstract, make_iter())
    message = str(info.value)
    assert "checkpoints/latest/7" in message
    assert "shape of params/dense/kernel: expected (16, 32), got (16, 64)" in message
    assert "missing keys" in message and "params/head/kernel" in message
    assert "opt_state/0/mu/dense/kernel" in message  # the Adam moments differ too
    store.close()


def test_load_params_host_and_sharded(tmp_path):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    state, _ = placed(make_state(), mesh)
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("latest", 7, state, make_iter(), {})
    store.save("best", 5, state, make_iter(), {})
    store.wait_until_finished()
    store.close()

    host = checkpointing.load_params(tmp_path, "latest")
    assert isinstance(host["dense"]["kernel"], np.ndarray)
    assert_trees_equal(host, state.params)
    assert_trees_equal(checkpointing.load_params(tmp_path, "best", step=5), state.params)

    target_sh = sharding.tree_shardings(state.params, mesh, MIN_SIZE)
    target = sharding.with_shardings(jax.eval_shape(lambda: state.params), target_sh)
    sharded = checkpointing.load_params(tmp_path, "best", target=target)
    assert sharded["dense"]["kernel"].sharding.spec == P(None, "fsdp")
    assert_trees_equal(sharded, state.params)

    wrong = dict(target)
    wrong["dense"] = {
        "kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding.replicated(mesh))
    }
    with pytest.raises(CheckpointMismatchError, match="dense/kernel: expected \\(16, 8\\)"):
        checkpointing.load_params(tmp_path, "best", target=wrong)


def test_load_params_without_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best checkpoint.*try which='latest'"):
        checkpointing.load_params(tmp_path, "best")
    with pytest.raises(ValueError, match="which='newest'"):
        checkpointing.load_params(tmp_path, "newest")


def test_load_trained_best_else_latest_and_says_what_it_used(tmp_path):
    state = make_state()
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("latest", 3, state, make_iter(), {})
    store.save("latest", 7, state, make_iter(), {})
    store.wait_until_finished()
    os.makedirs(
        os.path.join(checkpointing.checkpoint_dir(tmp_path, "latest"), "9.orbax-checkpoint-tmp-1")
    )
    assert checkpointing.finished_steps(tmp_path, "latest") == [3, 7]
    assert checkpointing.finished_steps(tmp_path, "best") == []

    params, used = checkpointing.load_trained(tmp_path)  # no best one: the latest
    assert_trees_equal(params, state.params)
    assert used == checkpointing.CheckpointUsed("best", "latest", 7)
    assert used.path == os.path.join("checkpoints", "latest", "7")
    with pytest.raises(FileNotFoundError, match="no best checkpoint.*try which='latest'"):
        checkpointing.load_trained(tmp_path, "best", exact=True)
    _, used = checkpointing.load_trained(tmp_path, "latest", step=3)
    assert used == checkpointing.CheckpointUsed("latest", "latest", 3)
    with pytest.raises(FileNotFoundError, match="at step 5.*steps there: \\[3, 7\\]"):
        checkpointing.load_trained(tmp_path, "latest", step=5)

    store.save("best", 3, state, make_iter(), {})
    store.wait_until_finished()
    store.close()
    assert checkpointing.find_checkpoint(tmp_path) == checkpointing.CheckpointUsed(
        "best", "best", 3
    )
    assert checkpointing.find_checkpoint(tmp_path, "latest").step == 7
    with pytest.raises(FileNotFoundError, match="no latest one either"):
        checkpointing.find_checkpoint(tmp_path / "empty")


def test_config_json_is_the_resolved_config(tmp_path):
    config = ml_collections.ConfigDict({"optim": {"lr": 1e-4, "freeze": ["sec_encoder"]}})
    checkpointing.write_workdir_config(tmp_path, config)
    config.optim.lr = 5e-4
    checkpointing.write_workdir_config(tmp_path, config)  # a new start overwrites it whole
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "optim": {"lr": 5e-4, "freeze": ["sec_encoder"]}
    }
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary files left behind
    assert checkpointing.read_workdir_config(tmp_path) == config.to_dict()


def test_read_workdir_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found: .* not a training"):
        checkpointing.read_workdir_config(tmp_path)
    checkpointing.write_workdir_config(tmp_path, {"model": {"dit": {}}})
    assert checkpointing.read_workdir_config(tmp_path, "dit")["model"] == {"dit": {}}
    with pytest.raises(ValueError, match="config.json: no 'model' group with a 't5' entry"):
        checkpointing.read_workdir_config(tmp_path, "t5")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        checkpointing.read_workdir_config(tmp_path)


def test_optimizer_state_paths_are_stable_strings():
    """The mismatch report's paths come from the same helper as the freeze regexes."""
    state = make_state()
    paths = optim.param_paths(state)
    assert "params/dense/kernel" in paths and "opt_state/0/nu/head/bias" in paths


# ------------------------------------------------------------------------------------------
# Damaged steps: skipped newest-first, one warning line each, what was skipped recorded.


def _two_steps(workdir, which="latest"):
    state = make_state()
    store = checkpointing.CheckpointStore(workdir)
    for step in (2, 4):
        store.save(which, step, state, make_iter(), {"step": step})
    store.wait_until_finished()
    store.close()
    return state


def _truncate_blobs(step_dir):
    """Cuts every array data file of a step to a few bytes (what a full disk leaves)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if os.sep + "d" in root and os.path.getsize(os.path.join(root, name)) > 64:
                os.truncate(os.path.join(root, name), 16)


@pytest.mark.parametrize("damage", ["state/_METADATA", "_CHECKPOINT_METADATA", "blob"])
def test_a_damaged_step_falls_back_to_the_newest_intact_one(tmp_path, capsys, damage):
    state = _two_steps(tmp_path)
    newest = os.path.join(checkpointing.checkpoint_dir(tmp_path, "latest"), "4")
    if damage == "blob":
        _truncate_blobs(newest)
    else:
        os.remove(os.path.join(newest, damage))
    capsys.readouterr()

    params, used = checkpointing.load_trained(tmp_path, "latest")
    assert_trees_equal(params, state.params)
    assert (used.which_used, used.step) == ("latest", 2)
    ((label, reason),) = used.skipped
    assert label == "latest/4"
    if damage != "blob":
        assert reason == f"{damage} missing"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("WARNING:absl")]
    assert lines == [f"checkpoint latest/4 is damaged ({reason}); using latest/2"], err
    assert used.as_dict()["skipped"] == [{"checkpoint": "latest/4", "reason": reason}]

    # The trainer's resume: the same step, the iterator and progress of step 2.
    store = checkpointing.CheckpointStore(tmp_path)
    _, progress = store.restore(jax.eval_shape(lambda: state), make_iter())
    store.close()
    assert progress == {"step": 2}
    assert store.restored.step == 2 and store.restored.skipped[0][0] == "latest/4"


def test_best_falls_back_to_latest_when_its_step_is_damaged(tmp_path, capsys):
    _two_steps(tmp_path)
    state = make_state()
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("best", 2, state, make_iter(), {})
    store.wait_until_finished()
    store.close()
    os.remove(
        os.path.join(checkpointing.checkpoint_dir(tmp_path, "best"), "2", "state", "_METADATA")
    )
    used = checkpointing.find_checkpoint(tmp_path, "best")
    assert (used.which_asked, used.which_used, used.step) == ("best", "latest", 4)
    assert "checkpoint best/2 is damaged (state/_METADATA missing); using latest/4" in (
        capsys.readouterr().err
    )
    with pytest.raises(checkpointing.CheckpointDamagedError, match="no intact checkpoint"):
        checkpointing.find_checkpoint(tmp_path, "best", exact=True)


def test_every_step_damaged_is_one_line_error(tmp_path, capsys):
    state = _two_steps(tmp_path)
    latest = checkpointing.checkpoint_dir(tmp_path, "latest")
    _truncate_blobs(os.path.join(latest, "4"))
    os.remove(os.path.join(latest, "2", "state", "_METADATA"))
    with pytest.raises(checkpointing.CheckpointDamagedError) as error:
        checkpointing.load_trained(tmp_path, "latest")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, FileNotFoundError)
    assert message.startswith(f"no intact checkpoint in {tmp_path}: damaged latest/4 (")
    assert message.endswith("latest/2 (state/_METADATA missing)")
    store = checkpointing.CheckpointStore(tmp_path)
    with pytest.raises(checkpointing.CheckpointDamagedError, match="no intact checkpoint"):
        store.restore(jax.eval_shape(lambda: state), make_iter())
    store.close()


def test_training_resumes_from_the_newest_intact_step(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    task, config = toy.make_task(), toy.small_config(num_steps=4, keep_last=3)
    trainer.run(config, workdir, task, toy.make_train_iter_factory(batch_size=8))
    os.remove(
        os.path.join(checkpointing.checkpoint_dir(workdir, "latest"), "4", "state", "_METADATA")
    )
    capsys.readouterr()
    longer = toy.small_config(num_steps=6, keep_last=3)
    result = trainer.run(longer, workdir, task, toy.make_train_iter_factory(batch_size=8))
    assert result.step == 6
    err = capsys.readouterr().err
    assert "checkpoint latest/4 is damaged (state/_METADATA missing); using latest/2" in err
    assert "resuming from latest/2; skipped damaged latest/4" in err
    assert checkpointing.step_damage(workdir, "latest", 4) is None  # saved again on the way


def test_relative_and_home_paths(tmp_path, monkeypatch):
    """Orbax takes absolute paths only: a relative workdir and one under ~ work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    state = _two_steps("rel")
    params, used = checkpointing.load_trained("~/rel", "latest")
    assert_trees_equal(params, state.params) and used.step == 4
    assert checkpointing.checkpoint_dir("rel") == str(tmp_path / "rel" / "checkpoints" / "latest")

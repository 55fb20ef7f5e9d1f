"""Damaged checkpoint steps (flipped bits, truncated or deleted files and folders) are found
by their checksums and skipped for the newest intact one, with one warning line each; a full
disk stops a save with one line and keeps the previous checkpoint."""

import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from test_checkpointing import assert_trees_equal, make_iter, make_state

from phraseldm_jax import checkpoint_integrity, checkpointing
from phraseldm_jax.errors import CheckpointDamagedError, CheckpointSaveError

WARNING = "checkpoint latest/4 is damaged ("
USING = "); using latest/2"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with latest/2 and latest/4 (same state, progress {"step": N})."""
    workdir = tmp_path_factory.mktemp("saved")
    state = make_state()
    store = checkpointing.CheckpointStore(workdir)
    for step in (2, 4):
        store.save("latest", step, state, make_iter(), {"step": step})
    store.close()
    return workdir, state


@pytest.fixture
def workdir(saved, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(saved[0], copy)
    return copy


def step_files(workdir, step=4):
    """Every file of a step, relative to it (Orbax's commit_success.txt markers hold no data
    and are not read: left out)."""
    root = os.path.join(checkpointing.checkpoint_dir(workdir, "latest"), str(step))
    files = []
    for folder, _, names in os.walk(root):
        files += [
            os.path.relpath(os.path.join(folder, n), root)
            for n in names
            if n != "commit_success.txt"
        ]
    return root, sorted(files)


def warnings(err):
    return [line for line in err.splitlines() if not line.startswith("WARNING:absl")]


def assert_falls_back(workdir, state, capsys, resume=True):
    """The trainer's resume (``resume``) or a load uses latest/2 and says so in one line;
    returns the reason given for latest/4."""
    capsys.readouterr()
    if resume:
        store = checkpointing.CheckpointStore(workdir)
        restored, progress = store.restore(jax.eval_shape(lambda: state), make_iter())
        store.close()
        assert progress == {"step": 2} and store.restored.step == 2
        assert_trees_equal(restored, state)
        skipped = store.restored.skipped
    else:
        restored, used = checkpointing.load_trained(workdir, "latest")
        assert used.step == 2 and used.verified
        assert_trees_equal(restored, state.params)
        skipped = used.skipped
    lines = warnings(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(WARNING) and lines[0].endswith(USING), lines
    ((label, reason),) = skipped
    assert label == "latest/4" and lines[0] == f"{WARNING}{reason}{USING}"
    return reason


def flip_bit(path, rng):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        offset = int(rng.integers(len(data)))
        data[offset] ^= 1 << int(rng.integers(8))
        f.seek(0)
        f.write(data)


def test_a_flipped_bit_in_any_file_is_found(saved, workdir, capsys):
    """A flip at a random offset in each file of the newest step (fixed seed), found by the
    resume and by a load in turn (benchmarks/checkpoint_faults.py: 20 flips a file)."""
    rng = np.random.default_rng(16)
    root, files = step_files(workdir)
    assert len(files) >= 10 and "file_digests.json" in files
    reasons = {}
    for index, name in enumerate(files):
        pristine = open(os.path.join(root, name), "rb").read()
        flip_bit(os.path.join(root, name), rng)
        reasons[name] = assert_falls_back(workdir, saved[1], capsys, resume=index % 2 == 0)
        with open(os.path.join(root, name), "wb") as f:
            f.write(pristine)
    assert reasons["state/_METADATA"] == "state/_METADATA unreadable: JSONDecodeError" or (
        "state/_METADATA" in reasons["state/_METADATA"]
    )
    assert reasons["data/process_0-of-1.json"].startswith("data/process_0-of-1.json")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_deleted_file_is_found(saved, workdir, capsys, damage):
    root, files = step_files(workdir)
    for index, name in enumerate(files):
        path = os.path.join(root, name)
        pristine = open(path, "rb").read()
        if damage == "truncate":
            os.truncate(path, len(pristine) // 2)
        else:
            os.remove(path)
        reason = assert_falls_back(workdir, saved[1], capsys, resume=index % 2 == 0)
        assert name in reason, (name, reason)
        with open(path, "wb") as f:
            f.write(pristine)


def test_deleted_folders_and_an_empty_step_are_found(saved, workdir, capsys):
    root, _ = step_files(workdir)
    kept = str(workdir) + ".step4"
    shutil.copytree(root, kept)
    folders = ("state", "data", "progress", "state/d", "state/ocdbt.process_0", "")
    for index, folder in enumerate(folders):
        shutil.rmtree(os.path.join(root, folder))
        os.makedirs(root, exist_ok=True)
        reason = assert_falls_back(workdir, saved[1], capsys, resume=index % 2 == 0)
        expected = folder or "the step folder is empty"
        assert expected in reason, (folder, reason)
        shutil.rmtree(root)
        shutil.copytree(kept, root)


def test_arrays_that_differ_from_their_checksums_are_found(monkeypatch, tmp_path, capsys):
    """Values damaged before they reached the files (the files then agree with their digests):
    only the checksums computed on the devices can tell."""
    state = make_state()
    store = checkpointing.CheckpointStore(tmp_path)
    store.save("latest", 2, state, make_iter(), {"step": 2})
    real = checkpoint_integrity.tree_checksums
    monkeypatch.setattr(
        checkpoint_integrity, "tree_checksums", lambda tree: real(make_state(seed=1))
    )
    store.save("latest", 4, state, make_iter(), {"step": 4})
    monkeypatch.setattr(checkpoint_integrity, "tree_checksums", real)
    store.close()
    assert checkpointing.step_damage(tmp_path, "latest", 4) is None  # the files are intact
    for resume in (True, False):
        reason = assert_falls_back(tmp_path, state, capsys, resume)
        assert reason == "checksum mismatch in params/dense/kernel"
    # Exactly that step: one line, no fallback.
    store = checkpointing.CheckpointStore(tmp_path)
    with pytest.raises(CheckpointDamagedError) as error:
        store.restore(jax.eval_shape(lambda: state), make_iter(), step=4)
    store.close()
    assert str(error.value) == (
        f"no intact checkpoint in {tmp_path}: damaged latest/4 "
        "(checksum mismatch in params/dense/kernel)"
    )


def test_checksums_are_the_same_on_any_mesh_and_on_the_host():
    from test_checkpointing import placed

    from phraseldm_jax import sharding

    state = make_state()
    host = checkpoint_integrity.tree_checksums(state)
    for shape in ({"data": 2, "fsdp": 4}, {"data": 8, "fsdp": 1}):
        on_mesh, _ = placed(state, sharding.make_mesh(shape))
        assert checkpoint_integrity.tree_checksums(on_mesh) == host
    kernel = np.array(state.params["dense"]["kernel"])
    for bit in range(32):  # any one bit of a float changes the sum
        damaged = kernel.copy()
        damaged.view(np.uint32)[5, 7] ^= np.uint32(1 << bit)
        assert checkpoint_integrity.tree_checksums(damaged) != host["params/dense/kernel"]


# ------------------------------------------------------------------------------------------
# A full disk.


def test_a_full_disk_stops_the_save_in_one_line(workdir, monkeypatch):
    state = make_state()
    directory = checkpointing.checkpoint_dir(workdir, "latest")
    usage = shutil.disk_usage(directory)
    monkeypatch.setattr(
        checkpointing.shutil,
        "disk_usage",
        lambda path: usage._replace(free=300 * 1024),
    )
    store = checkpointing.CheckpointStore(workdir)
    with pytest.raises(CheckpointSaveError) as error:
        store.save("latest", 6, state, make_iter(), {"step": 6})
    store.close()
    assert str(error.value) == (
        f"cannot save checkpoint latest/6 in {directory}: the disk is full "
        "(needs about 1.0 MiB, 0.3 MiB free); kept latest/4"
    )
    assert checkpointing.finished_steps(workdir, "latest") == [2, 4]
    assert checkpointing.step_damage(workdir, "latest", 4) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_write_that_runs_out_of_space_is_one_line_at_once(small_disk, monkeypatch, capsys):
    """Past the free-space check (space taken while the save runs): Orbax's error in the
    background is one line from the next check_for_errors (the trainer's logging steps),
    without Orbax's tracebacks, and the previous step is kept."""
    import time

    state = make_state()
    store = checkpointing.CheckpointStore(small_disk)
    store.save("latest", 2, state, make_iter(), {"step": 2})
    store.wait_until_finished()
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (free - 8 * 1024))
    monkeypatch.setattr(checkpointing.CheckpointStore, "_check_space", lambda *args: None)
    capsys.readouterr()
    with pytest.raises(CheckpointSaveError) as error:
        store.save("latest", 4, state, make_iter(), {"step": 4})
        for _ in range(200):
            store.check_for_errors()
            time.sleep(0.05)
    message = str(error.value)
    directory = checkpointing.checkpoint_dir(small_disk, "latest")
    assert "\n" not in message
    assert message.startswith(f"cannot save checkpoint latest/4 in {directory}: ")
    assert "No space left on device" in message
    assert message.endswith(" free); kept latest/2")
    store.close()
    assert capsys.readouterr().err == ""  # no tracebacks from Orbax's writer threads
    os.remove(small_disk / "filler")
    assert checkpointing.finished_steps(small_disk, "latest") == [2]
    params, used = checkpointing.load_trained(small_disk, "latest")
    assert used.step == 2 and used.skipped == ()


def test_training_stops_at_a_full_disk_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    import toy_training as toy

    from phraseldm_jax import trainer

    workdir = str(tmp_path / "run")
    task = toy.make_task()
    trainer.run(
        toy.small_config(num_steps=2), workdir, task, toy.make_train_iter_factory(batch_size=8)
    )
    usage = shutil.disk_usage(workdir)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage._replace(free=0))
    with pytest.raises(
        CheckpointSaveError,
        match=r"cannot save checkpoint latest/4 in .*"
        r"\(needs about 1\.\d MiB, 0\.0 MiB free\); kept latest/2$",
    ):
        trainer.run(
            toy.small_config(num_steps=4), workdir, task, toy.make_train_iter_factory(batch_size=8)
        )
    assert checkpointing.finished_steps(workdir, "latest") == [2]


def test_a_disk_that_fills_while_the_step_is_sealed_is_one_line_and_keeps_the_step(
    workdir, monkeypatch
):
    """Orbax wrote the step whole, then the digest update of its commit file ran out of
    space: one CheckpointSaveError line naming the folder and the free space, and the step
    (whose earlier digests are intact) still loads."""
    import errno

    def full(step_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.integrity, "seal_step", full)
    store = checkpointing.CheckpointStore(workdir)
    with pytest.raises(CheckpointSaveError) as error:
        store.save("latest", 6, make_state(), make_iter(), {"step": 6})
        store.wait_until_finished()
    store.close()
    directory = checkpointing.checkpoint_dir(workdir, "latest")
    message = str(error.value)
    assert message.startswith(f"cannot finish checkpoint latest/6 in {directory}: ")
    assert "No space left on device" in message and message.endswith(" free); kept latest/6")
    assert checkpointing.step_damage(workdir, "latest", 6) is None

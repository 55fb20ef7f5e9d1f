"""prepare survives faults: a failed or killed (re)build never leaves a mix of old and new
datasets, the next run cleans up, and a damaged record is named (reading and --verify)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from input_pipeline import (
    dataset_swap,
    latent_records,
    prepare,
    synthetic,
    tfds_builders,
    vae_pipeline,
)
from input_pipeline.damage import DamagedRecordError
from phraseldm_jax.cli import prepare as cli_prepare

REPO = pathlib.Path(__file__).resolve().parent.parent
OLD_SONGS, NEW_SONGS = 4, 9


def _prepare(data_dir, n_songs: int, *flags: str) -> int:
    argv = ["--source", "synthetic", "--n_songs", str(n_songs), "--data_dir", str(data_dir)]
    return cli_prepare.main([*argv, *flags])


@pytest.fixture(scope="module")
def old_set(tmp_path_factory) -> pathlib.Path:
    """A finished set of OLD_SONGS synthetic songs (copy it before changing it)."""
    data_dir = tmp_path_factory.mktemp("old") / "data"
    assert _prepare(data_dir, OLD_SONGS) == 0
    return data_dir


def _copy(old_set: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    data_dir = tmp_path / "data"
    shutil.copytree(old_set, data_dir)
    return data_dir


def _songs_per_dataset(data_dir) -> dict[str, int]:
    """Songs each dataset (and the summary) holds, as readers see them."""
    counts = {}
    for name in tfds_builders.DATASET_NAMES:
        ids = set()
        for split in tfds_builders.split_sizes(data_dir, name):
            source = tfds_builders.open_source(data_dir, name, split)
            ids.update(record["song_id"] for record in source.__getitems__(range(len(source))))
        counts[name] = len(ids)
    with open(dataset_swap.resolve(str(data_dir), prepare.SUMMARY_FILE)) as handle:
        counts["summary"] = json.load(handle)["songs"]
    return counts


def _leftovers(data_dir) -> list[str]:
    prefixes = (dataset_swap.INCOMPLETE, dataset_swap.READY, dataset_swap.RETIRED)
    return [name for name in os.listdir(data_dir) if name.startswith(prefixes)]


def test_failed_rebuild_keeps_the_old_set_whole(old_set, tmp_path, monkeypatch, capsys):
    data_dir = _copy(old_set, tmp_path)
    write = tfds_builders._write

    def songs_then_fail(folder, names, source_kwargs):
        write(folder, names[:1], source_kwargs)
        raise ValueError("disk trouble after the first dataset")

    monkeypatch.setattr(tfds_builders, "_write", songs_then_fail)
    assert _prepare(data_dir, NEW_SONGS, "--overwrite") == 2
    assert "disk trouble after the first dataset" in capsys.readouterr().err
    assert set(_songs_per_dataset(data_dir).values()) == {OLD_SONGS}
    assert _leftovers(data_dir) == []


KILLED_BUILD = textwrap.dedent(
    """
    import pathlib, sys, time
    from input_pipeline import tfds_builders
    from phraseldm_jax.cli import prepare
    data_dir, flag, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    write = tfds_builders._write

    def songs_then_hang(folder, names, source_kwargs):
        write(folder, names[:1], source_kwargs)
        pathlib.Path(flag).touch()
        time.sleep(120)

    tfds_builders._write = songs_then_hang
    argv = ["--source", "synthetic", "--n_songs", "9", "--data_dir", data_dir]
    prepare.main(argv + (["--overwrite"] if overwrite else []))
    """
)


def _kill_halfway(data_dir, tmp_path, overwrite: bool) -> None:
    """Runs a prepare that hangs after writing its first dataset, and SIGKILLs it there."""
    flag = tmp_path / "halfway"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(data_dir), str(flag), str(int(overwrite))],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert process.poll() is None, "the build exited before it was killed"
            assert time.time() < deadline, "the build never got halfway"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_killed_rebuild_keeps_the_old_set_and_the_next_run_cleans_up(old_set, tmp_path):
    data_dir = _copy(old_set, tmp_path)
    _kill_halfway(data_dir, tmp_path, overwrite=True)
    assert [name.split(".")[0] for name in _leftovers(data_dir)] == ["incomplete"]
    assert set(_songs_per_dataset(data_dir).values()) == {OLD_SONGS}
    assert _prepare(data_dir, NEW_SONGS, "--overwrite") == 0
    assert set(_songs_per_dataset(data_dir).values()) == {NEW_SONGS}
    assert _leftovers(data_dir) == []


def test_killed_first_build_needs_no_overwrite(tmp_path):
    data_dir = tmp_path / "data"
    _kill_halfway(data_dir, tmp_path, overwrite=False)
    assert prepare.existing_datasets(str(data_dir)) == []
    with pytest.raises(FileNotFoundError):
        tfds_builders.open_source(str(data_dir), "songs", "train")
    assert _prepare(data_dir, NEW_SONGS) == 0
    assert set(_songs_per_dataset(data_dir).values()) == {NEW_SONGS}
    assert _leftovers(data_dir) == []


def test_swap_killed_halfway_reads_as_the_new_set_and_is_finished(old_set, tmp_path, monkeypatch):
    data_dir = _copy(old_set, tmp_path)
    rename, calls = os.rename, []

    def die_at_the_third_rename(source, target):  # the commit, old bars aside, new bars in
        parent = pathlib.Path(source).parent
        if parent == data_dir or parent.name.startswith(dataset_swap.READY):  # not TFDS's own
            calls.append(source)
            if len(calls) == 3:
                raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(dataset_swap.os, "rename", die_at_the_third_rename)
    with pytest.raises(KeyboardInterrupt):
        _prepare(data_dir, NEW_SONGS, "--overwrite")
    monkeypatch.setattr(dataset_swap.os, "rename", rename)
    # the old bars are aside, the new ones not yet in: readers take the new set from ready.*
    assert [name.split(".")[0] for name in sorted(_leftovers(data_dir))] == ["ready", "retired"]
    assert not (data_dir / "bars").exists()
    assert set(_songs_per_dataset(data_dir).values()) == {NEW_SONGS}
    assert dataset_swap.recover(str(data_dir))[0].startswith("finished the interrupted swap")
    assert _leftovers(data_dir) == []
    assert set(_songs_per_dataset(data_dir).values()) == {NEW_SONGS}


def test_recovery_keeps_the_folder_of_a_running_build(tmp_path):
    with dataset_swap.staged(str(tmp_path)) as staging:
        assert dataset_swap.recover(str(tmp_path)) == []
        assert os.path.isdir(staging)
    assert _leftovers(tmp_path) == []


def _flip(path: pathlib.Path, offset: int) -> None:
    """Inverts 16 bytes of ``path`` at ``offset``: inside a record's chunk, its hash fails."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(16)
        handle.seek(offset)
        handle.write(bytes(byte ^ 0xFF for byte in data))


PHRASES_TRAIN = "phrases/1.0.0/phrases-train.array_record-00000-of-00001"


def test_verify_clean_and_damaged(old_set, tmp_path, capsys):
    assert cli_prepare.main(["--verify", "--data_dir", str(old_set)]) == 0
    assert capsys.readouterr().out.strip().endswith(": clean")
    data_dir = _copy(old_set, tmp_path)
    _flip(data_dir / PHRASES_TRAIN, 3000)
    assert cli_prepare.main(["--verify", "--data_dir", str(data_dir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    # ArrayRecord hashes whole chunks: every record of the flipped chunk is named, and only those.
    # Where the bytes land (a chunk's header or its data) depends on the records' sizes.
    damaged = re.match(
        rf"{re.escape(str(data_dir / PHRASES_TRAIN))}: (\d+) of \d+ records damaged "
        rf"\(records? (\d+)(?:-(\d+))? of split 'train'; chunk (?:data|header) hash mismatch",
        lines[0],
    )
    assert damaged, lines[0]
    count, first, last = int(damaged[1]), int(damaged[2]), int(damaged[3] or damaged[2])
    assert count == last - first + 1 >= 1
    assert lines[1].endswith("1 problem(s)") and "--overwrite" in lines[2]


def test_verify_finds_a_mix_of_builds_and_a_truncated_file(old_set, tmp_path, capsys):
    data_dir = _copy(old_set, tmp_path)
    tfds_builders.build(
        str(data_dir), names=["bars"], overwrite=True, songs=synthetic.synthetic_records(9)
    )
    songs_train = next((data_dir / "songs/1.0.0").glob("songs-train.array_record-*"))
    os.truncate(songs_train, 5000)
    assert cli_prepare.main(["--verify", "--data_dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{songs_train}: unreadable (" in out
    assert f"{data_dir / prepare.SUMMARY_FILE} says bars holds " in out


def test_verify_needs_datasets_and_no_source(tmp_path, capsys):
    assert cli_prepare.main(["--verify", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m phraseldm_jax.cli.prepare: error: {tmp_path} holds no prepared datasets "
        "(songs, phrases, bars)"
    )
    assert cli_prepare.main(["--data_dir", str(tmp_path)]) == 2
    assert "--source is required (or --verify" in capsys.readouterr().err


def test_a_damaged_record_read_in_training_names_file_and_record(old_set, tmp_path):
    data_dir = _copy(old_set, tmp_path)
    _flip(data_dir / PHRASES_TRAIN, 3000)
    source = tfds_builders.open_source(str(data_dir), "phrases", "train")
    bad = [i for i in range(len(source)) if _fails(source, i)]
    assert bad and bad == list(range(bad[0], bad[-1] + 1))  # one chunk: a run of records
    assert source.shard_of(bad[0]) == (str(data_dir / PHRASES_TRAIN), bad[0])
    expected = (
        rf"{re.escape(str(data_dir / PHRASES_TRAIN))}: record {bad[0]} of split 'train' is "
        r"damaged \(chunk (?:data|header) hash mismatch, chunk at "
    )
    dataset = vae_pipeline.make_vae_dataset(source, stage=2, batch_size=8, seed=0, train=False)
    with pytest.raises(DamagedRecordError) as error:
        list(dataset)
    message = str(error.value)
    assert re.match(expected, message) and "\n" not in message
    assert message.endswith(f"; run python -m phraseldm_jax prepare --verify --data_dir {data_dir}")


def _fails(source, index: int) -> bool:
    try:
        source[index]
    except DamagedRecordError:
        return True
    return False


def test_a_damaged_latent_record_names_file_and_record(tmp_path):
    songs = [
        {"song_id": f"s{i}", "latents": [[float(i)] * 4] * 8, "n_bars": 2,
         "section_plan": "", "plan_fits": False}
        for i in range(3)
    ]  # fmt: skip
    stats = {"scale_factor": 1.0, "abs_p999": 1.0, "inst_latent": [0.0] * 4,
             "bar_latent": [0.0] * 4, "sep_latent": [0.0] * 4, "latent_dim": 4}  # fmt: skip
    latent_records.write_latent_dataset(str(tmp_path / "lat"), {"train": songs}, stats)
    path = tmp_path / "lat" / "train.array_record"
    _flip(path, 60)
    source = latent_records.open_latent_source(str(tmp_path / "lat"), "train")
    with pytest.raises(DamagedRecordError, match=r"train.array_record: record 0 of split 'train'"):
        source.__getitems__([0, 1])


def test_a_damaged_record_ends_a_training_script_in_one_line(capsys):
    from phraseldm_jax.cli import common

    def main(argv):
        raise DamagedRecordError("D/x.array_record: record 3 of split 'train' is damaged (r)")

    with pytest.raises(SystemExit) as exit_:
        common.run_absl(main, "train_vae.py", ["train_vae.py"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "train_vae.py: error: D/x.array_record: record 3 of split 'train' is damaged (r)\n"
    )

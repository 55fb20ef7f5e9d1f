"""TFDS builders: ArrayRecord written and read back without TensorFlow, splits, atomicity,
and the prepare command."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import prepare, records, synthetic, tfds_builders
from phraseldm_jax import phrases
from phraseldm_jax.cli import prepare as cli_prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def songs():
    return synthetic.synthetic_records(48)


@pytest.fixture(scope="module")
def built(tmp_path_factory, songs):
    data_dir = str(tmp_path_factory.mktemp("datasets"))
    tfds_builders.quiet()
    tfds_builders.build(data_dir, songs=songs)
    return data_dir


def test_tensorflow_is_not_needed():
    assert "tensorflow" not in sys.modules


def test_songs_read_back_through_the_random_access_source(built, songs):
    by_id = {s["song_id"]: s for s in songs}
    seen = []
    for split in records.SPLITS:
        source = tfds_builders.open_source(built, "songs", split)
        assert len(source) == sum(records.split_of(i) == split for i in by_id)
        for index in range(len(source)):
            got = source[index]
            want = by_id[got["song_id"]]
            assert records.split_of(got["song_id"]) == split
            assert got == {**want, "tempo": pytest.approx(want["tempo"])}
            seen.append(got["song_id"])
    assert sorted(seen) == sorted(by_id)
    assert source[-1] == source[len(source) - 1]
    assert source.__getitems__([1, 0, -1]) == [source[1], source[0], source[-1]]
    with pytest.raises(IndexError):
        source[len(source)]
    assert any(".array_record-" in f for f in os.listdir(source.path))


def test_phrase_and_bar_lines(built, songs):
    train = [s for s in songs if records.split_of(s["song_id"]) == "train"]
    source = tfds_builders.open_source(built, "phrases", "train")
    lines = [source[i] for i in range(len(source))]
    assert len(lines) == sum(len(records.phrase_lines(s)) for s in train)
    texts = collections.Counter(line["text"] for line in lines)
    n_bars = sum(s["n_bars"] for s in train)
    assert texts["[INST]"] == n_bars and texts["b-1"] == n_bars
    assert texts["[SEP]"] == len(train)
    one = [line for line in lines if line["song_id"] == train[0]["song_id"]]
    assert sorted((line["bar"], line["text"]) for line in one if line["program"] >= 0) == sorted(
        zip(train[0]["phrase_bar"], train[0]["phrases"])
    )
    bars = tfds_builders.open_source(built, "bars", "train")
    bar_lines = [bars[i] for i in range(len(bars))]
    assert len(bar_lines) == n_bars + len(train)
    first = {
        line["bar"]: line["text"] for line in bar_lines if line["song_id"] == train[0]["song_id"]
    }
    assert first[0] == phrases.bar_text(
        t for t, b in zip(train[0]["phrases"], train[0]["phrase_bar"]) if b == 0
    )
    assert first[train[0]["n_bars"]] == "[SEP]"
    assert all(line["text"].endswith("b-1") or line["text"] == "[SEP]" for line in bar_lines)


def test_sources_work_with_grain(built):
    source = tfds_builders.open_source(built, "phrases", "validation")
    dataset = grain.MapDataset.source(source).shuffle(seed=3).map(lambda x: len(x["text"].split()))
    lengths = list(dataset)
    assert len(lengths) == len(source) and min(lengths) >= 1
    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=1),
        worker_count=0,
    )
    assert sorted(x["text"] for x in loader) == sorted(
        source[i]["text"] for i in range(len(source))
    )


def test_tfds_data_source_reads_it_too(built):
    direct = tfds.data_source("songs", data_dir=built, split="validation")
    assert len(direct) == len(tfds_builders.open_source(built, "songs", "validation"))


def test_missing_dataset_and_split_errors(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="no finished dataset 'songs'"):
        tfds_builders.open_source(str(tmp_path), "songs", "train")
    small = str(tmp_path / "small")
    tfds_builders.build(small, names=["songs"], songs=synthetic.synthetic_records(2))
    assert set(tfds_builders.split_sizes(small, "songs")) == {"train"}  # empty splits skipped
    with pytest.raises(KeyError, match=r"no split 'test'; it has \['train'\]"):
        tfds_builders.open_source(small, "songs", "test")


def test_split_is_deterministic_and_90_5_5():
    ids = [f"midi/song_{i}.mid" for i in range(20000)]
    splits = [records.split_of(i) for i in ids]
    shares = collections.Counter(splits)
    assert abs(shares["train"] / len(ids) - 0.90) < 0.01
    assert abs(shares["validation"] / len(ids) - 0.05) < 0.01
    assert abs(shares["test"] / len(ids) - 0.05) < 0.01
    # Same answer in another process with another string-hash seed.
    code = "import sys; from input_pipeline.records import split_of; " + (
        "print(','.join(split_of(f'midi/song_{i}.mid') for i in range(300)))"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip().split(",") == splits[:300]


def test_builders_import_from_a_source_folder(tmp_path):
    midi_dir = tmp_path / "midi"
    synthetic.write_midi_folder(str(midi_dir), n_songs=3)
    # Through TFDS's manual directory ...
    builder = tfds_builders.Songs(data_dir=str(tmp_path / "a"), source="midi")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(midi_dir))
    )
    # ... or a path argument.
    tfds_builders.build(
        str(tmp_path / "b"), names=["songs"], source="midi", source_dir=str(midi_dir)
    )
    for root in ("a", "b"):
        data_dir = str(tmp_path / root)
        ids = [
            source[i]["song_id"]
            for split in tfds_builders.split_sizes(data_dir, "songs")
            for source in [tfds_builders.open_source(data_dir, "songs", split)]
            for i in range(len(source))
        ]
        assert sorted(ids) == [f"midi/synthetic_{i:03d}.mid" for i in range(3)]
    with pytest.raises(ValueError, match="unknown source"):
        tfds_builders.Songs(data_dir=str(tmp_path), source="lakh")


def _finished(data_dir, name):
    try:
        tfds_builders.dataset_path(data_dir, name)
    except FileNotFoundError:
        return False
    return True


def test_failed_build_leaves_no_dataset_and_rebuild_works(tmp_path):
    data_dir = str(tmp_path)

    def broken_songs():
        good = synthetic.synthetic_records(4)
        yield from good[:3]
        raise RuntimeError("source died halfway")

    class Breaking(list):
        def __iter__(self):
            return broken_songs()

    with pytest.raises(RuntimeError, match="source died halfway"):
        tfds_builders.build(data_dir, names=["phrases"], songs=Breaking())
    assert not _finished(data_dir, "phrases")
    with pytest.raises(FileNotFoundError):
        tfds_builders.open_source(data_dir, "phrases", "train")
    tfds_builders.build(data_dir, names=["phrases"], songs=synthetic.synthetic_records(4))
    assert tfds_builders.split_sizes(data_dir, "phrases")["train"] > 0


KILLED_BUILD = textwrap.dedent(
    """
    import os, sys, time
    from input_pipeline import synthetic, tfds_builders
    data_dir, flag = sys.argv[1], sys.argv[2]

    def songs():
        for i, song in enumerate(synthetic.synthetic_records(6)):
            if i == 3:
                open(flag, "w").close()
                time.sleep(60)  # killed here, halfway through writing
            yield song

    class Slow(list):
        def __iter__(self):
            return songs()

    tfds_builders.build(data_dir, names=["songs"], songs=Slow())
    """
)


def test_killed_build_leaves_no_readable_dataset(tmp_path):
    data_dir, flag = str(tmp_path / "data"), str(tmp_path / "halfway")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, data_dir, flag],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not os.path.exists(flag):
            assert process.poll() is None, "the build exited before it was killed"
            assert time.time() < deadline, "the build never got halfway"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    leftovers = os.listdir(os.path.join(data_dir, "songs"))
    assert leftovers and all(name.startswith("incomplete.") for name in leftovers)
    assert not _finished(data_dir, "songs")
    with pytest.raises(FileNotFoundError):
        tfds_builders.open_source(data_dir, "songs", "train")
    tfds_builders.build(data_dir, names=["songs"], songs=synthetic.synthetic_records(6))
    assert sum(tfds_builders.split_sizes(data_dir, "songs").values()) == 6


def test_overwrite_rebuilds_and_plain_build_keeps(tmp_path):
    data_dir = str(tmp_path)
    tfds_builders.build(data_dir, names=["songs"], songs=synthetic.synthetic_records(3))
    tfds_builders.build(data_dir, names=["songs"], songs=synthetic.synthetic_records(5))
    assert sum(tfds_builders.split_sizes(data_dir, "songs").values()) == 3  # kept
    tfds_builders.build(
        data_dir, names=["songs"], overwrite=True, songs=synthetic.synthetic_records(5)
    )
    assert sum(tfds_builders.split_sizes(data_dir, "songs").values()) == 5


def test_prepare_command_on_the_synthetic_corpus(tmp_path, capsys):
    data_dir = str(tmp_path)
    argv = ["--source", "synthetic", "--data_dir", data_dir, "--n_songs", "48"]
    assert cli_prepare.main(argv) == 0
    saved = json.load(open(os.path.join(data_dir, prepare.SUMMARY_FILE)))
    assert saved["command"] == " ".join(["python -m phraseldm_jax.cli.prepare", *argv])
    songs = synthetic.synthetic_records(48)
    assert saved["songs"] == 48 and saved["rejected"] == 0
    assert saved["songs_fitting_plan"] == 48
    assert saved["bars"] == sum(s["n_bars"] for s in songs)
    assert saved["written"]["songs"] == {
        split: n
        for split, n in collections.Counter(records.split_of(s["song_id"]) for s in songs).items()
    }
    assert saved["splits"]["train"]["phrase_lines"] == saved["written"]["phrases"]["train"]
    lengths = [len(p.split()) for s in songs for p in s["phrases"]]
    assert saved["phrase_tokens"]["max"] == max(lengths)
    assert saved["phrase_tokens"]["p50"] == int(np.percentile(lengths, 50))
    out = capsys.readouterr().out
    assert "songs imported: 48" in out and "section plans: 48 of 48" in out
    assert cli_prepare.main(["--source", "synthetic", "--data_dir", data_dir]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_prepare_build_returns_what_it_saves(tmp_path):
    args = argparse.Namespace(
        source="synthetic", input=None, data_dir=str(tmp_path), workers=1, overwrite=False,
        limit=None, n_songs=12, seed=0,
    )  # fmt: skip
    summary = prepare.build(args, command="test")
    saved = json.load(open(os.path.join(tmp_path, prepare.SUMMARY_FILE)))
    assert saved == json.loads(json.dumps(summary)) and saved["command"] == "test"
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.build(args, command="test")


def test_summary_groups_reasons():
    song = synthetic.synthetic_records(1)[0]
    marked = {
        **song,
        "song_id": "pop909/002",
        "plan_fits": False,
        "plan_note": "3 bar(s) with notes outside the plan (1 before, 2 after)",
        "flags": ["plan_mismatch"],
    }
    other = {**marked, "song_id": "pop909/003", "plan_note": marked["plan_note"].replace("3", "4")}
    rejected = [
        ("x/1.mid", "time signature 3/4 at tick 0"),
        ("pop909/034", "/data/pop909/034/beat_midi.txt: triple meter"),
        ("pop909/035", "/data/pop909/035/beat_midi.txt: triple meter"),
    ]
    summary = prepare.summarize([song, marked, other], rejected)
    assert summary["songs_fitting_plan"] == 1
    assert summary["not_fitting_reasons"] == {
        "N bar(s) with notes outside the plan (N before, N after)": 2
    }
    assert summary["rejected_reasons"] == {"time signature N/N at tick N": 1, "triple meter": 2}
    assert prepare._reason_group("no usable plan: a/b.txt: plan 'i8A99' is bad") == (
        "no usable plan: plan '...' is bad"
    )
    assert [m["song_id"] for m in summary["marked_songs"]] == ["pop909/002", "pop909/003"]

"""The README's main job (``quickstart.py``) end to end at smoke size: every stage runs as its
own command, MIDI and REMI-z files come out that mido and remi-z read, and a second run skips
what is done.

Slow for a test: six subprocesses, each compiling its own small programs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mido
import pytest

from configs import paths, quickstart
from phraseldm_jax.remiz import MultiTrack

SMOKE = [
    "--config.corpus.n_songs=24",
    "--config.vae.stage2_steps=10",
    "--config.vae.stage3_steps=10",
    "--config.ldm.steps=6",
    "--config.sample.num_songs=2",
    "--config.sample.bars=8",
    "--config.sample.sampler=ddim",
    "--config.sample.steps=3",
    "--config.sample.shipped_songs=2",
]


def run_quickstart(workdir, *extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device per stage, as a user's machine
    return subprocess.run(
        [sys.executable, "quickstart.py", f"--workdir={workdir}", *SMOKE, *extra],
        cwd=paths.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    result = run_quickstart(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_writes_midi_that_readers_open(finished_run):
    workdir, _ = finished_run
    samples = workdir / "samples"
    summary = json.loads((samples / "summary.json").read_text())
    files = sorted(p.name for p in samples.glob("*.mid"))
    assert len(files) == 2
    for song in summary["songs"]:
        midi = mido.MidiFile(samples / song["file"])  # notes depend on training; smoke models
        assert midi.ticks_per_beat > 0 and midi.tracks  # may write near-empty bars
        text = (samples / song["text_file"]).read_text()
        assert text.split().count("b-1") == song["n_bars"] > 0
        MultiTrack.from_remiz_str(text, verbose=False)
    assert summary["settings"]["sampler"] == "ddim"
    assert summary["settings"]["target_bars"] == 8
    assert [song["file"] for song in summary["songs"]] == files


def test_every_stage_made_its_output(finished_run):
    workdir, result = finished_run
    for folder in ("data", "vae_stage2", "vae_stage3", "latents", "ldm", "samples"):
        assert (workdir / folder).is_dir(), folder
    assert (workdir / "latents" / "stats.json").is_file()
    state = json.loads((workdir / "quickstart_state.json").read_text())
    # The shipped models' songs are a seventh stage where pretrained/pop909-small is present.
    shipped = os.path.isfile(os.path.join(paths.pretrained_dir(), "shipped.json"))
    assert len(state["done"]) == stage_count(result.stdout) == 6 + shipped
    if shipped:
        songs = sorted((workdir / "pop909_songs").glob("*.mid"))
        assert len(songs) == 2 and "from the shipped POP909 models" in result.stdout
    assert "$ python train_vae.py --config=configs/vae_stage2.py:tiny" in result.stdout


def test_second_run_skips_finished_stages(finished_run):
    workdir, _ = finished_run
    again = run_quickstart(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == stage_count(again.stdout)


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown quickstart preset"):
        quickstart.get_config("lakh")


def stage_count(stdout: str) -> int:
    """N of the ``[i/N]`` stage headers quickstart prints."""
    match = re.search(r"\[1/(\d+)\]", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1))

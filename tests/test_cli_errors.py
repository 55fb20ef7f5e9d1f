"""The commands on a tiny PhraseVAE, run as subprocesses: user mistakes are one line and exit
status 2 (before any model loads, nothing half-written), library chatter only with --verbose,
and ``vae reconstruct`` reads MIDI as the datasets do."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_convert_cli import _vae
from test_midi_folder import PIANO, write_midi
from test_pop909 import fixture_notes, write_song

from input_pipeline import midi_folder
from phraseldm_jax.cli import convert as convert_cli
from phraseldm_jax.cli import vae as vae_cli
from phraseldm_jax.convert import api
from phraseldm_jax.metrics import f1 as f1_lib
from phraseldm_jax.remiz import MultiTrack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = "python -m phraseldm_jax.cli.vae"
# absl's "W1204 12:00:00.1 ..." lines, logging's "INFO:absl:..." and the known messages.
CHATTER = re.compile(r"^[IWE]\d{4} |^(INFO|WARNING):|Unable to initialize backend|orbax", re.M)


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@functools.cache
def _folders(root: str) -> dict:
    """A tiny PhraseVAE as an original folder and as an Orbax workdir, and input files."""
    out = {"original": os.path.join(root, "vae"), "workdir": os.path.join(root, "w")}
    api.export_phrase_vae(_vae(), out["original"])
    argv = ["import", "--kind", "vae", "--src", out["original"], "--workdir", out["workdir"]]
    assert convert_cli.main(argv) == 0
    notes = [*fixture_notes(9, range(2, 8)), ("BRIDGE", 4 * 3 + 1.5, 0.5, 81)]
    song_dir = write_song(root, "901", notes, "i2A4B2", n_bars=9)
    out["pop909"] = os.path.join(song_dir, "901.mid")
    out["waltz"] = write_midi(os.path.join(root, "waltz.mid"), [PIANO], time_signatures=((3, 4),))
    out["shared"] = write_midi(
        os.path.join(root, "shared.mid"), [PIANO, ("Piano LH", 0, False, [(0, 480, 40)])]
    )
    out["latents"] = os.path.join(root, "z.npy")
    np.save(out["latents"], np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    out["txt"] = os.path.join(root, "z.txt")
    with open(out["txt"], "w") as f:
        f.write("0.1 0.2\n")
    out["phrases"] = os.path.join(root, "phrases.txt")
    with open(out["phrases"], "w") as f:
        f.write("i-0 o-0 p-60 d-12\n")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _folders(str(tmp_path_factory.mktemp("cli_errors")))


def _one_line_error(done: subprocess.CompletedProcess, prog: str, message: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("waltz", "waltz.mid: time signature 3/4 at tick 0; only 4/4"),
        ("shared", "tracks ['Piano RH', 'Piano LH'] share program 0"),
        ("decode_txt", "z.txt: expected a .npy or .npz file"),
        ("missing_input", "nothing.mid: no such file"),
        ("bad_workdir", "is not a PhraseVAE workdir or original folder"),
        ("missing_workdir", "--workdir /nonexistent/vae: no such folder"),
        ("song_fails", "--song: "),
    ],
)
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(folders, tmp_path, case, message):
    out, song = str(tmp_path / "out.txt"), str(tmp_path / "song.mid")
    workdir = folders["original"]
    rec = ["-m", "phraseldm_jax.cli.vae", "reconstruct", "--output", song]
    dec = ["-m", "phraseldm_jax.cli.vae", "decode", "--output", out]
    command = {
        "waltz": [*rec, "--input", folders["waltz"]],
        "shared": [*rec, "--input", folders["shared"]],
        "decode_txt": [*dec, "--input", folders["txt"]],
        "missing_input": [*rec, "--input", str(tmp_path / "nothing.mid")],
        "bad_workdir": [*dec, "--input", folders["latents"]],
        "missing_workdir": [*dec, "--input", folders["latents"]],
        # random latents of an untrained model decode to no bar: the song cannot be written
        "song_fails": [*dec, "--input", folders["latents"], "--song", song],
    }[case]
    workdir = {"bad_workdir": str(tmp_path), "missing_workdir": "/nonexistent/vae"}.get(
        case, workdir
    )
    done = _run(*command, "--workdir", workdir)
    _one_line_error(done, VAE, message)
    assert "Traceback" not in done.stderr
    assert not os.path.exists(out) and not os.path.exists(song)  # nothing half-written


def test_quiet_by_default_and_chatty_with_verbose(folders, tmp_path):
    """An Orbax workdir: Orbax and JAX log at INFO/WARNING; none of it shows by default."""
    args = ["-m", "phraseldm_jax.cli.vae", "encode", "--workdir", folders["workdir"],
            "--input", folders["phrases"], "--output", str(tmp_path / "e.npz")]  # fmt: skip
    quiet = _run(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert not CHATTER.search(quiet.stderr), quiet.stderr
    verbose = _run(*args, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert CHATTER.search(verbose.stderr)
    assert len(verbose.stderr.splitlines()) > len(quiet.stderr.splitlines())


def test_prepare_prints_no_tfds_lines(tmp_path):
    done = _run("-m", "phraseldm_jax", "prepare", "--source", "synthetic", "--n_songs", "4",
                "--data_dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Downloading and preparing" not in done.stdout + done.stderr
    assert "downloaded and prepared" not in done.stdout + done.stderr
    assert not CHATTER.search(done.stderr), done.stderr


@pytest.mark.parametrize("script", ["train_vae.py", "train_ldm.py"])
def test_unknown_config_key_names_the_closest(script):
    config = (
        "configs/vae_stage3.py:tiny" if script == "train_vae.py" else "configs/ldm_lencond.py:small"
    )
    done = _run(script, "--config", config, "--workdir", "/tmp/never_written",
                "--config.train.num_step=3")  # fmt: skip
    _one_line_error(
        done, script, "unknown config key 'train.num_step'; did you mean 'train.num_steps'?"
    )
    assert not os.path.exists("/tmp/never_written")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.data.latent_dir=/tmp/no_latents_here"],
         "data.latent_dir: /tmp/no_latents_here/stats.json not found"),
        (["--config.model.scale_factor=1.0", "--config.model.clip_range=3.0",
          "--config.model.prediction_type=x0"],
         "config.model: PhraseLDMConfig.prediction_type must be one of"),
    ],
)  # fmt: skip
def test_train_ldm_data_and_model_mistakes_are_one_line(flags, message, tmp_path):
    workdir = tmp_path / "never"
    done = _run("train_ldm.py", "--config", "configs/ldm_lencond.py:tiny", "--workdir",
                str(workdir), *flags)  # fmt: skip
    _one_line_error(done, "train_ldm.py", message)
    assert not workdir.exists()


def test_reconstruct_reads_pop909_as_prepare_does(folders, tmp_path):
    """The POP909 layout picks the POP909 importer: three tracks kept apart (programs 13, 25,
    0 although the file has program 0 three times), its bars, its key back in the output."""
    record = vae_cli.import_midi(folders["pop909"])
    assert record["n_bars"] == 8 and set(record["phrase_program"]) == {0, 13, 25}
    slots = vae_cli.record_slots(record, "pitch_order")

    class Identity:
        def reconstruct(self, texts):
            return list(texts)

    output = str(tmp_path / "back.mid")
    scores = vae_cli.reconstruct(Identity(), record, output, "pitch_order")
    assert scores["bars"] == 8 and scores["exact_match"] == 1.0 and scores["f1_iopd"] == 1.0
    assert scores["phrases"] == len(record["phrases"])
    written = MultiTrack.from_midi(output)
    assert len(written.bars) == 8
    assert {bar.time_signature for bar in written.bars} == {(4, 4)}
    again = midi_folder.import_file(output, normalize_key=False)
    assert set(again["phrase_program"]) == {0, 13, 25}
    # The output is in the input's key (D major): the record's key shift is undone.
    assert record["key_shift"] == -2
    shifted = [re.sub(r"p-(\d+)", lambda m: f"p-{int(m[1]) + 2}", t) for t in record["phrases"]]
    assert f1_lib.reconstruction_f1(again["phrases"], shifted)["f1_iopd"] == 1.0
    assert len(slots) == 8 * 4


def test_reconstruct_command_on_pop909(folders, tmp_path):
    output = str(tmp_path / "r.mid")
    done = _run("-m", "phraseldm_jax.cli.vae", "reconstruct", "--workdir", folders["original"],
                "--input", folders["pop909"], "--output", output)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"bars": 8' in done.stdout and os.path.isfile(output)  # a random model's notes


def test_sample_is_quiet_and_checks_vae_workdir_first(folders, tmp_path):
    from test_sample_cli import _workdir

    ldm_workdir = _workdir(tmp_path, vae_workdir=folders["workdir"])
    args = ["sample.py", "--checkpoint", ldm_workdir, "--num_songs", "1", "--sampler", "ddim",
            "--steps", "2", "--max_decode_length", "6"]  # fmt: skip
    wrong = _run(*args, "--out", str(tmp_path / "x"), "--vae_workdir", str(tmp_path))
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "--vae_workdir" in wrong.stderr and "not a PhraseVAE workdir" in wrong.stderr
    quiet = _run(*args, "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0, quiet.stderr
    assert not CHATTER.search(quiet.stderr), quiet.stderr
    verbose = _run(*args, "--out", str(tmp_path / "v"), "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert CHATTER.search(verbose.stderr)


def test_training_is_quiet(tmp_path):
    """train_ldm.py on a tiny latent dataset: its progress and result, no INFO chatter."""
    import ldm_fixtures
    from test_train_ldm import OVERRIDES

    codebook = ldm_fixtures.Codebook()
    songs = ldm_fixtures.fixed_length_songs(codebook, [3, 5, 8, 4])
    latent_dir = ldm_fixtures.write_dataset(tmp_path / "latents", codebook, songs[:3], songs[3:])
    overrides = {**OVERRIDES, "train.num_steps": 2, "train.ckpt_every": 2, "train.eval_every": 2}
    done = _run("train_ldm.py", "--config", "configs/ldm_lencond.py:tiny",
                "--workdir", str(tmp_path / "w"), f"--config.data.latent_dir={latent_dir}",
                *[f"--config.{k}={v}" for k, v in overrides.items()])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done at step 2" in done.stdout
    assert not CHATTER.search(done.stderr), done.stderr[-3000:]

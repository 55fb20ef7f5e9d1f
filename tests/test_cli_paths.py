"""The real commands, in subprocesses from a scratch working folder with ``HOME`` there: every
path flag takes a relative path or ``~`` (Orbax takes absolute paths only, and training used to
die at its first save); sample.py says which checkpoints it used; a damaged checkpoint step is
one warning line and a fallback to the newest intact one, and a workdir with none intact is one
error line with exit status 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import ldm_fixtures
import pytest

from phraseldm_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_FLAGS = [
    "--config.data.data_dir=",  # the synthetic corpus
    "--config.data.bucket_lengths=(64,)",
    "--config.data.max_length=64",
    "--config.eval.decode_batch_size=8",
    "--config.eval.max_decode_length=16",
    "--config.eval.max_examples=16",
    "--config.eval.max_f1_examples=8",
    "--config.model.t5.d_ff=64",
    "--config.model.t5.d_model=32",
    "--config.model.t5.num_decoder_layers=1",
    "--config.model.t5.num_heads=2",
    "--config.model.t5.num_layers=1",
    "--config.train.ckpt_every=2",
    "--config.train.eval_every=0",
    "--config.train.num_steps=4",
]
LDM_FLAGS = [
    "--config.data.latent_dir=data/latents",  # relative
    "--config.vae.workdir=~/runs/vae",  # under ~
    "--config.model.dit.sample_size=64",
    "--config.train.num_steps=2",
    "--config.train.ckpt_every=1",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
    "--config.eval.num_songs=0",
]


def _run(home, *argv, expect=0):
    env = dict(os.environ, HOME=str(home), PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, *argv], cwd=home, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == expect, (argv, done.stdout[-2000:], done.stderr[-4000:])
    return done


def _said(done) -> list[str]:
    """stderr without absl's own warnings."""
    return [line for line in done.stderr.splitlines() if not line.startswith("WARNING:absl")]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A working folder (also ``HOME``) with a PhraseVAE and a PhraseLDM trained there by the
    training scripts, both given relative workdirs."""
    home = tmp_path_factory.mktemp("home")
    vae_script, vae_config = f"{REPO}/train_vae.py", f"{REPO}/configs/vae_stage3.py:tiny"
    _run(home, vae_script, "--config", vae_config, "--workdir", "runs/vae", *VAE_FLAGS)
    codebook = ldm_fixtures.Codebook(seed=0)
    songs = ldm_fixtures.fixed_length_songs(codebook, [4, 8, 12, 16])
    ldm_fixtures.write_dataset(home / "data" / "latents", codebook, songs, songs[:2])
    ldm_script, ldm_config = f"{REPO}/train_ldm.py", f"{REPO}/configs/ldm_lencond.py:tiny"
    _run(home, ldm_script, "--config", ldm_config, "--workdir", "runs/ldm", *LDM_FLAGS)
    return home


def test_training_with_relative_workdirs_saves_every_checkpoint(home):
    for name, steps in (("vae", [2, 4]), ("ldm", [1, 2])):
        workdir = home / "runs" / name
        assert checkpointing.finished_steps(workdir, "latest") == steps
        leftovers = [n for n in os.listdir(checkpointing.checkpoint_dir(workdir)) if "tmp" in n]
        assert leftovers == []
    assert (home / "runs" / "vae" / "test_metrics.json").exists()
    config = json.loads((home / "runs" / "ldm" / "config.json").read_text())
    assert config["vae"]["workdir"] == str(home / "runs" / "vae")  # ~ expanded, absolute
    assert config["data"]["latent_dir"] == str(home / "data" / "latents")


def test_commands_take_relative_and_home_paths(home):
    (home / "phrases.txt").write_text(ldm_fixtures.ONE_NOTE_BAR + "\n")
    vae = ["-m", "phraseldm_jax", "vae", "encode", "--workdir", "runs/vae"]
    _run(home, *vae, "--input", "phrases.txt", "--output", "z.npz")
    assert (home / "z.npz").exists()
    tools = ["-m", "phraseldm_jax.cli.latent_tools", "prior", "--workdir", "~/runs/vae"]
    _run(home, *tools, "--output", "~/prior.mid", "--n", "2")
    assert (home / "prior.mid").exists()
    export = ["-m", "phraseldm_jax", "convert", "export", "--kind", "vae", "--workdir"]
    _run(home, *export, "runs/vae", "--dst", "~/exported")
    assert (home / "exported" / "model.safetensors").exists()
    prepare = ["-m", "phraseldm_jax", "prepare", "--source", "synthetic", "--n_songs", "4"]
    _run(home, *prepare, "--data_dir", "data/songs")
    latents = ["-m", "phraseldm_jax", "latents", "--vae_workdir", "~/runs/vae"]
    _run(home, *latents, "--data_dir", "data/songs", "--out", "data/latents2")
    assert (home / "data" / "latents2" / "stats.json").exists()


SAMPLE = ["--num_songs", "2", "--bars", "4", "--sampler", "ddim", "--steps", "2"]
SAMPLE += ["--max_decode_length", "6", "--cpu_devices", "1"]


def test_sample_with_relative_paths_then_a_damaged_checkpoint(home):
    """One LDM workdir through three runs: intact; its newest step damaged (fallback, and the
    earlier run's songs removed from --out); every step damaged (one line, exit 2)."""
    sample = f"{REPO}/sample.py"
    done = _run(home, sample, "--checkpoint", "runs/ldm", "--out", "songs", *SAMPLE)
    said = _said(done)
    assert "LDM checkpoint: latest/2 (asked for best: the workdir has no intact best one)" in said
    assert "VAE checkpoint: latest/4 (asked for best: the workdir has no intact best one)" in said
    summary = json.loads((home / "songs" / "summary.json").read_text())
    ldm = summary["checkpoints"]["ldm"]
    assert ldm["path"] == str(home / "runs" / "ldm")
    assert (ldm["which_asked"], ldm["which_used"], ldm["step"], ldm["skipped"]) == (
        "best",
        "latest",
        2,
        [],
    )
    assert summary["checkpoints"]["vae"]["step"] == 4
    written = sorted(
        name
        for entry in summary["songs"]
        for name in (entry["text_file"], entry["file"] if entry["written"] else None)
        if name
    )
    assert [f for f in sorted(os.listdir(home / "songs")) if f.startswith("song_")] == written
    assert "song_001.txt" in written  # the second song, which the next run must remove

    latest = checkpointing.checkpoint_dir(home / "runs" / "ldm")
    os.remove(os.path.join(latest, "2", "state", "_METADATA"))
    one = [*SAMPLE[:1], "1", *SAMPLE[2:]]
    done = _run(home, sample, "--checkpoint", "~/runs/ldm", "--out", "~/songs", *one)
    said = _said(done)
    assert "checkpoint latest/2 is damaged (state/_METADATA missing); using latest/1" in said
    assert not any("Traceback" in line or "Event loop" in line for line in said), said
    summary = json.loads((home / "songs" / "summary.json").read_text())
    assert summary["checkpoints"]["ldm"]["step"] == 1
    assert summary["checkpoints"]["ldm"]["skipped"] == [
        {"checkpoint": "latest/2", "reason": "state/_METADATA missing"}
    ]
    files = sorted(os.listdir(home / "songs"))
    assert [f for f in files if f.startswith("song_")] == [
        n for n in ("song_000.mid", "song_000.txt") if n in files
    ]
    assert "song_000.txt" in files and len(summary["songs"]) == 1

    # Both steps' array data truncated (step 2's metadata put back: the same tree as step 1's),
    # so that two reads fail (each failed read leaves Orbax reports behind that must not show).
    shutil.copy(os.path.join(latest, "1", "state", "_METADATA"), os.path.join(latest, "2", "state"))
    for step in ("1", "2"):
        for root, _, names in os.walk(os.path.join(latest, step, "state")):
            for name in names:
                if os.sep + "d" in root:
                    os.truncate(os.path.join(root, name), 8)
    done = _run(home, sample, "--checkpoint", "runs/ldm", "--out", "songs", *one, expect=2)
    said = _said(done)
    errors = [line for line in said if line.startswith("sample.py: error:")]
    assert len(errors) == 1 and "no intact checkpoint in" in errors[0], said
    # The file digests name the truncated file before Orbax reads it.
    assert re.search(r"damaged latest/2 \(state/\S*d/\w+ truncated \(8 of \d+ bytes\)", errors[0])
    assert re.search(r"latest/1 \(state/\S*d/\w+ truncated \(8 of \d+ bytes\)", errors[0])
    assert not any("Traceback" in line or "Event loop" in line for line in said), said
    assert len(said) <= 6, said


def test_a_command_on_a_workdir_with_no_intact_step_is_one_line(home):
    latest = checkpointing.checkpoint_dir(home / "runs" / "vae")
    for step in ("2", "4"):
        os.remove(os.path.join(latest, step, "_CHECKPOINT_METADATA"))
    vae = ["-m", "phraseldm_jax", "vae", "encode", "--workdir", "runs/vae"]
    done = _run(home, *vae, "--input", "phrases.txt", "--output", "z2.npz", expect=2)
    said = _said(done)
    assert said[-1].startswith("python -m phraseldm_jax vae: error: no intact checkpoint in ")
    assert "damaged latest/4 (_CHECKPOINT_METADATA missing), latest/2 (" in said[-1]
    assert not any("Traceback" in line for line in said), said

"""Runs the whole job, data to MIDI: prepare a corpus, train PhraseVAE (stages 2 and 3), build
the latent dataset, train a length-conditioned PhraseLDM, sample songs as MIDI files.

  python quickstart.py                                          # embedded corpus (README: time)
  python quickstart.py --config configs/quickstart.py:pop909    # real POP909 (hours on a CPU)
  python quickstart.py --workdir runs/qs --config.sample.num_songs=8

Every stage is one of the project's ordinary commands (printed before it runs, so it can be
rerun by hand with other settings); the settings come from ``configs/quickstart.py``. An
interrupted run resumes: finished stages are recorded in ``<workdir>/quickstart_state.json``
and skipped while their command is unchanged (a changed stage reruns, and so does every stage
after it), and an interrupted training continues from its last checkpoint. ``--restart``
starts from scratch. Outputs under ``--workdir``: ``data/`` (datasets), ``vae_stage2/``,
``vae_stage3/``, ``latents/``, ``ldm/`` (TensorBoard logs and checkpoints in each run) and
``samples/`` (``song_*.mid``, their REMI-z text and ``summary.json``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from configs import paths
from phraseldm_jax import fileio

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(paths.REPO_ROOT, "configs", "quickstart.py"), "quickstart preset"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join(paths.RUNS_ROOT, "quickstart"), "where everything is written"
)
_RESTART = flags.DEFINE_bool("restart", False, "delete the workdir's results and start again")

STATE_FILE = "quickstart_state.json"


def _overrides(items) -> list[str]:
    return [f"--config.{item}" for item in items]


def stage_commands(config, workdir: str) -> list[tuple[str, list[str]]]:
    """(stage name, argv) in order; every argv runs from the repository root."""
    data_dir = os.path.join(workdir, "data")
    vae2, vae3 = os.path.join(workdir, "vae_stage2"), os.path.join(workdir, "vae_stage3")
    latents, ldm = os.path.join(workdir, "latents"), os.path.join(workdir, "ldm")
    corpus = config.corpus
    prepare = ["-m", "phraseldm_jax.cli.prepare", "--source", corpus.source, "--data_dir", data_dir]
    if corpus.source == "synthetic":
        prepare += ["--n_songs", str(corpus.n_songs)]
    else:
        if not corpus.input or not os.path.isdir(corpus.input):
            raise SystemExit(
                f"corpus folder {corpus.input!r} not found: set --config.corpus.input or "
                "PHRASELDM_POP909 to the raw dataset"
            )
        prepare += ["--input", corpus.input]
    prepare += shlex.split(corpus.extra_args)
    vae = config.vae
    vae_common = [f"--config.data.data_dir={data_dir}", *_overrides(vae.overrides)]
    ldm_cfg = config.ldm
    sample = config.sample
    stages = [
        ("prepare the corpus", prepare),
        (
            "PhraseVAE stage 2 (query-token autoencoder)",
            ["train_vae.py", f"--config=configs/vae_stage2.py:{vae.size}", f"--workdir={vae2}"]
            + vae_common
            + [f"--config.train.num_steps={vae.stage2_steps}"],
        ),
        (
            "PhraseVAE stage 3 (64-d VAE)",
            ["train_vae.py", f"--config=configs/vae_stage3.py:{vae.size}", f"--workdir={vae3}"]
            + vae_common
            + [f"--config.train.num_steps={vae.stage3_steps}", f"--config.train.init_from={vae2}"]
            + [f"--config.train.init_from_checkpoint={vae.checkpoint}"],
        ),
        (
            "latent dataset",
            ["-m", "phraseldm_jax.cli.latents", "--vae_workdir", vae3, "--data_dir", data_dir]
            + ["--out", latents, "--checkpoint", vae.checkpoint, "--overwrite"],
        ),
        (
            "PhraseLDM (length-conditioned)",
            ["train_ldm.py", f"--config={ldm_cfg.config}:{ldm_cfg.size}", f"--workdir={ldm}"]
            + [f"--config.data.latent_dir={latents}", f"--config.vae.workdir={vae3}"]
            + [f"--config.vae.checkpoint={vae.checkpoint}"]
            + [f"--config.train.num_steps={ldm_cfg.steps}", *_overrides(ldm_cfg.overrides)],
        ),
        (
            "sample songs to MIDI",
            ["sample.py", "--checkpoint", ldm, "--which", "latest"]
            + ["--out", os.path.join(workdir, "samples"), "--num_songs", str(sample.num_songs)]
            + ["--bars", str(sample.bars), "--sampler", sample.sampler]
            + ["--steps", str(sample.steps), "--tempo", str(sample.tempo)]
            + ["--seed", str(sample.seed)]
            + (["--force_length"] if sample.force_length else []),
        ),
    ]
    if sample.shipped_songs > 0 and shipped_models_present():
        stages.append(
            (
                "songs from the shipped POP909 models",
                ["sample.py", "--out", os.path.join(workdir, "pop909_songs")]
                + ["--num_songs", str(sample.shipped_songs), "--bars", str(sample.bars)]
                + ["--sampler", sample.sampler, "--steps", str(sample.steps)]
                + ["--seed", str(sample.seed)],
            )
        )
    return stages


def shipped_models_present() -> bool:
    """True when pretrained/pop909-small (or $PHRASELDM_PRETRAINED) holds shipped models."""
    return os.path.isfile(os.path.join(paths.pretrained_dir(), "shipped.json"))


def _load_state(path: str) -> dict:
    if not os.path.exists(path):
        return {"done": {}}
    with open(path) as f:
        return json.load(f)


def _save_state(path: str, state: dict) -> None:
    fileio.write_text(path, json.dumps(state, indent=2))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
    if _RESTART.value and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    state_path = os.path.join(workdir, STATE_FILE)
    state = _load_state(state_path)
    commands = stage_commands(config, workdir)
    started = time.perf_counter()
    redo = False  # once a stage runs, every later stage runs again
    for index, (name, args) in enumerate(commands, 1):
        header = f"[{index}/{len(commands)}] {name}"
        done = state["done"].get(name)
        if not redo and done is not None and done["argv"] == args:
            print(f"{header}: done in an earlier run ({done['seconds']:.0f} s), skipped")
            continue
        redo = True
        argv_shown = " ".join(shlex.quote(a) for a in ["python", *args])
        print(f"\n{header}\n  $ {argv_shown}", flush=True)
        stage_start = time.perf_counter()
        result = subprocess.run([sys.executable, *args], cwd=paths.REPO_ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{header} failed (exit code {result.returncode}); rerun to resume")
        state["done"][name] = {"seconds": time.perf_counter() - stage_start, "argv": args}
        _save_state(state_path, state)
        print(f"{header}: {state['done'][name]['seconds']:.0f} s", flush=True)
    samples = os.path.join(workdir, "samples")
    midi = sorted(f for f in os.listdir(samples) if f.endswith(".mid"))
    print(f"\ndone in {time.perf_counter() - started:.0f} s (this run); stage times (s):")
    for name, done in state["done"].items():
        print(f"  {done['seconds']:7.0f}  {name}")
    print(f"{len(midi)} MIDI files in {samples}: {', '.join(midi)}")
    shipped_songs = os.path.join(workdir, "pop909_songs")
    if os.path.isdir(shipped_songs):
        midi = sorted(f for f in os.listdir(shipped_songs) if f.endswith(".mid"))
        print(f"{len(midi)} MIDI files from the shipped POP909 models in {shipped_songs}")
    print(f"TensorBoard: tensorboard --logdir {workdir}")


if __name__ == "__main__":
    app.run(main)

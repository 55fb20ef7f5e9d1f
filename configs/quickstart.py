"""The whole job, data to MIDI, as ``quickstart.py`` runs it (``get_config(preset)``).

  python quickstart.py                                          # embedded corpus (README: time)
  python quickstart.py --config configs/quickstart.py:pop909    # real POP909, hours on a CPU

Presets:
- ``""`` (default): the built-in synthetic corpus (``input_pipeline.synthetic``, no download),
  a tiny PhraseVAE (stage 2 then stage 3, a few hundred steps each) and a tiny
  length-conditioned PhraseLDM (2 layers, 64 bars, 2500 steps): every stage of the real job in
  minutes on a CPU (README has the measured time), writing MIDI.
- ``pop909``: the raw POP909 folder (``$PHRASELDM_POP909``, default ``../shared/data/pop909``)
  with the CPU-sized ``small`` models: the runs whose numbers the README quotes.
Stage settings are passed to the stage scripts as ``--config.<field>=<value>`` overrides, so
every stage is also an ordinary command the user can rerun by hand (``quickstart.py`` prints
them).
"""

from __future__ import annotations

import ml_collections

from configs import paths


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    if preset not in ("", "pop909"):
        raise ValueError(f"unknown quickstart preset {preset!r}; use '' or 'pop909'")
    config = ml_collections.ConfigDict()

    config.corpus = ml_collections.ConfigDict()
    config.corpus.source = "synthetic"  # synthetic | pop909 | midi (phraseldm_jax.cli.prepare)
    config.corpus.input = ""  # raw folder for pop909 / midi
    config.corpus.n_songs = 96  # synthetic corpus size
    config.corpus.extra_args = ""  # e.g. "--programs 0,25 --max_tracks 3" for midi folders

    config.vae = ml_collections.ConfigDict()
    config.vae.size = "tiny"  # configs/vae_stage{2,3}.py:<size>
    config.vae.stage2_steps = 400
    config.vae.stage3_steps = 300
    config.vae.overrides = ("train.eval_every=100000", "train.ckpt_every=100", "optim.lr=2e-3")
    # which checkpoint of a stage the next stages use: "latest" when training runs without
    # periodic validation (no "best" checkpoint), as in the default preset
    config.vae.checkpoint = "latest"

    config.ldm = ml_collections.ConfigDict()
    config.ldm.config = "configs/ldm_lencond.py"  # length-conditioned: sample.py --bars works
    config.ldm.size = "tiny"
    config.ldm.steps = 2500
    config.ldm.overrides = (
        "model.dit.sample_size=256",  # 64 bars: the synthetic songs have at most 52
        "model.dit.num_layers=2",
        "model.dit.num_attention_heads=2",
        "model.dit.attention_head_dim=32",
        "model.dit.time_proj_dim=32",
        "model.dit.global_states_input_dim=32",
        "data.batch_size=16",
        "train.log_every=25",
        "train.eval_every=100000",
        "train.ckpt_every=100",
        "train.progress=True",
        "eval.num_songs=0",
        "optim.lr=1e-3",
        "model.prediction_type=v_prediction",  # learns where songs end (docs/LDM_LENGTH.md)
    )

    config.sample = ml_collections.ConfigDict()
    config.sample.num_songs = 4
    config.sample.bars = 32
    config.sample.sampler = "dpmpp_2m"
    config.sample.steps = 50
    # Songs end where the model ends them (the v-prediction LDM of the default preset learns
    # its length in minutes: 32, 32, 31, 32 bars asked for 32); True writes the requested bars
    # by position whatever the model did (sample.py --force_length).
    config.sample.force_length = False
    config.sample.tempo = 100.0
    config.sample.seed = 0
    # Songs from the models shipped in pretrained/pop909-small (seconds), written last into
    # <workdir>/pop909_songs; 0 = none. They end where the model ends them (their length
    # accuracy: pretrained/pop909-small/README.md).
    config.sample.shipped_songs = 4

    if preset == "pop909":
        config.corpus.source = "pop909"
        config.corpus.input = paths.RAW_POP909
        config.vae.size = "small"
        config.vae.stage2_steps = 2000
        config.vae.stage3_steps = 1250
        config.vae.overrides = ()
        config.vae.checkpoint = "best"
        config.ldm.size = "small"
        config.ldm.steps = 3000
        config.ldm.overrides = ()
        config.sample.bars = 64
        config.sample.force_length = False
    return config

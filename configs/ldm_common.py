"""The PhraseLDM recipe shared by ``ldm_uncond.py``, ``ldm_lencond.py`` and ``ldm_seccond.py``.

Default size: the paper's (SPEC section 5): the StableAudio DiT (6 layers, 16 heads of 32, 8
key/value heads), AdamW lr 5e-4, eps 1e-8, weight decay 0.01, grad-norm clip 0.5, batch 128,
200k steps, evaluation every 5000 steps generating 20 songs with DDPM-1000. ``small`` and
``tiny`` shrink the model, batch and schedule for CPU runs and tests.
"""

from __future__ import annotations

import ml_collections

from configs import paths, train_common

SIZES = ("", "paper", "small", "tiny")
# The section plan of POP909 song 083, the reference's fixed evaluation prompt (64 bars).
REFERENCE_PLAN = "i-8 A-8 A-8 B-4 B-4 x-4 A-8 B-4 B-4 B-4 B-4 X-4"


def _dit(width: int, layers: int, heads: int, kv_heads: int, cond: int, cross: int) -> dict:
    """DiTConfig fields: ``width`` = heads * 32; ``cond`` = time/global widths; ``cross`` =
    cross-attention widths."""
    return dict(
        sample_size=512,
        in_channels=64,
        out_channels=64,
        num_layers=layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        num_key_value_attention_heads=kv_heads,
        cross_attention_dim=cross,
        time_proj_dim=cond,
        global_states_input_dim=cond,
        cross_attention_input_dim=cross,
        dtype="float32",  # compute dtype: "bfloat16" keeps weights, norms, softmax, loss float32
        remat=False,  # True: recompute each block's activations for the gradient (memory)
    )


def ldm_config(
    length_control: bool, sec_control: bool, size: str = ""
) -> ml_collections.ConfigDict:
    """The full config of one PhraseLDM variant at one size (``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {SIZES[1:]} (or nothing)")
    config = train_common.default_train_config()

    # PhraseLDMConfig fields (built as PhraseLDMConfig(**config.model)).
    config.model = ml_collections.ConfigDict()
    cross = 256 if sec_control else 128  # the original widens cross-attention with sections
    config.model.dit = _dit(512, 6, 16, 8, 128, cross)
    config.model.length_control = length_control
    config.model.sec_control = sec_control
    config.model.length_bucket_size = 10  # "64 bars" = bucket 6 = [60, 70)
    config.model.num_length_buckets = 128
    config.model.max_sections = 30
    config.model.cross_bias_mode = "mask"  # "additive": the original's +1 bias (converted weights)
    config.model.train_encoders = True  # False: length/section encoders frozen, as the original
    config.model.scale_factor = 0.0  # <= 0: stats.json scale_factor of the latent dataset
    config.model.clip_range = 0.0  # raw-space x0 clip; <= 0: stats.json abs_p999
    config.model.diffusion_steps = 1000
    config.model.prediction_type = "epsilon"  # the reference; v_prediction: see docs/LDM_LENGTH.md

    config.data = ml_collections.ConfigDict()
    config.data.latent_dir = paths.POP909_LATENTS  # latent_records dataset folder
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # validation loss
    config.data.batch_size = 128  # global batch
    config.data.augmentation = "none"  # none | phrase_permute | phrase_subset | bar_permute
    config.data.reference_padding = False  # True: unscaled [SEP] pad, as the original
    config.data.exclude_unfit_plans = True  # section models: leave out songs without a plan
    config.data.read_threads = 2
    config.data.worker_count = 0  # Grain worker processes (0 = in the training process)

    config.vae = ml_collections.ConfigDict()
    config.vae.workdir = paths.POP909_VAE  # the PhraseVAE that made the latents
    config.vae.checkpoint = "best"  # which of its checkpoints decodes ("best" | "latest")

    config.optim.name = "adamw"
    config.optim.lr = 5e-4
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.01
    config.optim.clip_norm = 0.5

    config.train.num_steps = 200_000
    config.train.log_every = 50
    config.train.eval_every = 5000
    config.train.ckpt_every = 5000
    config.train.keep_last = 3
    config.train.seed = 42
    config.train.best_metric = "eval/phrase_fid"
    config.train.best_mode = "min"
    config.train.cond_dropout = 0.0  # share of songs trained with null conditions (CFG); 0 = ref
    config.train.mask_padding = False  # True: loss over the song's rows only

    config.eval = ml_collections.ConfigDict()
    config.eval.num_songs = 20  # songs generated per evaluation (0 = validation loss only)
    config.eval.sampler = "ddpm"  # ddpm | ddim | dpmpp_2m
    config.eval.num_steps = 1000
    config.eval.guidance_scale = 1.0  # 1 = no classifier-free guidance
    config.eval.eta = 0.0  # ddim noise
    config.eval.clip = "scaled"  # scaled (raw clip / scale) | reference | none
    config.eval.target_bars = 64  # length condition of the generated songs, and the accuracy target
    config.eval.section_plan = REFERENCE_PLAN  # section condition of the generated songs
    config.eval.seed = 0  # the same noise at every evaluation
    config.eval.fid_split = "validation"  # real songs PhraseFID compares against
    config.eval.fid_num_songs = 100  # at most this many (seeded choice)
    config.eval.reference_fid = True  # also log the original's FID variant (phrase_fid_reference)
    config.eval.songs_dir = ""  # prepared `songs` dataset for melody memorisation ("" = off)
    config.eval.batch_size = 32  # validation-loss batch
    config.eval.loss_batches = -1  # validation batches per evaluation (-1 = all, 0 = none)
    config.eval.max_decode_length = 128
    config.eval.reading = "tokens"  # songs.READINGS: tokens (SPEC section 7) | slots (by position)

    if size == "small":
        _small(config, length_control or sec_control, sec_control)
    elif size == "tiny":
        _tiny(config, sec_control)
    return config


def _small(config: ml_collections.ConfigDict, conditional: bool, sec_control: bool) -> None:
    """1.3M parameters for CPU runs on POP909 latents (step time: docs/ARCHITECTURE.md), with
    the recipe of the shipped models (docs/LDM_LENGTH.md): v-prediction, which is what makes
    this model learn where a song ends, lr 1e-3 with warm-up and cosine decay, and condition
    dropout for classifier-free guidance."""
    config.model.dit = _dit(128, 4, 4, 2, 64, 128 if sec_control else 64)
    config.model.prediction_type = "v_prediction"
    config.data.batch_size = 8
    config.optim.lr = 1e-3
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 300
    config.train.cond_dropout = 0.1 if conditional else 0.0
    config.train.num_steps = 3500
    config.train.log_every = 25
    config.train.eval_every = 500
    config.train.ckpt_every = 250
    config.eval.num_songs = 8
    config.eval.sampler = "ddim"
    config.eval.num_steps = 50
    config.eval.batch_size = 16


def _tiny(config: ml_collections.ConfigDict, sec_control: bool) -> None:
    """Smoke-test size: compiles and runs a few steps in seconds."""
    config.model.dit = _dit(32, 1, 1, 1, 16, 32 if sec_control else 16)
    config.data.batch_size = 8
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.ckpt_every = 10
    config.train.progress = False
    config.eval.num_songs = 2
    config.eval.sampler = "ddim"
    config.eval.num_steps = 4
    config.eval.batch_size = 8
    config.eval.max_decode_length = 32

"""The PhraseLDM training task: diffusion loss and periodic generation with song metrics.

- ``diffusion_loss``: t ~ U{0..999}, x_t = add_noise(x0, eps, t), MSE between the predicted
  and the true noise (or v, for ``model.prediction_type = "v_prediction"``) over all 512
  positions (the reference), or over the song's own rows
  (``train.mask_padding``). ``train.cond_dropout`` > 0 replaces the conditions of that share of
  songs by the null condition (``ldm.predict_noise``), so that classifier-free guidance
  is possible at sampling time; 0 (the reference) never does.
- The length and section encoders are trained (SPEC section 9.6); ``model.train_encoders =
  False`` freezes them as the original did. ``resolve_config`` puts ``ldm.frozen_patterns``
  (the one freezing rule: the DiT's Fourier frequencies always, the encoders when frozen) into
  ``optim.freeze``.
- ``Evaluator``: the validation diffusion loss (fixed timesteps and noise per batch, so values
  compare across steps), then ``eval.num_songs`` songs generated with the configured sampler,
  decoded with the frozen PhraseVAE of ``vae.workdir``, and their metrics (FACTS section 2):
  PhraseFID (true Frechet distance, plus the original's variant) against a reference set of
  real songs, SRS, melody memorisation against the training melodies, length accuracy at the
  target bar count, and a bar self-similarity image of the first song.

``evaluate_checkpoint`` scores a trained checkpoint with any sampler (the command is
``python -m phraseldm_jax.cli.evaluate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline import latent_records, ldm_pipeline
from phraseldm_jax import (
    checkpointing,
    diffusion,
    ldm,
    phrases,
    pretrained,
    sampler,
    sharding,
    trainer,
)
from phraseldm_jax import songs as song_lib
from phraseldm_jax.errors import ConfigError
from phraseldm_jax.metrics import ldm as ldm_metrics
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.vae_inference import SONG_DECODE_BATCH, PhraseVAEModel

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Config.


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def ldm_config(config: ml_collections.ConfigDict) -> ldm.PhraseLDMConfig:
    """``PhraseLDMConfig(**config.model)``; scale factor and clip range must be resolved."""
    model = _plain(config.model)
    if model.get("scale_factor", 0) <= 0 or model.get("clip_range", 0) <= 0:
        raise ValueError(
            "config.model.scale_factor and clip_range are not set; call "
            "ldm_task.resolve_config(config) first (they come from the latent dataset)"
        )
    try:
        return ldm.PhraseLDMConfig(**model)
    except (TypeError, ValueError) as error:  # a config mistake: one line from the scripts
        raise ConfigError(f"config.model: {error}") from None


def resolve_config(config: ml_collections.ConfigDict, stats: Mapping | None = None) -> None:
    """Fills what the config leaves to the data, in place, before training.

    ``model.scale_factor`` and ``model.clip_range`` (raw units) <= 0 are read from the latent
    dataset's ``stats.json`` (``scale_factor``, ``abs_p999``); ``optim.freeze`` gets
    ``ldm.frozen_patterns`` of the model config.
    """
    if stats is None and (config.model.scale_factor <= 0 or config.model.clip_range <= 0):
        try:
            stats = latent_records.read_stats(config.data.latent_dir)
        except FileNotFoundError as error:
            raise ConfigError(f"data.latent_dir: {error}") from None
    if config.model.scale_factor <= 0:
        config.model.scale_factor = float(stats["scale_factor"])
    if config.model.clip_range <= 0:
        config.model.clip_range = float(stats["abs_p999"])
    freeze = list(config.optim.freeze)
    wanted = ldm.frozen_patterns(ldm_config(config))
    config.optim.freeze = freeze + [p for p in wanted if p not in freeze]


# ------------------------------------------------------------------------------------------
# Loss.


def diffusion_loss(
    params: Any,
    config: ldm.PhraseLDMConfig,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool,
    cond_dropout: float = 0.0,
    mask_padding: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The diffusion MSE of one ``ldm_pipeline`` batch, its randomness drawn from ``rng``
    (timesteps, noise, condition dropout, the section encoder's dropout): see
    ``noise_prediction_loss``."""
    x0 = batch["latents"]
    batch_size = x0.shape[0]
    t_key, noise_key, drop_key, dropout_key = jax.random.split(rng, 4)
    t = jax.random.randint(t_key, (batch_size,), 0, config.diffusion_steps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    null = None
    if train and cond_dropout > 0:
        null = jax.random.bernoulli(drop_key, cond_dropout, (batch_size,))
    return noise_prediction_loss(
        params,
        config,
        batch,
        t,
        noise,
        null=null,
        deterministic=not train,
        dropout_rng=dropout_key,
        mask_padding=mask_padding,
    )


def noise_prediction_loss(
    params: Any,
    config: ldm.PhraseLDMConfig,
    batch: Mapping[str, jax.Array],
    t: jax.Array,
    noise: jax.Array,
    *,
    null: jax.Array | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    mask_padding: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MSE of the model's prediction (the noise, or v for ``prediction_type``
    "v_prediction") at given timesteps ``t`` [batch] and noise [batch, length, C].

    x_t = add_noise(x0, noise, t); ``null`` [batch] bool gives those songs null conditions;
    ``deterministic=False`` runs the section encoder's dropout (``dropout_rng``).
    Returns the loss (mean over songs weighted by ``batch["weight"]``) and metrics ``mse``
    (all positions), ``mse_song`` (the song's rows) and ``mse_pad`` (the padding rows).
    """
    x0 = batch["latents"]
    batch_size, length, _ = x0.shape
    x_t = diffusion.add_noise(x0, noise, t)
    prediction = ldm.model_output(
        params,
        config,
        x_t,
        t,
        ldm.conditions_from_batch(batch),
        null,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
    )
    target = noise
    if config.prediction_type == "v_prediction":
        target = diffusion.v_target(x0, noise, t)
    sq = jnp.mean(jnp.square(prediction - target), axis=-1)  # [batch, length]
    song = jnp.arange(length)[None, :] < SLOTS_PER_BAR * batch["n_bars"][:, None]
    n_song = jnp.sum(song, axis=-1)
    per_song = {
        "mse": jnp.mean(sq, axis=-1),
        "mse_song": jnp.sum(jnp.where(song, sq, 0.0), -1) / jnp.maximum(n_song, 1),
        "mse_pad": jnp.sum(jnp.where(song, 0.0, sq), -1) / jnp.maximum(length - n_song, 1),
    }
    weight = batch.get("weight", jnp.ones((batch_size,), jnp.float32))
    total = jnp.maximum(jnp.sum(weight), 1e-9)
    metrics = {k: jnp.sum(weight * v) / total for k, v in per_song.items()}
    loss = metrics["mse_song"] if mask_padding else metrics["mse"]
    return loss, metrics


# ------------------------------------------------------------------------------------------
# Evaluation.


def sampler_settings(eval_config) -> sampler.SamplerSettings:
    return sampler.SamplerSettings(
        sampler=eval_config.sampler,
        num_steps=int(eval_config.num_steps),
        guidance_scale=float(eval_config.guidance_scale),
        eta=float(eval_config.eta),
        timestep_spacing=eval_config.get("timestep_spacing") or None,
        clip=eval_config.clip,
        clipped_eps=bool(eval_config.get("clipped_eps", False)),
    )


def eval_conditions(config, ldm_cfg: ldm.PhraseLDMConfig) -> ldm.Conditions:
    """The conditions every evaluation generates with (target bars, section plan)."""
    ec = config.eval
    plan = ec.section_plan if ldm_cfg.sec_control else None
    n_bars = int(ec.target_bars) if ldm_cfg.length_control or plan is None else None
    cond = ldm.make_conditions(int(ec.num_songs), n_bars, plan)
    if plan is not None and ldm_cfg.length_control and int(cond.n_bars[0]) != ec.target_bars:
        raise ValueError(
            f"eval.section_plan {plan!r} covers {int(cond.n_bars[0])} bars but "
            f"eval.target_bars is {ec.target_bars}"
        )
    return cond


def reference_songs(data_dir: str, split: str, num_songs: int, seed: int = 42) -> list:
    """Raw latents [4 * n_bars, 64] of up to ``num_songs`` songs of ``split`` (a seeded random
    choice when the split has more): the real side of PhraseFID."""
    source = latent_records.open_latent_source(data_dir, split)
    indices = np.arange(len(source))
    if len(source) > num_songs:
        indices = np.sort(np.random.default_rng(seed).choice(len(source), num_songs, False))
    return [np.asarray(r["latents"], np.float32) for r in source.__getitems__(indices.tolist())]


def melody_reference(songs_dir: str, split: str = "train") -> ldm_metrics.MelodyReference:
    """Melody strings (program 13, ``i-13 o- p- d- ... b-1`` per bar) of every song of the
    prepared ``songs`` dataset: what generated melodies are compared against."""
    # Imported here: tensorflow_datasets is heavy and only evaluation with songs_dir needs it.
    from input_pipeline import tfds_builders

    source = tfds_builders.open_source(songs_dir, "songs", split)
    melodies = {}
    for i in range(len(source)):
        record = source[i]
        tokens = []
        for bar in phrases.record_phrases(record):
            tokens += [text for program, text in bar if program == ldm_metrics.MELODY_PROGRAM]
            tokens.append(phrases.BAR_TOKEN)
        melodies[record["song_id"]] = " ".join(tokens)
    return ldm_metrics.MelodyReference.build(melodies)


def ssm_image(z: np.ndarray, pixels_per_bar: int = 4) -> np.ndarray:
    """Bar self-similarity of one song's latents [4 * B, 64] as a uint8 image [B*p, B*p]
    (cosine -1..1 mapped to 0..255)."""
    ssm = ldm_metrics.bar_ssm(z)
    image = np.round((np.clip(ssm, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.kron(image, np.ones((pixels_per_bar, pixels_per_bar), np.uint8))


def song_metrics(
    songs: list[song_lib.Song],
    latents: np.ndarray,
    real: list[np.ndarray],
    *,
    target_bars: int,
    bucket_size: int = 10,
    melodies: ldm_metrics.MelodyReference | None = None,
    reference_fid: bool = True,
) -> dict[str, Any]:
    """Metrics of generated songs (raw latents [N, 512, 64] and their decodings)."""
    n_bars = [s.n_bars for s in songs]
    generated = ldm_metrics.song_latents(latents, n_bars)
    rows = sum(len(g) for g in generated)
    out: dict[str, Any] = {
        "mean_bars": float(np.mean(n_bars)),
        "length_accuracy": ldm_metrics.length_accuracy(n_bars, target_bars, bucket_size),
        "unreadable_songs": float(sum(s.multitrack is None for s in songs)),
        "srs": ldm_metrics.mean_section_recurrence_score(generated),
        "phrase_fid": float("nan"),
    }
    if rows >= 2:
        out["phrase_fid"] = ldm_metrics.phrase_fid(real, generated)
        if reference_fid:
            out["phrase_fid_reference"] = ldm_metrics.phrase_fid(
                real, generated, reference_variant=True
            )
    if melodies is not None:
        generated_melodies = [
            ldm_metrics.melody_string(s.multitrack) for s in songs if s.multitrack is not None
        ]
        if generated_melodies:
            mem = ldm_metrics.memorisation_metrics(generated_melodies, melodies)
            out["melody_similarity"] = mem["avg_mem_rate"]
            out["t2r"] = mem["avg_top2_ratio"]
            out["memorisation_rate"] = 1.0 - mem["avg_new_sample_rate"]
    if generated:
        out["ssm_first_song"] = ssm_image(generated[0])
    return out


class Evaluator:
    """``evaluate(params, step)`` of the LDM task (see the module docstring).

    decoder: the PhraseVAE decoder (anything with ``decode(latents) -> list[str]``); None loads
    ``PhraseVAEModel.from_workdir(config.vae.workdir)`` at the first evaluation.
    """

    def __init__(self, config, ldm_cfg: ldm.PhraseLDMConfig, decoder=None):
        ec = config.eval
        self.config, self.ldm_cfg, self.eval_config = config, ldm_cfg, ec
        if decoder is None and ec.num_songs > 0 and not config.vae.workdir:
            raise ValueError("eval.num_songs > 0 needs vae.workdir (the PhraseVAE to decode with)")
        self._decoder = decoder
        self.settings = sampler_settings(ec)
        self.cond = eval_conditions(config, ldm_cfg) if ec.num_songs > 0 else None
        self.mesh = sharding.make_mesh(config.mesh)
        self.loss_batches = self._loss_batches()
        self.real = []
        if ec.num_songs > 0:
            self.real = reference_songs(config.data.latent_dir, ec.fid_split, ec.fid_num_songs)
        self.melodies = melody_reference(ec.songs_dir) if ec.songs_dir else None
        if self.melodies is None and ec.num_songs > 0:
            logger.warning("eval.songs_dir is empty: no melody memorisation metrics")
        self._loss = jax.jit(
            lambda params, batch, rng: diffusion_loss(
                params, ldm_cfg, batch, rng, train=False, mask_padding=config.train.mask_padding
            )
        )

    def _loss_batches(self) -> list[dict[str, np.ndarray]]:
        ec, dc = self.eval_config, self.config.data
        if ec.loss_batches == 0:
            return []
        it = ldm_pipeline.make_iterator(
            dc.latent_dir,
            dc.eval_split,
            reference_padding=dc.reference_padding,
            max_bars=self.ldm_cfg.dit.sample_size // SLOTS_PER_BAR,
            batch_size=ec.batch_size,
            seed=0,
            train=False,
            exclude_unfit_plans=bool(dc.exclude_unfit_plans and self.ldm_cfg.sec_control),
        )
        batches = []
        for batch in it:
            batches.append(batch)
            if ec.loss_batches > 0 and len(batches) == ec.loss_batches:
                break
        return batches

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = PhraseVAEModel.from_workdir(
                self.config.vae.workdir,
                self.config.vae.checkpoint,
                max_length=self.eval_config.max_decode_length,
                decode_batch_size=SONG_DECODE_BATCH,
            )
        return self._decoder

    def validation_loss(self, params) -> dict[str, float]:
        """Weighted mean of the loss metrics over the validation batches (fixed keys)."""
        if not self.loss_batches:
            return {}
        base = jax.random.PRNGKey(self.eval_config.seed)
        sums, total = {}, 0.0
        for i, batch in enumerate(self.loss_batches):
            _, metrics = self._loss(params, batch, jax.random.fold_in(base, i))
            weight = float(np.sum(batch["weight"]))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            total += weight
        out = {k: v / total for k, v in sums.items()}
        out["loss"] = out["mse_song"] if self.config.train.mask_padding else out["mse"]
        return out

    def generate(self, params, step: int) -> dict[str, Any]:
        ec = self.eval_config
        key = jax.random.PRNGKey(ec.seed)
        start = time.perf_counter()
        latent_sampler = sampler.cached_sampler(self.ldm_cfg, self.settings, self.mesh)
        latents = latent_sampler(params, key, self.cond)
        sampled = time.perf_counter()
        compile_seconds = latent_sampler.compile_seconds
        generated = song_lib.decode_songs(
            self.decoder, latents, reading=ec.get("reading", "tokens")
        )
        decoded = time.perf_counter()
        out = song_metrics(
            generated,
            latents,
            self.real,
            target_bars=int(ec.target_bars),
            bucket_size=self.ldm_cfg.length_bucket_size,
            melodies=self.melodies,
            reference_fid=bool(ec.reference_fid),
        )
        out["compile_seconds"] = compile_seconds  # 0 after the first evaluation
        out["sample_seconds"] = sampled - start - compile_seconds
        out["decode_seconds"] = decoded - sampled
        logger.info("step %d: generated bars %s", step, [s.n_bars for s in generated])
        return out

    def __call__(self, params, step: int) -> dict[str, Any]:
        out = self.validation_loss(params)
        if self.eval_config.num_songs > 0:
            out.update(self.generate(params, step))
        return out


# ------------------------------------------------------------------------------------------
# The task.


def make_ldm_task(config: ml_collections.ConfigDict, decoder=None) -> trainer.Task:
    """The LDM ``trainer.Task`` for a resolved config (``resolve_config``).

    decoder: see ``Evaluator``; evaluation is built only when ``train.eval_every`` > 0.
    """
    ldm_cfg = ldm_config(config)
    cond_dropout = float(config.train.cond_dropout)
    if not 0.0 <= cond_dropout < 1.0:
        raise ConfigError(f"train.cond_dropout must be in [0, 1), got {cond_dropout}")
    if cond_dropout > 0 and not (ldm_cfg.length_control or ldm_cfg.sec_control):
        raise ConfigError("train.cond_dropout > 0 needs a conditional model")

    def init_params(rng, example_batch):
        del example_batch  # the parameters do not depend on the song length
        return ldm.init_params(rng, ldm_cfg)

    def loss_fn(params, frozen, batch, rng, train):
        del frozen
        return diffusion_loss(
            params,
            ldm_cfg,
            batch,
            rng,
            train=train,
            cond_dropout=cond_dropout,
            mask_padding=bool(config.train.mask_padding),
        )

    evaluate: Callable | None = None
    if config.train.eval_every:
        evaluate = Evaluator(config, ldm_cfg, decoder)
    return trainer.Task(name="ldm", init_params=init_params, loss_fn=loss_fn, evaluate=evaluate)


def train(config: ml_collections.ConfigDict, workdir: str, decoder=None) -> trainer.TrainResult:
    """``trainer.run`` in ``workdir`` (resuming if it holds a checkpoint) after resolving the
    config against the latent dataset. decoder: see ``Evaluator`` (default: the PhraseVAE of
    ``config.vae.workdir``)."""
    trainer.maybe_initialize_distributed()  # before the task touches a jax backend
    resolve_config(config)
    task = make_ldm_task(config, decoder)
    return trainer.run(config, workdir, task, ldm_pipeline.make_train_iter(config))


# ------------------------------------------------------------------------------------------
# Scoring a trained checkpoint.


def evaluate_checkpoint(
    workdir: str,
    which: str = "best",
    decoder=None,
    compute_dtype: str | None = None,
    **eval_overrides,
) -> dict[str, Any]:
    """Runs the ``Evaluator`` of a training workdir's config (``eval.*`` replaced by
    ``eval_overrides``) on one of its checkpoints; returns the scalar metrics with timings.
    ``compute_dtype``: sample with the DiT's matmuls in this dtype (None: the config's)."""
    config = ml_collections.ConfigDict(checkpointing.read_workdir_config(workdir, "dit"))
    config.eval.update({k: v for k, v in eval_overrides.items() if v is not None})
    model = pretrained.load_ldm(workdir, which)
    ldm_cfg = ldm.with_compute_dtype(model.config, compute_dtype)
    started = time.perf_counter()
    metrics = Evaluator(config, ldm_cfg, decoder)(model.params, step=-1)
    metrics["eval_seconds"] = time.perf_counter() - started
    scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    return {
        "workdir": workdir,
        "which": which,
        "eval": config.eval.to_dict(),
        "compute_dtype": ldm_cfg.dit.dtype,
        **scalars,
    }

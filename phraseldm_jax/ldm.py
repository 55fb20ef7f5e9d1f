"""PhraseLDM: the DiT denoiser plus its length and section conditions.

Three variants, as the original: unconditional, length-conditioned (``length_control``) and
length-and-section-conditioned (``sec_control``). Conditioning semantics (SPEC section 5):
without length the global input is zeros [batch, 1, 128]; without sections the cross input is
zeros [batch, 7, dim] with no mask. Both zero inputs pass through bias-free projections, so the
DiT skips them exactly (see ``dit.DiT``).

Reference quirks kept behind switches (SPEC section 9): ``cross_bias_mode="additive"`` reproduces
the original's +1 logit bias for real sections with unmasked pads (use it for converted
weights), ``"mask"`` (default) masks pads. ``train_encoders=False`` freezes the length and
section encoders as the original did (it never trained them).

Conditions (``Conditions``) are the model's inputs besides the noisy latents. A *null*
condition, used for classifier-free guidance, condition dropout and songs without a plan,
replaces the length embedding and the section states by zeros, which is exactly what the
unconditional model sees (the DiT's projections of both are bias-free). Training and sampling
both call the model through ``predict_noise``.

Freezing has one rule: ``frozen_patterns`` (the optimiser's ``optim.freeze`` regexes) plus a
``stop_gradient`` on the states of frozen encoders here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phraseldm_jax import diffusion, sections
from phraseldm_jax.conditioning import (
    MAX_SECTIONS,
    NUM_LENGTH_BUCKETS,
    LengthEncoder,
    SectionEncoder,
)
from phraseldm_jax.dit import CROSS_BIAS_MODES, DiT, DiTConfig

# Values of the original's PhraseLDM constructor (config.json defaults).
REFERENCE_SCALE_FACTOR = 0.7590118646621704
REFERENCE_CLIP_RANGE = diffusion.REFERENCE_CLIP_RANGE

# optim.freeze regexes (``frozen_patterns``): the fixed random Fourier frequencies, and the
# encoders when ``train_encoders`` is False.
TIME_PROJ_FREEZE = r"^dit/time_proj/"
ENCODER_FREEZE = {"length_control": r"^length_encoder/", "sec_control": r"^sec_encoder/"}


@dataclasses.dataclass(frozen=True)
class PhraseLDMConfig:
    """PhraseLDM: DiT sizes, which conditions exist, and the reference's diffusion constants.

    ``dit`` may be given as a mapping or ConfigDict (``config.model.dit``) and is turned into
    a ``DiTConfig``. ``scale_factor`` divides VAE latents before diffusion; ``clip_range`` is the
    original's stored x0 clip value (it applied it in scaled space; SPEC section 9.2)."""

    dit: DiTConfig = DiTConfig()
    length_control: bool = False
    sec_control: bool = False
    length_bucket_size: int = 10
    num_length_buckets: int = NUM_LENGTH_BUCKETS
    max_sections: int = MAX_SECTIONS
    cross_bias_mode: str = "mask"  # "additive" = the original (converted weights)
    train_encoders: bool = True  # False: length/section encoders frozen, as the original
    scale_factor: float = REFERENCE_SCALE_FACTOR
    clip_range: float = REFERENCE_CLIP_RANGE
    diffusion_steps: int = 1000
    prediction_type: str = "epsilon"  # the reference; "v_prediction": the DiT outputs v

    def __post_init__(self):
        dit = self.dit.to_dict() if hasattr(self.dit, "to_dict") else self.dit  # ConfigDict
        if isinstance(dit, Mapping):
            object.__setattr__(self, "dit", DiTConfig(**dit))
        elif not isinstance(dit, DiTConfig):
            raise TypeError(f"PhraseLDMConfig.dit must be a DiTConfig or a mapping, got {dit!r}")
        if self.cross_bias_mode not in CROSS_BIAS_MODES:
            raise ValueError(
                f"PhraseLDMConfig.cross_bias_mode must be one of {CROSS_BIAS_MODES}, "
                f"got {self.cross_bias_mode!r}"
            )
        if self.prediction_type not in diffusion.PREDICTION_TYPES:
            raise ValueError(
                f"PhraseLDMConfig.prediction_type must be one of {diffusion.PREDICTION_TYPES}, "
                f"got {self.prediction_type!r}"
            )
        if self.length_bucket_size < 1:
            raise ValueError(f"length_bucket_size must be >= 1, got {self.length_bucket_size}")
        if self.diffusion_steps != diffusion.NUM_TRAIN_STEPS:
            raise ValueError(
                f"PhraseLDMConfig.diffusion_steps={self.diffusion_steps} differs from the "
                f"diffusion schedule's {diffusion.NUM_TRAIN_STEPS} steps (diffusion.py)"
            )


def frozen_patterns(config: PhraseLDMConfig) -> list[str]:
    """The ``optim.freeze`` regexes of ``config``: weights the optimiser must never change
    (no update, no weight decay, not in the clip norm). Always the Fourier frequencies (a
    constant of the reference); the encoders too when ``train_encoders`` is False."""
    patterns = [TIME_PROJ_FREEZE]
    if not config.train_encoders:
        patterns += [p for flag, p in ENCODER_FREEZE.items() if getattr(config, flag)]
    return patterns


class Conditions(NamedTuple):
    """Model conditions of a batch of songs (numpy or jax arrays; a pytree).

    n_bars: [batch] int32 bar counts (length condition; ignored by other models).
    type_ids, length_ids: [batch, 30] int32 section ids, 0 = pad (section condition).
    has_plan: [batch] int32, 0 = no plan: the section condition is null for that song.
    """

    n_bars: Any
    type_ids: Any
    length_ids: Any
    has_plan: Any

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.n_bars)[0])


def make_conditions(
    num_songs: int,
    n_bars: int | None = None,
    plan: str | sections.SectionPlan | None = None,
    vocab: sections.SectionVocab = sections.DEFAULT_SECTION_VOCAB,
) -> Conditions:
    """The same conditions for ``num_songs`` songs; a plan sets the bar count when n_bars is
    None. Bad plans raise ``SectionPlanError``."""
    type_ids = np.zeros((num_songs, MAX_SECTIONS), np.int32)
    length_ids = np.zeros((num_songs, MAX_SECTIONS), np.int32)
    has_plan = np.zeros((num_songs,), np.int32)
    if plan is not None:
        plan = sections.parse_plan(plan) if isinstance(plan, str) else plan
        types, lengths, _ = sections.plan_to_ids(plan, vocab)
        type_ids[:], length_ids[:], has_plan[:] = types, lengths, 1
        n_bars = plan.n_bars if n_bars is None else n_bars
    bars = np.full((num_songs,), 64 if n_bars is None else n_bars, np.int32)
    return Conditions(bars, type_ids, length_ids, has_plan)


def conditions_from_batch(batch: Mapping) -> Conditions:
    """``Conditions`` of an ``ldm_pipeline`` batch."""
    return Conditions(
        batch["n_bars"], batch["section_type_ids"], batch["section_length_ids"], batch["has_plan"]
    )


class PhraseLDM(nn.Module):
    """The denoiser with its conditions; call ``predict_noise`` (also ``__call__``).

    Parameters: ``dit``, plus ``length_encoder`` when ``length_control`` and ``sec_encoder``
    when ``sec_control`` (the same layout as the original checkpoints)."""

    config: PhraseLDMConfig

    def setup(self):
        cfg = self.config
        self.dit = DiT(cfg.dit, cross_bias_mode=cfg.cross_bias_mode)
        if cfg.length_control:
            self.length_encoder = LengthEncoder(
                features=cfg.dit.global_states_input_dim,
                num_buckets=cfg.num_length_buckets,
                bucket_size=cfg.length_bucket_size,
            )
        if cfg.sec_control:
            self.sec_encoder = SectionEncoder(
                features=cfg.dit.cross_attention_input_dim,
                max_sections=cfg.max_sections,
                dtype=cfg.dit.compute_dtype,
            )

    def predict_noise(
        self,
        x: jax.Array,
        t: jax.Array,
        n_bars: jax.Array | None = None,
        sections: tuple[jax.Array, jax.Array] | None = None,
        deterministic: bool = True,
        *,
        has_plan: jax.Array | None = None,
        null: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted noise for noisy latents.

        Args:
          x: [batch, length, 64] noisy (scaled) latents; length 512 for whole songs.
          t: [batch] int diffusion timesteps 0..999 (a scalar is broadcast).
          n_bars: [batch] int bars per song; required iff ``length_control``.
          sections: (type_ids, length_ids), each [batch, <= max_sections] int, 0 = pad;
            required iff ``sec_control``.
          deterministic: False enables the section encoder's dropout (rng ``"dropout"``).
          has_plan: [batch] int, 0 = a null section condition for that song (None: all 1).
          null: [batch] bool, True = null length and section conditions (classifier-free
            guidance's unconditional branch, condition dropout in training).
        Returns:
          [batch, length, 64] float32.
        """
        cfg = self.config
        global_states = context = context_mask = None
        if (n_bars is not None) != cfg.length_control:
            raise ValueError(
                "PhraseLDM: n_bars must be given exactly when the model is length-conditioned "
                f"(length_control={cfg.length_control}, n_bars given: {n_bars is not None})"
            )
        if (sections is not None) != cfg.sec_control:
            raise ValueError(
                "PhraseLDM: sections must be given exactly when the model is section-conditioned "
                f"(sec_control={cfg.sec_control}, sections given: {sections is not None})"
            )
        if cfg.length_control:
            global_states = self._maybe_frozen(self.length_encoder(n_bars))
            if null is not None:
                global_states = jnp.where(null[:, None, None], 0.0, global_states)
        if cfg.sec_control:
            type_ids, length_ids = sections
            context, context_mask = self.sec_encoder(type_ids, length_ids, deterministic)
            context = self._maybe_frozen(context)
            drop = None if has_plan is None else jnp.asarray(has_plan) == 0
            if null is not None:
                drop = null if drop is None else drop | null
            if drop is not None:
                # Zero states reach bias-free projections: the cross-attention adds exactly 0.
                context = jnp.where(drop[:, None, None], 0.0, context)
                context_mask = jnp.where(drop[:, None], 1.0, context_mask)
        return self.dit(x, t, global_states, context, context_mask)

    def __call__(
        self, x, t, n_bars=None, sections=None, deterministic=True, *, has_plan=None, null=None
    ):
        return self.predict_noise(
            x, t, n_bars, sections, deterministic, has_plan=has_plan, null=null
        )

    def _maybe_frozen(self, states: jax.Array) -> jax.Array:
        return states if self.config.train_encoders else jax.lax.stop_gradient(states)


def model_output(
    params: Any,
    config: PhraseLDMConfig,
    x: jax.Array,
    t: jax.Array,
    cond: Conditions,
    null: jax.Array | None = None,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """The DiT's output (the noise, or v for ``prediction_type`` "v_prediction") for ``cond``
    (the conditions the model takes; songs with ``has_plan == 0`` get a null section
    condition) and per-song ``null`` conditions: the one model call of training and sampling.
    ``deterministic=False`` needs ``dropout_rng``."""
    n_bars = cond.n_bars if config.length_control else None
    section_ids = (cond.type_ids, cond.length_ids) if config.sec_control else None
    has_plan = cond.has_plan if config.sec_control else None
    rngs = None if deterministic else {"dropout": dropout_rng}
    return PhraseLDM(config).apply(
        {"params": params},
        x,
        t,
        n_bars,
        section_ids,
        deterministic,
        has_plan=has_plan,
        null=null,
        rngs=rngs,
    )


def predict_noise(
    params: Any, config: PhraseLDMConfig, x: jax.Array, t: jax.Array, cond: Conditions, null=None,
    **kwargs,
) -> jax.Array:  # fmt: skip
    """The predicted noise of ``model_output`` (same arguments; converted from v for a
    v_prediction model), what every sampler steps with."""
    out = model_output(params, config, x, t, cond, null, **kwargs)
    if config.prediction_type == "v_prediction":
        out = diffusion.eps_from_v(x, out, jnp.broadcast_to(jnp.asarray(t), x.shape[:1]))
    return out


def example_inputs(config: PhraseLDMConfig, batch: int = 1, length: int | None = None) -> dict:
    """Valid dummy inputs (keyword arguments of ``predict_noise``) for init and shape checks."""
    length = config.dit.sample_size if length is None else length
    inputs: dict[str, Any] = {
        "x": jnp.zeros((batch, length, config.dit.in_channels), jnp.float32),
        "t": jnp.zeros((batch,), jnp.int32),
    }
    if config.length_control:
        inputs["n_bars"] = jnp.full((batch,), 64, jnp.int32)
    if config.sec_control:
        ids = jnp.zeros((batch, config.max_sections), jnp.int32).at[:, 0].set(1)
        inputs["sections"] = (ids, ids)
    return inputs


def init_params(rng: jax.Array, config: PhraseLDMConfig, length: int = 8) -> dict:
    """Fresh float32 parameters (the ``"params"`` collection) for ``config``."""
    return jax.jit(PhraseLDM(config).init)(rng, **example_inputs(config, 1, length))["params"]


def _path_names(path) -> list[str]:
    """The keys of a ``tree_map_with_path`` path, e.g. ["dit", "proj_in", "kernel"]."""
    return [getattr(p, "key", str(p)) for p in path]


# The DiT's matmul dtype at inference unless told otherwise (the public API's
# ``predict_noise``, sample.py): bfloat16 keeps the songs' PhraseFID (within 2% of float32's,
# against 8-15% between seeds) at about twice the speed on CPUs with AMX (docs/BENCHMARKS.md,
# "Defaults of the public API"). Training keeps the config's dtype.
INFERENCE_DIT_DTYPE = "bfloat16"


def with_compute_dtype(config: PhraseLDMConfig, compute_dtype: str | None) -> PhraseLDMConfig:
    """``config`` with the DiT's matmuls in ``compute_dtype`` (None: unchanged); the
    counterpart of ``decoding.with_compute_dtype``."""
    if compute_dtype is None or compute_dtype == config.dit.dtype:
        return config
    return dataclasses.replace(config, dit=dataclasses.replace(config.dit, dtype=compute_dtype))


def inference_params(params: Mapping, config: PhraseLDMConfig) -> dict:
    """``params`` with the DiT's matmul kernels stored in its compute dtype, for sampling.

    Every ``Dense`` casts its kernel to ``config.dit.dtype`` at each call; in a sampler that
    repeats the same casts at every step (a measurable share of a CPU step: docs/BENCHMARKS.md,
    dit_step). Casting once gives the same numbers (a cast of a cast is the same cast).
    Everything else (biases, norms, embeddings, encoders) is unchanged; float32 configs
    get ``params`` back as they are.
    """
    dtype = jnp.dtype(config.dit.dtype)
    if dtype == jnp.float32:
        return dict(params)

    def cast(path, leaf):
        names = _path_names(path)
        return leaf.astype(dtype) if names[0] == "dit" and names[-1] == "kernel" else leaf

    return jax.tree_util.tree_map_with_path(cast, dict(params))

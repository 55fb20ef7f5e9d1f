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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phraseldm_jax.conditioning import (
    MAX_SECTIONS,
    NUM_LENGTH_BUCKETS,
    LengthEncoder,
    SectionEncoder,
)
from phraseldm_jax.dit import CROSS_BIAS_MODES, DiT, DiTConfig

# Values of the original's PhraseLDM constructor (config.json defaults).
REFERENCE_SCALE_FACTOR = 0.7590118646621704
REFERENCE_CLIP_RANGE = 3.064450740814209
NO_SECTION_CONTEXT_LEN = 7  # the original's dummy cross input length (skipped here, exact)


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
        if self.length_bucket_size < 1:
            raise ValueError(f"length_bucket_size must be >= 1, got {self.length_bucket_size}")


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
    ) -> jax.Array:
        """Predicted noise for noisy latents.

        Args:
          x: [batch, length, 64] noisy (scaled) latents; length 512 for whole songs.
          t: [batch] int diffusion timesteps 0..999 (a scalar is broadcast).
          n_bars: [batch] int bars per song; required iff ``length_control``.
          sections: (type_ids, length_ids), each [batch, <= max_sections] int, 0 = pad;
            required iff ``sec_control``.
          deterministic: False enables the section encoder's dropout (rng ``"dropout"``).
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
        if cfg.sec_control:
            type_ids, length_ids = sections
            context, context_mask = self.sec_encoder(type_ids, length_ids, deterministic)
            context = self._maybe_frozen(context)
        return self.dit(x, t, global_states, context, context_mask)

    def __call__(self, x, t, n_bars=None, sections=None, deterministic: bool = True):
        return self.predict_noise(x, t, n_bars, sections, deterministic)

    def _maybe_frozen(self, states: jax.Array) -> jax.Array:
        return states if self.config.train_encoders else jax.lax.stop_gradient(states)


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


def trainable_mask(params: Mapping, config: PhraseLDMConfig) -> Any:
    """Pytree of bools like ``params``: False for weights that must never change.

    False for the fixed Fourier frequencies (``dit/time_proj/weight``; a constant of the
    reference, not trained there) and, when ``config.train_encoders`` is False, for the whole
    length and section encoders. Use it to mask both the update and the weight decay, e.g.
    ``optax.masked`` or ``optax.multi_transform``."""

    def is_trainable(path, _leaf) -> bool:
        names = _path_names(path)
        if names[:2] == ["dit", "time_proj"]:
            return False
        if names[0] in ("length_encoder", "sec_encoder"):
            return config.train_encoders
        return True

    return jax.tree_util.tree_map_with_path(is_trainable, dict(params))


def with_compute_dtype(config: PhraseLDMConfig, compute_dtype: str | None) -> PhraseLDMConfig:
    """``config`` with the DiT's matmuls in ``compute_dtype`` (None: unchanged); the
    counterpart of ``decoding.with_compute_dtype``."""
    if compute_dtype is None or compute_dtype == config.dit.dtype:
        return config
    return dataclasses.replace(config, dit=dataclasses.replace(config.dit, dtype=compute_dtype))


def inference_params(params: Mapping, config: PhraseLDMConfig) -> dict:
    """``params`` with the DiT's matmul kernels stored in its compute dtype, for sampling.

    Every ``Dense`` casts its kernel to ``config.dit.dtype`` at each call; in a sampler that
    repeats the same casts at every step (on CPU, bfloat16 at the paper's size: ~33 ms of a
    ~310 ms batch-4 step). Casting once gives the same numbers (a cast of a cast is the same
    cast). Everything else (biases, norms, embeddings, encoders) is unchanged; float32 configs
    get ``params`` back as they are.
    """
    dtype = jnp.dtype(config.dit.dtype)
    if dtype == jnp.float32:
        return dict(params)

    def cast(path, leaf):
        names = _path_names(path)
        return leaf.astype(dtype) if names[0] == "dit" and names[-1] == "kernel" else leaf

    return jax.tree_util.tree_map_with_path(cast, dict(params))

"""PhraseVAE: the T5 backbone with the three heads of the training stages (SPEC section 4).

- ``full_sequence`` (stage 1, span-infill pretraining): the decoder's memory is every encoder
  state, masked with the input mask.
- ``query`` (stage 2, query autoencoder): the memory is the encoder states at the
  ``n_query_tokens`` query positions (``[C0] [C1] [C2] [C3]`` at the start of the input).
- ``vae`` (stage 3): the query states, concatenated position-major ([B, 4 * d_model]), go through
  LayerNorm (eps 1e-5, affine) and Linear(4 * d_model -> 2 * latent_dim) to give the posterior
  mean and log-variance; z = mean (inference) or mean + eps * exp(logvar / 2) (training); the
  memory is Linear(latent_dim -> 4 * d_model)(z) reshaped to [B, 4, d_model], all visible.

The latent head (LayerNorm, proj, post_proj) always runs in float32, whatever the T5 dtype.
Sampling z draws from the ``"latent"`` rng stream; dropout from ``"dropout"``.

Packed rows (``PackedRows``): several phrases one after another in each encoder and decoder row,
each phrase seeing only itself (segment masks in ``t5.T5Stack``), its query states gathered at
its own offset; the same losses as one phrase per row, without the padding.

Losses are pure functions: ``cross_entropy_loss`` and ``kl_divergence``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from phraseldm_jax import t5 as t5_lib
from phraseldm_jax.vocab import IGNORE_LABEL

HEADS = ("full_sequence", "query", "vae")
# The head each training stage trains (SPEC section 4): span infill, query autoencoder, VAE.
STAGE_HEADS = {1: "full_sequence", 2: "query", 3: "vae"}


@dataclasses.dataclass(frozen=True)
class PhraseVAEConfig:
    """PhraseVAE sizes; fields match ``config.model`` (``t5`` may be given as a mapping).

    Attributes:
      t5: the backbone.
      head: "full_sequence" (stage 1), "query" (stage 2) or "vae" (stage 3).
      n_query_tokens: query positions at the start of the encoder input (heads query and vae).
      latent_dim: size of z (head vae).
    """

    t5: t5_lib.T5Config
    head: str
    n_query_tokens: int = 4
    latent_dim: int = 64

    def __post_init__(self):
        if not isinstance(self.t5, t5_lib.T5Config):
            if not hasattr(self.t5, "keys"):
                raise TypeError(
                    f"PhraseVAEConfig.t5 must be a T5Config or mapping, got {self.t5!r}"
                )
            object.__setattr__(self, "t5", t5_lib.T5Config(**{k: self.t5[k] for k in self.t5}))
        if self.head not in HEADS:
            raise ValueError(f"PhraseVAEConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.n_query_tokens < 1 or self.latent_dim < 1:
            raise ValueError(
                "PhraseVAEConfig: n_query_tokens and latent_dim must be >= 1, got "
                f"{self.n_query_tokens} and {self.latent_dim}"
            )

    @property
    def memory_width(self) -> int:
        """Size of the concatenated query states / post_proj output (2048 at the paper's size)."""
        return self.n_query_tokens * self.t5.d_model


class PackedRows(NamedTuple):
    """Where the phrases of packed rows are (built by ``input_pipeline.vae_pipeline``).

    Attributes:
      segment_ids: [rows, len] encoder tokens: 1, 2, ... the phrase's slot in its row + 1,
        0 padding; phrases are numbered from 1 without gaps.
      decoder_segment_ids: [rows, len] the same for the decoder input and labels.
      query_starts: [rows, slots] encoder offset of each slot's first query token (any value
        for an empty slot); slots = the most phrases a row may hold.
    """

    segment_ids: jax.Array
    decoder_segment_ids: jax.Array
    query_starts: jax.Array

    def slot_mask(self) -> jax.Array:
        """[rows, slots] bool: the slot holds a phrase."""
        slots = jnp.arange(1, self.query_starts.shape[1] + 1)
        return slots[None, :] <= jnp.max(self.segment_ids, axis=1, keepdims=True)


def _torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class PhraseVAE(nn.Module):
    """T5 (``t5``) plus, for head "vae", ``layer_norm``, ``proj`` and ``post_proj``."""

    config: PhraseVAEConfig

    def setup(self):
        c = self.config
        self.t5 = t5_lib.T5(c.t5)
        if c.head == "vae":
            width = c.memory_width
            self.layer_norm = nn.LayerNorm(
                epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False
            )
            self.proj = nn.Dense(
                2 * c.latent_dim,
                precision=jax.lax.Precision.HIGHEST,
                kernel_init=_torch_linear_init(width),
                bias_init=_torch_linear_init(width),
            )
            self.post_proj = nn.Dense(
                width,
                precision=jax.lax.Precision.HIGHEST,
                kernel_init=_torch_linear_init(c.latent_dim),
                bias_init=_torch_linear_init(c.latent_dim),
            )

    def _require_head(self, what: str, *heads: str) -> None:
        if self.config.head not in heads:
            raise ValueError(
                f"PhraseVAE.{what} needs head {' or '.join(heads)}, not {self.config.head!r}"
            )

    def _query_states(self, input_ids, attention_mask, deterministic) -> jax.Array:
        n = self.config.n_query_tokens
        if input_ids.shape[1] < n:
            raise ValueError(
                f"encoder input of length {input_ids.shape[1]} is shorter than the {n} query tokens"
            )
        return self.t5.encode(input_ids, attention_mask, deterministic)[:, :n]

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Posterior of head vae.

        Args:
          input_ids, attention_mask: [batch, len], inputs
            ``[C0] [C1] [C2] [C3] [BOS] phrase [EOS] [PAD]...``.
        Returns:
          mean, logvar: [batch, latent_dim] float32.
        """
        self._require_head("encode", "vae")
        states = self._query_states(input_ids, attention_mask, deterministic)
        return self._posterior(states.reshape(states.shape[0], -1))

    def _posterior(self, flat_queries: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[..., n_query_tokens * d_model] position-major query states -> mean, logvar."""
        stats = self.proj(self.layer_norm(flat_queries.astype(jnp.float32)))
        return stats[..., : self.config.latent_dim], stats[..., self.config.latent_dim :]

    def sample_latent(
        self, mean: jax.Array, logvar: jax.Array, noise: jax.Array | None = None
    ) -> jax.Array:
        """z = mean + eps * exp(logvar / 2), eps ~ N(0, I) from the "latent" rng stream, or
        ``noise`` [batch, latent_dim] when given (the same eps fed to another implementation)."""
        eps = noise
        if eps is None:
            eps = jax.random.normal(self.make_rng("latent"), mean.shape, jnp.float32)
        return mean + eps.astype(jnp.float32) * jnp.exp(0.5 * logvar)

    def latent_to_memory(self, z: jax.Array) -> jax.Array:
        """z: [batch, latent_dim] -> memory [batch, n_query_tokens, d_model] float32."""
        self._require_head("latent_to_memory", "vae")
        c = self.config
        if z.ndim != 2 or z.shape[-1] != c.latent_dim:
            raise ValueError(f"latents must be [batch, {c.latent_dim}], got shape {z.shape}")
        memory = self.post_proj(z.astype(jnp.float32))
        return memory.reshape(z.shape[0], c.n_query_tokens, c.t5.d_model)

    def encode_memory(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        deterministic: bool = True,
        sample_latent: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Decoder memory of any head.

        Returns:
          memory: [batch, mem_len, d_model] float32 (mem_len = len for full_sequence, else
            n_query_tokens).
          memory_mask: [batch, mem_len] int32 (the input mask for full_sequence, else ones).
        """
        head = self.config.head
        if head == "full_sequence":
            return self.t5.encode(input_ids, attention_mask, deterministic), attention_mask
        if head == "query":
            memory = self._query_states(input_ids, attention_mask, deterministic)
        else:
            mean, logvar = self.encode(input_ids, attention_mask, deterministic)
            z = self.sample_latent(mean, logvar) if sample_latent else mean
            memory = self.latent_to_memory(z)
        return memory, jnp.ones(memory.shape[:2], jnp.int32)

    def decode_logits(
        self,
        memory_or_latent: jax.Array,
        decoder_input_ids: jax.Array,
        memory_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits.

        Args:
          memory_or_latent: memory [batch, mem_len, d_model], or latents [batch, latent_dim]
            (head vae).
          decoder_input_ids: [batch, len], ``[BOS]`` + target[:-1].
          memory_mask: [batch, mem_len] or None (all visible).
        Returns:
          [batch, len, vocab] float32.
        """
        memory = memory_or_latent
        if memory.ndim == 2:
            memory = self.latent_to_memory(memory)
        return self.t5.decode(decoder_input_ids, memory, memory_mask, deterministic)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        deterministic: bool = True,
        sample_latent: bool | None = None,
        latent_noise: jax.Array | None = None,
        packing: PackedRows | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Training forward.

        Args:
          sample_latent: head vae, draw z from the posterior (default: ``not deterministic``; the
            original also samples in validation, pass True to reproduce that).
          latent_noise: head vae, [batch, latent_dim] eps of the sample instead of the
            ``"latent"`` rng stream (implies sampling); packed: [rows, slots, latent_dim].
          packing: the rows hold several phrases each (``PackedRows``).
        Returns:
          logits [batch, dec_len, vocab] float32, and (mean, logvar) for head vae, else None;
          packed: (mean, logvar) [rows, slots, latent_dim], empty slots included.
        """
        if sample_latent is None:
            sample_latent = latent_noise is not None or not deterministic
        if packing is not None:
            return self._packed_forward(
                input_ids, decoder_input_ids, packing, deterministic, sample_latent, latent_noise
            )
        if self.config.head != "vae":
            memory, memory_mask = self.encode_memory(input_ids, attention_mask, deterministic)
            return self.decode_logits(memory, decoder_input_ids, memory_mask, deterministic), None
        mean, logvar = self.encode(input_ids, attention_mask, deterministic)
        z = self.sample_latent(mean, logvar, latent_noise) if sample_latent else mean
        logits = self.decode_logits(
            self.latent_to_memory(z), decoder_input_ids, None, deterministic
        )
        return logits, (mean, logvar)

    def _packed_forward(
        self, input_ids, decoder_input_ids, packing, deterministic, sample_latent, latent_noise
    ):
        """``__call__`` on packed rows: each slot's memory is built from its own phrase."""
        c = self.config
        segments = packing.segment_ids
        states = self.t5.encode(input_ids, segments != 0, deterministic, segment_ids=segments)
        posterior = None
        if c.head == "full_sequence":
            memory, memory_segments = states, segments
        else:
            rows, slots = packing.query_starts.shape
            n = c.n_query_tokens
            offsets = packing.query_starts[:, :, None] + jnp.arange(n)
            queries = jnp.take_along_axis(
                states, offsets.reshape(rows, slots * n, 1), axis=1
            )  # [rows, slots * n, d_model], slot-major
            memory = queries
            if c.head == "vae":
                mean, logvar = self._posterior(queries.reshape(rows, slots, n * c.t5.d_model))
                z = mean
                if sample_latent:
                    z = self.sample_latent(mean, logvar, latent_noise)
                memory = self.latent_to_memory(z.reshape(rows * slots, c.latent_dim))
                memory = memory.reshape(rows, slots * n, c.t5.d_model)
                posterior = (mean, logvar)
            slot_ids = jnp.where(packing.slot_mask(), jnp.arange(1, slots + 1), 0)
            memory_segments = jnp.repeat(slot_ids, n, axis=1)
        logits = self.t5.decode(
            decoder_input_ids,
            memory,
            memory_segments,
            deterministic,
            segment_ids=packing.decoder_segment_ids,
        )
        return logits, posterior


def init_params(rng: jax.Array, config: PhraseVAEConfig) -> dict[str, Any]:
    """Fresh parameters (HF T5 init for the backbone, PyTorch defaults for the latent head);
    ``(rng, config)`` as ``ldm.init_params``."""
    length = config.n_query_tokens + 2
    ids = jnp.full((1, length), 5, jnp.int32)
    mask = jnp.ones((1, length), jnp.int32)
    return jax.jit(PhraseVAE(config).init)(rng, ids, mask, ids[:, :2])["params"]


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Token-mean cross-entropy over the whole batch, skipping labels == -100 (float32 scalar).

    Args:
      logits: [batch, len, vocab]; labels: [batch, len] int.
    """
    valid = labels != IGNORE_LABEL
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)
    total = -jnp.sum(jnp.where(valid, picked[..., 0], 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1)


def kl_divergence(
    mean: jax.Array, logvar: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Per-dimension KL(q(z|x) || N(0, I)) as the reference: the KL summed over the latent dims,
    averaged over the batch, divided by latent_dim (float32 scalar; weight 0.01 is the caller's).

    Args:
      mean, logvar: [..., latent_dim].
      weights: [...] 1 for a phrase, 0 for an empty slot of packed rows (None: all phrases).
    """
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    per_sample = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)
    if weights is None:
        return jnp.mean(per_sample) / mean.shape[-1]
    weights = weights.astype(jnp.float32)
    total = jnp.sum(jnp.where(weights > 0, weights * per_sample, 0.0))
    return total / jnp.maximum(jnp.sum(weights), 1.0) / mean.shape[-1]

"""The PhraseLDM denoiser: a StableAudio-style DiT in flax.linen.

Semantics follow diffusers' ``StableAudioDiTModel`` as the original PhraseLDM calls it
(SPEC section 5): Gaussian Fourier time features (cos first) -> MLP, added to the projected
global (length) vector, which is prepended to the sequence as one extra token; rotary
position embedding on the first half of every self-attention head; pre-norm blocks of
self-attention, grouped-query cross-attention and a SwiGLU feed-forward; 1x1 convolutions with
residuals around the whole stack.

Arrays are channels-last, ``x: [batch, length, in_channels]`` (diffusers is channels-first;
``convert/ldm_weights.py`` maps the weights). Parameters are float32; matmuls run in
``config.dtype``; layer norms, softmax, rotary and the Fourier features run in float32; the
residual stream and the output are float32. ``config.remat`` wraps every block in
``nn.remat`` (activations recomputed for the gradient; same numbers and parameter names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phraseldm_jax import layers

CROSS_BIAS_MODES = ("additive", "mask")
# DiTConfig fields that say how to run the model, not what it is (not in the original's config).
RUNTIME_FIELDS = ("dtype", "remat")

# torch.nn.Linear / Conv1d default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so models
# trained here start like the original.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch.nn.Linear's bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """DiT sizes, named as diffusers' ``StableAudioDiTModel`` arguments (the original's
    ``model_config``), plus the compute ``dtype``. Defaults are the paper's unconditional and
    length-conditioned model; section conditioning uses 256 for both cross-attention widths."""

    sample_size: int = 512  # kept for the checkpoint config; any length runs
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 6
    attention_head_dim: int = 32
    num_attention_heads: int = 16
    num_key_value_attention_heads: int = 8
    cross_attention_dim: int = 128
    time_proj_dim: int = 128
    global_states_input_dim: int = 128
    cross_attention_input_dim: int = 128
    dtype: str = "float32"  # compute dtype of the matmuls; parameters stay float32
    remat: bool = False  # recompute each block's activations for the gradient (less memory)

    def __post_init__(self):
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"DiTConfig.dtype: unknown dtype {self.dtype!r}") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"DiTConfig.dtype must be a float dtype, got {dtype.name}")
        object.__setattr__(self, "dtype", dtype.name)
        if self.num_attention_heads % self.num_key_value_attention_heads:
            raise ValueError(
                f"DiTConfig: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_attention_heads={self.num_key_value_attention_heads}"
            )
        if self.attention_head_dim % 4:
            raise ValueError(
                "DiTConfig: attention_head_dim must be a multiple of 4 (rotary runs on half "
                f"of each head, in pairs), got {self.attention_head_dim}"
            )
        if self.time_proj_dim % 2:
            raise ValueError(f"DiTConfig: time_proj_dim must be even, got {self.time_proj_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any], **overrides) -> DiTConfig:
        """Builds the config from the original's ``model_config`` dict (config.json).

        Keys starting with ``_`` (diffusers bookkeeping) are ignored; any other unknown key
        is an error, so that a checkpoint with a different architecture is not silently
        misread."""
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
        unknown = sorted(k for k in model_config if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"model_config: unknown DiT arguments {unknown}")
        kwargs = {k: v for k, v in model_config.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_model_config(self) -> dict[str, int]:
        """The ``model_config`` dict of the original's config.json (no ``RUNTIME_FIELDS``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}


# --------------------------------------------------------------------------------------------
# Pure functions: time features, rotary embedding, attention.


def fourier_time_features(t: jax.Array, weight: jax.Array) -> jax.Array:
    """Gaussian Fourier features of the raw timestep, cos first.

    Args:
      t: [batch] timesteps (integers or floats; not log-transformed).
      weight: [time_proj_dim // 2] fixed random frequencies.
    Returns:
      [batch, time_proj_dim] float32 ``[cos(2 pi t w), sin(2 pi t w)]``.
    """
    t = jnp.asarray(t, jnp.float32)
    # Same float32 operation order as the reference: (2 pi * t) first, then times w.
    angle = (np.float32(2.0 * np.pi) * t)[:, None] * weight.astype(jnp.float32)[None, :]
    return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def rotary_tables(length: int, rot_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    """cos and sin tables of the non-interleaved rotary embedding over ``length`` positions.

    Frequencies ``theta ** (-2i / rot_dim)`` for ``i < rot_dim / 2``, each table repeated
    twice along the channels (diffusers ``use_real=True, repeat_interleave_real=False``).
    Returns two [length, rot_dim] float32 arrays (static: computed once at trace time).
    """
    exponents = np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponents)
    angle = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angle = angle.astype(np.float32)
    cos = np.cos(angle.astype(np.float64)).astype(np.float32)
    sin = np.sin(angle.astype(np.float64)).astype(np.float32)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def apply_partial_rotary(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """Rotates the first ``rot_dim`` channels of every head; the rest pass through.

    Within the rotated part the two halves are the (real, imaginary) pair:
    ``out = x * cos + [-x2, x1] * sin``, computed in float32.

    Args:
      x: [..., head_dim], e.g. [batch, heads, length, head_dim].
      cos, sin: from ``rotary_tables``, shaped to broadcast against ``x[..., :rot_dim]``
        ([length, rot_dim] for the layout above, [length, 1, rot_dim] for [batch, length,
        heads, head_dim]).
    Returns:
      x's shape and dtype.
    """
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim].astype(jnp.float32), x[..., rot_dim:]
    first, second = jnp.split(rotated, 2, axis=-1)
    turned = jnp.concatenate([-second, first], axis=-1)
    rotated = (rotated * jnp.asarray(cos) + turned * jnp.asarray(sin)).astype(x.dtype)
    return jnp.concatenate([rotated, passed], axis=-1)


# On CPU, self-attention runs a few heads at a time, each step's logits about this many
# elements, so that logits, exp and sums stay in cache instead of making one pass over
# [batch, heads, length, length] in memory (measured: docs/BENCHMARKS.md, dit_step).
_CPU_LOGITS_PER_CHUNK = 1 << 20


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q, k, v: [..., length, head_dim]; float32 softmax,
    normalised after the value product (one pass less over the logits)."""
    q = q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
    logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits)
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum(
        "...ts,...sh->...th", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype)


def _query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunks: int) -> jax.Array:
    """``_softmax_attention`` of q [batch, length, head_dim] against all of k, v, computed for
    ``chunks`` equal blocks of queries in turn (queries are independent; the last block is
    zero-padded and its padding cut off)."""
    batch, length, head_dim = q.shape
    size = -(-length // chunks)
    padded = jnp.pad(q, ((0, 0), (0, chunks * size - length), (0, 0)))
    blocks = padded.reshape(batch, chunks, size, head_dim).swapaxes(0, 1)
    out = jax.lax.map(lambda block: _softmax_attention(block, k, v), blocks)
    return out.swapaxes(0, 1).reshape(batch, chunks * size, -1)[:, :length]


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any = None) -> jax.Array:
    """Unmasked multi-head attention; q, k, v and the output: [batch, length, heads, head_dim].

    ``dtype``: the matmul operand dtype on accelerators (``jax.nn.dot_product_attention``,
    fused kernels where the platform has them; None keeps q's). On CPU attention runs in
    float32 whatever ``dtype`` (XLA:CPU's batched bfloat16 dots are slower than float32 ones),
    a few heads at a time (each step's logits about ``_CPU_LOGITS_PER_CHUNK`` elements, in
    cache), scanning over heads rather than the batch so that a batch sharded over devices
    stays sharded; when one head's logits are still more than twice that (large batches), its
    queries are split into blocks too, to keep them in cache (docs/BENCHMARKS.md). The
    heads-first layout this needs is made by one transpose each way, in float32.
    """
    if jax.default_backend() != "cpu":
        dtype = q.dtype if dtype is None else dtype
        return jax.nn.dot_product_attention(*(a.astype(dtype) for a in (q, k, v)))
    batch, length, heads, _ = q.shape
    head_logits = batch * length * k.shape[1]
    group = max(1, _CPU_LOGITS_PER_CHUNK // head_logits)
    heads_first = lambda a: jnp.transpose(a.astype(jnp.float32), (2, 0, 1, 3))  # noqa: E731
    q, k, v = heads_first(q), heads_first(k), heads_first(v)  # [heads, batch, length, head_dim]
    query_chunks = -(-head_logits // _CPU_LOGITS_PER_CHUNK)
    if group >= heads:
        out = _softmax_attention(q, k, v)
    elif query_chunks > 2:
        out = jax.lax.map(
            lambda qkv: _query_chunked_attention(*qkv, chunks=query_chunks), (q, k, v)
        )
    else:
        out = jax.lax.map(lambda qkv: _softmax_attention(*qkv), (q, k, v), batch_size=group)
    return jnp.transpose(out, (1, 2, 0, 3))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_bias: jax.Array | None = None,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped key/value heads.

    Query head ``n`` reads key/value head ``n // (heads // kv_heads)`` (so kv head j serves
    query heads 2j and 2j+1 when there are twice as many query heads), as torch's
    ``repeat_interleave``. Logits and softmax are float32.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim].
      key_bias: optional [batch, kv_len] float added to the scaled logits of every query.
      key_mask: optional [batch, kv_len] bool; False keys are excluded.
    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    bias = None if key_bias is None else key_bias.astype(jnp.float32)[:, None, None, :]
    mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


# --------------------------------------------------------------------------------------------
# Modules. Activations between modules are float32; every matmul casts its input and kernel
# to the compute dtype and accumulates in float32 (on CPU a bf16 x bf16 -> bf16 dot is slow).


class Dense(nn.Module):
    """Linear layer: kernel [in, out] (torch weight transposed), optional bias; float32 out."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", torch_linear_init, (x.shape[-1], self.features))
        y = layers.dense(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(x.shape[-1]), (self.features,))
        return y


def _layer_norm(name: str) -> nn.LayerNorm:
    """LayerNorm with eps 1e-5, computed in float32 whatever the compute dtype."""
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features of the timestep (``time_proj``).

    The frequencies are a parameter only so that they are checkpointed and converted; they
    never receive gradients (stop_gradient) and must be excluded from weight decay
    (``ldm.frozen_patterns``, the optimiser's freeze list)."""

    num_frequencies: int

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.normal(1.0), (self.num_frequencies,))
        return fourier_time_features(t, jax.lax.stop_gradient(weight))


class MLP2(nn.Module):
    """Linear -> SiLU -> Linear (``timestep_proj``, ``global_proj``, ``cross_attention_proj``)."""

    hidden: int
    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.hidden, self.use_bias, self.dtype, name="dense_in")(x)
        return Dense(self.features, self.use_bias, self.dtype, name="dense_out")(nn.silu(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v projection and partial rotary, no biases."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rotary: tuple[np.ndarray, np.ndarray]) -> jax.Array:
        """x: [batch, length, dim] -> [batch, length, dim] float32."""
        batch, length, dim = x.shape
        inner = self.num_heads * self.head_dim
        qkv = Dense(3 * inner, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim)
        cos, sin = (table[:, None, :] for table in rotary)  # broadcast over heads

        q = apply_partial_rotary(qkv[:, :, 0], cos, sin)
        k = apply_partial_rotary(qkv[:, :, 1], cos, sin)
        out = self_attention(q, k, qkv[:, :, 2], self.dtype)
        return Dense(dim, dtype=self.dtype, name="out")(out.reshape(batch, length, inner))


class CrossAttention(nn.Module):
    """Grouped-query cross-attention (no rotary, no biases) with a fused k/v projection.

    ``bias_mode`` decides what ``context_mask`` does: ``"additive"`` adds it (1 real, 0 pad)
    to the scaled logits, exactly as the original's float mask does in PyTorch (pads are not
    masked, real keys get +1); ``"mask"`` excludes keys where it is 0."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias_mode: str = "mask"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None
    ) -> jax.Array:
        """x: [batch, length, dim]; context: [batch, ctx_len, ctx_dim]; context_mask:
        [batch, ctx_len] or None. Returns [batch, length, dim] float32."""
        batch, length, dim = x.shape
        ctx_len = context.shape[1]
        inner = self.num_heads * self.head_dim
        kv_inner = self.num_kv_heads * self.head_dim
        q = Dense(inner, dtype=self.dtype, name="query")(x).astype(self.dtype)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        kv = Dense(2 * kv_inner, dtype=self.dtype, name="key_value")(context).astype(self.dtype)
        kv = kv.reshape(batch, ctx_len, 2, self.num_kv_heads, self.head_dim)
        key_bias = key_mask = None
        if context_mask is not None:
            if self.bias_mode == "additive":
                key_bias = context_mask
            else:
                key_mask = context_mask > 0
        out = attention(q, kv[:, :, 0], kv[:, :, 1], key_bias=key_bias, key_mask=key_mask)
        return Dense(dim, dtype=self.dtype, name="out")(out.reshape(batch, length, inner))


class SwiGLU(nn.Module):
    """Linear(dim -> 2 * hidden) split into (value, gate), value * silu(gate), Linear back."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(Dense(2 * self.hidden, True, self.dtype, name="proj_in")(x), 2, -1)
        return Dense(x.shape[-1], True, self.dtype, name="proj_out")(value * nn.silu(gate))


class DiTBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention, SwiGLU, each with a residual.

    When ``context`` is None the cross-attention is skipped: the reference then feeds all-zero
    context states through bias-free projections, so its cross-attention adds exactly 0."""

    config: DiTConfig
    cross_bias_mode: str = "mask"

    @nn.compact
    def __call__(self, h, rotary, context=None, context_mask=None):
        """h: [batch, length, inner_dim] float32 -> same."""
        cfg, dtype = self.config, self.config.compute_dtype
        attn = SelfAttention(cfg.num_attention_heads, cfg.attention_head_dim, dtype, name="attn1")
        h = h + attn(_layer_norm("norm1")(h), rotary)
        cross = CrossAttention(
            cfg.num_attention_heads,
            cfg.num_key_value_attention_heads,
            cfg.attention_head_dim,
            self.cross_bias_mode,
            dtype,
            name="attn2",
        )
        norm2 = _layer_norm("norm2")
        if context is None and self.is_initializing():
            context = jnp.zeros((h.shape[0], 1, cfg.cross_attention_dim), jnp.float32)
        if context is not None:
            h = h + cross(norm2(h), context, context_mask)
        return h + SwiGLU(4 * cfg.inner_dim, dtype, name="ff")(_layer_norm("norm3")(h))


class DiT(nn.Module):
    """StableAudio-style DiT noise predictor.

    Attributes:
      config: sizes and compute dtype.
      cross_bias_mode: ``"additive"`` (the original: the section mask is added to the
        cross-attention logits; use with converted weights) or ``"mask"`` (pads excluded).
    """

    config: DiTConfig
    cross_bias_mode: str = "mask"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        global_states: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the noise.

        Args:
          x: [batch, length, in_channels] noisy latents.
          t: [batch] (or scalar) diffusion timesteps, raw integers 0..999.
          global_states: [batch, 1, global_states_input_dim] (the length embedding), or None
            for all zeros (bias-free projection: contributes exactly 0).
          context: [batch, ctx_len, cross_attention_input_dim] (section states), or None
            for all zeros (the cross-attention then adds exactly 0 and is skipped).
          context_mask: [batch, ctx_len], 1 real / 0 pad, or None.
        Returns:
          [batch, length, out_channels] float32.
        """
        cfg, dtype = self.config, self.config.compute_dtype
        if self.cross_bias_mode not in CROSS_BIAS_MODES:
            raise ValueError(
                f"DiT: cross_bias_mode must be one of {CROSS_BIAS_MODES}, "
                f"got {self.cross_bias_mode!r}"
            )
        batch, length, channels = x.shape
        if channels != cfg.in_channels:
            raise ValueError(f"DiT: x has {channels} channels, config says {cfg.in_channels}")
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        inner = cfg.inner_dim

        # Global token: time features (+ projected length embedding).
        time_features = GaussianFourierProjection(cfg.time_proj_dim // 2, name="time_proj")(t)
        global_vec = MLP2(inner, inner, True, dtype, name="timestep_proj")(time_features)
        global_vec = global_vec[:, None, :]
        global_proj = MLP2(inner, inner, False, dtype, name="global_proj")
        if global_states is None and self.is_initializing():
            global_states = jnp.zeros((batch, 1, cfg.global_states_input_dim), jnp.float32)
        if global_states is not None:
            if global_states.shape != (batch, 1, cfg.global_states_input_dim):
                raise ValueError(
                    f"DiT: global_states must be [{batch}, 1, {cfg.global_states_input_dim}], "
                    f"got {list(global_states.shape)}"
                )
            global_vec = global_vec + global_proj(global_states.astype(jnp.float32))

        cross_proj = MLP2(
            cfg.cross_attention_dim,
            cfg.cross_attention_dim,
            False,
            dtype,
            name="cross_attention_proj",
        )
        if context is None and self.is_initializing():
            context = jnp.zeros((batch, 1, cfg.cross_attention_input_dim), jnp.float32)
        if context is not None:
            if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_input_dim:
                raise ValueError(
                    f"DiT: context must be [batch, ctx_len, {cfg.cross_attention_input_dim}], "
                    f"got {list(context.shape)}"
                )
            context = cross_proj(context.astype(jnp.float32))
        elif context_mask is not None:
            raise ValueError("DiT: context_mask given without context")

        # 1x1 convolution with residual, then the input projection (channels-last: a matmul).
        x = x.astype(jnp.float32)
        h = Dense(channels, dtype=dtype, name="preprocess_conv")(x) + x
        h = Dense(inner, dtype=dtype, name="proj_in")(h)
        h = jnp.concatenate([global_vec, h], axis=1)  # [batch, length + 1, inner]

        rotary = rotary_tables(length + 1, cfg.attention_head_dim // 2)
        block_cls = nn.remat(DiTBlock) if cfg.remat else DiTBlock
        for i in range(cfg.num_layers):
            block = block_cls(cfg, self.cross_bias_mode, name=f"transformer_blocks_{i}")
            h = block(h, rotary, context, context_mask)

        out = Dense(cfg.out_channels, dtype=dtype, name="proj_out")(h)[:, 1:]  # drop global
        return Dense(cfg.out_channels, dtype=dtype, name="postprocess_conv")(out) + out

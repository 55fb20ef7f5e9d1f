"""T5 encoder-decoder in flax.linen, with Hugging Face ``T5ForConditionalGeneration`` semantics.

This is the backbone of PhraseVAE (SPEC section 4). Loading converted PyTorch weights must give
the reference's numbers, so every detail follows the Hugging Face model:

- relative position bias (bucketed, bidirectional in the encoder, causal in the decoder),
  computed once per stack from the table owned by layer 0 and added in every layer's
  self-attention; cross-attention has no position bias;
- T5 RMS layer norm (no mean subtraction, no bias), pre-norm residual blocks;
- ReLU feed-forward without biases; attention without 1/sqrt(d_kv) scaling, inner width
  ``num_heads * d_kv`` independent of ``d_model``;
- dropout after the embedding, on attention weights, inside the feed-forward, on every residual
  branch and after the final norm (off when ``deterministic``);
- tied input/output embedding, decoder output multiplied by ``d_model ** -0.5`` before it.

Mixed precision: ``T5Config.dtype`` is the compute dtype of the matrix multiplications;
parameters, the residual stream, norms, softmax and logits stay float32. In float32 the matrix
multiplications ask for full precision (``Precision.HIGHEST``), so GPUs do not silently use
TF32 and converted checkpoints reproduce the reference within float32 round-off.

This module is the teacher-forced (uncached) model used for training and as the definition of
the decoder; greedy inference runs ``decoding.decode_step``, a cached step over the same weights
written for speed, which tests/test_decoding.py checks against ``T5.decode`` at every position.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from phraseldm_jax import layers

# The (keys, values) of one attention layer, each [batch, num_heads, length, d_kv]: heads-major,
# so that the attention matmuls read them as they are stored (``decoding`` caches them so too).
KeyValue = tuple[jax.Array, jax.Array]

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of the T5 backbone; field names match ``config.model.t5`` and HF's ``T5Config``.

    ``dtype`` is the compute dtype ("float32", "bfloat16" or "float16"); parameters are float32.
    ``remat``: every block is rematerialised (``nn.remat``): its activations are recomputed
    for the gradient instead of kept, trading about one more forward pass for memory; the
    numbers (and parameter names) are the same either way.
    """

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int = 1000
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        for name in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 1 or self.relative_attention_num_buckets < 4:
            raise ValueError(
                "T5Config: vocab_size must be >= 1 and relative_attention_num_buckets >= 4, got "
                f"{self.vocab_size} and {self.relative_attention_num_buckets}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"T5Config.dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")

    @property
    def inner_dim(self) -> int:
        """Attention width ``num_heads * d_kv`` (384 at the paper's size, not d_model)."""
        return self.num_heads * self.d_kv

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def precision(self) -> jax.lax.Precision:
        """Matmul precision: full float32 unless a lower compute dtype was asked for."""
        if self.dtype == "float32":
            return jax.lax.Precision.HIGHEST
        return jax.lax.Precision.DEFAULT


# The paper's PhraseVAE backbone (SPEC section 4).
PAPER_T5 = T5Config(
    d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=3, num_decoder_layers=3
)


def relative_position_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """Bucket ids of relative positions ``key_position - query_position``.

    Half of the buckets (per direction when bidirectional) hold exact distances; the rest are
    logarithmically wider up to ``max_distance``, beyond which everything shares the last bucket.
    The causal variant maps every key after the query (positive offsets) to bucket 0. The
    logarithm is taken in float32 and truncated, exactly as the reference, so the bucket edges
    agree with it.

    Args:
      relative_position: int array of any shape.
    Returns:
      int32 array of the same shape, values in ``[0, num_buckets)``.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # max(distance, 1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    log_bucket = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + log_bucket.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


def attention_weights(
    query: jax.Array,
    key: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> jax.Array:
    """Softmax attention weights in float32, T5 style (no 1/sqrt(d_kv) scaling).

    Args:
      query: [batch, heads, q_len, d_kv] in the compute dtype.
      key: [batch, heads, k_len, d_kv].
      bias: float32, broadcastable to [batch, heads, q_len, k_len] (relative position bias).
      mask: bool, broadcastable to [batch, heads, q_len, k_len]; True where attention is allowed.
    Returns:
      [batch, heads, q_len, k_len] float32.
    """
    scores = jnp.einsum(
        "bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32, precision=precision
    )
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class T5LayerNorm(nn.Module):
    """RMS norm: ``scale * x / sqrt(mean(x^2) + eps)``, computed and returned in float32."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return scale * (x * jax.lax.rsqrt(variance + self.epsilon))


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head); params ``embedding`` [num_buckets, num_heads]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions: [q_len], key_positions: [k_len] -> [1, heads, q_len, k_len] float32."""
        c = self.config
        table = self.param(
            "embedding",
            _normal(c.d_model**-0.5),
            (c.relative_attention_num_buckets, c.num_heads),
            jnp.float32,
        )
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None],
            bidirectional=self.bidirectional,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )
        values = jnp.take(table, buckets, axis=0)  # [q_len, k_len, heads]
        return jnp.transpose(values, (2, 0, 1))[None]


class T5Attention(nn.Module):
    """Multi-head attention without biases or scaling.

    Params: q, k, v kernels [d_model, inner], o kernel [inner, d_model].

    Keys/values are projected separately (``key_value``): cross-attention projects the memory,
    not ``x``.
    """

    config: T5Config

    def setup(self):
        c = self.config
        dense = dict(use_bias=False, dtype=c.compute_dtype, precision=c.precision)
        # Hugging Face's T5 initialisation (matters when training from scratch, stage 1).
        self.q = layers.Dense(
            c.inner_dim, kernel_init=_normal((c.d_model * c.d_kv) ** -0.5), **dense
        )
        self.k = layers.Dense(c.inner_dim, kernel_init=_normal(c.d_model**-0.5), **dense)
        self.v = layers.Dense(c.inner_dim, kernel_init=_normal(c.d_model**-0.5), **dense)
        self.o = layers.Dense(c.d_model, kernel_init=_normal(c.inner_dim**-0.5), **dense)
        self.dropout = layers.Dropout(c.dropout_rate)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        """[batch, len, heads * d_kv] -> [batch, heads, len, d_kv]."""
        x = x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)
        return jnp.swapaxes(x, 1, 2)

    def key_value(self, x: jax.Array) -> KeyValue:
        """x: [batch, k_len, d_model] -> keys, values [batch, heads, k_len, d_kv]."""
        return self._split_heads(self.k(x)), self._split_heads(self.v(x))

    def __call__(
        self,
        x: jax.Array,
        key_value: KeyValue,
        bias: jax.Array | None,
        mask: jax.Array | None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x: [batch, q_len, d_model] (normed) -> [batch, q_len, d_model] in the compute dtype."""
        keys, values = key_value
        precision = self.config.precision
        weights = attention_weights(self._split_heads(self.q(x)), keys, bias, mask, precision)
        weights = self.dropout(weights, deterministic=deterministic)
        out = jnp.einsum(
            "bhqk,bhkd->bqhd", weights.astype(values.dtype), values, precision=precision
        )
        return self.o(out.reshape(*out.shape[:2], self.config.inner_dim))


class T5FeedForward(nn.Module):
    """ReLU MLP without biases; params wi [d_model, d_ff], wo [d_ff, d_model]."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        dense = dict(use_bias=False, dtype=c.compute_dtype, precision=c.precision)
        h = layers.Dense(c.d_ff, kernel_init=_normal(c.d_model**-0.5), name="wi", **dense)(x)
        h = layers.Dropout(c.dropout_rate)(nn.relu(h), deterministic=deterministic)
        return layers.Dense(c.d_model, kernel_init=_normal(c.d_ff**-0.5), name="wo", **dense)(h)


class T5Block(nn.Module):
    """One pre-norm layer: self-attention, cross-attention (decoder only), feed-forward."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        c = self.config
        self.self_attention_norm = T5LayerNorm(c.layer_norm_epsilon)
        self.self_attention = T5Attention(c)
        if self.is_decoder:
            self.cross_attention_norm = T5LayerNorm(c.layer_norm_epsilon)
            self.cross_attention = T5Attention(c)
        self.mlp_norm = T5LayerNorm(c.layer_norm_epsilon)
        self.mlp = T5FeedForward(c)
        self.dropout = layers.Dropout(c.dropout_rate)

    def cross_key_value(self, memory: jax.Array) -> KeyValue:
        """memory: [batch, mem_len, d_model] -> cross-attention (keys, values), each
        [batch, heads, mem_len, d_kv]."""
        return self.cross_attention.key_value(memory.astype(self.config.compute_dtype))

    def __call__(
        self,
        h: jax.Array,
        self_bias: jax.Array,
        self_mask: jax.Array | None,
        cross_kv: KeyValue | None = None,
        cross_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """h: [batch, len, d_model] float32 residual stream -> new h."""
        dtype = self.config.compute_dtype
        x = self.self_attention_norm(h).astype(dtype)
        kv = self.self_attention.key_value(x)
        attended = self.self_attention(x, kv, self_bias, self_mask, deterministic)
        h = h + self.dropout(attended, deterministic=deterministic)
        if self.is_decoder:
            x = self.cross_attention_norm(h).astype(dtype)
            attended = self.cross_attention(x, cross_kv, None, cross_mask, deterministic)
            h = h + self.dropout(attended, deterministic=deterministic)
        x = self.mlp_norm(h).astype(dtype)
        return h + self.dropout(self.mlp(x, deterministic), deterministic=deterministic)


class T5Stack(nn.Module):
    """Encoder or decoder stack: bias table of layer 0, blocks ``blocks_i``, final norm."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        c = self.config
        num_layers = c.num_decoder_layers if self.is_decoder else c.num_layers
        self.relative_position_bias = RelativePositionBias(c, bidirectional=not self.is_decoder)
        # Argument 6 of T5Block.__call__ (counting self) is the Python bool ``deterministic``.
        block = nn.remat(T5Block, static_argnums=(6,)) if c.remat else T5Block
        self.blocks = [block(c, self.is_decoder) for _ in range(num_layers)]
        self.final_layer_norm = T5LayerNorm(c.layer_norm_epsilon)
        self.dropout = layers.Dropout(c.dropout_rate)

    def cross_key_values(self, memory: jax.Array) -> tuple[KeyValue, ...]:
        """memory: [batch, mem_len, d_model] -> per decoder layer (keys, values)."""
        return tuple(block.cross_key_value(memory) for block in self.blocks)

    def __call__(
        self,
        embeddings: jax.Array,
        mask: jax.Array | None = None,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        deterministic: bool = True,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Full-sequence pass.

        Args:
          embeddings: [batch, len, d_model] float32 token embeddings.
          mask: encoder only, [batch, len], nonzero for real tokens (keys elsewhere are hidden).
          memory: decoder only, [batch, mem_len, d_model] encoder states / VAE memory.
          memory_mask: decoder only, [batch, mem_len] or None (all visible).
          segment_ids: packed rows (several sequences one after another in a row): [batch, len]
            segment of each token, 1, 2, ... (0: padding). A token then sees only the tokens
            of its own segment; in the decoder, also only the memory positions whose
            ``memory_mask`` holds its segment id. Offsets between tokens of one segment are
            those of the sequence alone, so the relative position bias is unchanged.
        Returns:
          [batch, len, d_model] float32 states after the final norm (and dropout).
        """
        length = embeddings.shape[1]
        positions = jnp.arange(length)
        bias = self.relative_position_bias(positions, positions)
        if segment_ids is not None:
            same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if self.is_decoder:
            self_mask = (positions[None, :] <= positions[:, None])[None, None]
            cross_kvs = self.cross_key_values(memory)
            cross_mask = None if memory_mask is None else memory_mask[:, None, None, :] != 0
            if segment_ids is not None:
                self_mask = self_mask & same_segment
                if memory_mask is None:
                    raise ValueError("packed decoder rows need memory_mask with segment ids")
                cross_mask = segment_ids[:, None, :, None] == memory_mask[:, None, None, :]
        else:
            self_mask = None if mask is None else mask[:, None, None, :] != 0
            if segment_ids is not None:
                self_mask = same_segment & (segment_ids[:, None, None, :] != 0)
            cross_kvs = [None] * len(self.blocks)
            cross_mask = None
        h = self.dropout(embeddings, deterministic=deterministic)
        for block, cross_kv in zip(self.blocks, cross_kvs):
            h = block(h, bias, self_mask, cross_kv, cross_mask, deterministic)
        return self.dropout(self.final_layer_norm(h), deterministic=deterministic)


class T5(nn.Module):
    """T5 encoder-decoder with a tied embedding ``shared`` [vocab, d_model].

    Params: ``shared/embedding``, ``encoder/...``, ``decoder/...`` (see ``convert/vae_weights.py``
    for the mapping to Hugging Face keys).
    """

    config: T5Config

    def setup(self):
        c = self.config
        self.shared = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=_normal(1.0),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
        )
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic=True,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask: [batch, len] -> states [batch, len, d_model] float32.
        ``segment_ids`` [batch, len]: packed rows (``T5Stack``)."""
        return self.encoder(
            self.shared(input_ids),
            mask=attention_mask,
            deterministic=deterministic,
            segment_ids=segment_ids,
        )

    def logits(self, states: jax.Array) -> jax.Array:
        """Decoder states [..., d_model] -> logits [..., vocab] float32 (tied embedding)."""
        c = self.config
        table = self.shared.embedding  # [vocab, d_model]
        return layers.dense(states * c.d_model**-0.5, table.T, c.compute_dtype, c.precision)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        memory: jax.Array,
        memory_mask: jax.Array | None = None,
        deterministic: bool = True,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced decoder.

        Args:
          decoder_input_ids: [batch, len] int32, starting with the start token.
          memory: [batch, mem_len, d_model].
          memory_mask: [batch, mem_len] (nonzero = visible) or None; with ``segment_ids``,
            the segment id of each memory position.
          segment_ids: [batch, len] packed rows (``T5Stack``), or None.
        Returns:
          logits [batch, len, vocab] float32.
        """
        states = self.decoder(
            self.shared(decoder_input_ids),
            memory=memory,
            memory_mask=memory_mask,
            deterministic=deterministic,
            segment_ids=segment_ids,
        )
        return self.logits(states)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Sequence-to-sequence logits [batch, dec_len, vocab] (memory = all encoder states)."""
        memory = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(decoder_input_ids, memory, attention_mask, deterministic)

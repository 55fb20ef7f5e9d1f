"""Length and section encoders: the conditions of PhraseLDM (the original's LengthEncoder and
SecEncoder, FACTS section 6).

- ``LengthEncoder``: one embedding row per length bucket ``n_bars // bucket_size``
  ("64 bars" is bucket 6, i.e. [60, 70) bars); its output is the DiT's global vector.
- ``SectionEncoder``: [type | length] embeddings of up to 30 sections, padded with id 0,
  through a 3-layer post-norm transformer encoder with no padding mask (as the original);
  its states feed the DiT cross-attention together with a float mask (1 real, 0 pad).

Inputs are integer id arrays (``section_ids_from_plans`` makes them from plan strings with
``sections.py``, which owns parsing and the fixed id order). Values are checked when the
inputs are concrete (outside jit); under jit, callers validate first with ``check_n_bars`` /
``check_section_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phraseldm_jax import layers, sections
from phraseldm_jax.dit import Dense
from phraseldm_jax.phrases import MAX_BARS, length_bucket

NUM_LENGTH_BUCKETS = 128  # rows of the original's length embedding
NUM_SECTION_TYPES = len(sections.SECTION_TYPES)  # 11: i o A B C D E X x b c
MAX_SECTION_BARS = sections.MAX_SECTION_LENGTH  # section lengths 1..32
MAX_SECTIONS = sections.MAX_SECTIONS  # 30
PAD_SECTION_ID = sections.PAD_ID  # 0

# The original initialises its (never trained) embeddings with torch's default N(0, 1).
torch_embedding_init = nn.initializers.normal(1.0)


def _concrete(x) -> np.ndarray | None:
    """x as numpy when it has a value now, None while it is being traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_n_bars(n_bars, bucket_size: int = 10, num_buckets: int = NUM_LENGTH_BUCKETS) -> None:
    """Raises ValueError unless every entry is in 1..MAX_BARS and its bucket has a row."""
    values = np.asarray(n_bars).reshape(-1)
    bad = values[(values < 1) | (values > MAX_BARS)]
    if bad.size:
        raise ValueError(f"n_bars must be in 1..{MAX_BARS}, got {sorted(set(bad.tolist()))}")
    buckets = length_bucket(values, bucket_size)
    over = values[buckets >= num_buckets]
    if over.size:
        raise ValueError(
            f"n_bars {sorted(set(over.tolist()))} fall in length buckets >= {num_buckets} "
            f"(bucket size {bucket_size}): index out of range of the length embedding"
        )


class LengthEncoder(nn.Module):
    """n_bars [batch] int -> length embedding [batch, 1, features] float32."""

    features: int = 128
    num_buckets: int = NUM_LENGTH_BUCKETS
    bucket_size: int = 10

    @nn.compact
    def __call__(self, n_bars: jax.Array) -> jax.Array:
        concrete = _concrete(n_bars)
        if concrete is not None:
            check_n_bars(concrete, self.bucket_size, self.num_buckets)
        n_bars = jnp.asarray(n_bars)
        if n_bars.ndim != 1:
            raise ValueError(f"LengthEncoder: n_bars must be [batch], got {list(n_bars.shape)}")
        table = self.param(
            "embedding", torch_embedding_init, (self.num_buckets, self.features), jnp.float32
        )
        buckets = length_bucket(jnp.asarray(n_bars).astype(jnp.int32), self.bucket_size)
        return jnp.take(table, buckets, axis=0)[:, None, :]


def check_section_ids(
    type_ids,
    length_ids,
    num_types: int = NUM_SECTION_TYPES + 1,
    num_lengths: int = MAX_SECTION_BARS + 1,
    max_sections: int = MAX_SECTIONS,
) -> None:
    """Raises ValueError unless the ids are [batch, <= max_sections] in range, a section is pad
    (0) in both arrays or in neither, and pads only trail the real sections."""
    type_ids, length_ids = np.asarray(type_ids), np.asarray(length_ids)
    if type_ids.shape != length_ids.shape or type_ids.ndim != 2:
        raise ValueError(
            "section ids: type_ids and length_ids must both be [batch, sections], got "
            f"{list(type_ids.shape)} and {list(length_ids.shape)}"
        )
    if type_ids.shape[1] > max_sections:
        raise ValueError(f"section ids: {type_ids.shape[1]} sections, at most {max_sections}")
    for name, ids, rows in (("type", type_ids, num_types), ("length", length_ids, num_lengths)):
        bad = ids[(ids < 0) | (ids >= rows)]
        if bad.size:
            raise ValueError(
                f"section {name} ids must be in 0..{rows - 1}, got {sorted(set(bad.tolist()))}"
            )
    is_pad = type_ids == PAD_SECTION_ID
    if np.any(is_pad != (length_ids == PAD_SECTION_ID)):
        rows = sorted(set(np.nonzero(is_pad != (length_ids == PAD_SECTION_ID))[0].tolist()))
        raise ValueError(f"section ids: rows {rows} have a pad type with a real length or back")
    if np.any(is_pad[:, :-1] & ~is_pad[:, 1:]):
        rows = sorted(set(np.nonzero(is_pad[:, :-1] & ~is_pad[:, 1:])[0].tolist()))
        raise ValueError(f"section ids: rows {rows} have a real section after a pad")


def section_ids_from_plans(
    plans: Sequence[str | sections.SectionPlan],
    vocab: sections.SectionVocab = sections.DEFAULT_SECTION_VOCAB,
    max_sections: int = MAX_SECTIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """(type_ids, length_ids), each [batch, max_sections] int32, from plan strings such as
    ``"i-8 A-8 B-8"`` or POP909's ``"i8A8B8"`` (``sections.py`` parses and validates; a bad
    plan raises ``SectionPlanError``). ``vocab`` sets the id order (default: ours, fixed)."""
    type_ids, length_ids, _ = sections.plans_to_ids(plans, vocab, max_sections)
    return type_ids, length_ids


class _PostNormEncoderLayer(nn.Module):
    """torch ``nn.TransformerEncoderLayer`` (batch_first, post-norm, ReLU, eps 1e-5)."""

    num_heads: int
    ff_dim: int
    dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """x: [batch, length, dim] float32 -> same."""
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        dense = lambda n, name: Dense(n, True, self.dtype, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(1e-5, dtype=jnp.float32, name=name)  # noqa: E731
        drop = layers.Dropout(self.dropout_rate)

        qkv = dense(3 * dim, "qkv")(x).astype(self.dtype)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        scores = jnp.einsum(
            "bqnh,bknh->bnqk", qkv[:, :, 0], qkv[:, :, 1], preferred_element_type=jnp.float32
        )
        probs = jax.nn.softmax(scores / np.sqrt(head_dim).astype(np.float32), axis=-1)
        probs = drop(probs, deterministic=deterministic).astype(self.dtype)
        attn = jnp.einsum(
            "bnqk,bknh->bqnh", probs, qkv[:, :, 2], preferred_element_type=jnp.float32
        ).reshape(batch, length, dim)
        attn = dense(dim, "out")(attn)
        x = norm("norm1")(x + drop(attn, deterministic=deterministic))

        ff = nn.relu(dense(self.ff_dim, "linear1")(x))
        ff = dense(dim, "linear2")(drop(ff, deterministic=deterministic))
        return norm("norm2")(x + drop(ff, deterministic=deterministic))


class SectionEncoder(nn.Module):
    """Section ids -> (states [batch, max_sections, features] float32, mask [batch,
    max_sections] float32 with 1 real / 0 pad).

    ``features`` is the DiT's ``cross_attention_input_dim``; the type and length embeddings
    are ``features // 2`` wide each, concatenated [type | length]. Ids shorter than
    ``max_sections`` are padded with 0. Dropout (0.1) is active when not ``deterministic``
    (needs a ``"dropout"`` rng)."""

    features: int = 256
    num_types: int = NUM_SECTION_TYPES + 1
    num_lengths: int = MAX_SECTION_BARS + 1
    max_sections: int = MAX_SECTIONS
    num_layers: int = 3
    num_heads: int = 8
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, type_ids: jax.Array, length_ids: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        if self.features % 2 or self.features % self.num_heads:
            raise ValueError(
                f"SectionEncoder: features={self.features} must be even and a multiple of "
                f"num_heads={self.num_heads}"
            )
        concrete_types, concrete_lengths = _concrete(type_ids), _concrete(length_ids)
        if concrete_types is not None and concrete_lengths is not None:
            check_section_ids(
                concrete_types, concrete_lengths, self.num_types, self.num_lengths,
                self.max_sections,
            )  # fmt: skip
        if type_ids.ndim != 2 or type_ids.shape != length_ids.shape:
            raise ValueError(
                "SectionEncoder: type_ids and length_ids must both be [batch, sections], got "
                f"{list(type_ids.shape)} and {list(length_ids.shape)}"
            )
        if type_ids.shape[1] > self.max_sections:
            raise ValueError(
                f"SectionEncoder: {type_ids.shape[1]} sections, at most {self.max_sections}"
            )
        pad = ((0, 0), (0, self.max_sections - type_ids.shape[1]))
        type_ids = jnp.pad(jnp.asarray(type_ids, jnp.int32), pad)
        length_ids = jnp.pad(jnp.asarray(length_ids, jnp.int32), pad)

        half = self.features // 2
        type_table = self.param("type_embed", torch_embedding_init, (self.num_types, half))
        length_table = self.param("len_embed", torch_embedding_init, (self.num_lengths, half))
        x = jnp.concatenate(
            [jnp.take(type_table, type_ids, axis=0), jnp.take(length_table, length_ids, axis=0)],
            axis=-1,
        )
        for i in range(self.num_layers):
            layer = _PostNormEncoderLayer(
                self.num_heads, 4 * self.features, self.dropout_rate, self.dtype, name=f"layers_{i}"
            )
            x = layer(x, deterministic)
        mask = (type_ids != PAD_SECTION_ID).astype(jnp.float32)
        return x, mask

"""The linear layer both backbones use: one matmul over every row at once.

``Dense`` folds all leading axes of its input into one before the matmul and unfolds them
after. The numbers are those of ``flax.linen.Dense`` (same params ``kernel`` [in, out] and
``bias``; each output element is the same dot product), but XLA sees plain 2-D matmuls. With
[batch, length, features] inputs XLA's CPU backend lays the backward pass's weight gradients
out with a transposed copy of the activations per layer; the 2-D form needs none, which is most
of what makes a training step fast there (docs/BENCHMARKS.md, "Training step profile").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense(
    x: jax.Array, kernel: jax.Array, dtype: Any, precision: jax.lax.Precision | None = None
) -> jax.Array:
    """``x @ kernel`` over x's last axis as one 2-D matmul in ``dtype``, float32 out."""
    y = jnp.dot(
        x.reshape(-1, x.shape[-1]).astype(dtype),
        kernel.astype(dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """``y = x @ kernel (+ bias)`` over the last axis of ``x``.

    ``dtype``: compute dtype of the matmul (input and kernel are cast to it); the product
    accumulates in float32 and is returned as ``out_dtype`` (default: ``dtype``). Parameters
    are float32.
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    out_dtype: Any = None
    precision: jax.lax.Precision | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        y = dense(x, kernel, self.dtype, self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y.astype(self.dtype if self.out_dtype is None else self.out_dtype)


# Dropout draws 16-bit words: half the random bits of a float32 uniform and no conversion to
# float, so the masks cost about a third of ``flax.linen.Dropout``'s on CPU. The rate is
# rounded to a multiple of 2**-16 (0.1 -> 0.1000061) and kept values are scaled by the
# inverse of the exact keep probability, so the expected output equals the input.
_DROPOUT_LEVELS = 1 << 16


class Dropout(nn.Module):
    """Inverted dropout with ``flax.linen.Dropout``'s call (``x, deterministic``) and key
    (``rng_collection``); masks from 16-bit random words (see above)."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        threshold = round(self.rate * _DROPOUT_LEVELS)
        if deterministic or threshold == 0:
            return x
        if threshold >= _DROPOUT_LEVELS:
            return jnp.zeros_like(x)
        bits = jax.random.bits(self.make_rng(self.rng_collection), x.shape, jnp.uint16)
        scale = _DROPOUT_LEVELS / (_DROPOUT_LEVELS - threshold)
        return jnp.where(bits >= threshold, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))

"""Growth of greedy decoding's self-attention cache, and a pool of buffers to grow it into.

A decode starts with a short key/value cache and grows it as positions advance (see
``decoding._CACHE_BLOCK``), so attention reads little more than the filled prefix. Growing
writes a zero-padded copy into a larger buffer; on the host a fresh buffer of that size costs
more (page faults, the ``munmap`` of the old one) than the copy itself, so ``CacheBuffers``
keeps the caches a decode drops and hands them back as growth targets (measurements:
docs/DECODING.md). This module knows only caches, per decoder layer (keys, values), each
[batch, heads, length, d_kv]; the decoder's weights and loop stay in ``decoding``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phraseldm_jax.t5 import KeyValue

Cache = tuple[KeyValue, ...]


@functools.partial(
    jax.jit, static_argnames=("length",), donate_argnames=("target",), keep_unused=True
)
def grow_cache(cache: Cache, length: int, target: Cache | None = None) -> Cache:
    """Zero-pads ``cache`` to ``length`` positions. ``target`` (a cache of that shape, donated,
    contents ignored): the result is written into its buffers instead of new ones
    (``keep_unused`` keeps the unread argument so that jax can alias it to the output)."""

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    return jax.tree.map(pad, cache)


def _cache_bytes(cache: Cache) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(cache))


class CacheBuffers:
    """Key/value cache buffers kept for reuse by the cache growth of later decodes.

    ``greedy_decode(..., buffers=...)`` hands every cache it drops (grown from, compacted,
    finished) to this pool and takes a growth target of the right shape, dtype and sharding
    from it when there is one, which saves the fresh host buffer's page faults and ``munmap``
    (the reason for the pool); the target is donated and fully overwritten, so the tokens do not
    depend on what a buffer held. At most ``max_bytes`` are kept (the oldest entries go first);
    ``clear()`` frees them. Not thread-safe: one decode at a time."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = int(max_bytes)
        self._free: dict[tuple, Cache] = {}  # insertion order = age

    @staticmethod
    def _key(shape, dtype, sharding) -> tuple:
        return (tuple(shape), jnp.dtype(dtype).name, sharding)

    @property
    def nbytes(self) -> int:
        """Bytes held for reuse."""
        return sum(_cache_bytes(cache) for cache in self._free.values())

    def take(self, shape, dtype, sharding) -> Cache | None:
        """A held cache whose arrays are all ``shape``/``dtype``/``sharding``, removed from
        the pool; None if there is none."""
        return self._free.pop(self._key(shape, dtype, sharding), None)

    def give(self, cache: Cache) -> None:
        """Keeps ``cache`` (a tuple of (keys, values) pairs of one shape) for reuse; arrays
        already donated or deleted are ignored."""
        leaves = jax.tree.leaves(cache)
        if not leaves or any(x.is_deleted() for x in leaves):
            return
        first = leaves[0]
        key = self._key(first.shape, first.dtype, first.sharding)
        self._free.pop(key, None)
        self._free[key] = cache
        while self._free and self.nbytes > self.max_bytes:
            del self._free[next(iter(self._free))]

    def clear(self) -> None:
        self._free.clear()


def grow(cache: Cache, length: int, buffers: CacheBuffers | None) -> Cache:
    """``grow_cache`` into a buffer from ``buffers`` when it holds one; the old cache goes back
    to ``buffers``."""
    if buffers is None:
        return grow_cache(cache, length)
    keys = cache[0][0]
    shape = (*keys.shape[:2], length, keys.shape[3])
    target = buffers.take(shape, keys.dtype, keys.sharding)
    grown = grow_cache(cache, length, target)
    buffers.give(cache)
    return grown


def give(buffers: CacheBuffers | None, cache: Cache) -> None:
    """Hands a dropped cache to ``buffers`` (if any) for reuse."""
    if buffers is not None:
        buffers.give(cache)

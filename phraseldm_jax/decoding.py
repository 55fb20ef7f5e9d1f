"""Greedy decoding of PhraseVAE latents (or decoder memories) under ``jax.jit``.

Semantics match Hugging Face ``generate(do_sample=False, num_beams=1)`` with the reference's
settings (SPEC section 4): every row starts with ``[BOS]``, takes the argmax token at each step,
stops at ``[EOS]`` and is padded with ``[PAD]`` afterwards; at most ``max_length`` positions
including the start token. Output: int32 [N, max_length].

Speed comes from:
- a key/value cache and a dedicated step (``decode_step``): one fused q/k/v matmul per layer,
  cross-attention keys/values computed once per decode, the position bias of the one new query
  looked up from the table, matmuls in the compute dtype with float32 results, cache and
  attention in float32;
- ``compute_dtype="bfloat16"`` (opt-in): bfloat16 matmuls, faster steps on CPUs with AMX
  (XLA's CPU bfloat16 matmul is fast only with a float32 result, and its bfloat16 batched
  attention matmuls are slower than float32 ones, so the cache stays float32);
- the cache grows in blocks of 32 positions, so attention reads little more than the filled
  prefix, into reused buffers (``decode_cache``); it is updated in place (state buffers are
  donated);
- a ``lax.while_loop`` over steps that exits as soon as every row has produced ``[EOS]``;
- compaction: the loop runs in chunks of ``check_every`` steps; between chunks the host looks at
  which rows are still live and, when they fit in half the batch, gathers them into a batch of
  the next power-of-two size. Finished rows (in a song most slots are ``[INST]``, ``b-1`` or
  ``[SEP]``, done after 2 tokens) stop costing compute. Batch sizes are powers of two so only a
  few shapes are ever compiled;
- ``devices``: the rows are split evenly over several devices (one program per device, run
  concurrently). On a CPU split into one device per core (``sharding.use_cpu_cores``) this is
  what puts the second core to work on the attention over the cache, which XLA:CPU runs on one
  thread per program.

Measured numbers (what each of these gains) and where the time goes: ``docs/DECODING.md``.

``decode_step`` is the only cached T5 decoder; tests/test_decoding.py checks its logits against
the teacher-forced ``PhraseVAE.decode_logits`` at every position, and the tokens of the loop
against a plain argmax loop over it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from phraseldm_jax import decode_cache
from phraseldm_jax.decode_cache import CacheBuffers
from phraseldm_jax.t5 import KeyValue, relative_position_bucket
from phraseldm_jax.vae import PhraseVAE, PhraseVAEConfig
from phraseldm_jax.vocab import BOS_ID, EOS_ID, PAD_ID, PHRASE_VOCAB

DEFAULT_MAX_LENGTH = 128
# The cache grows in blocks of this many positions as the sequence advances, so attention reads
# little more than the filled prefix (max_length / _CACHE_BLOCK shapes to compile).
_CACHE_BLOCK = 32
# With several devices a batch is split over them only while each gets at least this many rows
# (smaller batches run on the first device: see _Placement).
MIN_ROWS_PER_DEVICE = 32


class _Layer(NamedTuple):
    """One decoder layer's weights for the cached step; kernels in the compute dtype."""

    self_norm: jax.Array  # [d_model] float32
    qkv: jax.Array  # [d_model, 3 * inner]: q, k and v kernels side by side (one matmul)
    self_out: jax.Array  # [inner, d_model]
    cross_norm: jax.Array  # [d_model] float32
    cross_q: jax.Array  # [d_model, inner]
    cross_kv: jax.Array  # [d_model, 2 * inner] (used once per decode, for the memory)
    cross_out: jax.Array  # [inner, d_model]
    mlp_norm: jax.Array  # [d_model] float32
    wi: jax.Array  # [d_model, d_ff]
    wo: jax.Array  # [d_ff, d_model]


class _Weights(NamedTuple):
    """The decoder's weights arranged for the cached step (see ``decoder_weights``)."""

    embedding: jax.Array  # [vocab, d_model] float32, token lookup
    head: jax.Array  # [d_model, vocab] compute dtype, the tied output projection
    bias_table: jax.Array  # [num_buckets, heads] float32, relative position bias
    final_norm: jax.Array  # [d_model] float32
    layers: tuple[_Layer, ...]


def decoder_weights(params: Any, config: PhraseVAEConfig) -> _Weights:
    """The T5 decoder of PhraseVAE ``params`` laid out for ``decode step``: fused q/k/v kernels,
    matmul kernels cast once to ``config.t5.dtype`` (not at every step), the output projection
    pre-transposed. Norm scales, embeddings and the bias table stay float32."""
    dtype = config.t5.compute_dtype
    t5_params = params["t5"]
    decoder = t5_params["decoder"]

    def kernel(*path):
        node = decoder
        for key in path:
            node = node[key]
        return jnp.asarray(node["kernel"]).astype(dtype)

    layers = []
    for i in range(config.t5.num_decoder_layers):
        block = f"blocks_{i}"
        attn = (block, "self_attention")
        cross = (block, "cross_attention")
        layers.append(
            _Layer(
                self_norm=jnp.asarray(decoder[block]["self_attention_norm"]["scale"]),
                qkv=jnp.concatenate([kernel(*attn, n) for n in "qkv"], axis=1),
                self_out=kernel(*attn, "o"),
                cross_norm=jnp.asarray(decoder[block]["cross_attention_norm"]["scale"]),
                cross_q=kernel(*cross, "q"),
                cross_kv=jnp.concatenate([kernel(*cross, n) for n in "kv"], axis=1),
                cross_out=kernel(*cross, "o"),
                mlp_norm=jnp.asarray(decoder[block]["mlp_norm"]["scale"]),
                wi=kernel(block, "mlp", "wi"),
                wo=kernel(block, "mlp", "wo"),
            )
        )
    embedding = jnp.asarray(t5_params["shared"]["embedding"], jnp.float32)
    return _Weights(
        embedding=embedding,
        head=embedding.T.astype(dtype),
        bias_table=jnp.asarray(decoder["relative_position_bias"]["embedding"], jnp.float32),
        final_norm=jnp.asarray(decoder["final_layer_norm"]["scale"]),
        layers=tuple(layers),
    )


def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] in the kernel's dtype, float32 result. (XLA's CPU
    bfloat16 matmul is fast with a float32 result and slow with a bfloat16 one.)"""
    full = kernel.dtype == jnp.float32
    return jnp.dot(
        x.astype(kernel.dtype),
        kernel,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if full else None,
    )


def _rms_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """T5's RMS norm in float32 (as ``t5.T5LayerNorm``)."""
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return scale * (x * jax.lax.rsqrt(variance + epsilon))


def _attend(query, keys, values, bias, mask) -> jax.Array:
    """One query per row against float32 keys/values [batch, heads, len, d_kv], T5 style (no
    scaling); query [batch, heads, d_kv] -> [batch, heads * d_kv] float32."""
    full = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bhd,bhkd->bhk", query, keys, precision=full)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhk,bhkd->bhd", weights, values, precision=full)
    return out.reshape(out.shape[0], -1)


def _cross_key_values(weights: _Weights, config, memory: jax.Array) -> tuple[KeyValue, ...]:
    """memory [batch, mem_len, d_model] -> per layer (keys, values) [batch, heads, mem_len, d_kv]
    float32."""
    c = config.t5
    out = []
    for layer in weights.layers:
        kv = _dense(memory, layer.cross_kv)  # [batch, mem_len, 2 * inner]
        kv = kv.reshape(*memory.shape[:2], 2, c.num_heads, c.d_kv).transpose(2, 0, 3, 1, 4)
        out.append((kv[0], kv[1]))
    return tuple(out)


def decode_step(
    weights: _Weights,
    config: PhraseVAEConfig,
    token: jax.Array,
    position: jax.Array,
    cache: tuple[KeyValue, ...],
    cross_kvs: tuple[KeyValue, ...],
    memory_mask: jax.Array,
) -> tuple[jax.Array, tuple[KeyValue, ...]]:
    """One cached decoder position: the logits ``T5.decode`` gives at ``position`` (HF T5),
    written for speed: one q/k/v matmul per layer, float32 cache and attention, matmuls in the
    kernels' dtype with float32 results.

    Args:
      token: [batch] int32 at ``position`` (int32 scalar, the same for every row).
      cache: per layer (keys, values) [batch, heads, cache_len, d_kv] float32, cache_len >
        position; slots after ``position`` are hidden.
      cross_kvs: per layer (keys, values) [batch, heads, mem_len, d_kv] float32.
      memory_mask: [batch, mem_len] int32, nonzero = visible.
    Returns:
      logits [batch, vocab] float32 for the next position, the updated cache.
    """
    c = config.t5
    batch = token.shape[0]
    keys = jnp.arange(cache[0][0].shape[2])
    buckets = relative_position_bucket(
        keys - position,
        bidirectional=False,
        num_buckets=c.relative_attention_num_buckets,
        max_distance=c.relative_attention_max_distance,
    )
    bias = jnp.take(weights.bias_table, buckets, axis=0).T[None]  # [1, heads, cache_len]
    self_mask = (keys <= position)[None, None, :]
    cross_mask = (memory_mask != 0)[:, None, :]
    h = jnp.take(weights.embedding, token, axis=0)  # [batch, d_model] float32
    new_cache = []
    for layer, (cached_k, cached_v), (cross_k, cross_v) in zip(weights.layers, cache, cross_kvs):
        x = _rms_norm(h, layer.self_norm, c.layer_norm_epsilon)
        q, k, v = jnp.split(_dense(x, layer.qkv).reshape(batch, 3, c.num_heads, c.d_kv), 3, 1)
        cached_k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.swapaxes(1, 2), position, 2)
        cached_v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.swapaxes(1, 2), position, 2)
        new_cache.append((cached_k, cached_v))
        attended = _attend(q[:, 0], cached_k, cached_v, bias, self_mask)
        h = h + _dense(attended, layer.self_out)
        x = _rms_norm(h, layer.cross_norm, c.layer_norm_epsilon)
        query = _dense(x, layer.cross_q).reshape(batch, c.num_heads, c.d_kv)
        h = h + _dense(_attend(query, cross_k, cross_v, None, cross_mask), layer.cross_out)
        x = _rms_norm(h, layer.mlp_norm, c.layer_norm_epsilon)
        h = h + _dense(jax.nn.relu(_dense(x, layer.wi)), layer.wo)
    h = _rms_norm(h, weights.final_norm, c.layer_norm_epsilon)
    return _dense(h * c.d_model**-0.5, weights.head), tuple(new_cache)


class _DecodeState(NamedTuple):
    """Loop state; every field but ``position`` has the batch as its leading axis."""

    tokens: jax.Array  # [batch, max_length] int32; column 0 is [BOS]
    finished: jax.Array  # [batch] bool; padding rows start finished
    position: jax.Array  # int32 scalar: the last written column
    cache: tuple[KeyValue, ...]  # per layer [batch, heads, cache_length, d_kv] float32
    cross_kvs: tuple[KeyValue, ...]  # per layer [batch, heads, mem_len, d_kv] float32
    memory_mask: jax.Array  # [batch, mem_len] int32


@functools.partial(jax.jit, static_argnames=("config", "max_length", "cache_length"))
def _start(
    params, weights, config, memory_or_latents, memory_mask, live, max_length, cache_length
) -> _DecodeState:
    memory = memory_or_latents
    if memory.ndim == 2:  # latents (head vae)
        model = PhraseVAE(config)
        memory = model.apply({"params": params}, memory, method=PhraseVAE.latent_to_memory)
    cross_kvs = _cross_key_values(weights, config, memory)
    batch = memory_or_latents.shape[0]
    tokens = jnp.full((batch, max_length), PAD_ID, jnp.int32).at[:, 0].set(BOS_ID)
    c = config.t5
    zeros = jnp.zeros((batch, c.num_heads, cache_length, c.d_kv), jnp.float32)
    cache = tuple((zeros, zeros) for _ in range(c.num_decoder_layers))
    return _DecodeState(tokens, ~live, jnp.int32(0), cache, cross_kvs, memory_mask)


@functools.partial(
    jax.jit, static_argnames=("config", "suppress_eos", "split"), donate_argnames=("state",)
)
def _advance(
    weights: _Weights,
    config,
    state: _DecodeState,
    stop: jax.Array,
    suppress_eos: bool = False,
    split: bool = False,
) -> _DecodeState:
    """Greedy steps until column ``stop`` (<= cache length) is written or every row is finished.

    ``suppress_eos``: the [EOS] logit is set to -inf before the argmax (rows never finish).
    ``split`` (the batch is split over devices): run to ``stop`` without the every-row-finished
    exit, which would need a cross-device reduction at every step; the host checks between
    chunks anyway."""

    def keep_going(s: _DecodeState) -> jax.Array:
        if split:
            return s.position < stop
        return (s.position < stop) & ~jnp.all(s.finished)

    def step(s: _DecodeState) -> _DecodeState:
        token = jax.lax.dynamic_index_in_dim(s.tokens, s.position, axis=1, keepdims=False)
        logits, cache = decode_step(
            weights, config, token, s.position, s.cache, s.cross_kvs, s.memory_mask
        )
        if suppress_eos:
            logits = logits.at[:, EOS_ID].set(-jnp.inf)
        next_token = jnp.where(s.finished, PAD_ID, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, next_token, s.position + 1, axis=1)
        finished = s.finished | (next_token == EOS_ID)
        return _DecodeState(tokens, finished, s.position + 1, cache, s.cross_kvs, s.memory_mask)

    return jax.lax.while_loop(keep_going, step, state)


@jax.jit
def _take_rows(state: _DecodeState, rows: jax.Array, live: jax.Array) -> _DecodeState:
    """Gathers ``rows`` of every batched field; rows with ``live`` False become finished padding."""
    gathered = jax.tree.map(lambda x: x[rows], state._replace(position=None))
    return gathered._replace(position=state.position, finished=gathered.finished | ~live)


def _bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


class _Placement:
    """Where a batch of rows runs: split over every device while each gets at least
    ``min_rows_per_device`` rows, else on the first device alone (for small batches the
    per-step synchronisation of the split costs more than the extra cores give). Holds the
    weights on both."""

    def __init__(self, devices, params, weights, min_rows_per_device: int):
        devices = list(devices) if devices is not None else []
        self.min_rows = min_rows_per_device
        if devices:
            self.single = jax.device_put((params, weights), devices[0])
        else:  # jax's default device, uncommitted
            self.single = jax.device_put((params, weights))
        self.rows = self.replicated = None
        if len(devices) > 1:
            mesh = Mesh(np.array(devices), ("rows",))
            self.rows, self.replicated = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
            self.split = jax.device_put((params, weights), self.replicated)

    def splits(self, size: int) -> bool:
        return self.rows is not None and size >= self.min_rows * self.rows.mesh.size

    def bucket(self, n: int, minimum: int) -> int:
        """Batch size for ``n`` live rows: a power of two, a multiple of the devices if split."""
        size = _bucket(n, minimum)
        if self.splits(size):
            devices = self.rows.mesh.size
            size = -(-size // devices) * devices
        return size

    def weights(self, split: bool) -> tuple[Any, _Weights]:
        """(params, decoder weights) for a split batch, or one on the first device."""
        return self.split if split else self.single

    def put_state(self, state: _DecodeState, split: bool) -> _DecodeState:
        if split:
            shardings = jax.tree.map(lambda _: self.rows, state._replace(position=None))
            return jax.device_put(state, shardings._replace(position=self.replicated))
        if self.rows is None:
            return state
        return jax.device_put(state, self.rows.mesh.devices.flat[0])


def _check_options(max_length: int, batch_size: int, check_every: int, min_batch: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (start token + one step), got {max_length}")
    if batch_size < 1 or check_every < 1 or min_batch < 1:
        raise ValueError(
            "batch_size, check_every and min_batch must be >= 1, got "
            f"{batch_size}, {check_every}, {min_batch}"
        )


class _Options(NamedTuple):
    """The keyword options of ``greedy_decode`` and ``greedy_decode_memory`` (see there)."""

    max_length: int
    batch_size: int
    check_every: int
    min_batch: int
    suppress_eos: bool
    compute_dtype: str | None
    devices: Sequence[jax.Device] | None
    buffers: CacheBuffers | None


def _decode_rows(config, sources, masks, rows, out, options: _Options, placement) -> None:
    """Decodes ``sources[rows]`` (latents or memories) into ``out[rows]``; dropped caches go
    to ``options.buffers`` (when not None), growth targets come from it."""
    max_length, check_every, min_batch = options.max_length, options.check_every, options.min_batch
    suppress_eos, buffers = options.suppress_eos, options.buffers
    size = placement.bucket(len(rows), min_batch)
    live = np.arange(size) < len(rows)
    padded = np.concatenate([rows, np.full(size - len(rows), rows[0])])
    cache_length = min(_CACHE_BLOCK, max_length)
    # The first chunk runs on one device: in a song most rows finish within it, and splitting
    # a batch that is about to shrink costs more than it gains (A/B in docs/DECODING.md).
    split = False
    params, weights = placement.weights(split)
    state = _start(
        params, weights, config, sources[padded], masks[padded], live, max_length, cache_length
    )
    row_ids = np.where(live, padded, -1)
    position = 0
    while True:
        # A split batch is large and synchronises its devices at every check: check half as
        # often (faster on large batches, songs unchanged: docs/DECODING.md).
        chunk = 2 * check_every if split else check_every
        # Chunks end on multiples of their length, so that (with power-of-two check_every)
        # no chunk straddles a cache block: steps before the boundary read the shorter cache.
        stop = min((position // chunk + 1) * chunk, max_length - 1)
        if stop > cache_length:  # the loop reads positions up to stop - 1
            cache_length = min(-(-stop // _CACHE_BLOCK) * _CACHE_BLOCK, max_length)
            state = state._replace(cache=decode_cache.grow(state.cache, cache_length, buffers))
        state = _advance(weights, config, state, np.int32(stop), suppress_eos, split)
        finished = np.asarray(state.finished)
        position = int(state.position)
        done = bool(finished.all()) or position >= max_length - 1
        live_rows = np.flatnonzero(~finished)
        new_size = size if done else placement.bucket(len(live_rows), min_batch)
        new_split = placement.splits(new_size)
        if not done and new_size == size and new_split == split:
            continue
        if done or new_size != size:
            tokens = np.asarray(state.tokens)
            leaving = (row_ids >= 0) & (finished | done)
            out[row_ids[leaving]] = tokens[leaving]
            if done:
                decode_cache.give(buffers, state.cache)
                return
            keep = np.arange(new_size) < len(live_rows)
            take = np.concatenate([live_rows, np.full(new_size - len(live_rows), live_rows[0])])
            dropped, state = state.cache, _take_rows(state, take, keep)
            decode_cache.give(buffers, dropped)
            row_ids = np.where(keep, row_ids[take], -1)
            size = new_size
        split = new_split
        dropped, state = state.cache, placement.put_state(state, split)
        if state.cache[0][0] is not dropped[0][0]:  # moved to other devices
            decode_cache.give(buffers, dropped)
        params, weights = placement.weights(split)


def with_compute_dtype(config: PhraseVAEConfig, compute_dtype: str | None) -> PhraseVAEConfig:
    """``config`` with the T5 matmuls in ``compute_dtype`` (None: unchanged)."""
    if compute_dtype is None or compute_dtype == config.t5.dtype:
        return config
    return dataclasses.replace(config, t5=dataclasses.replace(config.t5, dtype=compute_dtype))


def _decode_all(params, config, sources, masks, options: _Options) -> np.ndarray:
    """Decodes every row of ``sources`` (latents or memories, checked), ``batch_size`` at a
    time: the common body of ``greedy_decode`` and ``greedy_decode_memory``."""
    max_length, batch_size = options.max_length, options.batch_size
    _check_options(max_length, batch_size, options.check_every, options.min_batch)
    config = with_compute_dtype(config, options.compute_dtype)
    placement = _Placement(  # weights put on the devices once, not at every chunk
        options.devices, params, decoder_weights(params, config), MIN_ROWS_PER_DEVICE
    )
    if options.buffers is None and len(sources) > batch_size:  # several batches: reuse them
        options = options._replace(buffers=CacheBuffers())
    out = np.full((len(sources), max_length), PAD_ID, np.int32)
    for start in range(0, len(sources), batch_size):
        rows = np.arange(start, min(start + batch_size, len(sources)))
        _decode_rows(config, sources, masks, rows, out, options, placement)
    return out


def greedy_decode(
    params: Any,
    config: PhraseVAEConfig,
    latents: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 1024,
    check_every: int = 4,
    min_batch: int = 8,
    suppress_eos: bool = False,
    compute_dtype: str | None = None,
    devices: Sequence[jax.Device] | None = None,
    buffers: CacheBuffers | None = None,
) -> np.ndarray:
    """Greedy token ids of PhraseVAE latents (head vae).

    Args:
      params: the PhraseVAE params pytree.
      latents: [N, latent_dim] float.
      max_length: positions per row, the start token included.
      batch_size: rows decoded together (memory: about batch_size * 1.2 MB of cache at the
        paper's size, max_length 128).
      check_every: steps between host checks for finished rows (compaction points).
      min_batch: smallest batch the live rows are compacted into.
      suppress_eos: never emit ``[EOS]`` (its logit is -inf): every row runs all ``max_length``
        positions (equal work for benchmarks; ``generate(suppress_tokens=[EOS])`` does the same).
      compute_dtype: matmul dtype for this decode ("bfloat16": faster matmuls on CPUs with
        AMX); None keeps ``config.t5.dtype``. Norms, softmax, logits and the argmax stay float32;
        bfloat16 tokens can differ from float32 ones where two logits are nearly tied.
      devices: split large batches evenly over these devices (rounded up to a multiple of
        their number; batches under ``MIN_ROWS_PER_DEVICE`` rows per device and the first
        ``check_every`` steps run on the first of them); None: jax's default device. Same
        tokens either way.
      buffers: a ``CacheBuffers`` kept between calls (as ``vae_inference.PhraseVAEModel`` does): the
        cache grows into buffers an earlier decode left instead of fresh ones (faster; the
        pool holds memory until cleared). None: buffers are reused only between the batches
        of this call. Same tokens either way.
    Returns:
      int32 numpy [N, max_length]: ``[BOS]``, tokens, ``[EOS]``, then ``[PAD]``.
    """
    if config.head != "vae":
        raise ValueError(
            f"greedy_decode needs head 'vae', not {config.head!r}; use greedy_decode_memory"
        )
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or latents.shape[1] != config.latent_dim:
        raise ValueError(f"latents must be [N, {config.latent_dim}], got shape {latents.shape}")
    masks = np.ones((len(latents), config.n_query_tokens), np.int32)
    options = _Options(
        max_length=max_length,
        batch_size=batch_size,
        check_every=check_every,
        min_batch=min_batch,
        suppress_eos=suppress_eos,
        compute_dtype=compute_dtype,
        devices=devices,
        buffers=buffers,
    )
    return _decode_all(params, config, latents, masks, options)


def greedy_decode_memory(
    params: Any, config: PhraseVAEConfig, memory: Any, memory_mask: Any | None = None, **options
) -> np.ndarray:
    """Greedy token ids from decoder memories (any head; see ``PhraseVAE.encode_memory``).

    Args:
      memory: [N, mem_len, d_model] float.
      memory_mask: [N, mem_len], nonzero = visible; None = all visible.
      options: the keyword options of ``greedy_decode``, with its defaults (its signature is
        the one list of them).
    Returns:
      int32 numpy [N, max_length], as ``greedy_decode``.
    """
    memory = np.asarray(memory, np.float32)
    if memory.ndim != 3 or memory.shape[2] != config.t5.d_model:
        raise ValueError(f"memory must be [N, mem_len, {config.t5.d_model}], got {memory.shape}")
    if memory_mask is None:
        memory_mask = np.ones(memory.shape[:2], np.int32)
    memory_mask = np.asarray(memory_mask).astype(np.int32)
    if memory_mask.shape != memory.shape[:2]:
        raise ValueError(f"memory_mask must be {memory.shape[:2]}, got {memory_mask.shape}")
    return _decode_all(params, config, memory, memory_mask, _bind_options(options))


def _bind_options(options: dict[str, Any]) -> _Options:
    """``greedy_decode``'s keyword options from ``options``, its defaults for the rest;
    TypeError for a name it does not take."""
    bound = inspect.signature(greedy_decode).bind(None, None, None, **options)
    bound.apply_defaults()
    return _Options(*(bound.arguments[name] for name in _Options._fields))


def tokens_to_phrases(token_ids: Iterable[Iterable[int]]) -> list[str]:
    """Phrase strings of decoded rows: tokens up to the first ``[EOS]``, without
    ``[BOS] [EOS] [PAD]``, space-joined (e.g. ``"i-0 o-0 p-60 d-12"``)."""
    phrases = []
    for row in np.asarray(token_ids):
        ids = [int(i) for i in row]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        phrases.append(PHRASE_VOCAB.decode(ids, skip=(BOS_ID, EOS_ID, PAD_ID)))
    return phrases

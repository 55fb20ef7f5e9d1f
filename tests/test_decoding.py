"""Cached greedy decoding: the cached step gives the teacher-forced decoder's logits at every
position, and the cached loop exactly the plain greedy tokens, whatever the batching/compaction."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from phraseldm_jax import decoding, t5, vae
from phraseldm_jax.vae import PhraseVAE
from phraseldm_jax.vocab import BOS_ID, EOS_ID, PAD_ID

T5_TINY = t5.T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
VAE = vae.PhraseVAEConfig(t5=T5_TINY, head="vae", latent_dim=16)
MAX_LENGTH = 64


@functools.cache
def _lively_params():
    """Random params made to decode varied sequences: a fresh T5 mostly repeats its input token,
    so the residual branches are amplified (the output depends on position and memory) and the
    [EOS] embedding is enlarged (rows stop at varied positions; some never stop)."""
    params = vae.init_params(jax.random.key(0, impl="unsafe_rbg"), VAE)  # compiles fast

    def amplify(path, x):
        return x * 10.0 if path[-2].key in ("o", "wo") else x

    params = jax.tree_util.tree_map_with_path(amplify, params)
    embedding = params["t5"]["shared"]["embedding"]
    params["t5"]["shared"]["embedding"] = embedding.at[EOS_ID].multiply(2.5)
    return params


def _plain_greedy(
    params,
    config,
    memory_or_latents,
    memory_mask=None,
    *,
    max_length=MAX_LENGTH,
    suppress_eos=False,
    compute_dtype=None,
):
    """Greedy decoding without a cache: the teacher-forced ``PhraseVAE.decode_logits`` over the
    whole prefix at every step, argmax at the last position. Slow; what the cached decoder must
    equal. memory_or_latents: [N, latent_dim] or [N, mem_len, d_model]; int32 [N, max_length]."""
    model = PhraseVAE(decoding.with_compute_dtype(config, compute_dtype))
    logits_fn = jax.jit(
        lambda p, m, mask, ids: model.apply(
            {"params": p}, m, ids, mask, method=PhraseVAE.decode_logits
        )
    )
    memory_or_latents = jax.numpy.asarray(memory_or_latents, jax.numpy.float32)
    batch = memory_or_latents.shape[0]
    tokens = np.full((batch, max_length), PAD_ID, np.int32)
    tokens[:, 0] = BOS_ID
    finished = np.zeros(batch, bool)
    for position in range(max_length - 1):
        logits = np.array(logits_fn(params, memory_or_latents, memory_mask, tokens)[:, position])
        if suppress_eos:
            logits[:, EOS_ID] = -np.inf
        next_token = np.where(finished, PAD_ID, logits.argmax(-1))
        tokens[:, position + 1] = next_token
        finished |= next_token == EOS_ID
        if finished.all():
            break
    return tokens


def _latents(n=48, seed=0):
    return np.random.default_rng(seed).normal(size=(n, VAE.latent_dim)).astype(np.float32)


def _eos_positions(tokens):
    return np.array([list(row).index(EOS_ID) if EOS_ID in row else -1 for row in tokens])


@functools.cache
def _reference_tokens():
    return _plain_greedy(_lively_params(), VAE, _latents())


def test_cached_greedy_equals_plain_greedy_for_latents():
    reference = _reference_tokens()
    cached = decoding.greedy_decode(_lively_params(), VAE, _latents(), max_length=MAX_LENGTH)
    assert cached.dtype == np.int32 and cached.shape == (48, MAX_LENGTH)
    np.testing.assert_array_equal(cached, reference)
    # The case is not degenerate: rows stop at many different positions, some never stop,
    # and rows are not one repeated token.
    eos = _eos_positions(reference)
    assert len(set(eos[eos > 0].tolist())) >= 8
    assert np.any(eos == -1)
    assert np.mean([len(set(row[1:10].tolist())) for row in reference]) > 2


@pytest.mark.parametrize("padded", [False, True], ids=["all-visible", "padded-memory"])
@pytest.mark.parametrize("head", ["query", "vae"])
def test_cached_step_logits_equal_teacher_forced_logits(head, padded):
    """``decoding.decode_step`` fed the teacher's tokens one position at a time gives the logits
    of the uncached ``PhraseVAE.decode_logits`` at every position (float32), with or without
    memory slots hidden by the mask, with a cache longer than the sequence or just as long."""
    config = dataclasses.replace(VAE, head=head)
    params = _lively_params() if head == "vae" else {"t5": _lively_params()["t5"]}
    rng = np.random.default_rng(4)
    batch, length = 3, 12
    if head == "vae":
        source = _latents(batch, seed=4)  # memory [batch, n_query_tokens, d_model] inside
        mask = np.ones((batch, config.n_query_tokens), np.int32)
    else:
        source = rng.normal(size=(batch, 5, 32)).astype(np.float32)
        mask = np.ones((batch, 5), np.int32)
    if padded:
        mask[0, 2:] = 0
        mask[2, -1] = 0
    ids = rng.integers(0, T5_TINY.vocab_size, (batch, length)).astype(np.int32)
    ids[:, 0] = BOS_ID
    teacher = jax.jit(PhraseVAE(config).apply, static_argnames="method")(
        {"params": params}, source, ids, mask, method=PhraseVAE.decode_logits
    )
    teacher = np.asarray(teacher)
    weights = decoding.decoder_weights(params, config)
    cache_length = length if padded else 16
    live = np.ones(batch, bool)
    state = decoding._start(params, weights, config, source, mask, live, length, cache_length)
    step = jax.jit(decoding.decode_step, static_argnums=1)
    cache = state.cache
    scale = np.abs(teacher).max()
    for position in range(length):
        logits, cache = step(
            weights, config, ids[:, position], np.int32(position), cache, state.cross_kvs, mask
        )
        np.testing.assert_allclose(
            np.asarray(logits), teacher[:, position], rtol=1e-5, atol=1e-5 * scale
        )
    # Slots after the last written position are untouched; written ones are filled.
    keys = np.asarray(cache[0][0])
    assert not np.any(keys[:, :, length:])
    assert np.all(np.any(keys[:, :, :length] != 0, axis=-1))


def test_output_layout():
    tokens = _reference_tokens()
    assert np.all(tokens[:, 0] == BOS_ID)
    for row, eos in zip(tokens, _eos_positions(tokens)):
        if eos > 0:
            assert np.all(row[eos + 1 :] == PAD_ID)
            assert EOS_ID not in row[1:eos]
    empty = decoding.greedy_decode(_lively_params(), VAE, np.zeros((0, 16)), max_length=8)
    assert empty.shape == (0, 8) and empty.dtype == np.int32


@pytest.mark.parametrize(
    "options",
    [
        dict(batch_size=1024, check_every=1000),  # one chunk, no compaction
        dict(batch_size=5, check_every=1, min_batch=1),  # tiny batches, compact every step
        dict(batch_size=8, check_every=3, min_batch=2),
    ],
    ids=["no-compaction", "every-step", "mixed"],
)
def test_batching_and_compaction_do_not_change_tokens(options, monkeypatch):
    sizes = []
    take_rows = decoding._take_rows

    def spy(state, rows, live):
        sizes.append((state.tokens.shape[0], len(rows)))
        return take_rows(state, rows, live)

    monkeypatch.setattr(decoding, "_take_rows", spy)
    tokens = decoding.greedy_decode(
        _lively_params(), VAE, _latents(), max_length=MAX_LENGTH, **options
    )
    np.testing.assert_array_equal(tokens, _reference_tokens())
    if options["check_every"] < MAX_LENGTH:
        assert sizes, "finished rows were never compacted away"
        assert all(new < old for old, new in sizes)
    else:
        assert not sizes


def test_loop_exits_as_soon_as_every_row_has_finished(monkeypatch):
    reference = _reference_tokens()
    eos = _eos_positions(reference)
    finishing = np.flatnonzero(eos > 0)
    positions = []
    advance = decoding._advance

    def spy(*args):
        state = advance(*args)
        positions.append(int(state.position))
        return state

    monkeypatch.setattr(decoding, "_advance", spy)
    tokens = decoding.greedy_decode(
        _lively_params(), VAE, _latents()[finishing], max_length=MAX_LENGTH, check_every=MAX_LENGTH
    )
    np.testing.assert_array_equal(tokens, reference[finishing])
    assert positions == [eos.max()]  # one while_loop, stopped at the last [EOS]


@pytest.mark.parametrize("num_devices", [2, 3])
def test_rows_split_over_devices_give_the_same_tokens(num_devices, monkeypatch):
    """Rows split over several devices (3: batches rounded up to a multiple that is not a power
    of two) give the plain greedy tokens. The first chunk runs on one device; later a batch is
    split while every device gets at least MIN_ROWS_PER_DEVICE rows, else runs on one."""
    devices = jax.devices()[:num_devices]
    assert len(devices) == num_devices, "tests run with 8 host devices (conftest.py)"
    min_rows = 4
    monkeypatch.setattr(decoding, "MIN_ROWS_PER_DEVICE", min_rows)
    spread = []
    advance = decoding._advance

    def spy(weights, config, state, *args):
        placed = {len(state.tokens.sharding.device_set), len(weights.head.sharding.device_set)}
        assert len(placed) == 1, "weights and state on different devices"
        spread.append((state.tokens.shape[0], placed.pop()))
        return advance(weights, config, state, *args)

    monkeypatch.setattr(decoding, "_advance", spy)
    eos = _eos_positions(_reference_tokens())  # all rows that stop and two that never do
    rows = np.concatenate([np.flatnonzero(eos > 0), np.flatnonzero(eos == -1)[:2]])
    tokens = decoding.greedy_decode(
        _lively_params(), VAE, _latents()[rows], max_length=MAX_LENGTH, min_batch=2, devices=devices
    )
    np.testing.assert_array_equal(tokens, _reference_tokens()[rows])
    # 33 rows in a power-of-two batch (a multiple of the devices), first chunk on one device
    assert spread[0] == (-(-64 // num_devices) * num_devices, 1)
    for rows, placed in spread[1:]:
        split = rows >= min_rows * num_devices
        assert placed == (num_devices if split else 1), (rows, placed)
        assert not split or rows % num_devices == 0
    assert {placed for _, placed in spread[1:]} == {1, num_devices}, spread


class _CountingBuffers(decoding.CacheBuffers):
    """CacheBuffers that records which growth targets it handed out."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.handed = []

    def take(self, shape, dtype, sharding):
        cache = super().take(shape, dtype, sharding)
        if cache is not None:
            self.handed.append((shape, cache))
        return cache


@pytest.mark.parametrize("num_devices", [1, 2])
def test_cache_buffers_are_reused_and_their_contents_ignored(num_devices, monkeypatch):
    """A pool kept between calls supplies the growth targets of the next decode (donated,
    written over), and the tokens are the plain greedy ones even when every held buffer is
    filled with NaN first. (Rows never stop here, so both calls grow the same shapes.)"""
    devices = jax.devices()[:num_devices]
    monkeypatch.setattr(decoding, "MIN_ROWS_PER_DEVICE", 4)
    buffers = _CountingBuffers()
    options = dict(max_length=MAX_LENGTH, suppress_eos=True, devices=devices)
    first = decoding.greedy_decode(_lively_params(), VAE, _latents(), buffers=buffers, **options)
    plain = decoding.greedy_decode(_lively_params(), VAE, _latents(), **options)
    np.testing.assert_array_equal(first, plain)
    assert buffers.nbytes > 0 and not buffers.handed  # filled; nothing to take on a first call

    def poisoned(x):
        return jax.device_put(np.full(x.shape, np.nan, x.dtype), x.sharding)

    for key, cache in list(buffers._free.items()):
        buffers._free[key] = jax.tree.map(poisoned, cache)
    latents = _latents(seed=7)
    tokens = decoding.greedy_decode(_lively_params(), VAE, latents, buffers=buffers, **options)
    reference = _plain_greedy(
        _lively_params(), VAE, latents, max_length=MAX_LENGTH, suppress_eos=True
    )
    np.testing.assert_array_equal(tokens, reference)
    assert len(buffers.handed) == len(range(64, MAX_LENGTH + 1, decoding._CACHE_BLOCK))
    for shape, cache in buffers.handed:
        assert shape[2] > decoding._CACHE_BLOCK  # growth targets only
        assert all(x.is_deleted() for x in jax.tree.leaves(cache)), "target was not donated"
        assert len(jax.tree.leaves(cache)[0].sharding.device_set) == num_devices


def test_cache_buffers_keep_at_most_max_bytes():
    latents = _latents(16, seed=2)
    options = dict(max_length=MAX_LENGTH, suppress_eos=True)
    unbounded = decoding.CacheBuffers()
    decoding.greedy_decode(_lively_params(), VAE, latents, buffers=unbounded, **options)
    held = unbounded.nbytes
    assert held > 0
    # it holds the 32- and 64-position caches (1/3 and 2/3 of the bytes): a cap of 3/4 drops
    # the older, smaller one
    cap = held * 3 // 4
    bounded = decoding.CacheBuffers(max_bytes=cap)
    tokens = decoding.greedy_decode(_lively_params(), VAE, latents, buffers=bounded, **options)
    assert held // 2 < bounded.nbytes <= cap
    again = decoding.greedy_decode(_lively_params(), VAE, latents, buffers=bounded, **options)
    np.testing.assert_array_equal(again, tokens)
    bounded.clear()
    assert bounded.nbytes == 0
    # arrays that were donated elsewhere are not kept
    cache = ((jax.numpy.zeros((2, 4, 32, 8)),) * 2,)
    jax.tree.leaves(cache)[0].delete()
    bounded.give(cache)
    assert bounded.nbytes == 0


@pytest.mark.parametrize(
    "head, padded", [("query", False), ("query", True), ("full_sequence", True)]
)
def test_cached_greedy_equals_plain_greedy_for_memories(head, padded):
    config = dataclasses.replace(VAE, head=head)
    params = {"t5": _lively_params()["t5"]}
    rng = np.random.default_rng(1)
    memory = rng.normal(size=(12, 6, 32)).astype(np.float32)
    mask = None
    if padded:
        mask = (np.arange(6)[None] < rng.integers(2, 7, (12, 1))).astype(np.int32)
    cached = decoding.greedy_decode_memory(
        params, config, memory, mask, max_length=40, batch_size=8, check_every=4, min_batch=2
    )
    reference = _plain_greedy(params, config, memory, mask, max_length=40)
    np.testing.assert_array_equal(cached, reference)
    assert len(set(map(tuple, cached.tolist()))) > 6  # different memories, different outputs
    if mask is not None:  # masked memory slots are invisible
        hidden = np.where(mask[..., None] == 1, memory, 50.0)
        again = decoding.greedy_decode_memory(params, config, hidden, mask, max_length=40)
        np.testing.assert_array_equal(again, cached)


def test_tokens_to_phrases():
    rows = np.array(
        [
            [BOS_ID, 152, 24, 341, 549, EOS_ID, PAD_ID, PAD_ID],
            [BOS_ID, 9, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
            [BOS_ID, 23, 23, 23, 23, 23, 23, 23],  # never stopped
            [BOS_ID, EOS_ID, 24, 24, PAD_ID, PAD_ID, PAD_ID, PAD_ID],  # after [EOS]: ignored
        ]
    )
    assert decoding.tokens_to_phrases(rows) == [
        "i-0 o-0 p-60 d-12",
        "[INST]",
        "b-1 b-1 b-1 b-1 b-1 b-1 b-1",
        "",
    ]


def test_bad_input_is_reported():
    params = _lively_params()
    with pytest.raises(ValueError, match=r"latents must be \[N, 16\]"):
        decoding.greedy_decode(params, VAE, np.zeros((3, 8)))
    with pytest.raises(ValueError, match="max_length"):
        decoding.greedy_decode(params, VAE, _latents(2), max_length=1)
    with pytest.raises(ValueError, match="needs head 'vae'"):
        decoding.greedy_decode(params, dataclasses.replace(VAE, head="query"), _latents(2))
    with pytest.raises(ValueError, match="memory_mask"):
        decoding.greedy_decode_memory(params, VAE, np.zeros((2, 4, 32)), np.ones((2, 3)))
    with pytest.raises(TypeError, match="max_lenght"):  # options are greedy_decode's
        decoding.greedy_decode_memory(params, VAE, np.zeros((2, 4, 32)), max_lenght=8)


def test_suppress_eos_runs_every_position_and_matches_plain_greedy():
    latents = _latents(12, seed=3)
    options = dict(max_length=24, suppress_eos=True)
    cached = decoding.greedy_decode(_lively_params(), VAE, latents, batch_size=8, **options)
    reference = _plain_greedy(_lively_params(), VAE, latents, **options)
    np.testing.assert_array_equal(cached, reference)
    assert not np.any(cached == EOS_ID) and not np.any(cached == PAD_ID)
    # Without suppression most of these rows stop early, so the option changed the work.
    plain = decoding.greedy_decode(_lively_params(), VAE, latents, max_length=24)
    assert np.sum(np.any(plain == EOS_ID, axis=1)) >= 6
    first = plain[:, 1] != EOS_ID  # the same model: the same first token unless it was [EOS]
    assert first.sum() >= 3
    np.testing.assert_array_equal(cached[first, 1], plain[first, 1])


def test_decoder_weights_cast_matmul_kernels_once():
    weights = decoding.decoder_weights(
        _lively_params(), decoding.with_compute_dtype(VAE, "bfloat16")
    )
    layer = weights.layers[0]
    assert layer.qkv.shape == (32, 3 * 32) and layer.qkv.dtype == jax.numpy.bfloat16
    assert weights.head.shape == (32, 1000) and weights.head.dtype == jax.numpy.bfloat16
    assert weights.embedding.dtype == np.float32 and layer.self_norm.dtype == np.float32
    assert decoding.with_compute_dtype(VAE, "bfloat16").t5.dtype == "bfloat16"
    assert VAE.t5.dtype == "float32" and decoding.with_compute_dtype(VAE, None) is VAE


def test_bfloat16_decoding_mostly_agrees_with_float32():
    """bfloat16 matmuls (float32 norms, softmax, logits, argmax) give nearly the float32 tokens;
    the cached bfloat16 loop and the plain bfloat16 loop agree as closely."""
    fp32 = _reference_tokens()
    bf16 = decoding.greedy_decode(
        _lively_params(), VAE, _latents(), max_length=MAX_LENGTH, compute_dtype="bfloat16"
    )
    plain_bf16 = _plain_greedy(
        _lively_params(), VAE, _latents(), max_length=MAX_LENGTH, compute_dtype="bfloat16"
    )
    assert bf16.dtype == np.int32 and bf16.shape == fp32.shape
    first_tokens = np.mean(bf16[:, 1:5] == fp32[:, 1:5])
    same_rows = np.mean((bf16 == fp32).all(1))
    same_as_plain = np.mean((bf16 == plain_bf16).all(1))
    print(
        f"bf16 vs fp32: first 4 tokens {first_tokens:.3f}, rows {same_rows:.3f}; "
        f"cached vs plain bf16 rows {same_as_plain:.3f}"
    )
    assert first_tokens >= 0.9 and same_rows >= 0.5 and same_as_plain >= 0.5


def test_phrase_vae_model_decodes_in_the_asked_dtype():
    from phraseldm_jax import vae_inference

    latents = _latents(6, seed=5)
    model = vae_inference.PhraseVAEModel(
        VAE, _lively_params(), max_length=16, decode_batch_size=8, compute_dtype="bfloat16"
    )
    expected = decoding.greedy_decode(
        _lively_params(), VAE, latents, max_length=16, batch_size=8, compute_dtype="bfloat16"
    )
    assert model.decode(latents) == decoding.tokens_to_phrases(expected)
    with pytest.raises(ValueError, match="T5Config.dtype"):
        decoding.greedy_decode(_lively_params(), VAE, latents, compute_dtype="float64")

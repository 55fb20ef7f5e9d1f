"""Packed PhraseVAE training rows (``data.pack_phrases``): the pipeline's ``pack_batch`` keeps
every phrase intact and once, the model's packed forward gives the loss and gradients of the
same phrases one per row, and packed training runs and resumes on the 8-device mesh."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vae_fixtures as fx

from input_pipeline import vae_pipeline
from input_pipeline.batching import pack_batch
from input_pipeline.vae_pipeline import make_iterator
from phraseldm_jax import errors, metric_writer, vae_task
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.vocab import IGNORE_LABEL, PAD_ID


def _corpus(n: int, seed: int = 0) -> list[dict]:
    """Phrases of 4 to 61 tokens (their lengths vary, so packing has something to do)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        tokens = [f"i-{rng.integers(0, 129)}"]
        for _ in range(int(rng.integers(1, 21))):
            tokens += [f"o-{rng.integers(0, 48)}", f"p-{rng.integers(30, 100)}"]
            tokens += [f"d-{rng.integers(1, 48)}"]
        records.append({"text": " ".join(tokens)})
    return records


def _padded_batch(stage: int, batch_size: int = 24, seed: int = 3) -> dict:
    iterator = make_iterator(
        _corpus(60, seed), stage=stage, batch_size=batch_size, seed=seed, train=True
    )
    return next(iterator)


def _phrases_of_packed(packed: dict) -> dict[int, tuple]:
    """record index -> (encoder ids, decoder ids, labels) read back from packed rows."""
    out = {}
    for row, slot in zip(*np.nonzero(packed["weight"])):
        enc = packed["segment_ids"][row] == slot + 1
        dec = packed["decoder_segment_ids"][row] == slot + 1
        assert np.flatnonzero(enc)[0] == packed["query_starts"][row, slot]
        for where in (enc, dec):  # each segment is one contiguous run
            positions = np.flatnonzero(where)
            assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))
        out[int(packed["record_index"][row, slot])] = (
            tuple(packed["input_ids"][row, enc]),
            tuple(packed["decoder_input_ids"][row, dec]),
            tuple(packed["labels"][row, dec]),
        )
    return out


def _phrases_of_padded(batch: dict) -> dict[int, tuple]:
    out = {}
    for row in range(len(batch["input_ids"])):
        n_in = int(batch["attention_mask"][row].sum())
        n_out = int((batch["labels"][row] != IGNORE_LABEL).sum())
        out[int(batch["record_index"][row])] = (
            tuple(batch["input_ids"][row, :n_in]),
            tuple(batch["decoder_input_ids"][row, :n_out]),
            tuple(batch["labels"][row, :n_out]),
        )
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_pack_batch_keeps_every_phrase_once_and_intact(stage):
    batch = _padded_batch(stage)
    packed = pack_batch(batch, max_segments=5, row_multiple=4)
    rows, length = packed["input_ids"].shape
    assert length == batch["input_ids"].shape[1] and rows % 4 == 0
    assert rows < len(batch["input_ids"])  # fewer rows than phrases
    assert packed["weight"].shape == (rows, 5) and packed["weight"].sum() == 24
    assert _phrases_of_packed(packed) == _phrases_of_padded(batch)
    # Segments are numbered 1.. without gaps; padding is PAD / -100 / segment 0.
    for row in range(rows):
        used = int(packed["weight"][row].sum())
        assert set(np.unique(packed["segment_ids"][row])) <= set(range(used + 1))
        pad = packed["segment_ids"][row] == 0
        assert np.all(packed["input_ids"][row, pad] == PAD_ID)
        assert np.all(packed["labels"][row, packed["decoder_segment_ids"][row] == 0] == -100)
    np.testing.assert_array_equal(packed["attention_mask"], packed["segment_ids"] != 0)


def test_pack_batch_rows_fill_up_to_the_length_and_segment_cap():
    batch = _padded_batch(2, batch_size=32)
    for cap in (1, 3, 16):
        packed = pack_batch(batch, max_segments=cap, row_multiple=1)
        assert int(packed["weight"].sum(1).max()) <= cap
        assert int((packed["segment_ids"] != 0).sum(1).max()) <= packed["input_ids"].shape[1]
    one_each = pack_batch(batch, max_segments=1, row_multiple=1)
    assert one_each["input_ids"].shape[0] == 32


def _noise_by_slot(packed: dict, record_order: np.ndarray, noise: np.ndarray) -> np.ndarray:
    out = np.zeros(packed["weight"].shape + noise.shape[1:], np.float32)
    position = {int(r): i for i, r in enumerate(record_order)}
    for row, slot in zip(*np.nonzero(packed["weight"])):
        out[row, slot] = noise[position[int(packed["record_index"][row, slot])]]
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_packed_loss_and_gradients_equal_one_phrase_per_row(stage):
    config = fx.tiny_config(stage)
    model_config = vae_task.model_config(config)
    model = vae_lib.PhraseVAE(model_config)
    params = vae_lib.init_params(jax.random.PRNGKey(stage), model_config)
    batch = _padded_batch(stage)
    packed = pack_batch(batch, max_segments=16, row_multiple=2)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (24, model_config.latent_dim)))

    def loss(p, b, eps):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        eps = jnp.asarray(eps) if stage == 3 else None
        return vae_task.vae_loss(model, 0.01, p, b, train=False, latent_noise=eps)

    (plain, plain_metrics), plain_grads = jax.value_and_grad(loss, has_aux=True)(
        params, batch, noise
    )
    (pack, pack_metrics), pack_grads = jax.value_and_grad(loss, has_aux=True)(
        params, packed, _noise_by_slot(packed, batch["record_index"], noise)
    )
    np.testing.assert_allclose(float(pack), float(plain), rtol=1e-6)
    for key in plain_metrics:
        np.testing.assert_allclose(float(pack_metrics[key]), float(plain_metrics[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(pack_grads)):
        assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(a)) + 1e-12


def test_packed_batches_restore_exactly_and_split_over_processes():
    source = _corpus(50, seed=1)
    kwargs = dict(stage=2, batch_size=16, seed=5, train=True, pack_max_segments=8)
    reference = list(itertools.islice(make_iterator(source, **kwargs), 7))
    iterator = make_iterator(source, **kwargs)
    list(itertools.islice(iterator, 3))
    fresh = make_iterator(source, **kwargs)
    fresh.set_state(iterator.get_state())
    for a, b in zip(itertools.islice(fresh, 4), reference[3:]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Two processes: equal row blocks of the same global packed batch.
    parts = [
        list(itertools.islice(make_iterator(source, process_index=p, process_count=2, **kwargs), 4))
        for p in (0, 1)
    ]
    # (the global row count is then a multiple of 2: compare with that single-process run)
    even = list(itertools.islice(make_iterator(source, pack_row_multiple=2, **kwargs), 4))
    for step, (a, b) in enumerate(zip(*parts)):
        assert a["input_ids"].shape == b["input_ids"].shape
        whole = even[step]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])


def test_packing_config_mistakes_are_config_errors():
    config = fx.tiny_config(2)
    config.data.pack_phrases = True
    config.data.bucket_lengths = (16, 64)
    with pytest.raises(errors.ConfigError, match="bucket_lengths"):
        vae_task.check_data_config(config.data)
    config.data.bucket_lengths = ()
    config.data.pack_max_segments = 0
    with pytest.raises(errors.ConfigError, match="pack_max_segments"):
        vae_task.check_data_config(config.data)
    with pytest.raises(ValueError, match="bucket_lengths"):
        make_vae_kwargs = dict(stage=2, batch_size=4, seed=0, train=True, max_length=64)
        vae_pipeline.make_vae_dataset(
            _corpus(8), bucket_lengths=(32, 64), pack_max_segments=4, **make_vae_kwargs
        )


def test_paper_and_small_configs_pack_by_default():
    from configs import vae_common

    for size in ("", "small"):
        data = vae_common.vae_config(3, size).data
        assert data.pack_phrases and not data.bucket_lengths
        vae_task.check_data_config(data)


def _packed_tiny(stage: int, **train):
    config = fx.tiny_config(stage, **train)
    config.data.bucket_lengths = ()
    config.data.pack_phrases = True
    config.data.pack_max_segments = 8
    return config


def test_packed_training_runs_on_the_mesh_and_resumes_exactly(tmp_path):
    """Stage 3, packed rows split over the 8 test devices: a run stopped after 3 steps and
    resumed ends with the parameters and losses of a straight 6-step run."""
    assert jax.local_device_count() == 8
    straight = tmp_path / "straight"
    fx.train(straight, _packed_tiny(3, num_steps=6, ckpt_every=3, log_every=1))
    halves = tmp_path / "halves"
    fx.train(halves, _packed_tiny(3, num_steps=3, ckpt_every=3, log_every=1))
    fx.train(halves, _packed_tiny(3, num_steps=6, ckpt_every=3, log_every=1))
    fx.assert_trees_equal(fx.params_of(straight), fx.params_of(halves))

    def losses(workdir):
        rows = metric_writer.read_jsonl(str(workdir))
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    assert losses(straight) == losses(halves) and len(losses(straight)) >= 2
    assert all(np.isfinite(loss) for _, loss in losses(straight))


def test_the_loop_compiles_one_program_per_batch_shape(tmp_path):
    """No recompilation in the loop: fixed-length batches give one compiled step program,
    packed batches one per distinct batch shape that the data produced."""
    fixed = fx.train(tmp_path / "fixed", fx.tiny_config(2, num_steps=5))
    assert fixed.compiled_step_programs == 1
    config = _packed_tiny(2, num_steps=8)
    packed = fx.train(tmp_path / "packed", config)
    shapes = {
        batch["input_ids"].shape
        for batch in itertools.islice(vae_pipeline.make_train_iter(config, 8)(0, 1), 8)
    }
    assert packed.compiled_step_programs == len(shapes)

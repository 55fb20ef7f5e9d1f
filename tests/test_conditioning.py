"""Length buckets, the length encoder's errors, and the section encoder's shapes, mask,
padding, lack of a padding mask, dropout and id validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import conditioning, phrases


def test_length_bucket_edges():
    buckets = phrases.length_bucket(jnp.array([1, 9, 10, 59, 60, 64, 69, 70, 128]))
    np.testing.assert_array_equal(buckets, [0, 0, 1, 5, 6, 6, 6, 7, 12])


def test_length_encoder_looks_up_bucket_rows():
    encoder = conditioning.LengthEncoder(features=16)
    params = encoder.init(jax.random.key(0), jnp.array([64]))["params"]
    table = np.asarray(params["embedding"])
    assert table.shape == (128, 16)
    assert 0.7 < table.std() < 1.3  # torch's N(0, 1), not a fan-in scaled init
    out = np.asarray(encoder.apply({"params": params}, jnp.array([59, 60, 69, 70])))
    assert out.shape == (4, 1, 16)
    np.testing.assert_array_equal(out[:, 0], table[[5, 6, 6, 7]])


@pytest.mark.parametrize("n_bars", [0, -3, 129])
def test_length_encoder_rejects_bar_counts_out_of_range(n_bars):
    encoder = conditioning.LengthEncoder(features=4)
    with pytest.raises(ValueError, match=r"n_bars must be in 1\.\.128.*" + str(n_bars)):
        encoder.init(jax.random.key(0), jnp.array([64, n_bars]))


def test_length_encoder_rejects_bucket_out_of_range():
    encoder = conditioning.LengthEncoder(features=4, num_buckets=128, bucket_size=1)
    with pytest.raises(ValueError, match="index out of range"):
        encoder.init(jax.random.key(0), jnp.array([127, 128]))
    params = encoder.init(jax.random.key(0), jnp.array([127]))
    assert params["params"]["embedding"].shape == (128, 4)


C = 32  # section feature width in these tests (8 heads of 4)


@functools.cache
def _section_setup():
    encoder = conditioning.SectionEncoder(features=C)
    ids = jnp.zeros((2, 30), jnp.int32).at[:, 0].set(1)
    params = jax.jit(encoder.init)(jax.random.key(0), ids, ids)["params"]
    apply = jax.jit(encoder.apply, static_argnames="deterministic")
    return encoder, params, apply


def _ids():
    types = np.zeros((2, 30), np.int32)
    lengths = np.zeros((2, 30), np.int32)
    types[0, :4], lengths[0, :4] = [4, 3, 3, 9], [8, 8, 16, 4]
    types[1, :2], lengths[1, :2] = [11, 1], [32, 1]
    return types, lengths


def test_section_encoder_shapes_mask_and_parameters():
    encoder, params, apply = _section_setup()
    assert params["type_embed"].shape == (12, C // 2)
    assert params["len_embed"].shape == (33, C // 2)
    assert sorted(k for k in params if k.startswith("layers_")) == [
        "layers_0",
        "layers_1",
        "layers_2",
    ]
    assert params["layers_0"]["linear1"]["kernel"].shape == (C, 4 * C)
    types, lengths = _ids()
    states, mask = apply({"params": params}, types, lengths)
    assert states.shape == (2, 30, C) and states.dtype == jnp.float32
    assert mask.dtype == jnp.float32
    np.testing.assert_array_equal(mask[0], [1] * 4 + [0] * 26)
    np.testing.assert_array_equal(mask[1], [1] * 2 + [0] * 28)


def test_section_encoder_pads_short_inputs_to_max_sections():
    encoder, params, apply = _section_setup()
    types, lengths = _ids()
    full = apply({"params": params}, types, lengths)
    short = encoder.apply({"params": params}, types[:, :5], lengths[:, :5])
    np.testing.assert_allclose(short[0], full[0], atol=1e-6)
    np.testing.assert_array_equal(short[1], full[1])


def test_section_encoder_has_no_padding_mask():
    """Like the original, pads take part in self-attention: their embedding (row 0) changes
    the states of the real sections."""
    _, params, apply = _section_setup()
    types, lengths = _ids()
    states, _ = apply({"params": params}, types, lengths)
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["type_embed"] = params["type_embed"].at[0].add(1.0)
    states_changed, _ = apply({"params": changed}, types, lengths)
    assert np.abs(np.asarray(states_changed[0, :4] - states[0, :4])).max() > 1e-3


def test_section_encoder_dropout_only_when_not_deterministic():
    _, params, apply = _section_setup()
    types, lengths = _ids()
    base, _ = apply({"params": params}, types, lengths, deterministic=True)
    again, _ = apply({"params": params}, types, lengths, deterministic=True)
    np.testing.assert_array_equal(base, again)
    rngs = {"dropout": jax.random.key(1)}
    dropped, _ = apply({"params": params}, types, lengths, deterministic=False, rngs=rngs)
    assert np.abs(np.asarray(dropped - base)).max() > 1e-3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, n: t.__setitem__((0, 0), 12), r"type ids must be in 0\.\.11"),
        (lambda t, n: n.__setitem__((0, 1), 33), r"length ids must be in 0\.\.32"),
        (lambda t, n: n.__setitem__((0, 4), 5), "pad type with a real length"),
        (lambda t, n: (t.__setitem__((1, 3), 2), n.__setitem__((1, 3), 2)), "after a pad"),
    ],
)
def test_section_ids_are_validated(edit, message):
    encoder, params, _ = _section_setup()
    types, lengths = _ids()
    edit(types, lengths)
    with pytest.raises(ValueError, match=message):
        encoder.apply({"params": params}, types, lengths)


def test_too_many_sections_is_an_error():
    encoder, params, _ = _section_setup()
    ids = np.ones((1, 31), np.int32)
    with pytest.raises(ValueError, match="31 sections, at most 30"):
        encoder.apply({"params": params}, ids, ids)


def test_section_ids_from_plan_strings():
    from phraseldm_jax import sections

    types, lengths = conditioning.section_ids_from_plans(["i-8 A-8 B-16", "i4x4"])
    assert types.shape == lengths.shape == (2, 30) and types.dtype == np.int32
    vocab = sections.DEFAULT_SECTION_VOCAB
    assert types[0, :4].tolist() == [vocab.type_to_id[t] for t in "iAB"] + [0]
    assert lengths[0, :3].tolist() == [vocab.length_to_id[n] for n in ("8", "8", "16")]
    assert types[1, :3].tolist() == [vocab.type_to_id["i"], vocab.type_to_id["x"], 0]
    conditioning.check_section_ids(types, lengths)  # valid encoder input
    encoder, params, apply = _section_setup()
    _, mask = apply({"params": params}, types, lengths)
    assert mask.sum(axis=1).tolist() == [3, 2]
    with pytest.raises(sections.SectionPlanError):
        conditioning.section_ids_from_plans(["i-8 Q-8"])

"""Inpainting (RePaint) and SDEdit loops: for every sampler the known region equals the
forward-noised known latents after every step and the known latents exactly at the end; an
empty mask gives ``sample_loop``'s result bit for bit; resampling and SDEdit run the steps
they should; plain sampling through ``LatentSampler`` is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import diffusion, inpainting

SHAPE = (2, 12, 4)  # batch, slots, channels


def _denoise(x, t):
    """A toy epsilon model that mixes slots (as attention does) and depends on t."""
    scale = (t.astype(jnp.float32) / 1000.0)[:, None, None]
    return 0.5 * x + 0.1 * jnp.mean(x, axis=1, keepdims=True) * (1 + scale)


def _known():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE[:2] + (1,), bool)
    mask[0, :5] = mask[1, 3:9] = True
    return inpainting.Known(jnp.asarray(x0), jnp.asarray(mask))


CASES = [("ddpm", 10, {}), ("ddim", 6, {}), ("ddim", 6, {"eta": 1.0}), ("dpmpp_2m", 6, {})]


@pytest.mark.parametrize("sampler, steps, extra", CASES)
@pytest.mark.parametrize("resample", [0, 2])
def test_known_region_follows_the_forward_process(sampler, steps, extra, resample):
    known, key = _known(), jax.random.PRNGKey(3)
    x_T = jax.random.normal(jax.random.PRNGKey(9), SHAPE)
    run = jax.jit(
        lambda x: inpainting.edit_loop(
            _denoise, x, known, sampler=sampler, num_steps=steps, key=key,
            resample=resample, clip_range=3.0, trajectory=True, **extra,
        )
    )  # fmt: skip
    x0, states = run(x_T)
    mask = np.broadcast_to(np.asarray(known.mask), SHAPE)
    schedule = diffusion.reference_schedule()
    _, t_next, _ = inpainting._schedule_steps(sampler, steps, None, schedule)
    assert states.shape == (steps, *SHAPE)
    for i in range(steps):
        noise = inpainting.edit_noise(key, i, resample, inpainting.KNOWN_STREAM, SHAPE)
        expected = inpainting.forward_noised(known.x0, noise, t_next[i], schedule)
        # equal up to float rounding (XLA fuses the jitted multiply-adds)
        np.testing.assert_allclose(
            np.asarray(states[i])[mask], np.asarray(expected)[mask], rtol=1e-6, atol=1e-6
        )
    np.testing.assert_array_equal(np.asarray(x0)[mask], np.asarray(known.x0)[mask])
    assert np.isfinite(np.asarray(x0)).all()
    # The generated region moved away from the known latents and depends on them.
    assert not np.allclose(np.asarray(x0)[~mask], np.asarray(known.x0)[~mask])
    other = inpainting.Known(known.x0 + 1.0, known.mask)
    moved = inpainting.edit_loop(
        _denoise, x_T, other, sampler=sampler, num_steps=steps, key=key, resample=resample,
        **extra,
    )  # fmt: skip
    assert not np.allclose(np.asarray(moved)[~mask], np.asarray(x0)[~mask])


@pytest.mark.parametrize("sampler, steps, extra", CASES)
def test_an_empty_mask_is_plain_sampling(sampler, steps, extra):
    key = jax.random.PRNGKey(4)
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    empty = inpainting.Known(jnp.ones(SHAPE), jnp.zeros(SHAPE[:2] + (1,), bool))
    args = dict(sampler=sampler, num_steps=steps, key=key, clip_range=2.0, **extra)
    plain = jax.jit(lambda x: diffusion.sample_loop(_denoise, x, **args))(x_T)
    edited = jax.jit(lambda x: inpainting.edit_loop(_denoise, x, empty, **args))(x_T)
    np.testing.assert_array_equal(np.asarray(edited), np.asarray(plain))


def test_resampling_calls_the_model_once_per_round():
    calls = []

    def counting(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return _denoise(x, t)

    x_T = jnp.zeros(SHAPE)
    inpainting.edit_loop(
        counting, x_T, _known(), sampler="ddim", num_steps=4, key=jax.random.PRNGKey(0),
        resample=3,
    ).block_until_ready()  # fmt: skip
    jax.effects_barrier()
    assert len(calls) == 4 * 4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sdedit_runs_the_last_steps_from_the_noised_song(sampler):
    steps, key = 10, jax.random.PRNGKey(2)
    song = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE).astype(np.float32))
    x_T = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
    assert [inpainting.start_index(steps, s) for s in (1.0, 0.4, 0.01)] == [0, 6, 9]
    x0, states = inpainting.edit_loop(
        _denoise, x_T, init=song, strength=0.4, sampler=sampler, num_steps=steps, key=key,
        trajectory=True,
    )  # fmt: skip
    assert states.shape == (4, *SHAPE) and np.isfinite(np.asarray(x0)).all()
    # Weaker edits stay closer to the song.
    far = inpainting.edit_loop(
        _denoise, x_T, init=song, strength=1.0, sampler=sampler, num_steps=steps, key=key
    )
    near = inpainting.edit_loop(
        _denoise, x_T, init=song, strength=0.1, sampler=sampler, num_steps=steps, key=key
    )
    assert np.abs(near - song).mean() < np.abs(far - song).mean()
    with pytest.raises(ValueError, match="strength must be in"):
        inpainting.start_index(steps, 0.0)
    with pytest.raises(ValueError, match="needs the `init`"):
        inpainting.edit_loop(_denoise, x_T, strength=0.5, num_steps=steps, key=key)
    with pytest.raises(ValueError, match="needs a known region"):
        inpainting.edit_loop(_denoise, x_T, resample=1, num_steps=steps, key=key)

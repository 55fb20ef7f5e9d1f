"""Diffusion math against diffusers' schedulers (DDPM step to 1e-6, whole DDIM/DPM++ loops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phraseldm_jax import diffusion
from phraseldm_jax.diffusion import REFERENCE_CLIP_RANGE

SHAPE = (2, 8, 4)
# diffusers 0.42 calls np.array(tensor) in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _torch():
    return pytest.importorskip("torch", reason="diffusers parity needs the torch extra")


def _diffusers_schedulers():
    _torch()
    return pytest.importorskip("diffusers.schedulers", reason="parity needs diffusers")


_ABAR = diffusion.reference_schedule().alphas_cumprod


def _fake_eps_jax(x, t):
    """A fixed nonlinear 'denoiser': the optimal eps for N(0, 0.5) data plus a sine term.

    Bounded x0 predictions keep whole loops well conditioned, so they can be compared.
    """
    a = jnp.asarray(_ABAR)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return (1 - a) ** 0.5 * x / (0.5 * a + 1 - a) + 0.2 * a**0.5 * jnp.sin(3 * x)


def _fake_eps_torch(x, t):
    torch = _torch()
    a = float(_ABAR[int(t)])
    return (1 - a) ** 0.5 * x / (0.5 * a + 1 - a) + 0.2 * a**0.5 * torch.sin(3 * x)


def _rand(seed, shape=SHAPE, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- schedules


def test_reference_schedule_values():
    sched = diffusion.reference_schedule()
    ac = sched.alphas_cumprod
    assert ac.dtype == np.float32 and ac.shape == (1000,)
    assert np.all(np.diff(ac) < 0)
    # Values diffusers 0.42.1 produces for squaredcos_cap_v2 (float32, printed from torch).
    assert ac[0] == np.float32(0.9999587) and ac[1] == np.float32(0.99991256)
    assert ac[-1] == np.float32(2.4287350e-09)
    assert sched.betas[-1] == np.float32(0.999)  # the cap


def test_cosine_schedule_is_bit_identical_to_diffusers():
    sched_mod = _diffusers_schedulers()
    ref = sched_mod.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ours = diffusion.make_schedule("squaredcos_cap_v2")
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_linear_schedule_matches_diffusers():
    sched_mod = _diffusers_schedulers()
    ref = sched_mod.DDPMScheduler(beta_schedule="linear")
    ours = diffusion.make_schedule("linear")
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)


def test_unknown_schedule_and_sampler_are_rejected():
    with pytest.raises(ValueError, match="beta schedule"):
        diffusion.make_schedule("cosine")
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample_loop(_fake_eps_jax, jnp.zeros(SHAPE), sampler="euler", num_steps=2)
    with pytest.raises(ValueError, match="key"):
        diffusion.sample_loop(_fake_eps_jax, jnp.zeros(SHAPE), sampler="ddpm", num_steps=2)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.spaced_timesteps(0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 20, 50, 61, 1000])
def test_timesteps_match_diffusers(spacing, n):
    sched_mod = _diffusers_schedulers()
    ddim = sched_mod.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    ddim.set_timesteps(n)
    ref = ddim.timesteps.numpy()
    ours = diffusion.spaced_timesteps(n, spacing)
    assert len(ours) == n
    if len(ref) == n + 1:  # diffusers' float arange adds a spurious trailing -1 for n=61
        assert spacing == "trailing" and ref[-1] == -1
        ref = ref[:-1]
    np.testing.assert_array_equal(ours, ref)

    dpm = sched_mod.DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing
    )
    dpm.set_timesteps(n)
    ref = dpm.timesteps.numpy()
    ours = diffusion.dpm_solver_timesteps(n, spacing)
    if len(ref) == n + 1:
        assert spacing == "trailing" and ref[-1] == -1
        ref = ref[:-1]
    np.testing.assert_array_equal(ours, ref)


def test_trailing_starts_at_999_and_leading_does_not():
    assert diffusion.spaced_timesteps(50, "trailing")[0] == 999
    assert diffusion.spaced_timesteps(50, "leading")[0] == 980
    assert diffusion.dpm_solver_timesteps(20)[0] == 999


# ----------------------------------------------------------------------------- single steps


def test_add_noise_matches_diffusers():
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    ref = sched_mod.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = _rand(0), _rand(1)
    t = np.array([0, 731], np.int32)
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    ours = diffusion.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=0, atol=1e-6)


def test_add_noise_extremes():
    x0, noise = jnp.ones(SHAPE), jnp.zeros(SHAPE)
    out = diffusion.add_noise(x0, noise, jnp.array([0, 999]))
    assert np.allclose(out[0], np.sqrt(0.9999587), atol=1e-7)
    assert np.allclose(out[1], 0.0, atol=1e-4)  # all signal is gone at t = 999


@pytest.mark.parametrize("clip", [REFERENCE_CLIP_RANGE, None])
@pytest.mark.parametrize("t", [999, 998, 500, 10, 1, 0])
def test_ddpm_step_matches_diffusers(monkeypatch, t, clip):
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    x, eps, noise = _rand(2, scale=2.0), _rand(3), _rand(4)
    monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: torch.from_numpy(noise))
    ref = sched_mod.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        clip_sample_range=clip if clip is not None else 1.0,
    )
    out = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x))
    x_prev, x0 = diffusion.ddpm_step(
        jnp.asarray(x), jnp.asarray(eps), t, jnp.asarray(noise), clip_range=clip
    )
    # 1e-6, relative where unclipped x0 at t=999 reaches 1e4 (float32 spacing there is 2e-3).
    tol = dict(atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(x0), out.pred_original_sample.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(x_prev), out.prev_sample.numpy(), **tol)


def test_ddpm_step_per_example_timesteps_equal_scalar_steps():
    x, eps, noise = _rand(5), _rand(6), _rand(7)
    t = jnp.array([999, 0])
    batched, _ = diffusion.ddpm_step(x, eps, t, noise, clip_range=3.0)
    for row, t_row in enumerate([999, 0]):
        single, _ = diffusion.ddpm_step(
            x[row : row + 1], eps[row : row + 1], t_row, noise[row : row + 1], clip_range=3.0
        )
        np.testing.assert_allclose(np.asarray(batched[row]), np.asarray(single[0]), atol=1e-7)


def test_ddpm_step_at_t0_adds_no_noise():
    x, eps = _rand(8), _rand(9)
    a, _ = diffusion.ddpm_step(x, eps, 0, jnp.zeros(SHAPE))
    b, x0 = diffusion.ddpm_step(x, eps, 0, 100.0 * jnp.ones(SHAPE))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(b), np.asarray(x0), atol=1e-6)  # t=0 returns x0


# ----------------------------------------------------------------------------- whole loops


def _diffusers_loop(scheduler, x_T, eps_fn, step_kwargs=lambda i: {}):
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(eps_fn(x, int(t)), t, x, **step_kwargs(i)).prev_sample
    return x


def test_ddpm_1000_step_loop_matches_diffusers(monkeypatch):
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    key = jax.random.key(0)
    x_T = _rand(10)
    # Feed diffusers the same per-step noise our loop draws.
    calls = iter(range(1000))
    monkeypatch.setattr(
        ddpm_mod,
        "randn_tensor",
        lambda *a, **k: torch.from_numpy(np.array(diffusion.step_noise(key, next(calls), SHAPE))),
    )
    ref = sched_mod.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample_range=REFERENCE_CLIP_RANGE
    )
    expected = _diffusers_loop(ref, torch.from_numpy(x_T), _fake_eps_torch).numpy()

    ours = jax.jit(
        lambda x, k: diffusion.sample_loop(
            _fake_eps_jax, x, sampler="ddpm", num_steps=1000, key=k, clip_range=REFERENCE_CLIP_RANGE
        )
    )(jnp.asarray(x_T), key)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # a real, non-degenerate trajectory


def test_strided_ddpm_loop_matches_diffusers_set_timesteps(monkeypatch):
    """Fewer DDPM steps step to the next listed timestep, as DDPMScheduler.set_timesteps does."""
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    key = jax.random.key(5)
    x_T = _rand(15)
    calls = iter(range(50))
    monkeypatch.setattr(
        ddpm_mod,
        "randn_tensor",
        lambda *a, **k: torch.from_numpy(np.array(diffusion.step_noise(key, next(calls), SHAPE))),
    )
    ref = sched_mod.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ref.set_timesteps(50)
    expected = _diffusers_loop(ref, torch.from_numpy(x_T), _fake_eps_torch).numpy()
    ours = diffusion.sample_loop(
        _fake_eps_jax, jnp.asarray(x_T), sampler="ddpm", num_steps=50, key=key, clip_range=1.0
    )
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


@pytest.mark.parametrize(
    "num_steps, eta, spacing, clip",
    [
        (50, 0.0, "trailing", REFERENCE_CLIP_RANGE),
        (20, 0.7, "leading", None),
        (30, 0.0, "linspace", 2.0),
    ],
)
def test_ddim_loop_matches_diffusers(num_steps, eta, spacing, clip):
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    key = jax.random.key(1)
    x_T = _rand(11)
    ref = sched_mod.DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
        timestep_spacing=spacing,
    )
    ref.set_timesteps(num_steps)

    def kwargs(i):
        noise = np.array(diffusion.step_noise(key, i, SHAPE))
        return {"eta": eta, "variance_noise": torch.from_numpy(noise) if eta > 0 else None}

    expected = _diffusers_loop(ref, torch.from_numpy(x_T), _fake_eps_torch, kwargs).numpy()
    ours = diffusion.sample_loop(
        _fake_eps_jax,
        jnp.asarray(x_T),
        sampler="ddim",
        num_steps=num_steps,
        key=key,
        eta=eta,
        clip_range=clip,
        timestep_spacing=spacing,
    )
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5)


# Loops that start at t=999 compare to 1e-3 only: there x0 = (x - sigma * eps) / alpha with
# alpha = 5e-5, so the last-bit differences of XLA's fused multiply-add and division (both
# legitimate float32 results) are amplified 2e4 times in the first step. Loops that start
# lower ("leading") are well conditioned and agree to float32 round-off.
@pytest.mark.parametrize(
    "num_steps, spacing, clip, atol",
    [
        (20, "leading", None, 5e-6),
        (25, "leading", 0.5, 5e-6),
        (2, "leading", None, 5e-6),
        (20, "linspace", None, 1e-3),
        (7, "trailing", None, 1e-3),
    ],
)
def test_dpmpp_2m_loop_matches_diffusers(num_steps, spacing, clip, atol):
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    x_T = _rand(12)
    ref = sched_mod.DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing=spacing,
        thresholding=clip is not None,
    )
    if clip is not None:  # diffusers' x0 hook; plain clipping stands in for dynamic thresholding
        ref._threshold_sample = lambda s: s.clamp(-clip, clip)
    ref.set_timesteps(num_steps)
    expected = _diffusers_loop(ref, torch.from_numpy(x_T), _fake_eps_torch).numpy()
    ours = diffusion.sample_loop(
        _fake_eps_jax,
        jnp.asarray(x_T),
        sampler="dpmpp_2m",
        num_steps=num_steps,
        clip_range=clip,
        clipped_eps=True,  # diffusers' thresholding keeps x: the eps of the clipped x0
        timestep_spacing=spacing,
    )
    np.testing.assert_allclose(np.asarray(ours), expected, atol=atol)


# The clipping tests need a denoiser that mixes positions: with an elementwise one a clipped
# element stays clipped to the end and both clipping forms give the same final sample.
def _mixing_eps_jax(x, t):
    return _fake_eps_jax(x, t) + 0.3 * jnp.roll(x, 1, axis=-1)


def _mixing_eps_torch(x, t):
    return _fake_eps_torch(x, t) + 0.3 * _torch().roll(x, 1, dims=-1)


def test_ddim_clipped_eps_matches_diffusers_use_clipped_model_output():
    torch = _torch()
    sched_mod = _diffusers_schedulers()
    x_T = _rand(16, scale=2.0)
    ref = sched_mod.DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5
    )
    ref.set_timesteps(20)
    kwargs = {"use_clipped_model_output": True}
    expected = _diffusers_loop(ref, torch.from_numpy(x_T), _mixing_eps_torch, lambda i: kwargs)
    ours = diffusion.sample_loop(
        _mixing_eps_jax,
        jnp.asarray(x_T),
        sampler="ddim",
        num_steps=20,
        clip_range=0.5,
        clipped_eps=True,
        timestep_spacing="leading",
    )
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=2e-5)
    plain = diffusion.sample_loop(
        _mixing_eps_jax,
        jnp.asarray(x_T),
        sampler="ddim",
        num_steps=20,
        clip_range=0.5,
        timestep_spacing="leading",
    )
    assert not np.allclose(np.asarray(plain), expected.numpy(), atol=1e-2)


def _ddim_chain(x, timesteps, clip, clipped_eps):
    """DDIM steps t_0 -> t_1 -> ... -> -1 (alphas_cumprod = 1), one fake-model call each."""
    prev = list(timesteps[1:]) + [-1]
    for t, t_prev in zip(timesteps, prev):
        eps = _mixing_eps_jax(x, jnp.full((x.shape[0],), int(t), jnp.int32))
        x, _ = diffusion.ddim_step(
            x, eps, int(t), int(t_prev), clip_range=clip, use_clipped_model_output=clipped_eps
        )
    return x


@pytest.mark.parametrize("clipped_eps", [False, True])
def test_first_order_dpmpp_with_clipping_is_ddim_on_the_same_timesteps(clipped_eps):
    """With 2 steps both DPM++ steps are first order, i.e. DDIM steps. A DPM++ that clips x0
    but keeps x (the eps of the clipped x0) is DDIM with use_clipped_model_output; our default
    must be DDIM's default (the model's eps), as the ddim sampler does, whatever the clip."""
    x_T = jnp.asarray(_rand(17, scale=2.0))
    clip = 0.5  # active at both steps
    ours = diffusion.sample_loop(
        _mixing_eps_jax,
        x_T,
        sampler="dpmpp_2m",
        num_steps=2,
        clip_range=clip,
        clipped_eps=clipped_eps,
        timestep_spacing="leading",
    )
    timesteps = diffusion.dpm_solver_timesteps(2, "leading")
    expected = _ddim_chain(x_T, timesteps, clip, clipped_eps)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5)
    other = _ddim_chain(x_T, timesteps, clip, not clipped_eps)
    assert not np.allclose(np.asarray(ours), np.asarray(other), atol=1e-3)


def test_dpmpp_tables_first_and_last_steps_are_first_order():
    tables = diffusion.dpm_solver_tables(10)
    assert tables.d1_coeff[0] == 0 and tables.d1_coeff[-1] == 0
    assert np.all(tables.d1_coeff[1:-1] != 0)
    # The last step lands on sigma = 0: it returns the x0 prediction itself.
    assert tables.x_coeff[-1] == 0 and tables.d0_coeff[-1] == 1


def test_classifier_free_guidance_combines_predictions():
    x_T = jnp.asarray(_rand(13))

    def cond_uncond(x, t):
        return _fake_eps_jax(x, t), 0.5 * _fake_eps_jax(x, t) - 0.2

    def combined(x, t):
        eps_c, eps_u = cond_uncond(x, t)
        return eps_u + 3.0 * (eps_c - eps_u)

    kw = dict(sampler="ddim", num_steps=10, clip_range=None)
    guided = diffusion.sample_loop(cond_uncond, x_T, guidance_scale=3.0, **kw)
    manual = diffusion.sample_loop(combined, x_T, **kw)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(manual), atol=1e-6)
    plain = diffusion.sample_loop(_fake_eps_jax, x_T, **kw)
    assert not np.allclose(np.asarray(guided), np.asarray(plain), atol=1e-3)


def test_loop_runs_under_jit_with_model_parameters_as_arguments():
    """The intended use: the model call is jitted together with the per-step math."""
    x_T = jnp.asarray(_rand(14))

    @jax.jit
    def sample(scale, x, key):
        return diffusion.sample_loop(
            lambda x, t: scale * _fake_eps_jax(x, t), x, sampler="ddpm", num_steps=25, key=key
        )

    a = sample(1.0, x_T, jax.random.key(3))
    b = sample(1.0, x_T, jax.random.key(3))
    c = sample(1.0, x_T, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert a.dtype == jnp.float32 and a.shape == SHAPE

"""Diffusion math: noise schedules, add_noise, DDPM / DDIM / DPM-Solver++(2M) steps and loops.

Everything here is a pure function: arrays in, arrays out, noise passed in explicitly (the
loops draw it from a key with `step_noise`, so a caller can reproduce it). The semantics are
those of diffusers' `DDPMScheduler`, `DDIMScheduler` and `DPMSolverMultistepScheduler`
(epsilon prediction), checked against them in `tests/test_diffusion.py`.

The reference PhraseLDM samples with DDPM over all 1000 training steps (t = 999..0, previous
t = t - 1, `fixed_small` variance) and clips the predicted x0 to +-3.0644507. That value is a
percentile of |raw VAE latent| but the reference applies it to the *scaled* latents (raw /
0.759); see SPEC section 9 item 2. The clip range is therefore a plain argument here: pass
`REFERENCE_CLIP_RANGE` to reproduce the reference, or
`REFERENCE_CLIP_RANGE / scale_factor` (about 4.04) to clip the same raw range consistently.

Shapes: `x` is any float array whose leading axis is the batch, e.g. `[batch, 512, 64]`;
`t` is a scalar or `[batch]` int array of training timesteps (0..num_train_steps-1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_STEPS = 1000
# 99.9th percentile of |raw latent| (reference `clip_range`), applied in scaled space there.
REFERENCE_CLIP_RANGE = 3.064450740814209
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
# Where the stored x0 clip value applies (sampler.model_space_clip); a model carries its own.
CLIP_MODES = ("scaled", "reference", "none")
SPACINGS = ("leading", "trailing", "linspace")
# What the denoiser outputs: the noise (the reference), or v = sqrt(abar) eps - sqrt(1-abar) x0.
PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule(NamedTuple):
    """Per-timestep constants, float32 numpy arrays of shape [num_train_steps]."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray


def cosine_betas(num_train_steps: int = NUM_TRAIN_STEPS, max_beta: float = 0.999) -> np.ndarray:
    """`squaredcos_cap_v2` betas: 1 - abar(t2)/abar(t1) in float64, capped, stored float32."""
    steps = np.arange(num_train_steps + 1, dtype=np.float64) / num_train_steps
    # math.cos per point, as Python floats, so the values are bit-identical to diffusers'.
    abar = np.array([math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 for s in steps])
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta).astype(np.float32)


def linear_betas(
    num_train_steps: int = NUM_TRAIN_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """`linear` betas. torch.linspace in float32 rounds a few entries differently (by 1 ulp)."""
    return np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64).astype(np.float32)


def make_schedule(
    name: str = "squaredcos_cap_v2", num_train_steps: int = NUM_TRAIN_STEPS
) -> NoiseSchedule:
    """Build a schedule exactly as diffusers does on the host.

    alphas = 1 - betas in float32; alphas_cumprod is their cumulative product accumulated in
    float64 and rounded to float32, which is what torch's CPU `cumprod` does (diffusers builds
    the schedule on the CPU), so the table matches diffusers bit for bit.
    """
    if name == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_steps)
    elif name == "linear":
        betas = linear_betas(num_train_steps)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; use 'squaredcos_cap_v2' or 'linear'")
    alphas = np.float32(1.0) - betas
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return NoiseSchedule(betas=betas, alphas_cumprod=alphas_cumprod)


@functools.cache
def reference_schedule() -> NoiseSchedule:
    """The reference PhraseLDM schedule: `squaredcos_cap_v2`, 1000 steps."""
    return make_schedule("squaredcos_cap_v2", NUM_TRAIN_STEPS)


def _per_example(values: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape per-timestep values (scalar or [batch]) to broadcast against x."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def _alpha_prod(schedule: NoiseSchedule, t: jax.Array, final: float = 1.0) -> jax.Array:
    """alphas_cumprod[t], and `final` where t < 0 (the step after the last one)."""
    table = jnp.asarray(schedule.alphas_cumprod)
    return jnp.where(t >= 0, table[jnp.maximum(t, 0)], jnp.float32(final))


def add_noise(
    x0: jax.Array, noise: jax.Array, t: jax.Array, *, schedule: NoiseSchedule | None = None
) -> jax.Array:
    """Forward diffusion q(x_t | x0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise.

    Args:
      x0, noise: [batch, ...] float.
      t: [batch] (or scalar) int timesteps.
    """
    schedule = schedule or reference_schedule()
    abar = jnp.asarray(schedule.alphas_cumprod).astype(x0.dtype)[jnp.asarray(t)]
    abar = _per_example(abar, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def v_target(
    x0: jax.Array, noise: jax.Array, t: jax.Array, *, schedule: NoiseSchedule | None = None
) -> jax.Array:
    """The velocity v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (diffusers'
    ``get_velocity``), the training target of a ``v_prediction`` model."""
    schedule = schedule or reference_schedule()
    abar = _per_example(jnp.asarray(schedule.alphas_cumprod).astype(x0.dtype)[t], x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def eps_from_v(
    x_t: jax.Array, v: jax.Array, t: jax.Array, *, schedule: NoiseSchedule | None = None
) -> jax.Array:
    """The noise a predicted velocity implies: sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t.

    Exact at every t, also where abar_t is about 0: there the noise is x_t itself and the
    model's output decides x0 = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v, which an epsilon
    model can only reach through an error of its output divided by sqrt(abar_t)."""
    schedule = schedule or reference_schedule()
    abar = _per_example(jnp.asarray(schedule.alphas_cumprod).astype(x_t.dtype)[t], x_t)
    return abar**0.5 * v + (1 - abar) ** 0.5 * x_t


def _clip(x0: jax.Array, clip_range: float | None) -> jax.Array:
    return x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)


def ddpm_step(
    x_t: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prev_t: jax.Array | None = None,
    clip_range: float | None = None,
    schedule: NoiseSchedule | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral DDPM step (diffusers `DDPMScheduler.step`, epsilon, `fixed_small`).

    Args:
      x_t: [batch, ...] current sample at timestep t.
      eps: [batch, ...] predicted noise.
      t: scalar or [batch] int timestep.
      noise: [batch, ...] standard normal noise for this step (unused at t == 0).
      prev_t: the timestep stepped to; default t - 1 (the reference, which never calls
        `set_timesteps`); negative means "past the end" (alphas_cumprod = 1).
      clip_range: clip the predicted x0 to [-clip_range, clip_range]; None disables.

    Returns:
      (x_prev, x0_pred), both shaped like x_t.
    """
    schedule = schedule or reference_schedule()
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - 1 if prev_t is None else jnp.asarray(prev_t, jnp.int32)
    a_t = _per_example(_alpha_prod(schedule, t), x_t)
    a_prev = _per_example(_alpha_prod(schedule, prev_t), x_t)
    beta_prod_t = 1 - a_t
    beta_prod_prev = 1 - a_prev
    alpha_step = a_t / a_prev
    beta_step = 1 - alpha_step

    x0 = _clip((x_t - beta_prod_t**0.5 * eps) / a_t**0.5, clip_range)
    x0_coeff = (a_prev**0.5 * beta_step) / beta_prod_t
    xt_coeff = alpha_step**0.5 * beta_prod_prev / beta_prod_t
    mean = x0_coeff * x0 + xt_coeff * x_t

    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta_step, 1e-20)
    add = jnp.where(_per_example(t, x_t) > 0, variance**0.5 * noise, 0.0)
    return (mean + add).astype(x_t.dtype), x0


def ddim_step(
    x_t: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    noise: jax.Array | None = None,
    *,
    eta: float = 0.0,
    clip_range: float | None = None,
    use_clipped_model_output: bool = False,
    schedule: NoiseSchedule | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (diffusers `DDIMScheduler.step`, epsilon, `set_alpha_to_one=True`).

    Args:
      x_t, eps: [batch, ...] sample and predicted noise at timestep t.
      t, prev_t: scalar or [batch] int timesteps; prev_t < 0 steps to alphas_cumprod = 1.
      noise: [batch, ...] standard normal noise, required when eta > 0.
      eta: 0 is deterministic DDIM, 1 has the DDPM posterior variance (a Python float).
      clip_range: clip the predicted x0; None disables.
      use_clipped_model_output: recompute eps from the clipped x0 (diffusers' option).

    Returns:
      (x_prev, x0_pred).
    """
    schedule = schedule or reference_schedule()
    a_t = _per_example(_alpha_prod(schedule, jnp.asarray(t, jnp.int32)), x_t)
    a_prev = _per_example(_alpha_prod(schedule, jnp.asarray(prev_t, jnp.int32)), x_t)
    beta_prod_t = 1 - a_t

    x0 = _clip((x_t - beta_prod_t**0.5 * eps) / a_t**0.5, clip_range)
    if use_clipped_model_output:
        eps = (x_t - a_t**0.5 * x0) / beta_prod_t**0.5
    variance = ((1 - a_prev) / beta_prod_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs `noise`")
        x_prev = x_prev + std * noise
    return x_prev.astype(x_t.dtype), x0


def spaced_timesteps(
    num_steps: int,
    spacing: str = "trailing",
    num_train_steps: int = NUM_TRAIN_STEPS,
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending inference timesteps, as DDPM/DDIM `set_timesteps` places them.

    "leading": multiples of num_train_steps // num_steps (starts below 999 unless every step
    is used); "trailing": counted back from num_train_steps, so the first step is 999;
    "linspace": evenly spaced from 0 to num_train_steps - 1, rounded.
    """
    _check_steps(num_steps, num_train_steps)
    if spacing == "leading":
        steps = np.arange(num_steps) * (num_train_steps // num_steps) + steps_offset
        return steps[::-1].astype(np.int32)
    if spacing == "trailing":
        return _trailing(num_steps, num_train_steps)
    if spacing == "linspace":
        return np.linspace(0, num_train_steps - 1, num_steps).round()[::-1].astype(np.int32)
    raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {SPACINGS}")


def dpm_solver_timesteps(
    num_steps: int,
    spacing: str = "linspace",
    num_train_steps: int = NUM_TRAIN_STEPS,
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending timesteps as `DPMSolverMultistepScheduler.set_timesteps` places them.

    It spaces num_steps + 1 points and drops the last (the final step goes to sigma = 0).
    """
    _check_steps(num_steps, num_train_steps)
    if spacing == "linspace":
        points = np.linspace(0, num_train_steps - 1, num_steps + 1).round()
        return points[::-1][:-1].astype(np.int32)
    if spacing == "leading":
        ratio = num_train_steps // (num_steps + 1)
        points = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
        return points.astype(np.int32)
    if spacing == "trailing":
        return _trailing(num_steps, num_train_steps)
    raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {SPACINGS}")


def _trailing(num_steps: int, num_train_steps: int) -> np.ndarray:
    """round(T - k * T / n) - 1 for k < n. diffusers builds this with a float `np.arange`,
    which for some n (61, 103, ...) yields an extra timestep -1; we always give n steps."""
    steps = np.round(num_train_steps - np.arange(num_steps) * (num_train_steps / num_steps))
    return (steps - 1).astype(np.int32)


def _check_steps(num_steps: int, num_train_steps: int) -> None:
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")


class DpmSolverTables(NamedTuple):
    """Per-step float32 coefficients of DPM-Solver++(2M), each [num_steps].

    At step i: x0_i = (x - sigma_i * eps) / alpha_i; then
    x <- x_coeff * x + d0_coeff * x0_i + d1_coeff * (x0_i - x0_{i-1}) * inv_r0.
    Steps that fall back to first order (the first and the last, as in diffusers with
    `final_sigmas_type="zero"`) have d1_coeff = 0.
    """

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    x_coeff: np.ndarray
    d0_coeff: np.ndarray
    d1_coeff: np.ndarray
    inv_r0: np.ndarray


def dpm_solver_tables(
    num_steps: int,
    spacing: str = "linspace",
    schedule: NoiseSchedule | None = None,
) -> DpmSolverTables:
    """Host-side coefficients for `dpmpp_2m` (midpoint solver, epsilon prediction).

    Mirrors diffusers' float32 arithmetic: sigmas = sqrt((1 - abar) / abar) at the chosen
    timesteps plus a final 0; alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha,
    lambda = log(alpha) - log(sigma_t).
    """
    schedule = schedule or reference_schedule()
    n_train = len(schedule.alphas_cumprod)
    timesteps = dpm_solver_timesteps(num_steps, spacing, n_train)
    abar = schedule.alphas_cumprod
    all_sigmas = ((np.float32(1) - abar) / abar) ** np.float32(0.5)
    sigmas = np.concatenate([all_sigmas[timesteps], [0.0]]).astype(np.float32)
    alpha = np.float32(1) / (sigmas**2 + np.float32(1)) ** np.float32(0.5)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma = 0

    one = np.float32(1)
    x_coeff = np.zeros(num_steps, np.float32)
    d0_coeff = np.zeros(num_steps, np.float32)
    d1_coeff = np.zeros(num_steps, np.float32)
    inv_r0 = np.zeros(num_steps, np.float32)
    for i in range(num_steps):
        h = lam[i + 1] - lam[i]
        phi = alpha[i + 1] * (np.exp(-h) - one)  # alpha_t * (e^-h - 1)
        x_coeff[i] = sigma[i + 1] / sigma[i]
        d0_coeff[i] = -phi
        second_order = 0 < i < num_steps - 1
        if second_order:
            h0 = lam[i] - lam[i - 1]
            inv_r0[i] = one / (h0 / h)
            d1_coeff[i] = np.float32(-0.5) * phi
    return DpmSolverTables(timesteps, alpha[:-1], sigma[:-1], x_coeff, d0_coeff, d1_coeff, inv_r0)


def step_noise(key: jax.Array, step_index: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """The standard normal noise the loops use at loop step `step_index` (0 = first step)."""
    return jax.random.normal(jax.random.fold_in(key, step_index), shape, dtype)


def _guided(denoise_fn: Callable, guidance_scale: float | None) -> Callable:
    """Wrap denoise_fn for classifier-free guidance: it then returns (eps_cond, eps_uncond)."""
    if guidance_scale is None:
        return denoise_fn

    def guided(x, t):
        eps_cond, eps_uncond = denoise_fn(x, t)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return guided


def sample_loop(
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    *,
    sampler: str = "ddpm",
    num_steps: int = NUM_TRAIN_STEPS,
    key: jax.Array | None = None,
    clip_range: float | None = None,
    clipped_eps: bool = False,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    guidance_scale: float | None = None,
    schedule: NoiseSchedule | None = None,
) -> jax.Array:
    """Run a whole reverse process as one `lax.scan`; jit it together with the model call.

    Args:
      denoise_fn: (x [batch, ...], t [batch] int32) -> eps [batch, ...]. With
        guidance_scale set it returns (eps_cond, eps_uncond) and the loop combines them as
        eps_uncond + guidance_scale * (eps_cond - eps_uncond).
      x_T: [batch, ...] starting noise.
      sampler: "ddpm" (ancestral; with num_steps=1000 this is exactly the reference),
        "ddim" (eta=0 deterministic, eta>0 stochastic) or "dpmpp_2m" (DPM-Solver++ 2M).
      num_steps: number of denoising steps (model calls).
      key: PRNG key for the per-step noise (`step_noise(key, i, ...)`); needed by "ddpm"
        and by "ddim" with eta > 0.
      clip_range: clip the predicted x0 to +-clip_range (None: no clipping). The value is
        applied to whatever space x lives in; see the module docstring. For "dpmpp_2m" this
        is our addition (diffusers offers only dynamic thresholding at that point).
      clipped_eps: how a clipped x0 enters the ddim / dpmpp_2m update. False (default, as
        diffusers' DDIM): the update keeps the model's eps, so clipping pulls the state back
        towards the data range. True: the update uses the eps implied by the clipped x0
        (DDIM's `use_clipped_model_output`, diffusers' DPM++ thresholding); clipping then
        only masks out-of-range x0 and the excess stays in the state. ddpm always uses its
        posterior mean, which is the True form (the reference). On a trained model the True
        form leaves more of the final latents saturated at the clip than False does
        (docs/LDM_RESULTS.md).
      timestep_spacing: None picks "trailing" for ddpm/ddim (diffusers' default "leading"
        would start a 50-step DDIM at t=980 from pure noise; "trailing" starts at 999 as the
        training marginal and the reference DDPM do) and "linspace" (diffusers' default,
        also starting at 999) for dpmpp_2m.
    Returns:
      x_0: [batch, ...] the final sample, same dtype as x_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
    schedule = schedule or reference_schedule()
    eps_fn = _guided(denoise_fn, guidance_scale)
    batch = x_T.shape[0]

    def model_eps(x, t):
        return eps_fn(x, jnp.full((batch,), t, jnp.int32)).astype(x.dtype)

    if sampler == "dpmpp_2m":
        return _dpmpp_2m_loop(
            model_eps, x_T, num_steps, clip_range, clipped_eps, timestep_spacing, schedule
        )

    n_train = len(schedule.alphas_cumprod)
    timesteps = spaced_timesteps(num_steps, timestep_spacing or "trailing", n_train)
    if sampler == "ddpm":
        prev = np.concatenate([timesteps[1:], [-1]]).astype(np.int32)
    else:  # diffusers' DDIM always steps back by num_train_steps // num_steps
        prev = (timesteps - n_train // num_steps).astype(np.int32)
    needs_noise = sampler == "ddpm" or eta > 0
    if needs_noise and key is None:
        raise ValueError(f"sample_loop: sampler {sampler!r} (eta={eta}) needs a PRNG `key`")

    def body(x, step):
        i, t, t_prev = step
        eps = model_eps(x, t)
        noise = step_noise(key, i, x.shape, x.dtype) if needs_noise else None
        if sampler == "ddpm":
            x, _ = ddpm_step(
                x, eps, t, noise, prev_t=t_prev, clip_range=clip_range, schedule=schedule
            )
        else:
            x, _ = ddim_step(
                x,
                eps,
                t,
                t_prev,
                noise,
                eta=eta,
                clip_range=clip_range,
                use_clipped_model_output=clipped_eps,
                schedule=schedule,
            )
        return x, None

    steps = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(timesteps), jnp.asarray(prev))
    x, _ = jax.lax.scan(body, x_T, steps)
    return x


def _dpmpp_2m_loop(model_eps, x_T, num_steps, clip_range, clipped_eps, spacing, schedule):
    """DPM-Solver++(2M) as a scan; the carry holds the previous x0 prediction.

    Unless ``clipped_eps``, a clipped x0 also moves the state: x <- alpha * x0 + sigma * eps
    before the update, so the update keeps the model's eps (at first order this is DDIM's
    step exactly); with ``clipped_eps`` the update keeps x and so implies the eps
    (x - alpha * x0) / sigma, as diffusers' thresholding does.
    """
    tables = dpm_solver_tables(num_steps, spacing or "linspace", schedule)

    def body(carry, step):
        x, prev_x0 = carry
        t, alpha, sigma, x_coeff, d0_coeff, d1_coeff, inv_r0 = step
        eps = model_eps(x, t)
        x0 = _clip((x - sigma * eps) / alpha, clip_range)
        if clip_range is not None and not clipped_eps:
            x = alpha * x0 + sigma * eps
        d1 = inv_r0 * (x0 - prev_x0)
        x = x_coeff * x + d0_coeff * x0 + d1_coeff * d1
        return (x.astype(x_T.dtype), x0), None

    steps = tuple(jnp.asarray(a) for a in tables)
    (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), steps)
    return x

"""Editing reverse processes: inpainting (RePaint) and SDEdit, for DDPM, DDIM and DPM-Solver++.

``edit_loop`` runs the same steps as ``diffusion.sample_loop`` (one ``lax.scan``, jitted with
the model) with two additions:

- A known region (``Known``: clean latents ``x0`` and a ``mask``, 1 = known). After every step
  from t to t_prev the known region of the state is replaced by the forward process at the new
  noise level, ``sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * z`` with fresh noise z (RePaint);
  the start state's known region is the forward process at the first step's t, and after the
  loop ``x[known] = x0`` exactly. ``resample`` r > 0 repeats every step r more times after a
  jump back: the whole state goes from t_prev to t by the forward process,
  ``sqrt(abar_t / abar_prev) * x + sqrt(1 - abar_t / abar_prev) * z``, and is denoised again
  (RePaint's resampling with jump length 1), inside the scan as a ``lax.fori_loop``.
- SDEdit (``strength`` s in (0, 1], needs ``init``): only the last round(s * num_steps) steps
  of the schedule run (at least one), from ``add_noise(init, x_T, t_start)``.

DPM-Solver++(2M) keeps the previous x0 prediction as its history. Its update is elementwise,
so the known region's history only ever moves the known region, which is replaced after every
step; the unknown region's history is the model's prediction at the previous step, made on the
replaced state, i.e. on the trajectory the solver is on. Resampling rounds of a step all use
the history of the previous step (the step they redo), and the last round's prediction becomes
the next step's history. The first step run (also when SDEdit starts mid-schedule) is first
order, as it has no history.

Noise: the ancestral step noise is ``diffusion.step_noise(key, i)`` as in ``sample_loop`` when
``resample`` is 0 (so an empty mask at strength 1 gives ``sample_loop``'s result); the noise of
the known region and of the jumps, and the step noise of resampling rounds, is
``edit_noise(key, i, round, stream)``. ``i`` is the index in the full schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phraseldm_jax import diffusion

# Streams of ``edit_noise`` (far from the step indices ``step_noise`` folds into a key).
STEP_STREAM, KNOWN_STREAM, JUMP_STREAM = 1_000_001, 1_000_002, 1_000_003


class Known(NamedTuple):
    """The known region: ``x0`` [batch, ...] clean latents in the space the loop runs in, and
    ``mask`` broadcastable to it (1 = known, 0 = generated), e.g. [batch, length, 1]."""

    x0: jax.Array
    mask: jax.Array


def edit_noise(key, step_index, round_index, stream: int, shape, dtype=jnp.float32):
    """The standard normal noise of ``stream`` at loop step ``step_index``, resampling round
    ``round_index`` (0 = the first pass of the step)."""
    key = jax.random.fold_in(jax.random.fold_in(key, stream), step_index)
    return jax.random.normal(jax.random.fold_in(key, round_index), shape, dtype)


def start_index(num_steps: int, strength: float) -> int:
    """Index of the first step SDEdit runs: the last round(strength * num_steps) steps (at
    least one) of the schedule. ValueError unless 0 < strength <= 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return num_steps - max(1, min(num_steps, round(strength * num_steps)))


def forward_noised(x0, noise, t, schedule: diffusion.NoiseSchedule):
    """q(x_t | x0) with the schedule's alphas_cumprod at ``t`` (a scalar); ``x0`` itself, exactly,
    for t < 0 (past the last step)."""
    abar = diffusion._alpha_prod(schedule, jnp.asarray(t, jnp.int32)).astype(x0.dtype)
    noised = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    return jnp.where(t < 0, x0, noised)


def jump_back(x, noise, t_prev, t, schedule: diffusion.NoiseSchedule):
    """One forward step q(x_t | x_{t_prev}) of the whole state, t > t_prev (t_prev < 0: from
    the clean end, alphas_cumprod = 1)."""
    a_t = diffusion._alpha_prod(schedule, jnp.asarray(t, jnp.int32))
    a_prev = diffusion._alpha_prod(schedule, jnp.asarray(t_prev, jnp.int32))
    ratio = (a_t / a_prev).astype(x.dtype)
    return ratio**0.5 * x + (1 - ratio) ** 0.5 * noise


def _schedule_steps(sampler, num_steps, spacing, schedule):
    """(timesteps, next timesteps, per-step solver tables or None) of the full schedule."""
    n_train = len(schedule.alphas_cumprod)
    if sampler == "dpmpp_2m":
        tables = diffusion.dpm_solver_tables(num_steps, spacing or "linspace", schedule)
        timesteps = tables.timesteps
        return timesteps, np.concatenate([timesteps[1:], [-1]]).astype(np.int32), tables
    timesteps = diffusion.spaced_timesteps(num_steps, spacing or "trailing", n_train)
    if sampler == "ddpm":
        prev = np.concatenate([timesteps[1:], [-1]]).astype(np.int32)
    else:  # as sample_loop: diffusers' DDIM steps back by num_train_steps // num_steps
        prev = (timesteps - n_train // num_steps).astype(np.int32)
    return timesteps, prev, None


def _step_fn(sampler, model_eps, *, clip_range, clipped_eps, eta, schedule):
    """(x, history, step, noise) -> (x_prev, x0 prediction) of one sampler step."""

    def step(x, history, s, noise):
        if sampler == "ddpm":
            return diffusion.ddpm_step(
                x,
                model_eps(x, s["t"]),
                s["t"],
                noise,
                prev_t=s["t_prev"],
                clip_range=clip_range,
                schedule=schedule,
            )
        if sampler == "ddim":
            return diffusion.ddim_step(
                x,
                model_eps(x, s["t"]),
                s["t"],
                s["t_prev"],
                noise,
                eta=eta,
                clip_range=clip_range,
                use_clipped_model_output=clipped_eps,
                schedule=schedule,
            )
        eps = model_eps(x, s["t"])  # dpmpp_2m, as diffusion._dpmpp_2m_loop
        x0 = diffusion._clip((x - s["sigma"] * eps) / s["alpha"], clip_range)
        if clip_range is not None and not clipped_eps:
            x = s["alpha"] * x0 + s["sigma"] * eps
        d1 = s["inv_r0"] * (x0 - history)
        x = s["x_coeff"] * x + s["d0_coeff"] * x0 + s["d1_coeff"] * d1
        return x, x0

    return step


def edit_loop(
    denoise_fn: Callable,
    x_T: jax.Array,
    known: Known | None = None,
    *,
    init: jax.Array | None = None,
    strength: float = 1.0,
    resample: int = 0,
    sampler: str = "ddpm",
    num_steps: int = diffusion.NUM_TRAIN_STEPS,
    key: jax.Array,
    clip_range: float | None = None,
    clipped_eps: bool = False,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    guidance_scale: float | None = None,
    schedule: diffusion.NoiseSchedule | None = None,
    trajectory: bool = False,
):
    """``diffusion.sample_loop`` with a known region and/or SDEdit (module docstring).

    Args: as ``sample_loop``, plus
      known: the known region, or None.
      init: [batch, ...] clean latents SDEdit starts from (required when strength < 1).
      strength: SDEdit strength in (0, 1]; 1 starts from x_T at the first step.
      resample: RePaint resampling rounds per step (0 = none; needs ``known``).
      key: PRNG key of every noise the loop draws (always needed).
      trajectory: also return the state after each step run, [steps_run, batch, ...].

    Returns:
      x_0 [batch, ...] (and the trajectory when asked).
    """
    if sampler not in diffusion.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {diffusion.SAMPLERS}")
    if resample < 0 or (resample and known is None):
        raise ValueError(f"resample={resample}: needs a known region and must be >= 0")
    start = start_index(num_steps, strength)
    if start and init is None:
        raise ValueError(f"strength {strength} < 1 needs the `init` latents to start from")
    schedule = schedule or diffusion.reference_schedule()
    eps_fn = diffusion._guided(denoise_fn, guidance_scale)
    batch = x_T.shape[0]

    def model_eps(x, t):
        return eps_fn(x, jnp.full((batch,), t, jnp.int32)).astype(x.dtype)

    timesteps, t_next, tables = _schedule_steps(sampler, num_steps, timestep_spacing, schedule)
    steps = {"i": np.arange(num_steps, dtype=np.int32), "t": timesteps, "t_prev": t_next}
    if tables is not None:
        steps.update({name: getattr(tables, name) for name in tables._fields[1:]})
        steps["d1_coeff"] = steps["d1_coeff"].copy()
        steps["d1_coeff"][start] = 0.0  # the first step run has no history: first order
    steps = {name: jnp.asarray(values[start:]) for name, values in steps.items()}
    needs_noise = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    step = _step_fn(
        sampler, model_eps, clip_range=clip_range, clipped_eps=clipped_eps, eta=eta,
        schedule=schedule,
    )  # fmt: skip

    def replace(x, i, j, t):
        if known is None:
            return x
        noise = edit_noise(key, i, j, KNOWN_STREAM, x.shape, x.dtype)
        return jnp.where(known.mask, forward_noised(known.x0, noise, t, schedule), x)

    def one_round(x, history, s, j):
        noise = None
        if needs_noise:
            noise = (
                diffusion.step_noise(key, s["i"], x.shape, x.dtype)
                if resample == 0
                else edit_noise(key, s["i"], j, STEP_STREAM, x.shape, x.dtype)
            )
        x_prev, x0 = step(x, history, s, noise)
        return replace(x_prev.astype(x_T.dtype), s["i"], j, s["t_prev"]), x0

    def body(carry, s):
        x, history = carry
        if resample == 0:
            x, x0 = one_round(x, history, s, 0)
        else:

            def again(j, state):
                x_prev, x0 = one_round(state[0], history, s, j)
                z = edit_noise(key, s["i"], j, JUMP_STREAM, x.shape, x.dtype)
                jumped = jump_back(x_prev, z, s["t_prev"], s["t"], schedule)
                return jnp.where(j < resample, jumped, x_prev), x0

            x, x0 = jax.lax.fori_loop(0, resample + 1, again, (x, jnp.zeros_like(x)))
        return (x, x0), (x if trajectory else None)

    x = x_T if not start else diffusion.add_noise(init, x_T, timesteps[start], schedule=schedule)
    if known is not None:
        x = jnp.where(known.mask, forward_noised(known.x0, x_T, timesteps[start], schedule), x)
    (x, _), states = jax.lax.scan(body, (x, jnp.zeros_like(x_T)), steps)
    if known is not None:
        x = jnp.where(known.mask, known.x0, x)
    return (x, states) if trajectory else x

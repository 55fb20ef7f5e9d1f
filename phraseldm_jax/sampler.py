"""The compiled whole-song sampler: noise -> denoising loop -> raw (VAE-scale) latents.

The denoising loop is one compiled function (``diffusion.sample_loop``, a ``lax.scan``) over
the batch of songs, sharded over the mesh's batch axes when a mesh is given. Samplers:
``ddpm`` over all 1000 steps (the reference), and the fast ``ddim`` / ``dpmpp_2m`` at a few
tens of steps. The model is called through ``ldm.predict_noise`` (conditions, null
conditions for classifier-free guidance).

Clipping of the predicted x0 (SPEC section 9.2): the clip value is stored in raw latent units
(``PhraseLDMConfig.clip_range``, the 99.9th percentile of |raw latent|) and, by default
(``clip="scaled"``), applied in the model's scaled space as ``clip_range / scale_factor``;
``clip="reference"`` applies the raw value to scaled latents as the original did;
``clip="none"`` disables clipping.

Seeds: songs sampled together share one key; a result depends on the key and on the padded
batch size (the batch is padded to a multiple of the devices), not on the mesh layout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phraseldm_jax import diffusion, ldm, sharding
from phraseldm_jax.sharding import BATCH_AXES

CLIP_MODES = diffusion.CLIP_MODES


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How to sample. ``guidance_scale`` 1.0 = the conditional model alone; any other value
    runs classifier-free guidance eps_null + w * (eps_cond - eps_null) (0 = unconditional),
    which needs a model trained with condition dropout. The default, DPM-Solver++(2M) at 50
    steps, is the best measured sampler; ``ddpm`` at 1000 steps is the reference's.
    ``clipped_eps``: how a clipped x0
    enters the ddim / dpmpp_2m update (``diffusion.sample_loop``; False keeps the model's
    eps, which on our trained model keeps the latents in range)."""

    sampler: str = "dpmpp_2m"  # the best measured setting (docs/LDM_RESULTS.md), not ddpm:1000
    num_steps: int = 50
    guidance_scale: float = 1.0
    eta: float = 0.0
    timestep_spacing: str | None = None
    clip: str = "scaled"
    clipped_eps: bool = False

    def __post_init__(self):
        if self.sampler not in diffusion.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {diffusion.SAMPLERS}")
        if not 1 <= self.num_steps <= diffusion.NUM_TRAIN_STEPS:
            raise ValueError(
                f"num_steps must be in 1..{diffusion.NUM_TRAIN_STEPS}, got {self.num_steps}"
            )
        if self.clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {self.clip!r}; use one of {CLIP_MODES}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def model_space_clip(config: ldm.PhraseLDMConfig, clip: str = "scaled") -> float | None:
    """The x0 clip value in the model's scaled space (see the module docstring)."""
    if clip == "none":
        return None
    if clip == "reference":
        return float(config.clip_range)
    if clip == "scaled":
        return float(config.clip_range) / float(config.scale_factor)
    raise ValueError(f"unknown clip mode {clip!r}; use one of {CLIP_MODES}")


def _sample_fn(config: ldm.PhraseLDMConfig, settings: SamplerSettings, batch_sharding=None):
    """(params, key, cond) -> raw latents [batch, sample_size, in_channels] float32."""
    shape_tail = (config.dit.sample_size, config.dit.in_channels)
    clip_range = model_space_clip(config, settings.clip)

    def sample(params, key, cond: ldm.Conditions):
        params = ldm.inference_params(params, config)  # kernels cast once, not at every step
        batch = cond.batch_size
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch, *shape_tail), jnp.float32)
        if batch_sharding is not None:
            x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)

        def denoise(x, t):
            if not settings.guided:
                return ldm.predict_noise(params, config, x, t, cond)
            both = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
            null = jnp.arange(2 * batch) >= batch
            x2, t2 = jnp.concatenate([x, x]), jnp.tile(t, 2)
            eps = ldm.predict_noise(params, config, x2, t2, both, null)
            return eps[:batch], eps[batch:]

        x0 = diffusion.sample_loop(
            denoise,
            x_T,
            sampler=settings.sampler,
            num_steps=settings.num_steps,
            key=loop_key,
            clip_range=clip_range,
            clipped_eps=settings.clipped_eps,
            eta=settings.eta,
            timestep_spacing=settings.timestep_spacing,
            guidance_scale=settings.guidance_scale if settings.guided else None,
        )
        return x0 * jnp.float32(config.scale_factor)

    return sample


class LatentSampler:
    """The compiled sampler of one model config and one set of settings.

    ``sampler(params, key, cond)`` -> raw (VAE-scale) latents [num_songs, 512, 64] numpy.
    The songs are split over the batch axes of ``mesh`` (default: one device); the batch is
    padded to a multiple of the mesh size with copies of the first song, then cut back.
    Compiled ahead of time once per padded batch size; ``compile_seconds`` is the time the
    last compilation took (0 when the call reused one), so sampling times exclude it.
    """

    def __init__(self, config: ldm.PhraseLDMConfig, settings: SamplerSettings, mesh=None):
        if settings.guided and not (config.length_control or config.sec_control):
            raise ValueError("classifier-free guidance needs a conditional model")
        if mesh is None:
            mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
        self.config, self.settings, self.mesh = config, settings, mesh
        self._batch_sh = NamedSharding(mesh, P(BATCH_AXES))
        self._replicated = NamedSharding(mesh, P())
        self._fn = jax.jit(
            _sample_fn(config, settings, self._batch_sh),
            in_shardings=(self._replicated, self._replicated, self._batch_sh),
            out_shardings=self._batch_sh,
        )
        self._compiled: dict[int, Any] = {}
        self.compile_seconds = 0.0

    def __call__(self, params: Any, key: jax.Array, cond: ldm.Conditions) -> np.ndarray:
        n = cond.batch_size
        if n < 1:
            raise ValueError("LatentSampler: no songs to sample")
        padded = -(-n // self.mesh.size) * self.mesh.size
        cond = ldm.Conditions(
            *(
                np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], padded - n, 0)]).astype(
                    np.int32
                )
                for a in cond
            )
        )
        args = (
            jax.device_put(params, self._replicated),
            jax.device_put(key, self._replicated),
            jax.device_put(cond, self._batch_sh),
        )
        self.compile_seconds = 0.0
        if padded not in self._compiled:
            start = time.perf_counter()
            self._compiled[padded] = self._fn.lower(*args).compile()
            self.compile_seconds = time.perf_counter() - start
        out = self._compiled[padded](*args)
        if not out.is_fully_addressable:  # multi-process: every process gets every song
            return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n]
        return np.asarray(jax.device_get(out))[:n]


@functools.lru_cache(maxsize=8)
def cached_sampler(config, settings, mesh=None) -> LatentSampler:
    """``LatentSampler(config, settings, mesh)``, compiled once per distinct argument set."""
    return LatentSampler(config, settings, mesh)

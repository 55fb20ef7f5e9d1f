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

Editing (``phraseldm_jax/editing.py``): given a song's latents and a mask of slots to keep,
the sampler runs ``inpainting.edit_loop`` instead (RePaint replacement at every step, optional
resampling rounds, SDEdit variations); plain sampling is the same compiled program as before.

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

from phraseldm_jax import diffusion, inpainting, ldm, sharding
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
    resample: int = 0  # RePaint rounds per step when a known region is given (editing)
    strength: float = 1.0  # SDEdit strength of a variation: start at t ~ strength * T

    def __post_init__(self):
        if self.sampler not in diffusion.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {diffusion.SAMPLERS}")
        if not 1 <= self.num_steps <= diffusion.NUM_TRAIN_STEPS:
            raise ValueError(
                f"num_steps must be in 1..{diffusion.NUM_TRAIN_STEPS}, got {self.num_steps}"
            )
        if self.clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {self.clip!r}; use one of {CLIP_MODES}")
        if self.resample < 0:
            raise ValueError(f"resample must be >= 0, got {self.resample}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def edits(self) -> bool:
        """Whether sampling needs the song being edited (resampling or a variation)."""
        return self.resample > 0 or self.strength < 1


def model_space_clip(config: ldm.PhraseLDMConfig, clip: str = "scaled") -> float | None:
    """The x0 clip value in the model's scaled space (see the module docstring)."""
    if clip == "none":
        return None
    if clip == "reference":
        return float(config.clip_range)
    if clip == "scaled":
        return float(config.clip_range) / float(config.scale_factor)
    raise ValueError(f"unknown clip mode {clip!r}; use one of {CLIP_MODES}")


def _denoiser(params, config: ldm.PhraseLDMConfig, settings: SamplerSettings, cond, batch):
    """(x, t) -> eps, or (eps_cond, eps_null) when guided: the one model call of the loops."""

    def denoise(x, t):
        if not settings.guided:
            return ldm.predict_noise(params, config, x, t, cond)
        both = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
        null = jnp.arange(2 * batch) >= batch
        x2, t2 = jnp.concatenate([x, x]), jnp.tile(t, 2)
        eps = ldm.predict_noise(params, config, x2, t2, both, null)
        return eps[:batch], eps[batch:]

    return denoise


def _loop_args(config: ldm.PhraseLDMConfig, settings: SamplerSettings) -> dict:
    """The keyword arguments both loops take from the settings."""
    return dict(
        sampler=settings.sampler,
        num_steps=settings.num_steps,
        clip_range=model_space_clip(config, settings.clip),
        clipped_eps=settings.clipped_eps,
        eta=settings.eta,
        timestep_spacing=settings.timestep_spacing,
        guidance_scale=settings.guidance_scale if settings.guided else None,
    )


def _start_noise(key, config: ldm.PhraseLDMConfig, batch: int, batch_sharding):
    """(x_T [batch, sample_size, in_channels], the loop's key) from the call's key."""
    noise_key, loop_key = jax.random.split(key)
    shape = (batch, config.dit.sample_size, config.dit.in_channels)
    x_T = jax.random.normal(noise_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    return x_T, loop_key


def _sample_fn(config: ldm.PhraseLDMConfig, settings: SamplerSettings, batch_sharding=None):
    """(params, key, cond) -> raw latents [batch, sample_size, in_channels] float32."""

    def sample(params, key, cond: ldm.Conditions):
        params = ldm.inference_params(params, config)  # kernels cast once, not at every step
        x_T, loop_key = _start_noise(key, config, cond.batch_size, batch_sharding)
        denoise = _denoiser(params, config, settings, cond, cond.batch_size)
        x0 = diffusion.sample_loop(denoise, x_T, key=loop_key, **_loop_args(config, settings))
        return x0 * jnp.float32(config.scale_factor)

    return sample


def _edit_fn(config: ldm.PhraseLDMConfig, settings: SamplerSettings, batch_sharding=None):
    """(params, key, cond, song, mask) -> raw latents: ``inpainting.edit_loop`` keeping the
    slots of ``song`` (model space, [batch, sample_size, in_channels]) where ``mask``
    ([batch, sample_size], 1 = keep) and, at strength < 1, starting from the noised song."""

    def sample(params, key, cond: ldm.Conditions, song, mask):
        params = ldm.inference_params(params, config)
        x_T, loop_key = _start_noise(key, config, cond.batch_size, batch_sharding)
        denoise = _denoiser(params, config, settings, cond, cond.batch_size)
        known = inpainting.Known(song, mask[..., None] > 0)
        x0 = inpainting.edit_loop(
            denoise,
            x_T,
            known,
            init=song,
            strength=settings.strength,
            resample=settings.resample,
            key=loop_key,
            **_loop_args(config, settings),
        )
        return x0 * jnp.float32(config.scale_factor)

    return sample


class LatentSampler:
    """The compiled sampler of one model config and one set of settings.

    ``sampler(params, key, cond)`` -> raw (VAE-scale) latents [num_songs, 512, 64] numpy;
    ``sampler(params, key, cond, song, mask)`` edits ``song`` (see ``__call__``).
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
        self._edit = jax.jit(
            _edit_fn(config, settings, self._batch_sh),
            in_shardings=(self._replicated, self._replicated, *(self._batch_sh,) * 3),
            out_shardings=self._batch_sh,
        )
        self._compiled: dict[tuple[int, bool], Any] = {}
        self.compile_seconds = 0.0

    def __call__(
        self,
        params: Any,
        key: jax.Array,
        cond: ldm.Conditions,
        song: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw latents [num_songs, sample_size, in_channels]. With ``song`` (model-space
        latents of the same shape) and ``mask`` ([num_songs, sample_size], 1 = keep) the
        masked slots are kept (``inpainting.edit_loop``: RePaint with ``settings.resample``
        rounds, SDEdit from the song at ``settings.strength`` < 1); an all-zero mask at
        strength 1 and resample 0 gives the plain result."""
        n = cond.batch_size
        if n < 1:
            raise ValueError("LatentSampler: no songs to sample")
        edit = song is not None
        if edit != (mask is not None):
            raise ValueError("LatentSampler: give `song` and `mask` together")
        if self.settings.edits and not edit:
            raise ValueError("LatentSampler: resample / strength < 1 need `song` and `mask`")
        padded = -(-n // self.mesh.size) * self.mesh.size

        def pad(a, dtype):
            a = np.asarray(a)
            return np.concatenate([a, np.repeat(a[:1], padded - n, 0)]).astype(dtype)

        cond = ldm.Conditions(*(pad(a, np.int32) for a in cond))
        args = [
            jax.device_put(params, self._replicated),
            jax.device_put(key, self._replicated),
            jax.device_put(cond, self._batch_sh),
        ]
        if edit:
            shape = (n, self.config.dit.sample_size, self.config.dit.in_channels)
            if np.shape(song) != shape or np.shape(mask) != shape[:2]:
                raise ValueError(
                    f"LatentSampler: song must be {list(shape)} and mask {list(shape[:2])}, got "
                    f"{list(np.shape(song))} and {list(np.shape(mask))}"
                )
            args += [jax.device_put(pad(a, np.float32), self._batch_sh) for a in (song, mask)]
        self.compile_seconds = 0.0
        if (padded, edit) not in self._compiled:
            start = time.perf_counter()
            fn = self._edit if edit else self._fn
            self._compiled[padded, edit] = fn.lower(*args).compile()
            self.compile_seconds = time.perf_counter() - start
        out = self._compiled[padded, edit](*args)
        if not out.is_fully_addressable:  # multi-process: every process gets every song
            return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n]
        return np.asarray(jax.device_get(out))[:n]


@functools.lru_cache(maxsize=8)
def cached_sampler(config, settings, mesh=None) -> LatentSampler:
    """``LatentSampler(config, settings, mesh)``, compiled once per distinct argument set."""
    return LatentSampler(config, settings, mesh)

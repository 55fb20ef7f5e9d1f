"""Exploring the PhraseVAE latent space: prior samples and interpolations, written as MIDI.

- ``sample_prior``: phrases decoded from z ~ N(0, temperature^2 I);
- ``interpolate``: ``steps`` points from a to b, linear or spherical (``slerp``: along the
  great circle through the two vectors, norms interpolated with it; the usual choice for
  Gaussian latents, whose typical set is a shell);
- ``interpolate_phrases``: between two phrases' posterior means, one decoded phrase per step;
- ``interpolate_bars``: between two bars, each its 4 slot latents (3 track slots and the
  ``b-1`` slot), slot by slot: one decoded bar per step.

Songs written as MIDI have one bar per step (``phrases_as_song`` for single phrases). The
command is ``python -m phraseldm_jax.cli.latent_tools``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from phraseldm_jax import phrases
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.songs import notes_only
from phraseldm_jax.vae_inference import PhraseVAEModel

METHODS = ("linear", "slerp")


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``(1 - t) a + t b`` for each t: a, b [D], t [S] -> [S, D]."""
    t = np.asarray(t, np.float64)[:, None]
    return ((1.0 - t) * a + t * b).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation ``sin((1-t) w) / sin w * a + sin(t w) / sin w * b``, w the
    angle between a and b; linear when they are (anti)parallel within 1e-6. [D], [S] -> [S, D]."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a64) * np.linalg.norm(b64)
    if norms == 0.0:
        return lerp(a, b, t)
    cos = np.clip(np.dot(a64, b64) / norms, -1.0, 1.0)
    omega = np.arccos(cos)
    if np.sin(omega) < 1e-6:
        return lerp(a, b, t)
    t = np.asarray(t, np.float64)[:, None]
    out = (np.sin((1.0 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    return out.astype(np.float32)


def interpolate(a: np.ndarray, b: np.ndarray, steps: int, method: str = "slerp") -> np.ndarray:
    """``steps`` (>= 2) points from a to b inclusive: [D], [D] -> [steps, D]."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"interpolate needs two vectors of one width, got {a.shape} and {b.shape}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both ends included), got {steps}")
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; expected one of {METHODS}")
    t = np.linspace(0.0, 1.0, steps)
    return lerp(a, b, t) if method == "linear" else slerp(a, b, t)


def sample_prior(
    model: PhraseVAEModel, n: int, rng: jax.Array, temperature: float = 1.0
) -> tuple[np.ndarray, list[str]]:
    """``n`` latents z ~ N(0, temperature^2 I) [n, D] and their decoded phrases."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    z = temperature * np.asarray(jax.random.normal(rng, (n, model.latent_dim)), np.float32)
    return z, model.decode(z)


def interpolate_phrases(
    model: PhraseVAEModel, a: str, b: str, steps: int, method: str = "slerp"
) -> list[str]:
    """Decoded phrases along the path between the posterior means of phrases a and b."""
    mean, _ = model.encode([a, b])
    return model.decode(interpolate(mean[0], mean[1], steps, method))


def interpolate_bars(
    model: PhraseVAEModel,
    bar_a: Sequence[str],
    bar_b: Sequence[str],
    steps: int,
    method: str = "slerp",
) -> list[str]:
    """Slot strings (``4 * steps``) of the bars along the path between two bars.

    Args:
      bar_a, bar_b: the 4 slot strings of each bar (3 slots, ``[INST]`` when empty, then
        ``b-1``), e.g. from ``phrases.slot_phrases``.
    """
    for name, bar in (("bar_a", bar_a), ("bar_b", bar_b)):
        if len(bar) != SLOTS_PER_BAR:
            raise ValueError(f"{name} must hold {SLOTS_PER_BAR} slot strings, got {len(bar)}")
    mean, _ = model.encode([*bar_a, *bar_b])
    paths = [
        interpolate(mean[k], mean[SLOTS_PER_BAR + k], steps, method) for k in range(SLOTS_PER_BAR)
    ]
    latents = np.stack(paths, axis=1).reshape(steps * SLOTS_PER_BAR, model.latent_dim)
    return model.decode(latents)


def phrases_as_song(texts: Sequence[str]) -> list[str]:
    """One bar per phrase: slot strings ``[phrase, [INST], [INST], b-1]`` for each."""
    slots = []
    for text in texts:
        notes = notes_only(text) or phrases.INST_TOKEN
        empty = [phrases.INST_TOKEN] * (phrases.DEFAULT_N_SLOTS - 1)
        slots.extend([notes, *empty, phrases.BAR_TOKEN])
    return slots


def bar_slots(slots: Sequence[str], bar: int, where: str) -> list[str]:
    """The slot strings of bar ``bar`` of a song's slot list (``SLOTS_PER_BAR`` per bar)."""
    n_bars = len(slots) // SLOTS_PER_BAR
    if not 0 <= bar < n_bars:
        raise ValueError(f"{where}: bar {bar} is outside 0..{n_bars - 1}")
    return list(slots[SLOTS_PER_BAR * bar : SLOTS_PER_BAR * (bar + 1)])

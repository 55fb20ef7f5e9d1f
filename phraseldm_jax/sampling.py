"""Whole-song sampling: noise -> denoising loop -> raw latents -> phrases -> MultiTrack -> MIDI.

The denoising loop is one compiled function (``diffusion.sample_loop``, a ``lax.scan``) over
the batch of songs, sharded over the mesh's batch axes when a mesh is given. Samplers:
``ddpm`` over all 1000 steps (the reference), and the fast ``ddim`` / ``dpmpp_2m`` at a few
tens of steps.

Conditions (``Conditions``) are the model's inputs besides the noisy latents: the bar count
(length condition) and the section ids with ``has_plan`` (section condition). A *null*
condition, used for classifier-free guidance and for songs without a plan, replaces the
length embedding and the section states by zeros, which is exactly what the unconditional
model sees (the DiT's projections of both are bias-free, so they then contribute nothing).

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
import json
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phraseldm_jax import diffusion, phrases, sections
from phraseldm_jax.conditioning import MAX_SECTIONS
from phraseldm_jax.ldm import PhraseLDM, PhraseLDMConfig, inference_params
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.sharding import BATCH_AXES
from phraseldm_jax.vocab import SEP_ID

CLIP_MODES = ("scaled", "reference", "none")
SLOTS_PER_BAR = 4  # three track slots and the bar slot (ARCHITECTURE.md, song latent layout)
REFERENCE_TEMPO = 90.0  # bpm the original writes into its MIDI files


class Conditions(NamedTuple):
    """Model conditions of a batch of songs (numpy or jax arrays; a pytree).

    n_bars: [batch] int32 bar counts (length condition; ignored by other models).
    type_ids, length_ids: [batch, 30] int32 section ids, 0 = pad (section condition).
    has_plan: [batch] int32, 0 = no plan: the section condition is null for that song.
    """

    n_bars: Any
    type_ids: Any
    length_ids: Any
    has_plan: Any

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.n_bars)[0])


def make_conditions(
    num_songs: int,
    n_bars: int | None = None,
    plan: str | sections.SectionPlan | None = None,
    vocab: sections.SectionVocab = sections.DEFAULT_SECTION_VOCAB,
) -> Conditions:
    """The same conditions for ``num_songs`` songs; a plan sets the bar count when n_bars is
    None. Bad plans raise ``SectionPlanError``."""
    type_ids = np.zeros((num_songs, MAX_SECTIONS), np.int32)
    length_ids = np.zeros((num_songs, MAX_SECTIONS), np.int32)
    has_plan = np.zeros((num_songs,), np.int32)
    if plan is not None:
        plan = sections.parse_plan(plan) if isinstance(plan, str) else plan
        types, lengths, _ = sections.plan_to_ids(plan, vocab)
        type_ids[:], length_ids[:], has_plan[:] = types, lengths, 1
        n_bars = plan.n_bars if n_bars is None else n_bars
    bars = np.full((num_songs,), 64 if n_bars is None else n_bars, np.int32)
    return Conditions(bars, type_ids, length_ids, has_plan)


def conditions_from_batch(batch: dict) -> Conditions:
    """``Conditions`` of an ``ldm_pipeline`` batch."""
    return Conditions(
        batch["n_bars"], batch["section_type_ids"], batch["section_length_ids"], batch["has_plan"]
    )


# ------------------------------------------------------------------------------------------
# The model call with null conditions.


def _length_states(module: PhraseLDM, n_bars):
    return module.length_encoder(n_bars)


def _section_states(module: PhraseLDM, type_ids, length_ids, deterministic):
    return module.sec_encoder(type_ids, length_ids, deterministic)


def _denoise(module: PhraseLDM, x, t, global_states, context, context_mask):
    return module.dit(x, t, global_states, context, context_mask)


def predict_noise(
    params: Any,
    config: PhraseLDMConfig,
    x: jax.Array,
    t: jax.Array,
    cond: Conditions,
    null: jax.Array | None = None,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """``PhraseLDM.predict_noise`` with per-song null conditions.

    Args:
      x: [batch, length, 64] scaled noisy latents; t: [batch] int timesteps.
      cond: the conditions; songs with ``has_plan == 0`` get a null section condition.
      null: [batch] bool, True = null length and section conditions (classifier-free
        guidance's unconditional branch, and condition dropout in training).
      deterministic: False enables the section encoder's dropout (needs ``dropout_rng``).
    Returns:
      [batch, length, 64] float32 predicted noise.
    """
    model, variables = PhraseLDM(config), {"params": params}
    maybe_frozen = (lambda s: s) if config.train_encoders else jax.lax.stop_gradient
    global_states = context = context_mask = None
    if config.length_control:
        global_states = maybe_frozen(model.apply(variables, cond.n_bars, method=_length_states))
        if null is not None:
            global_states = jnp.where(null[:, None, None], 0.0, global_states)
    if config.sec_control:
        rngs = None if deterministic else {"dropout": dropout_rng}
        context, context_mask = model.apply(
            variables,
            cond.type_ids,
            cond.length_ids,
            deterministic,
            method=_section_states,
            rngs=rngs,
        )
        context = maybe_frozen(context)
        drop = jnp.asarray(cond.has_plan) == 0
        if null is not None:
            drop = drop | null
        # Zero states reach bias-free projections: the cross-attention adds exactly 0.
        context = jnp.where(drop[:, None, None], 0.0, context)
        context_mask = jnp.where(drop[:, None], 1.0, context_mask)
    return model.apply(variables, x, t, global_states, context, context_mask, method=_denoise)


# ------------------------------------------------------------------------------------------
# The compiled sampler.


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How to sample. ``guidance_scale`` 1.0 = the conditional model alone; any other value
    runs classifier-free guidance eps_null + w * (eps_cond - eps_null) (0 = unconditional),
    which needs a model trained with condition dropout. ``clipped_eps``: how a clipped x0
    enters the ddim / dpmpp_2m update (``diffusion.sample_loop``; False keeps the model's
    eps, which on our trained model keeps the latents in range)."""

    sampler: str = "ddpm"
    num_steps: int = diffusion.NUM_TRAIN_STEPS
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


def model_space_clip(config: PhraseLDMConfig, clip: str = "scaled") -> float | None:
    """The x0 clip value in the model's scaled space (see the module docstring)."""
    if clip == "none":
        return None
    if clip == "reference":
        return float(config.clip_range)
    if clip == "scaled":
        return float(config.clip_range) / float(config.scale_factor)
    raise ValueError(f"unknown clip mode {clip!r}; use one of {CLIP_MODES}")


def _sample_fn(config: PhraseLDMConfig, settings: SamplerSettings, batch_sharding=None):
    """(params, key, cond) -> raw latents [batch, sample_size, in_channels] float32."""
    shape_tail = (config.dit.sample_size, config.dit.in_channels)
    clip_range = model_space_clip(config, settings.clip)

    def sample(params, key, cond: Conditions):
        params = inference_params(params, config)  # kernels cast once, not at every step
        batch = cond.batch_size
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch, *shape_tail), jnp.float32)
        if batch_sharding is not None:
            x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)

        def denoise(x, t):
            if not settings.guided:
                return predict_noise(params, config, x, t, cond)
            both = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
            null = jnp.arange(2 * batch) >= batch
            eps = predict_noise(params, config, jnp.concatenate([x, x]), jnp.tile(t, 2), both, null)
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

    def __init__(self, config: PhraseLDMConfig, settings: SamplerSettings, mesh=None):
        from phraseldm_jax import sharding

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

    def __call__(self, params: Any, key: jax.Array, cond: Conditions) -> np.ndarray:
        n = cond.batch_size
        if n < 1:
            raise ValueError("LatentSampler: no songs to sample")
        padded = -(-n // self.mesh.size) * self.mesh.size
        cond = Conditions(
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


# ------------------------------------------------------------------------------------------
# Latents -> songs.


class PhraseDecoder(Protocol):
    """Anything that turns raw phrase latents [N, 64] into phrase strings (the PhraseVAE)."""

    def decode(self, latents: np.ndarray) -> list[str]: ...


class VAEDecoder:
    """The frozen PhraseVAE decoder (greedy, jitted, with early exit): latents -> phrases.
    ``devices``: the rows are split over them (``decoding.greedy_decode``); None: one device.
    ``compute_dtype``: the decoder's matmul dtype ("bfloat16": faster on CPUs with AMX and on
    accelerators; tokens can differ where two logits nearly tie); None: the config's."""

    def __init__(
        self,
        params: Any,
        config,
        *,
        max_length: int = 128,
        batch_size: int = 4096,
        devices: Sequence[jax.Device] | None = None,
        compute_dtype: str | None = None,
    ):
        from phraseldm_jax import decoding
        from phraseldm_jax import vae as vae_lib

        if not isinstance(config, vae_lib.PhraseVAEConfig):
            config = vae_lib.PhraseVAEConfig(**config)
        if config.head != "vae":
            raise ValueError(f"the LDM needs a stage-3 PhraseVAE (head 'vae'), got {config.head!r}")
        self.params, self.config = jax.device_put(params), config
        self.max_length, self.batch_size = max_length, batch_size
        self.devices = None if devices is None else list(devices)
        self.compute_dtype = compute_dtype
        # Cache buffers kept from one decode to the next (decoding.CacheBuffers): growing the
        # cache into them instead of fresh allocations is ~13% faster on long rows.
        self.buffers = decoding.CacheBuffers()

    @classmethod
    def from_workdir(cls, workdir: str, which: str = "best", **kwargs) -> VAEDecoder:
        """Loads ``config.json`` (group ``model``) and the ``which`` (or, failing that, the
        other) checkpoint's params of a PhraseVAE training workdir, or a PhraseVAE folder in
        the original's layout (config.json + model.safetensors)."""
        from phraseldm_jax import checkpointing
        from phraseldm_jax.convert import api

        if api.is_original_folder(workdir):
            model = api.import_phrase_vae(workdir)
            return cls(model.params, model.config, **kwargs)

        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {workdir} is not a PhraseVAE workdir")
        model = _read_json(path).get("model")
        if not isinstance(model, dict) or "t5" not in model:
            raise ValueError(f"{path}: no PhraseVAE 'model' group with a 't5' entry")
        try:
            params = checkpointing.load_params(workdir, which)
        except FileNotFoundError:
            params = checkpointing.load_params(workdir, "latest" if which == "best" else "best")
        return cls(params, model, **kwargs)

    def _tokens(self, latents: np.ndarray, max_length: int) -> np.ndarray:
        from phraseldm_jax import decoding

        return decoding.greedy_decode(
            self.params,
            self.config,
            np.asarray(latents, np.float32),
            max_length=max_length,
            batch_size=self.batch_size,
            devices=self.devices,
            buffers=self.buffers,
            compute_dtype=self.compute_dtype,
        )

    def decode(self, latents: np.ndarray) -> list[str]:
        from phraseldm_jax import decoding

        return decoding.tokens_to_phrases(self._tokens(latents, self.max_length))

    def first_tokens(self, latents: np.ndarray) -> np.ndarray:
        """[N] int: the first token each latent decodes to (one greedy step)."""
        return self._tokens(latents, 2)[:, 1]


@dataclasses.dataclass
class Song:
    """One decoded song. ``slots``: the decoded phrase of every latent; ``text``: the REMI-z
    song string (up to the first ``[SEP]``, or ``n_bars`` bars read by position when the
    length was forced); ``n_bars``: its ``b-1`` count; ``multitrack``: None when remi-z could
    not read ``text`` (``error`` says why); ``bars_before_sep``: the ``b-1`` count before the
    first ``[SEP]``, the length the model itself generated (equal to ``n_bars`` unless
    forced)."""

    slots: list[str]
    text: str
    n_bars: int
    multitrack: MultiTrack | None
    error: str = ""
    bars_before_sep: int = 0


def forced_length_text(slots: Sequence[str], n_bars: int) -> str:
    """Exactly ``n_bars`` bars read by position from the song layout: bar k is the tokens of
    slots 4k..4k+2 (the track slots) followed by ``b-1``. Special tokens in those slots
    (``[SEP]``, ``[INST]``, ...) and stray ``b-1`` count as nothing, so a bar the model left
    empty or marked as past the end is an empty (silent) bar; the bar-slot latents are not read.
    """
    if n_bars * SLOTS_PER_BAR > len(slots):
        raise ValueError(f"{n_bars} bars need {n_bars * SLOTS_PER_BAR} slots, got {len(slots)}")
    tokens: list[str] = []
    for bar in range(n_bars):
        for text in slots[bar * SLOTS_PER_BAR : bar * SLOTS_PER_BAR + SLOTS_PER_BAR - 1]:
            tokens += [
                token
                for token in phrases.as_text(text).split()
                if token != phrases.BAR_TOKEN and not token.startswith("[")
            ]
        tokens.append(phrases.BAR_TOKEN)
    return " ".join(tokens)


def song_from_slots(slots: Sequence[str], n_bars: int | None = None) -> Song:
    """Decoded slot strings -> Song (SPEC section 7: the bars before the first ``[SEP]``).
    ``n_bars`` forces the length instead (``forced_length_text``)."""
    natural = phrases.slots_to_remiz(slots)
    text = natural if n_bars is None else forced_length_text(slots, n_bars)
    bars_before_sep = natural.split().count(phrases.BAR_TOKEN)
    try:
        multitrack, error = phrases.remiz_to_multitrack(text), ""
    except Exception as err:  # remi-z asserts on some token sequences; report, don't crash
        multitrack, error = None, f"{type(err).__name__}: {err}"
    count = text.split().count(phrases.BAR_TOKEN)
    return Song(list(slots), text, count, multitrack, error, bars_before_sep)


def song_ends(first_tokens: np.ndarray) -> np.ndarray:
    """[num_songs, length] first decoded token of every slot -> [num_songs] index of each
    song's first slot that starts with ``[SEP]`` (``length`` when none does)."""
    starts_with_sep = np.asarray(first_tokens) == SEP_ID
    return np.where(starts_with_sep.any(1), starts_with_sep.argmax(1), starts_with_sep.shape[1])


def decode_songs(
    decoder: PhraseDecoder,
    latents: np.ndarray,
    n_bars: int | None = None,
    *,
    past_the_end: bool = False,
) -> list[Song]:
    """Raw latents [num_songs, length, 64] -> Songs (the slots decoded in one call);
    ``n_bars`` forces every song's length (``song_from_slots``).

    A natural-length song stops at its first ``[SEP]``, so when the decoder reports first
    tokens (``VAEDecoder.first_tokens``, one greedy step per slot) the slots after a song's
    first slot that starts with ``[SEP]`` are not decoded: same text, bars and MIDI, and an
    undertrained model leaves most of its 512 slots past the end, often as rows that never
    emit ``[EOS]``. Their ``slots`` entries are then ``""`` and the ``[SEP]`` slot's is
    ``"[SEP]"``. ``past_the_end=True`` (or a forced length, which reads slots by position)
    decodes every slot."""
    latents = np.asarray(latents, np.float32)
    n, length, dim = latents.shape
    flat = latents.reshape(n * length, dim)
    if n_bars is not None or past_the_end or not hasattr(decoder, "first_tokens"):
        texts = decoder.decode(flat)
        if len(texts) != n * length:
            raise ValueError(f"decoder returned {len(texts)} phrases for {n * length} latents")
    else:
        ends = song_ends(np.asarray(decoder.first_tokens(flat)).reshape(n, length))
        rows = np.concatenate([i * length + np.arange(end) for i, end in enumerate(ends)])
        decoded = decoder.decode(flat[rows]) if len(rows) else []
        if len(decoded) != len(rows):
            raise ValueError(f"decoder returned {len(decoded)} phrases for {len(rows)} latents")
        texts = [""] * (n * length)
        for row, text in zip(rows, decoded):
            texts[row] = text
        for i, end in enumerate(ends):
            if end < length:
                texts[i * length + end] = phrases.SEP_TOKEN
    return [song_from_slots(texts[i * length : (i + 1) * length], n_bars) for i in range(n)]


def transpose(multitrack: MultiTrack, semitones: int) -> None:
    """Shifts every non-drum note by ``semitones`` in place, keeping pitches in 0..127 by
    octaves."""
    if semitones == 0:
        return
    for bar in multitrack.bars:
        for track in bar.tracks.values():
            if track.is_drum:
                continue
            for note in track.notes:
                pitch = note.pitch + semitones
                while pitch < 0:
                    pitch += 12
                while pitch > 127:
                    pitch -= 12
                note.pitch = pitch


def _extend_to_last_bar(path: str, multitrack: MultiTrack) -> None:
    """Moves the end of every MIDI track to the end of the song's last bar, so trailing
    silent bars stay in the file (remi-z ends the file at the last note)."""
    import mido

    midi = mido.MidiFile(path)
    end = 0
    for bar in multitrack.bars:
        numerator, denominator = bar.time_signature
        end += round(midi.ticks_per_beat * numerator * 4 / denominator)
    for track in midi.tracks:
        total = sum(message.time for message in track)
        if track and track[-1].type == "end_of_track" and total < end:
            track[-1].time += end - total
    midi.save(path)


def write_midi(
    multitrack: MultiTrack,
    path: str,
    *,
    tempo: float = REFERENCE_TEMPO,
    semitones: int = 0,
    keep_silent_bars: bool = False,
) -> None:
    """Writes the song as MIDI at ``tempo`` bpm, transposed by ``semitones``, atomically.
    ``keep_silent_bars``: the file lasts to the end of the last bar even when it is silent."""
    transpose(multitrack, semitones)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    try:
        multitrack.to_midi(tmp, tempo=float(tempo), verbose=False)
        if keep_silent_bars:
            _extend_to_last_bar(tmp, multitrack)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------
# Loading a trained model.


@dataclasses.dataclass(frozen=True)
class LoadedLDM:
    """A PhraseLDM ready to sample: config, params and where it came from.

    format: "orbax" (a ``train_ldm.py`` workdir) or "original" (config.json +
    model.safetensors). vae_workdir: the PhraseVAE the workdir names ("" if none).
    default_clip: "scaled" for our models, "reference" for the original's weights (trained
    and sampled with the raw clip value in scaled space).
    """

    config: PhraseLDMConfig
    params: Any
    format: str
    vae_workdir: str
    default_clip: str


def _checkpoint_format(path: str) -> str:
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "orbax"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "original"
    raise FileNotFoundError(
        f"{path} is neither an LDM training workdir (no checkpoints/ folder) nor an original "
        "PhraseLDM folder (no model.safetensors)"
    )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_ldm_config(path: str) -> PhraseLDMConfig:
    """The model config of a checkpoint folder, without loading weights (cheap)."""
    fmt = _checkpoint_format(path)
    config = _read_json(os.path.join(path, "config.json"))
    if fmt == "original":
        from phraseldm_jax.convert import ldm_weights

        return ldm_weights.ldm_config_from_hf_config(config)
    model = config.get("model")
    if not isinstance(model, dict) or "dit" not in model:
        raise ValueError(f"{path}/config.json has no PhraseLDM 'model' group")
    if model.get("scale_factor", 0) <= 0 or model.get("clip_range", 0) <= 0:
        raise ValueError(f"{path}/config.json: model.scale_factor / clip_range not resolved")
    return PhraseLDMConfig(**model)


def load_ldm(path: str, which: str = "best") -> LoadedLDM:
    """Loads a PhraseLDM from a training workdir (the ``which`` checkpoint, else the other
    one) or from a folder in the original's layout."""
    from phraseldm_jax import checkpointing

    fmt = _checkpoint_format(path)
    if fmt == "original":  # section ids in the order of its section_vocab.json, if any
        from phraseldm_jax.convert import api

        model = api.import_phrase_ldm(path)
        return LoadedLDM(model.config, model.params, fmt, "", "reference")
    config = read_ldm_config(path)
    try:
        params = checkpointing.load_params(path, which)
    except FileNotFoundError:
        params = checkpointing.load_params(path, "latest" if which == "best" else "best")
    workdir_config = _read_json(os.path.join(path, "config.json"))
    vae = workdir_config.get("vae", {}).get("workdir", "")
    clip = "reference" if workdir_config.get("converted_from") else "scaled"  # original weights
    return LoadedLDM(config, params, fmt, vae or "", clip)


@functools.lru_cache(maxsize=8)
def cached_sampler(config, settings, mesh=None) -> LatentSampler:
    """``LatentSampler(config, settings, mesh)``, compiled once per distinct argument set."""
    return LatentSampler(config, settings, mesh)


def sample_songs(
    params: Any,
    config: PhraseLDMConfig,
    settings: SamplerSettings,
    decoder: PhraseDecoder,
    key: jax.Array,
    cond: Conditions,
    mesh=None,
) -> tuple[np.ndarray, list[Song]]:
    """Samples and decodes one batch: (raw latents [n, 512, 64], Songs)."""
    latents = cached_sampler(config, settings, mesh)(params, key, cond)
    return latents, decode_songs(decoder, latents)

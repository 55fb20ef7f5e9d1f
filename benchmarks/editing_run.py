"""Sampling, decoding and measuring the editing benchmark's runs (``benchmarks/editing.py``
parses the flags and loads the models; ``editing_measures`` holds the measures).

Every song of a mode is sampled three ways from the same noise (one key per batch of songs,
``fold_in(seed, batch)``), with the same sampler settings: ``plain`` (no mask; one run shared
by every mode, measured on each mode's slots), ``naive`` (RePaint replacement, no resampling)
and ``resample`` (``resample_rounds`` RePaint rounds per step). The songs are decoded as
``sample.py`` decodes them (``songs.decode_songs``: the bars before the first ``[SEP]``), with
any slot of bars 1..n past a song's end decoded too. ``real`` is the test songs themselves,
measured on the same slots.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import editing_measures as measures
from benchmarks import editing_songs
from phraseldm_jax import editing, ldm, phrases, songs
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.sampler import LatentSampler, SamplerSettings

# The special slots an edit's reference holds besides the song's phrases.
SPECIALS = (phrases.INST_TOKEN, phrases.BAR_TOKEN, phrases.SEP_TOKEN)


@dataclasses.dataclass
class Models:
    """What the runs need of the loaded models: the LDM's config and params, the clip mode it
    travels with, the PhraseVAE (encode / decode) and the conventions of its latent dataset."""

    config: ldm.PhraseLDMConfig
    params: Any
    clip: str
    vae: Any
    slot_order: str = "pitch_order"
    reference_padding: bool = False


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Sampler settings and sizes of a benchmark run."""

    sampler: str = "dpmpp_2m"
    steps: int = 50
    resample_rounds: int = 5
    seed: int = 0
    batch_size: int = 8
    modes: tuple[str, ...] = editing_songs.MODES
    edits: editing_songs.ModeOptions = editing_songs.ModeOptions()


class CachingEncoder:
    """The PhraseVAE's ``encode`` with each phrase encoded once over the whole run (every mode
    plans the same songs); ``seconds`` is the time spent in the VAE's encoder."""

    def __init__(self, vae):
        self._vae, self._means, self.seconds = vae, {}, 0.0

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        new = sorted(set(texts) - set(self._means))
        if new:
            start = time.perf_counter()
            means = np.asarray(self._vae.encode(new)[0], np.float32)
            self.seconds += time.perf_counter() - start
            self._means.update(zip(new, means))
        rows = np.stack([self._means[t] for t in texts])
        return rows, np.zeros_like(rows)


@dataclasses.dataclass
class Case:
    """One test song: the song, the bars edited (n) and the raw latents of those bars."""

    song: editing.SourceSong
    n_bars: int
    real: np.ndarray  # [4 * n_bars, D]

    @property
    def song_id(self) -> str:
        return str(self.song.record.get("song_id", self.song.path))

    @property
    def slots(self) -> list[str]:
        """The song's slot strings of bars 1..n."""
        return list(self.song.slots[: SLOTS_PER_BAR * self.n_bars])


def conditions(config: ldm.PhraseLDMConfig, cases: Sequence[Case]) -> ldm.Conditions:
    """Per-song conditions: each song's bar count, and its section plan for a
    section-conditioned model."""
    per_song = []
    for case in cases:
        plan = editing_songs.song_plan(case.song, case.n_bars) if config.sec_control else None
        per_song.append(ldm.make_conditions(1, case.n_bars, plan))
    return ldm.Conditions(*(np.concatenate(parts) for parts in zip(*per_song)))


class Sampling:
    """Samples batches of cases with one compiled ``LatentSampler`` per settings, timing the
    sampling alone (``compile_seconds`` taken out), and decodes them (``decode_seconds``)."""

    def __init__(self, models: Models, options: RunOptions):
        self.models, self.options, self._samplers = models, options, {}
        self.decode_seconds = 0.0

    def settings(self, resample: int = 0, strength: float = 1.0) -> SamplerSettings:
        o = self.options
        return SamplerSettings(
            sampler=o.sampler, num_steps=o.steps, clip=self.models.clip, resample=resample,
            strength=strength,
        )  # fmt: skip

    def __call__(self, settings, cases, plans=None) -> tuple[np.ndarray, float]:
        """(raw latents [len(cases), length, D], sampling seconds); with ``plans`` the kept
        slots are kept and restored to the encoded latents, as ``sample.py`` does."""
        if settings not in self._samplers:
            self._samplers[settings] = LatentSampler(self.models.config, settings)
        sampler = self._samplers[settings]
        m, size, out, seconds = self.models, self.options.batch_size, [], 0.0
        for index, start in enumerate(range(0, len(cases), size)):
            chunk = slice(start, start + size)
            cond = conditions(m.config, cases[chunk])
            key = jax.random.fold_in(jax.random.PRNGKey(self.options.seed), index)
            began = time.perf_counter()
            if plans is None:
                raw = sampler(m.params, key, cond)
            else:
                batch = plans[chunk]
                song = np.stack([p.model for p in batch])
                mask = np.stack([p.mask for p in batch])
                raw = sampler(m.params, key, cond, song, mask)
                raw = np.stack([p.restore(r[None])[0] for p, r in zip(batch, raw)])
            seconds += time.perf_counter() - began - sampler.compile_seconds
            out.append(raw)
        return np.concatenate(out), seconds

    def decode(self, raw: np.ndarray, cases: Sequence[Case], plans=None) -> Decoded:
        """``decode`` with the PhraseVAE, timed."""
        started = time.perf_counter()
        decoded = decode(self.models.vae, raw, cases, plans)
        self.decode_seconds += time.perf_counter() - started
        return decoded


@dataclasses.dataclass
class Decoded:
    """A run's songs as ``sample.py`` would write them, and the slot strings of bars 1..n."""

    songs: list[songs.Song]
    slots: list[list[str]]


def decode(vae, raw: np.ndarray, cases: Sequence[Case], plans=None) -> Decoded:
    """``songs.decode_songs`` of the run as ``sample.py`` does it (a plan that keeps the bar
    layout reads its song by that layout), plus the slots of bars 1..n it did not decode (past
    a song that ended early)."""
    if plans is not None and any(plan.exact_length for plan in plans):
        decoded = [
            songs.decode_songs(vae, raw[i : i + 1], plan.n_bars if plan.exact_length else None)[0]
            for i, plan in enumerate(plans)
        ]
    else:
        decoded = songs.decode_songs(vae, raw)
    slot_texts = []
    for song, case, latents in zip(decoded, cases, raw):
        texts = list(song.slots[: SLOTS_PER_BAR * case.n_bars])
        missing = [i for i, t in enumerate(texts) if not t]
        if missing:
            for i, text in zip(missing, vae.decode(latents[missing])):
                texts[i] = text
        slot_texts.append(texts)
    return Decoded(decoded, slot_texts)


def reconstructions(vae, texts: Sequence[str]) -> dict[str, str]:
    """Phrase -> the PhraseVAE's reconstruction of it (decode of the encoded mean)."""
    distinct = sorted(set(texts))
    return dict(zip(distinct, vae.decode(np.asarray(vae.encode(distinct)[0], np.float32))))


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every run is measured against: ``pool`` the test songs' track-slot latents of
    bars 1..n (PhraseFID's real side), ``spread_limits`` the real songs' spread of
    adjacent-bar note changes, ``reconstructions`` the PhraseVAE's reconstruction of every
    phrase the songs (and an edit's special slots) hold."""

    pool: np.ndarray
    spread_limits: np.ndarray
    reconstructions: dict[str, str]


def reference(vae, cases: Sequence[Case]) -> Reference:
    """The ``Reference`` of the test songs."""
    pool = np.concatenate([c.real[measures.track_slots(c.n_bars)] for c in cases])
    changes = [
        measures.note_changes(
            measures.bar_texts(c.slots, c.n_bars), measures.adjacent_pairs(c.n_bars)
        )
        for c in cases
    ]
    texts = [t for c in cases for t in c.slots] + list(SPECIALS)
    return Reference(
        pool, measures.spread_limits(np.concatenate(changes)), reconstructions(vae, texts)
    )


def _song_measures(latents, texts, case: Case, plan) -> dict:
    """One song's structure and seam measures on the slots of ``plan``: bar SSM between its
    generated and kept bars, seam distances, seam note changes."""
    seam_bars = measures.seams(plan.mask, case.n_bars)
    return {
        "ssm": measures.ssm_generated_vs_kept(latents, plan.mask, case.n_bars),
        "seam_l2": measures.seam_distances(latents, seam_bars),
        "changes": measures.note_changes(measures.bar_texts(texts, case.n_bars), seam_bars),
    }


def real_measures(cases, plans, ref: Reference) -> dict:
    """The test songs measured on the slots of the mode's edits (the ``real`` row)."""
    per_song = [_song_measures(c.real, c.slots, c, p) for c, p in zip(cases, plans)]
    region = [c.real[measures.generated_slots(p.mask, c.n_bars)] for c, p in zip(cases, plans)]
    seam_l2 = [d for s in per_song for d in s["seam_l2"]]
    return {
        "phrase_fid": measures.region_fid(ref.pool, np.concatenate(region)),
        "ssm_generated_kept": measures.mean_or_none([s["ssm"] for s in per_song]),
        "seam_l2": measures.mean_or_none(seam_l2),
        "seams": len(seam_l2),
        "seam_notes_within_spread": measures.within_spread(
            np.concatenate([s["changes"] for s in per_song]), ref.spread_limits
        ),
    }


def measure(raw, decoded: Decoded, cases, plans, ref: Reference) -> dict:
    """A run's measures on the slots of the mode's ``plans`` (``editing_measures``), each song
    against its real counterpart."""
    recon = ref.reconstructions
    matched = kept = copied = generated_total = 0
    rows, ssm, ssm_gap, seam_l2, seam_gap, changes = [], [], [], [], [], []
    for latents, texts, case, plan in zip(raw, decoded.slots, cases, plans):
        n = case.n_bars
        kept_index = np.flatnonzero(plan.mask[: SLOTS_PER_BAR * n])
        m, k = measures.kept_identity(
            [texts[j] for j in kept_index], [recon[plan.slots[j]] for j in kept_index]
        )
        matched, kept = matched + m, kept + k
        generated = measures.generated_slots(plan.mask, n)
        rows.append(latents[: SLOTS_PER_BAR * n][generated])
        copied += sum(texts[j] == recon[case.slots[j]] for j in np.flatnonzero(generated))
        generated_total += int(generated.sum())
        ours = _song_measures(latents, texts, case, plan)
        real = _song_measures(case.real, case.slots, case, plan)
        if ours["ssm"] is not None:
            ssm.append(ours["ssm"])
            ssm_gap.append(abs(ours["ssm"] - real["ssm"]))
        seam_l2 += ours["seam_l2"]
        seam_gap += [abs(a - b) for a, b in zip(ours["seam_l2"], real["seam_l2"])]
        changes.append(ours["changes"])
    exact = [song.n_bars == case.n_bars for song, case in zip(decoded.songs, cases)]
    return {
        "kept_identity": matched / kept if kept else None,
        "kept_slots": kept,
        "exact_length_share": float(np.mean(exact)),
        "bars": [song.n_bars for song in decoded.songs],
        "phrase_fid": measures.region_fid(ref.pool, np.concatenate(rows)),
        "generated_slots": generated_total,
        "source_copy_share": copied / generated_total if generated_total else None,
        "ssm_generated_kept": measures.mean_or_none(ssm),
        "ssm_gap": measures.mean_or_none(ssm_gap),
        "seam_l2": measures.mean_or_none(seam_l2),
        "seam_l2_gap": measures.mean_or_none(seam_gap),
        "seam_notes_within_spread": measures.within_spread(
            np.concatenate(changes), ref.spread_limits
        ),
    }


def run_mode(mode: str, cases, sampling: Sampling, plain: dict, ref: Reference, encoder) -> dict:
    """Every run of ``mode`` on the cases it applies to; ``plain``: the plain run's raw latents,
    decoded songs and seconds per song."""
    options, m = sampling.options, sampling.models
    edits = [editing_songs.mode_edit(mode, c.song, c.n_bars, options.edits) for c in cases]
    chosen = [i for i, e in enumerate(edits) if e is not None]
    mode_cases = [cases[i] for i in chosen]
    entry = {"description": editing_songs.describe(mode, options.edits), "songs": len(chosen)}
    if not chosen:
        return entry
    plans = [
        editing.plan_edit(
            encoder, length=m.config.dit.sample_size, scale_factor=m.config.scale_factor,
            n_bars=cases[i].n_bars, song=edits[i].song, keep=edits[i].keep,
            reference_padding=m.reference_padding,
        )
        for i in chosen
    ]  # fmt: skip
    strength = edits[chosen[0]].strength
    plain_decoded = plain["decoded"]
    plain_decoded = Decoded(
        [plain_decoded.songs[i] for i in chosen], [plain_decoded.slots[i] for i in chosen]
    )
    runs = {
        "real": real_measures(mode_cases, plans, ref),
        "plain": measure(plain["raw"][chosen], plain_decoded, mode_cases, plans, ref),
    }
    runs["plain"]["seconds_per_song"] = plain["seconds_per_song"]
    for name, rounds in (("naive", 0), ("resample", options.resample_rounds)):
        raw, seconds = sampling(sampling.settings(rounds, strength), mode_cases, plans)
        decoded = sampling.decode(raw, mode_cases, plans)
        runs[name] = measure(raw, decoded, mode_cases, plans, ref)
        runs[name]["seconds_per_song"] = seconds / len(mode_cases)
    for name in ("plain", "naive", "resample"):
        runs[name]["speed_vs_plain"] = runs[name]["seconds_per_song"] / plain["seconds_per_song"]
    entry.update(
        song_ids=[c.song_id for c in mode_cases],
        strength=strength,
        variants=runs,
        resample_vs_naive=measures.compare(runs["naive"], runs["resample"]),
    )
    return entry


def run(models: Models, cases: Sequence[Case], options: RunOptions, encoder=None) -> dict:
    """Plain sampling once, then every mode: the result's ``plain``, ``spread_limits``,
    ``modes`` and ``timings``. ``encoder``: the ``CachingEncoder`` that encoded the cases."""
    encoder = encoder or CachingEncoder(models.vae)
    sampling = Sampling(models, options)
    started = time.perf_counter()
    ref = reference(models.vae, cases)
    raw, seconds = sampling(sampling.settings(), list(cases))
    plain = {"raw": raw, "decoded": sampling.decode(raw, cases)}
    plain["seconds_per_song"] = seconds / len(cases)
    modes = {mode: run_mode(mode, cases, sampling, plain, ref, encoder) for mode in options.modes}
    return {
        "plain": {
            "seconds_per_song": plain["seconds_per_song"],
            "bars": [s.n_bars for s in plain["decoded"].songs],
            "requested_bars": [c.n_bars for c in cases],
        },
        "spread_limits": {
            "quantile": measures.SPREAD_QUANTILE,
            "onset_density": float(ref.spread_limits[0]),
            "pitch_range": float(ref.spread_limits[1]),
        },
        "modes": modes,
        "timings": {
            "encode_s": encoder.seconds,
            "decode_s": sampling.decode_seconds,
            "run_s": time.perf_counter() - started,
        },
    }


def make_cases(encoder: CachingEncoder, chosen) -> list[Case]:
    """The cases of the (song, n_bars) pairs, their real latents encoded by ``encoder``."""
    return [
        Case(song, n_bars, editing.encode_texts(encoder, song.slots[: SLOTS_PER_BAR * n_bars]))
        for song, n_bars in chosen
    ]

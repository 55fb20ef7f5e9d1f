"""The measures of the editing benchmark (``benchmarks/editing.py``): numpy on one song's raw
latents [4 * n, D] and slot strings, and the comparison of two runs.

Layout: ``SLOTS_PER_BAR`` (4) slots per bar, the last one the bar's ``b-1``; the other three
are its *track slots*. Given a mask of kept slots, a bar is *kept* when all its track slots
are, *generated* when any of them is not. A *seam* is a pair of adjacent bars, one kept and one
generated (a continuation has one, an infill two; accompaniment, variation and exact length
none). Bars are represented as ``metrics.ldm.bar_ssm`` represents them: the mean of their
slots' latents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from phraseldm_jax.metrics import ldm as ldm_metrics
from phraseldm_jax.phrases import SLOTS_PER_BAR

NOTE_TOKEN = re.compile(r"([op])-(\d+)")
SPREAD_QUANTILE = 0.9  # a seam's note change is "within real-song spread" up to this quantile


def track_slots(n_bars: int) -> np.ndarray:
    """[4 * n_bars] bool: True for the track slots (not the ``b-1`` slots)."""
    return np.arange(SLOTS_PER_BAR * n_bars) % SLOTS_PER_BAR != SLOTS_PER_BAR - 1


def generated_slots(mask: np.ndarray, n_bars: int) -> np.ndarray:
    """[4 * n_bars] bool: the track slots of bars 1..n the edit generates."""
    return ~np.asarray(mask[: SLOTS_PER_BAR * n_bars], bool) & track_slots(n_bars)


def kept_bars(mask: np.ndarray, n_bars: int) -> np.ndarray:
    """[n_bars] bool: bars whose track slots are all kept."""
    generated = generated_slots(mask, n_bars).reshape(n_bars, SLOTS_PER_BAR)
    return ~generated.any(axis=1)


def seams(mask: np.ndarray, n_bars: int) -> list[tuple[int, int]]:
    """(kept bar, generated bar) of every seam, 0-based, in song order."""
    kept = kept_bars(mask, n_bars)
    out = []
    for bar in range(n_bars - 1):
        if kept[bar] != kept[bar + 1]:
            out.append((bar, bar + 1) if kept[bar] else (bar + 1, bar))
    return out


def kept_identity(decoded: Sequence[str], reconstructed: Sequence[str]) -> tuple[int, int]:
    """(kept slots whose decoded phrase equals the reconstruction of the input's, kept slots)."""
    if len(decoded) != len(reconstructed):
        raise ValueError(f"{len(decoded)} decoded phrases for {len(reconstructed)} kept slots")
    return sum(a == b for a, b in zip(decoded, reconstructed)), len(decoded)


def bar_means(latents: np.ndarray) -> np.ndarray:
    """[n, D] mean latent of each bar of [4 * n, D] latents."""
    latents = np.asarray(latents, np.float64)
    return latents.reshape(len(latents) // SLOTS_PER_BAR, SLOTS_PER_BAR, -1).mean(axis=1)


def ssm_generated_vs_kept(latents: np.ndarray, mask: np.ndarray, n_bars: int) -> float | None:
    """Mean bar self-similarity (``bar_ssm``) between the generated and the kept bars of a
    song; None without both."""
    kept = kept_bars(mask, n_bars)
    if kept.all() or not kept.any():
        return None
    ssm = ldm_metrics.bar_ssm(latents[: SLOTS_PER_BAR * n_bars])
    return float(ssm[~kept][:, kept].mean())


def seam_distances(latents: np.ndarray, seam_bars: Sequence[tuple[int, int]]) -> list[float]:
    """L2 between the bar-mean latents of the two bars of every seam."""
    if not seam_bars:
        return []
    means = bar_means(latents[: SLOTS_PER_BAR * (1 + max(max(s) for s in seam_bars))])
    return [float(np.linalg.norm(means[a] - means[b])) for a, b in seam_bars]


def bar_note_stats(track_texts: Sequence[str]) -> tuple[int, int]:
    """(onset density: distinct onsets, pitch range: highest - lowest pitch) of one bar's track
    slots; tokens other than ``o-N`` / ``p-N`` are ignored, a bar without notes is (0, 0)."""
    onsets, pitches = set(), []
    for text in track_texts:
        for kind, value in NOTE_TOKEN.findall(text or ""):
            if kind == "o":
                onsets.add(int(value))
            else:
                pitches.append(int(value))
    return len(onsets), (max(pitches) - min(pitches)) if pitches else 0


def bar_texts(slots: Sequence[str], n_bars: int) -> list[list[str]]:
    """The track-slot strings of each of the first ``n_bars`` bars."""
    per = SLOTS_PER_BAR
    return [list(slots[per * b : per * b + per - 1]) for b in range(n_bars)]


def note_changes(bars: Sequence[Sequence[str]], pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """[len(pairs), 2] |change| of (onset density, pitch range) between the bars of each pair."""
    stats = [bar_note_stats(bar) for bar in bars]
    rows = [np.abs(np.subtract(stats[a], stats[b])) for a, b in pairs]
    return np.asarray(rows, np.float64).reshape(len(rows), 2)


def adjacent_pairs(n_bars: int) -> list[tuple[int, int]]:
    return [(bar, bar + 1) for bar in range(n_bars - 1)]


def spread_limits(changes: np.ndarray, quantile: float = SPREAD_QUANTILE) -> np.ndarray:
    """[2] the ``quantile`` of real songs' adjacent-bar changes of onset density and pitch
    range: a change up to it is within real-song spread."""
    changes = np.asarray(changes, np.float64).reshape(-1, 2)
    if not len(changes):
        raise ValueError("no adjacent bars in the real songs to measure their spread")
    return np.quantile(changes, quantile, axis=0)


def within_spread(changes: np.ndarray, limits: np.ndarray) -> float | None:
    """Share of seams whose onset-density and pitch-range changes are both within ``limits``;
    None without seams."""
    changes = np.asarray(changes, np.float64).reshape(-1, 2)
    if not len(changes):
        return None
    return float(np.mean((changes <= limits).all(axis=1)))


def region_fid(real_rows: np.ndarray, generated_rows: np.ndarray) -> float | None:
    """PhraseFID (``metrics.ldm.frechet_distance``) of generated phrase latents against real
    ones, at least 0 (two equal sets give a rounding error either side of it); None with fewer
    than 2 rows on a side."""
    if len(real_rows) < 2 or len(generated_rows) < 2:
        return None
    return max(0.0, ldm_metrics.frechet_distance(real_rows, generated_rows))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --- naive replacement against resampling --------------------------------------------------

# measure -> True when higher is better (the others: lower is better).
HIGHER_IS_BETTER = {
    "kept_identity": True,
    "exact_length_share": True,
    "phrase_fid": False,
    "ssm_gap": False,
    "seam_l2_gap": False,
    "seam_notes_within_spread": True,
    "seconds_per_song": False,
}


def compare(naive: dict, resampled: dict, measures=HIGHER_IS_BETTER) -> dict:
    """Per measure: both values, ``change`` (resampled - naive), ``relative`` (change /
    |naive|) and ``better`` ("resample", "naive", "tie", or None where a value is missing)."""
    out = {}
    for name, higher in measures.items():
        a, b = naive.get(name), resampled.get(name)
        entry = {"naive": a, "resample": b, "change": None, "relative": None, "better": None}
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            change = b - a
            entry.update(change=change, relative=change / abs(a) if a else None)
            if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
                entry["better"] = "tie"
            else:
                entry["better"] = "resample" if (change > 0) == higher else "naive"
        out[name] = entry
    return out

"""PhraseLDM song metrics (FACTS section 2): PhraseFID, n-gram FID, bar SSM, SRS, bright_ratio,
melody memorisation, diversity, length accuracy and `truncate_by_self_similarity`.

All functions are host-side numpy. Latents of one song are `[T, D]` with 4 phrases per bar
(T = 4 * bars); a batch of generated songs is `[N, 512, D]` plus the decoded bar counts, which
`song_latents` turns into the list of valid `[4 * n_bars_i, D]` slices the metrics take.

Reference bugs are fixed by default, each with a switch back (SPEC section 9):
- `frechet_distance(..., reference_variant=True)` reproduces the original's float32
  `eigh` of the non-symmetric product S_A S_B (only its lower triangle is read);
- `truncate_by_self_similarity(..., reference_behaviour=True)` keeps its last-bar bug.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from phraseldm_jax.phrases import SLOTS_PER_BAR, length_bucket_range

MELODY_PROGRAM = 13


# ----------------------------------------------------------------------------- inputs


def song_latents(
    latents: np.ndarray, n_bars: Sequence[int], phrases_per_bar: int = SLOTS_PER_BAR
) -> list[np.ndarray]:
    """Valid rows of each generated song: latents[i, :phrases_per_bar * n_bars[i]].

    Like the original, the slice silently stops at the array end and songs with no rows are
    dropped. latents: [N, T, D]; returns a list of [L_i, D] arrays.
    """
    latents = np.asarray(latents)
    if latents.ndim != 3 or len(latents) != len(n_bars):
        raise ValueError(f"latents {latents.shape} do not match {len(n_bars)} bar counts")
    rows = [min(phrases_per_bar * int(b), latents.shape[1]) for b in n_bars]
    return [latents[i, :r] for i, r in enumerate(rows) if r > 0]


# ----------------------------------------------------------------------------- FID


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of rows x: [N, D], in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature rows [N, D], got shape {x.shape}")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr sqrtm(S_A S_B) = sum of sqrt(eig(sqrt(S_A) S_B sqrt(S_A))), in float64, no scipy."""
    root_a = _psd_sqrt(np.asarray(cov_a, np.float64))
    middle = root_a @ np.asarray(cov_b, np.float64) @ root_a
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def reference_trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """The original's term: float32 M = S_A S_B, eigh of M's lower triangle, eigenvalues
    clamped at 1e-12. Not tr sqrtm(S_A S_B) unless M happens to be symmetric."""
    product = np.asarray(cov_a, np.float32) @ np.asarray(cov_b, np.float32)
    lower = np.tril(product) + np.tril(product, -1).T
    values = np.linalg.eigvalsh(lower)
    return float(np.sqrt(np.maximum(values, np.float32(1e-12))).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray, *, reference_variant: bool = False) -> float:
    """Frechet distance between the Gaussians fitted to feature rows a: [N1, D], b: [N2, D].

    ||mu_A - mu_B||^2 + tr(S_A) + tr(S_B) - 2 tr sqrtm(S_A S_B), with unbiased covariances.
    reference_variant: the original `compute_fid` (float32, lower-triangle eigh; about 0.005
    rather than 0 for FID(X, X) on real latents), to compare with the paper's numbers.
    """
    if reference_variant:
        return _reference_fid(np.asarray(a, np.float32), np.asarray(b, np.float32))
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """The true Frechet distance from precomputed (mean [D], covariance [D, D]) pairs."""
    diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product(cov_a, cov_b)
    return float(diff @ diff + trace)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """float32 throughout, as the original computes it with torch."""
    stats = []
    for x in (a, b):
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 feature rows [N, D], got shape {x.shape}")
        mu = x.mean(axis=0)
        centred = x - mu
        stats.append((mu, centred.T @ centred / np.float32(len(x) - 1)))
    (mu_a, cov_a), (mu_b, cov_b) = stats
    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    trace = float(np.trace(cov_a + cov_b)) - 2.0 * reference_trace_sqrt_product(cov_a, cov_b)
    return mean_term + trace


def phrase_fid(
    real_songs: Sequence[np.ndarray],
    generated_songs: Sequence[np.ndarray],
    *,
    reference_variant: bool = False,
) -> float:
    """PhraseFID: every phrase latent of every song is one 64-d feature row."""
    return frechet_distance(
        np.concatenate(real_songs),
        np.concatenate(generated_songs),
        reference_variant=reference_variant,
    )


def ngram_vectors(songs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """All windows of n consecutive phrase latents (stride 1), concatenated: [M, n * D].

    Songs shorter than n contribute nothing.
    """
    windows = [
        np.lib.stride_tricks.sliding_window_view(s, n, axis=0)
        .transpose(0, 2, 1)
        .reshape(len(s) - n + 1, -1)
        for s in songs
        if len(s) >= n
    ]
    if not windows:
        raise ValueError(f"no song has at least {n} phrases")
    return np.concatenate(windows)


def ngram_fid(songs_a, songs_b, n: int, *, reference_variant: bool = False) -> float:
    """FID between the n-gram windows of two song sets (n = 1 is PhraseFID)."""
    return frechet_distance(
        ngram_vectors(songs_a, n), ngram_vectors(songs_b, n), reference_variant=reference_variant
    )


def all_ngram_fids(
    real_songs,
    generated_songs,
    ns: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    reference_variant=False,
) -> dict[str, float]:
    """{"fid_1gram": ..., "fid_2gram": ...} as the original's `compute_all_fids_gt_vs_out`."""
    return {
        f"fid_{n}gram": ngram_fid(
            real_songs, generated_songs, n, reference_variant=reference_variant
        )
        for n in ns
    }


# ----------------------------------------------------------------------------- structure


def bar_ssm(z: np.ndarray, phrases_per_bar: int = SLOTS_PER_BAR) -> np.ndarray:
    """Bar self-similarity [B, B]: cosine of the bar means of the phrase latents z: [T, D].

    Norms are floored at 1e-12 (so an all-zero bar has similarity 0 to everything).
    """
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or len(z) % phrases_per_bar:
        raise ValueError(f"latents {z.shape} are not [T, D] with T a multiple of {phrases_per_bar}")
    bars = z.reshape(len(z) // phrases_per_bar, phrases_per_bar, -1).mean(axis=1)
    bars = bars / np.maximum(np.linalg.norm(bars, axis=1, keepdims=True), 1e-12)
    return bars @ bars.T


def recurrence_score_from_ssm(
    ssm: np.ndarray, threshold: float = 0.5, min_run_length: int = 4
) -> float:
    """SRS: total length of counted bright runs on the off-diagonals, divided by B.

    A run of >= min_run_length cells with similarity > threshold on diagonal k counts only if
    diagonal k + 1 has no bright cell at the same rows (the last diagonal always counts).
    The defaults are the values every call in the original uses.
    """
    n_bars = len(ssm)
    if n_bars <= 1:
        return 0.0
    bright = [np.diagonal(ssm, k) > threshold for k in range(1, n_bars)] + [np.zeros(0, bool)]
    total = 0
    for k in range(1, n_bars):
        diag = bright[k - 1]
        edges = np.diff(np.r_[0, diag.astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        long = ends - starts >= min_run_length
        starts, ends = starts[long], ends[long]
        if k < n_bars - 1:
            above = np.r_[0, np.cumsum(bright[k])]
            limit = len(bright[k])
            clear = above[np.minimum(ends, limit)] - above[np.minimum(starts, limit)] == 0
            starts, ends = starts[clear], ends[clear]
        total += int((ends - starts).sum())
    return total / n_bars


def section_recurrence_score(
    z: np.ndarray, threshold: float = 0.5, min_run_length: int = 4
) -> float:
    """SRS of one song's phrase latents z: [4 * B, D] (logged as "bright_ratio" originally)."""
    return recurrence_score_from_ssm(bar_ssm(z), threshold, min_run_length)


def mean_section_recurrence_score(
    songs: Sequence[np.ndarray], threshold=0.5, min_run_length=4
) -> float:
    """Mean SRS over songs (the original's validation value)."""
    scores = [section_recurrence_score(s, threshold, min_run_length) for s in songs]
    return float(np.mean(scores)) if scores else 0.0


def bright_ratio(z: np.ndarray, threshold: float = 0.8) -> float:
    """Strictly-upper-triangle bar-SSM entries above threshold, divided by the bar count."""
    ssm = bar_ssm(z)
    return float(np.count_nonzero(np.triu(ssm > threshold, k=1)) / len(ssm)) if len(ssm) else 0.0


def truncate_by_self_similarity(
    z: np.ndarray,
    phrases_per_bar: int = SLOTS_PER_BAR,
    pad_threshold: float = 0.95,
    min_real_bars: int = 4,
    *,
    reference_behaviour: bool = False,
) -> tuple[np.ndarray, int]:
    """Cut trailing padding bars off a generated song z: [T, D]; returns (z[:4 * bars], bars).

    Padding is recognised by similarity to the last bar (cosine of bar means > pad_threshold).
    Default: the padding is the run of bars just before the last bar that resemble it, plus
    the last bar; if the bar before the last does not resemble it, nothing is cut. At least
    min_real_bars are kept (never more than the song has).
    reference_behaviour: the original, which cuts at the first bar anywhere that resembles the
    last bar; since the last bar resembles itself it always drops at least that bar, and
    for songs under min_real_bars it reports min_real_bars bars.
    """
    z = np.asarray(z)
    last_row = bar_ssm(z, phrases_per_bar)[-1] if len(z) else np.zeros(0)
    n_bars = len(last_row)
    similar = last_row > pad_threshold
    if reference_behaviour:
        pad_start = int(np.argmax(similar)) if similar.any() else n_bars
        pad_start = max(pad_start, min_real_bars)
        return z[: phrases_per_bar * pad_start].copy(), pad_start
    pad_start = n_bars
    if n_bars >= 2 and similar[n_bars - 2]:
        pad_start = n_bars - 1
        while pad_start > 0 and similar[pad_start - 1]:
            pad_start -= 1
    pad_start = min(max(pad_start, min_real_bars), n_bars)
    return z[: phrases_per_bar * pad_start].copy(), pad_start


def diversity(songs: Sequence[np.ndarray], *, exclude_zero: bool = False) -> float:
    """Mean Euclidean distance over all unordered pairs of the pooled phrase latents.

    exclude_zero: leave out zero distances (identical rows such as the shared `b-1` and
    `[INST]` latents), as the original's real-data version does; its generated-data version
    keeps them. 0.0 when fewer than two rows (or no non-zero pair) remain.
    """
    rows = [s for s in songs if len(s)]
    x = np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 1))
    if len(x) <= 1:
        return 0.0
    # Identical rows must give exactly 0, which the Gram formula below does not guarantee.
    _, row_id = np.unique(x, axis=0, return_inverse=True)
    row_id = row_id.reshape(-1)
    sq = np.einsum("ij,ij->i", x, x)
    total, count = 0.0, 0
    for start in range(0, len(x), 1024):
        block = slice(start, start + 1024)
        d2 = sq[block, None] + sq[None, :] - 2.0 * x[block] @ x.T
        dist = np.sqrt(np.maximum(d2, 0.0))
        dist[row_id[block, None] == row_id[None, :]] = 0.0
        upper = np.arange(start, start + len(dist))[:, None] < np.arange(len(x))[None, :]
        if exclude_zero:
            upper &= dist > 0
        total += float(dist[upper].sum())
        count += int(upper.sum())
    return total / count if count else 0.0


# ----------------------------------------------------------------------------- length


def length_accuracy(n_bars: Sequence[int], target_bars: int = 64, bucket_size: int = 10) -> float:
    """Fraction of generated songs whose bar count falls in the target's bucket."""
    if len(n_bars) == 0:
        return 0.0
    low, high = length_bucket_range(target_bars, bucket_size)
    n_bars = np.asarray(n_bars)
    return float(np.mean((n_bars >= low) & (n_bars < high)))


# ----------------------------------------------------------------------------- memorisation


def melody_string(multitrack, program: int = MELODY_PROGRAM) -> str:
    """The melody of a remi-z MultiTrack as `i-13 o- p- d- ... b-1` per bar; a bar without the
    program is just `b-1`. The MultiTrack is not modified (the original filters in place)."""
    tokens = []
    for bar in multitrack.bars:
        track = bar.tracks.get(program)
        if track is not None and not track.is_drum:
            tokens.extend(track.to_remiz_seq(with_velocity=False))
        tokens.append("b-1")
    return " ".join(tokens)


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token lists (unit costs); simple row-vectorised DP."""
    ref = np.asarray(list(reference), dtype=object)
    row = np.arange(len(ref) + 1)
    for j, token in enumerate(hypothesis, start=1):
        diag = row[:-1] + (ref != token)  # substitution or match
        new = np.empty_like(row)
        new[0] = j
        new[1:] = np.minimum(diag, row[1:] + 1)  # deletion of the hypothesis token
        # insertions within the column: new[i] = min_k (new[k] + i - k)
        idx = np.arange(len(row))
        row = np.minimum.accumulate(new - idx) + idx
    return int(row[-1])


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(S + D + I) / N_ref over whitespace tokens, as jiwer.wer(reference, hypothesis)."""
    ref = reference.split()
    if not ref:
        raise ValueError("word_error_rate: the reference has no tokens")
    return edit_distance(ref, hypothesis.split()) / len(ref)


_WORD = 64
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class MelodyReference:
    """Reference melodies packed for bit-parallel edit distance against all of them at once.

    Song k's tokens occupy bits [offset_k, offset_k + m_k) of one long bit vector, followed
    by one guard bit that keeps the additions of neighbouring songs apart. `match[c]` has
    the bits of the positions whose token is c (Myers' Peq table), [n_tokens + 1, n_words];
    its last row (no bits) serves tokens that no reference contains.
    """

    song_ids: tuple[str, ...]
    lengths: np.ndarray  # [R] tokens per reference melody
    offsets: np.ndarray  # [R] first bit of each song
    token_index: Mapping[str, int]
    match: np.ndarray  # [n_tokens + 1, n_words] uint64
    starts: np.ndarray  # [n_words] uint64, the first bit of every song
    valid: np.ndarray  # [n_words] uint64, all song bits (no guards)

    @classmethod
    def build(cls, melodies: Mapping[str, str]) -> MelodyReference:
        """melodies: song id -> melody string (as `melody_string` writes it)."""
        token_lists = {sid: text.split() for sid, text in melodies.items()}
        for sid, tokens in token_lists.items():
            if not tokens:
                raise ValueError(f"reference melody {sid!r} has no tokens")
        if not token_lists:
            raise ValueError("no reference melodies")
        vocab = {t: i for i, t in enumerate(sorted({t for ts in token_lists.values() for t in ts}))}
        lengths = np.array([len(ts) for ts in token_lists.values()])
        offsets = np.r_[0, np.cumsum(lengths + 1)[:-1]]
        n_words = (int(offsets[-1] + lengths[-1]) + 1 + _WORD - 1) // _WORD
        codes = np.array([vocab[t] for ts in token_lists.values() for t in ts])
        bits = np.concatenate([o + np.arange(m) for o, m in zip(offsets, lengths)])
        match = np.zeros((len(vocab) + 1, n_words), np.uint64)
        np.bitwise_or.at(
            match, (codes, bits // _WORD), np.uint64(1) << (bits % _WORD).astype(np.uint64)
        )
        return cls(
            song_ids=tuple(token_lists),
            lengths=lengths,
            offsets=offsets,
            token_index=vocab,
            match=match,
            starts=_bitmask(offsets, n_words),
            valid=_bitmask(bits, n_words),
        )

    def edit_distances(self, hypothesis: str) -> np.ndarray:
        """Levenshtein distance from every reference melody to hypothesis: [R] int."""
        codes = [self.token_index.get(t, len(self.token_index)) for t in hypothesis.split()]
        return _packed_edit_distances(self, codes)

    def word_error_rates(self, hypothesis: str) -> np.ndarray:
        """WER of hypothesis against every reference melody: [R] float64."""
        return self.edit_distances(hypothesis) / self.lengths


def _bitmask(bits: np.ndarray, n_words: int) -> np.ndarray:
    mask = np.zeros(n_words, np.uint64)
    np.bitwise_or.at(
        mask, bits // _WORD, np.uint64(1) << (np.asarray(bits) % _WORD).astype(np.uint64)
    )
    return mask


def _bits_to_int(flags: np.ndarray) -> int:
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


def _add_with_carry(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) of two multi-word integers stored little-endian in uint64 arrays.

    Word w overflows (g_w) or is all ones and passes an incoming carry on (p_w). The carry
    into word w + 1 is g_w | (p_w & carry_w), which is exactly the carry chain of the
    integer sum G + (G | P) over word-indexed bits, so one Python big-int addition resolves
    every carry chain at once.
    """
    total = a + b
    generate = _bits_to_int(total < a)
    either = generate | _bits_to_int(total == _ALL_ONES)
    carries = (generate + either) ^ generate ^ either  # bit w: carry into word w
    n = len(total)
    raw = carries.to_bytes((n + 8) // 8 + 1, "little")
    carry_in = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
    total += carry_in
    return total


def _shift_left_1(x: np.ndarray) -> np.ndarray:
    out = x << np.uint64(1)
    out[1:] |= x[:-1] >> np.uint64(_WORD - 1)
    return out


def _packed_edit_distances(ref: MelodyReference, codes: Sequence[int]) -> np.ndarray:
    """Myers/Hyyro bit-parallel Levenshtein, every reference at once (one column per token).

    The references are the pattern (vertical), the hypothesis the text: after the last column
    D[m_k][n] = n + (#vertical +1 deltas) - (#vertical -1 deltas) within song k's bits.
    """
    pv = ref.valid.copy()  # column 0: D[i][0] = i, all vertical deltas +1
    mv = np.zeros_like(pv)
    not_starts = ~ref.starts
    for c in codes:
        eq = ref.match[c]
        xv = eq | mv
        xh = (_add_with_carry(eq & pv, pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        ph = _shift_left_1(ph) | ref.starts  # row 0 rises by 1 per column: +1 enters each song
        mh = _shift_left_1(mh) & not_starts
        pv = (mh | ~(xv | ph)) & ref.valid
        mv = ph & xv & ref.valid
    plus = np.unpackbits(pv.astype("<u8").view(np.uint8), bitorder="little")
    minus = np.unpackbits(mv.astype("<u8").view(np.uint8), bitorder="little")
    delta = plus.astype(np.int64) - minus
    per_song = np.add.reduceat(delta, ref.offsets)
    return len(codes) + per_song


def memorisation_metrics(
    generated_melodies: Sequence[str], reference: MelodyReference, threshold: float = 1 / 3
) -> dict:
    """Melody memorisation of generated songs against the reference melodies (FACTS 2.7).

    Per song: w1 <= w2 the two smallest WERs against all references; mem_rate = 1 - w1 (can
    be negative), top2_ratio = w1 / w2 (0 when w2 = 0 or only one reference),
    new_sample_flag = top2_ratio > threshold. Returns the per-song lists (plus the nearest
    reference id) and their plain means avg_mem_rate, avg_top2_ratio, avg_new_sample_rate.
    """
    mem_rates, ratios, flags, nearest = [], [], [], []
    for melody in generated_melodies:
        wers = reference.word_error_rates(melody)
        order = np.argsort(wers, kind="stable")
        w1 = float(wers[order[0]])
        w2 = float(wers[order[1]]) if len(order) > 1 else math.nan
        ratio = w1 / w2 if len(order) > 1 and w2 > 0 else 0.0
        mem_rates.append(1.0 - w1)
        ratios.append(ratio)
        flags.append(int(ratio > threshold))
        nearest.append(reference.song_ids[order[0]])

    def mean(values):
        return float(np.mean(values)) if values else 0.0

    return {
        "mem_rates": mem_rates,
        "top2_ratios": ratios,
        "new_sample_flags": flags,
        "nearest_song_ids": nearest,
        "avg_mem_rate": mean(mem_rates),
        "avg_top2_ratio": mean(ratios),
        "avg_new_sample_rate": mean(flags),
    }


def melody_strings_from_texts(
    song_texts: Sequence[str], program: int = MELODY_PROGRAM
) -> list[str]:
    """Decoded song strings -> melody strings (through remi-z, as the original does)."""
    from phraseldm_jax.remiz import MultiTrack

    return [melody_string(MultiTrack.from_remiz_str(t, verbose=False), program) for t in song_texts]

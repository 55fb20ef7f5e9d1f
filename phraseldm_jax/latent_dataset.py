"""Builds the song-latent dataset PhraseLDM trains on, with a trained PhraseVAE (the command
is ``python -m phraseldm_jax.cli.latents``).

Every song of the ``songs`` dataset becomes its slot sequence (SPEC section 3): per bar the
track phrases (``pitch_order``: remi-z order; ``fixed``: POP909's programs 13, 25, 0 in slots
0-2), ``[INST]`` in empty slots, then ``b-1``; each slot string is encoded to its posterior
mean. Songs over ``max_bars`` (128) bars are left out and counted. Each distinct slot string
is encoded once (songs repeat phrases, and every bar holds ``b-1``), so the ``[INST]`` /
``b-1`` rows are exactly the special latents of ``stats.json``. Encoding batches are split
over every device (``sharding.make_mesh``); single process.

``stats.json`` (``input_pipeline/latent_records.py``) gets: ``scale_factor`` = mean over the
latent dimensions of their standard deviation (unbiased) over every row of the training split;
``abs_p999`` = 99.9th percentile of |latent| over those rows (raw space); ``inst_latent``,
``bar_latent``, ``sep_latent``; and the provenance (VAE workdir and step, data, exclusions).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import tqdm

from input_pipeline import latent_records, tfds_builders
from phraseldm_jax import phrases
from phraseldm_jax.phrases import MAX_BARS
from phraseldm_jax.vae_inference import PhraseVAEModel

SPECIAL_SLOTS = {
    "inst_latent": phrases.INST_TOKEN,
    "bar_latent": phrases.BAR_TOKEN,
    "sep_latent": phrases.SEP_TOKEN,
}


def song_slots(song: Mapping, slot_order: str) -> list[str]:
    """The ``SLOTS_PER_BAR * n_bars`` slot strings of a song record."""
    return phrases.slot_phrases(song, slot_order, fixed_programs=phrases.POP909_PROGRAMS)


def select_songs(songs, max_bars: int = MAX_BARS) -> tuple[list[Mapping], list[str]]:
    """(songs with 1..max_bars bars, ids of the others)."""
    kept, excluded = [], []
    for song in songs:
        (kept if 0 < int(song["n_bars"]) <= max_bars else excluded).append(song)
    return kept, [str(s["song_id"]) for s in excluded]


def encode_songs(
    model: PhraseVAEModel,
    songs_by_split: Mapping[str, Sequence[Mapping]],
    slot_order: str = "pitch_order",
    progress: bool = True,
) -> tuple[dict[str, list[dict]], dict[str, np.ndarray], int]:
    """Latent records of every song, the special latents, and the phrases left out.

    Returns:
      records: split -> latent records (``latent_records`` fields; ``latents`` float32
        [4 * n_bars, latent_dim] posterior means).
      specials: ``inst_latent`` / ``bar_latent`` / ``sep_latent`` -> [latent_dim].
      dropped: phrases that had no slot (more than 3 tracks in a bar, or a program without
        a fixed slot).
    """
    slots = {
        split: [song_slots(song, slot_order) for song in songs]
        for split, songs in songs_by_split.items()
    }
    dropped = sum(
        phrases.dropped_phrases(song, slot_order)
        for songs in songs_by_split.values()
        for song in songs
    )
    distinct = sorted(
        set(SPECIAL_SLOTS.values()).union(*(s for per_song in slots.values() for s in per_song))
    )
    row_of = {text: row for row, text in enumerate(distinct)}
    wrap = (lambda it: tqdm.tqdm(it, desc="encoding phrases", unit="batch")) if progress else None
    table, _ = model.encode(distinct, progress=wrap)
    records = {}
    for split, songs in songs_by_split.items():
        records[split] = [
            {
                "song_id": str(song["song_id"]),
                "latents": table[[row_of[text] for text in song_slot_texts]],
                "n_bars": int(song["n_bars"]),
                "section_plan": str(song["section_plan"]),
                "plan_fits": bool(song["plan_fits"]),
            }
            for song, song_slot_texts in zip(songs, slots[split], strict=True)
        ]
    specials = {key: table[row_of[text]] for key, text in SPECIAL_SLOTS.items()}
    return records, specials, dropped


def latent_statistics(latents: Sequence[np.ndarray]) -> dict[str, float]:
    """``scale_factor`` (mean per-dimension unbiased std) and ``abs_p999`` of the rows of
    ``latents`` (arrays [n_i, D], concatenated)."""
    rows = np.concatenate([np.asarray(x, np.float64) for x in latents])
    if len(rows) < 2:
        raise ValueError(f"need at least 2 latent rows for statistics, got {len(rows)}")
    return {
        "scale_factor": float(np.mean(np.std(rows, axis=0, ddof=1))),
        "abs_p999": float(np.percentile(np.abs(rows), 99.9)),
        "n_rows": int(len(rows)),
    }


def build_latent_dataset(
    vae_workdir: str,
    data_dir: str,
    out_dir: str,
    *,
    slot_order: str = "pitch_order",
    checkpoint: str = "best",
    max_bars: int = MAX_BARS,
    overwrite: bool = False,
    model: PhraseVAEModel | None = None,
    songs_by_split: Mapping[str, Sequence[Mapping]] | None = None,
    progress: bool = True,
) -> dict:
    """Encodes every song and writes the dataset; returns the ``stats.json`` content.

    ``model`` / ``songs_by_split`` replace loading them from ``vae_workdir`` / ``data_dir``.
    """
    if jax.process_count() > 1:
        raise NotImplementedError("latent_dataset runs in one process (it encodes in seconds)")
    if slot_order not in phrases.SLOT_ORDERS:
        raise ValueError(
            f"unknown slot order {slot_order!r}; expected one of {phrases.SLOT_ORDERS}"
        )
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    start = time.time()
    if model is None:
        model = PhraseVAEModel.from_workdir(vae_workdir, checkpoint)
    if songs_by_split is None:
        songs_by_split = {}
        for split in latent_records.SPLITS:
            try:
                songs_by_split[split] = tfds_builders.open_source(data_dir, "songs", split)
            except KeyError:
                continue  # a corpus too small to have every split
    kept, excluded = {}, {}
    for split, songs in songs_by_split.items():
        kept[split], excluded[split] = select_songs(songs, max_bars)
    if not kept.get("train"):
        raise ValueError(
            f"{data_dir}: no training songs of 1..{max_bars} bars to compute statistics"
        )
    records, specials, dropped = encode_songs(model, kept, slot_order, progress)
    train_stats = latent_statistics([r["latents"] for r in records["train"]])
    stats = {
        "scale_factor": train_stats["scale_factor"],
        "abs_p999": train_stats["abs_p999"],
        "train_rows": train_stats["n_rows"],
        **specials,
        "latent_dim": model.latent_dim,
        "slot_order": slot_order,
        "fixed_programs": list(phrases.POP909_PROGRAMS) if slot_order == "fixed" else [],
        "max_bars": max_bars,
        "excluded_songs": {split: ids for split, ids in excluded.items() if ids},
        "n_excluded": sum(len(ids) for ids in excluded.values()),
        "dropped_phrases": dropped,
        "vae_workdir": os.path.abspath(vae_workdir) if vae_workdir else "",
        "vae_source": model.source,
        "data_dir": os.path.abspath(data_dir) if data_dir else "",
        "built_seconds": round(time.time() - start, 1),
    }
    counts = latent_records.write_latent_dataset(out_dir, records, stats, overwrite=overwrite)
    return {**stats, "songs_per_split": counts}


def summary_lines(stats: Mapping) -> list[str]:
    """The statistics as printable lines."""
    norms = {k: float(np.linalg.norm(stats[k])) for k in SPECIAL_SLOTS}
    return [
        f"songs per split: {stats['songs_per_split']}",
        f"excluded songs (no bars, or over {stats['max_bars']}): {stats['n_excluded']} "
        f"{stats['excluded_songs']}",
        f"phrases without a slot: {stats['dropped_phrases']}",
        f"scale factor (mean per-dim std, train): {stats['scale_factor']:.6f}",
        f"p99.9 |latent| (raw, train): {stats['abs_p999']:.6f}",
        "special latent norms: " + ", ".join(f"{k} {v:.4f}" for k, v in norms.items()),
        f"slot order: {stats['slot_order']}; {stats['train_rows']} training rows; "
        f"{stats['built_seconds']} s",
    ]

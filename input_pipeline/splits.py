"""Opening a split of a PhraseVAE dataset (a prepared folder or the synthetic corpus), and
evenly spread subsets of it for evaluation."""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from input_pipeline import records, synthetic, tfds_builders


@functools.lru_cache(maxsize=8)
def _synthetic_split(name: str, split: str, n_songs: int) -> tuple[dict, ...]:
    songs = [
        s for s in synthetic.synthetic_records(n_songs) if records.split_of(s["song_id"]) == split
    ]
    if not songs:
        raise ValueError(f"the synthetic corpus of {n_songs} songs has no {split!r} songs")
    if name == "songs":
        return tuple(songs)
    lines = {"phrases": records.phrase_lines, "bars": records.bar_lines}[name]
    return tuple(line for song in songs for line in lines(song))


def open_split(data_config: ml_collections.ConfigDict, split: str, name: str | None = None):
    """Random-access records of ``split`` of dataset ``name`` (default ``data.dataset``).

    ``data.data_dir`` names a folder built by ``python -m phraseldm_jax.cli.prepare``; empty
    means the synthetic corpus of ``data.n_synthetic_songs`` songs, built in memory.
    """
    name = name or data_config.dataset
    if name not in tfds_builders.DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {tfds_builders.DATASET_NAMES}")
    if data_config.data_dir:
        return tfds_builders.open_source(data_config.data_dir, name, split)
    return _synthetic_split(name, split, int(data_config.n_synthetic_songs))


class Subset:
    """Records ``indices`` of a source, as a source (random access, ``len``)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[int(self._indices[index])]


def spread_indices(n: int, limit: int) -> np.ndarray:
    """``limit`` indices evenly spread over ``range(n)`` (all of them when limit <= 0 or >= n)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))

"""The song-latent dataset that PhraseLDM trains on: storage format, writer and reader.

One folder per dataset::

    <dir>/train.array_record, validation.array_record, test.array_record
    <dir>/stats.json

Each record is one song, msgpack-encoded::

    song_id       str
    latents       float32 [4 * n_bars, latent_dim]  raw VAE posterior means, unscaled, unpadded
    n_bars        int
    section_plan  str   canonical "i-8 A-8 ..." or ""
    plan_fits     bool

``stats.json`` holds what the LDM needs besides the songs: ``scale_factor`` (mean per-dimension
std of the training latents), ``abs_p999`` (99.9th percentile of |latent|, raw space), the
special latents ``inst_latent`` / ``bar_latent`` / ``sep_latent`` (posterior means of
``[INST]``, ``b-1``, ``[SEP]``), ``slot_order``, ``latent_dim`` and provenance. The folder is
written under a temporary name and renamed into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from array_record.python import array_record_module
from flax import serialization

from input_pipeline import damage

SPLITS = ("train", "validation", "test")
RECORD_FIELDS = ("song_id", "latents", "n_bars", "section_plan", "plan_fits")
STATS_FILE = "stats.json"
REQUIRED_STATS = (
    "scale_factor",
    "abs_p999",
    "inst_latent",
    "bar_latent",
    "sep_latent",
    "latent_dim",
)


def encode_record(record: Mapping) -> bytes:
    """One song record -> bytes; checks the fields and the latent layout."""
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise ValueError(f"latent record {record.get('song_id', '?')!r} lacks fields {missing}")
    latents = np.asarray(record["latents"], np.float32)
    n_bars = int(record["n_bars"])
    if latents.ndim != 2 or latents.shape[0] != 4 * n_bars:
        raise ValueError(
            f"latent record {record['song_id']!r}: latents of shape {latents.shape} do not hold "
            f"4 slots for each of its {n_bars} bars"
        )
    payload = {
        "song_id": str(record["song_id"]),
        "latents": latents,
        "n_bars": n_bars,
        "section_plan": str(record["section_plan"]),
        "plan_fits": bool(record["plan_fits"]),
    }
    return serialization.msgpack_serialize(payload)


def decode_record(data: bytes) -> dict:
    record = serialization.msgpack_restore(data)
    record["latents"] = np.asarray(record["latents"], np.float32)
    return record


def write_latent_dataset(
    out_dir: str | os.PathLike,
    records_by_split: Mapping[str, Iterable[Mapping]],
    stats: Mapping,
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Writes the dataset atomically and returns the number of songs per split.

    Args:
      out_dir: the dataset folder to create.
      records_by_split: split name -> iterable of song records (see module docstring).
      stats: the ``stats.json`` content; must contain REQUIRED_STATS.
      overwrite: replace an existing dataset (the old one stays readable until the rename).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    missing = [k for k in REQUIRED_STATS if k not in stats]
    if missing:
        raise ValueError(f"{out_dir}: stats lack {missing}")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    counts = {}
    try:
        for split, records in records_by_split.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            path = os.path.join(tmp, f"{split}.array_record")
            writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
            n = 0
            try:
                for record in records:
                    writer.write(encode_record(record))
                    n += 1
            finally:
                writer.close()
            counts[split] = n
        stats = {**_jsonable(stats), "songs_per_split": counts}
        with open(os.path.join(tmp, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=2)
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_stats(data_dir: str | os.PathLike) -> dict:
    """``stats.json`` with the special latents as float32 numpy arrays."""
    path = os.path.join(os.fspath(data_dir), STATS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a finished latent dataset "
            "(build it with `python -m phraseldm_jax.cli.latents`)"
        )
    with open(path) as f:
        stats = json.load(f)
    for key in ("inst_latent", "bar_latent", "sep_latent"):
        stats[key] = np.asarray(stats[key], np.float32)
    return stats


class LatentSource:
    """Random access to one split of a latent dataset (a Grain-compatible data source)."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.path = os.path.join(os.fspath(data_dir), f"{split}.array_record")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} not found (split {split!r} of {data_dir})")
        self.split = split
        try:
            self._reader = array_record_module.ArrayRecordReader(
                self.path, "readahead_buffer_size:0"
            )
            self._len = self._reader.num_records()
        except Exception as error:  # truncated or overwritten: the index does not read
            raise damage.DamagedRecordError(
                f"{self.path}: unreadable ({damage.short_reason(error)}); rebuild "
                f"{os.fspath(data_dir)} with python -m phraseldm_jax latents"
            ) from error

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not -self._len <= index < self._len:
            raise IndexError(f"{self.path}: index {index} out of range ({self._len} songs)")
        index = int(index) % self._len
        try:
            return decode_record(self._reader.read([index])[0])
        except Exception as error:
            raise self.damaged(index, error) from error

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) % self._len for i in indices]
        try:
            return [decode_record(b) for b in self._reader.read(indices)]
        except Exception:
            return [self[i] for i in indices]  # one at a time: names the damaged record

    def damaged(self, index: int, error: BaseException) -> damage.DamagedRecordError:
        """The one-line error for song ``index``, which could not be read (``error``)."""
        hint = f"rebuild {os.path.dirname(self.path)} with python -m phraseldm_jax latents"
        return damage.damaged_record(self.path, index, self.split, error, hint, None)

    def __getstate__(self):
        return {"data_dir": os.path.dirname(self.path), "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return f"LatentSource({self.path}, {self._len} songs)"


def open_latent_source(data_dir: str | os.PathLike, split: str) -> LatentSource:
    return LatentSource(data_dir, split)

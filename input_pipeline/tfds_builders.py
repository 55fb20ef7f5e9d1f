"""TFDS builders for the three datasets, written as ArrayRecord, no TensorFlow needed.

- ``songs``: one example per song (the song record of docs/ARCHITECTURE.md).
- ``phrases``: one example per phrase line, like the original's phrase-level jsonl: per
  bar each track phrase, one ``[INST]`` line and one ``b-1`` line; one ``[SEP]`` per song.
- ``bars``: stage-1 data, one example per bar (all its phrases ending in ``b-1``), one
  ``[SEP]`` line per song.

Splits are by song (``records.split_of``: SHA-256 of the id, 90/5/5); a split without any
song is not written. Each builder takes its songs from, in this order: ``songs=`` (records
already imported, e.g. by ``phraseldm_jax.cli.prepare``), or ``source=`` ``"pop909"`` /
``"midi"`` / ``"synthetic"`` with ``source_dir=`` or TFDS's manual directory
(``download_config=tfds.download.DownloadConfig(manual_dir=...)``).

TFDS writes into ``<name>/incomplete.XXXX_<version>/`` and renames it to
``<name>/<version>/`` only after every split and ``dataset_info.json`` are written, so a
build that fails or is killed leaves no dataset a reader would open (``open_source``
only opens version folders with a ``dataset_info.json``); the next build starts afresh.
A rebuild (``overwrite``) writes the new datasets beside the old ones and swaps them in as
one set (``dataset_swap``); readers find them through ``dataset_swap.resolve``.

Reading: ``open_source(data_dir, name, split)`` -> a random-access source (``len``,
``[i]``) of plain dicts (``str``, ``int``, ``float``, ``bool``, lists), usable directly as a
Grain data source. A record that cannot be read back raises ``damage.DamagedRecordError``,
one line naming the ArrayRecord file and the record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as base_data_source

from input_pipeline import damage, dataset_swap, midi_folder, pop909, records, synthetic

DATASET_VERSION = "1.0.0"
DATASET_NAMES = ("songs", "phrases", "bars")
SOURCES = ("pop909", "midi", "synthetic")
_TEXT = tfds.features.Text()


def _text_sequence() -> tfds.features.Sequence:
    return tfds.features.Sequence(tfds.features.Text())


def _int_sequence() -> tfds.features.Sequence:
    return tfds.features.Sequence(np.int32)


class _SongCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What the three builders share: where the songs come from, and the splits."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Songs, phrase lines and bar lines from song records."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point the manual directory at the raw corpus: a POP909 folder (001/ ... 909/) for "
        "source='pop909', or a folder of MIDI files for source='midi'."
    )

    def __init__(
        self,
        *,
        songs: Sequence[Mapping] | None = None,
        source: str = "pop909",
        source_dir: str | None = None,
        selection: midi_folder.TrackSelection | None = None,
        normalize_key: bool = True,
        n_synthetic: int = 48,
        workers: int = 1,
        **kwargs,
    ):
        """
        Args:
          songs: song records to write (the source options are then unused).
          source: ``"pop909"``, ``"midi"`` or ``"synthetic"``.
          source_dir: the raw corpus folder (default: TFDS's manual directory).
          selection, normalize_key: options of the MIDI-folder importer.
          n_synthetic: songs of the synthetic corpus.
          workers: import processes.
          **kwargs: ``tfds.core.GeneratorBasedBuilder`` arguments (``data_dir``, ...).
        """
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
        self._songs = songs
        self._source = source
        self._source_dir = source_dir
        self._selection = selection or midi_folder.TrackSelection()
        self._normalize_key = normalize_key
        self._n_synthetic = n_synthetic
        self._workers = workers
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _log_download_bytes(self) -> None:
        """Silent: TFDS prints "Downloading and preparing dataset" to stdout, though nothing
        downloads here (the songs are given)."""

    def _log_download_done(self) -> None:
        """Silent, for the same reason."""

    def _load_songs(self, dl_manager) -> Sequence[Mapping]:
        if self._songs is not None:
            return self._songs
        if self._source == "synthetic":
            return synthetic.synthetic_records(self._n_synthetic)
        folder = self._source_dir or os.fspath(dl_manager.manual_dir)
        if self._source == "pop909":
            songs, _ = pop909.import_folder(folder, workers=self._workers)
        else:
            songs, _ = midi_folder.import_folder(
                folder, self._selection, self._normalize_key, workers=self._workers
            )
        return songs

    def _split_generators(self, dl_manager):
        by_split: dict[str, list[Mapping]] = {split: [] for split in records.SPLITS}
        for song in self._load_songs(dl_manager):
            records.check_record(song)
            by_split[records.split_of(song["song_id"])].append(song)
        return {split: self._generate_examples(songs) for split, songs in by_split.items() if songs}

    def _generate_examples(self, songs: Sequence[Mapping]) -> Iterator[tuple[str, dict]]:
        raise NotImplementedError


class Songs(_SongCorpusBuilder):
    """One example per song: the song record."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "song_id": _TEXT,
                "n_bars": np.int32,
                "phrases": _text_sequence(),
                "phrase_bar": _int_sequence(),
                "phrase_program": _int_sequence(),
                "section_plan": _TEXT,
                "plan_fits": np.bool_,
                "plan_note": _TEXT,
                "key_shift": np.int32,
                "tempo": np.float32,
                "flags": _text_sequence(),
            }
        )
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

    def _generate_examples(self, songs):
        for song in songs:
            yield song["song_id"], {field: song[field] for field in records.RECORD_FIELDS}


class Phrases(_SongCorpusBuilder):
    """One example per phrase line (``text``, ``song_id``, ``bar``, ``program``)."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"text": _TEXT, "song_id": _TEXT, "bar": np.int32, "program": np.int32}
        )
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

    def _generate_examples(self, songs):
        for song in songs:
            for index, line in enumerate(records.phrase_lines(song)):
                yield f"{song['song_id']}#{index}", line


class Bars(_SongCorpusBuilder):
    """One example per bar line (``text``, ``song_id``, ``bar``)."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": _TEXT, "song_id": _TEXT, "bar": np.int32})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

    def _generate_examples(self, songs):
        for song in songs:
            for index, line in enumerate(records.bar_lines(song)):
                yield f"{song['song_id']}#{index}", line


BUILDERS: Mapping[str, type[_SongCorpusBuilder]] = {
    "songs": Songs,
    "phrases": Phrases,
    "bars": Bars,
}


def build(
    data_dir: str,
    names: Sequence[str] = DATASET_NAMES,
    overwrite: bool = False,
    **source_kwargs,
) -> dict[str, str]:
    """Builds the named datasets under ``data_dir`` (``<data_dir>/<name>/<version>/``) and
    returns their version folders.

    With ``overwrite`` they are all built in a folder beside the old ones and swapped in
    together (``dataset_swap.staged``): a build that fails or is killed leaves the old ones
    whole, and readers see either every old or every new dataset, never a mix.

    Args:
      data_dir: root folder of the datasets.
      names: which of ``songs``, ``phrases``, ``bars``.
      overwrite: rebuild datasets that already exist (otherwise they are kept).
      **source_kwargs: builder arguments (``songs=``, ``source=``, ``source_dir=``, ...).
    """
    if overwrite:
        with dataset_swap.staged(data_dir) as staging:
            _write(staging, names, source_kwargs)
    else:
        dataset_swap.recover(data_dir)
        _write(data_dir, names, source_kwargs)
    return {name: dataset_path(data_dir, name) for name in names}


def _write(data_dir: str, names: Sequence[str], source_kwargs: Mapping) -> None:
    """Writes the named datasets not yet under ``data_dir`` (TFDS's own ``incomplete.*``
    folder per dataset, renamed when finished)."""
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    for name in names:
        builder = BUILDERS[name](data_dir=data_dir, **source_kwargs)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode)
        )


def _decode(value):
    """TFDS numpy values -> plain Python (bytes -> str, numpy scalars -> int/float/bool)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()] if value.ndim else _decode(value.item())
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class RecordSource:
    """Random access to one split of a dataset, examples as plain dicts. A record that
    cannot be read raises ``damage.DamagedRecordError`` naming its file and index."""

    def __init__(self, source, name: str, split: str, path: str, data_dir: str | None = None):
        self._source = source
        self.name = name
        self.split = split
        self.path = path
        self.data_dir = data_dir or os.path.dirname(os.path.dirname(path))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self!r}: index {index} out of range")
        index = index % len(self)
        try:
            return {key: _decode(value) for key, value in self._source[index].items()}
        except Exception as error:
            raise self.damaged(index, error) from error

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Several examples in one call: much faster than one ``[i]`` each (ArrayRecord
        reads them in parallel); Grain uses it when present."""
        n = len(self)
        for index in indices:
            if not -n <= index < n:
                raise IndexError(f"{self!r}: index {index} out of range")
        indices = [int(i) % n for i in indices]
        try:
            examples = self._source.__getitems__(indices)
            return [{key: _decode(value) for key, value in ex.items()} for ex in examples]
        except Exception:
            return [self[i] for i in indices]  # one at a time: names the damaged record

    def shard_of(self, index: int) -> tuple[str, int]:
        """(ArrayRecord file, index in that file) of record ``index`` of the split."""
        instructions = base_data_source.file_instructions(self._source.dataset_info, self.split)
        start = 0
        for instruction in instructions:
            if index < start + instruction.take:
                return instruction.filename, instruction.skip + index - start
            start += instruction.take
        raise IndexError(f"{self!r}: index {index} out of range")

    def damaged(self, index: int, error: BaseException) -> damage.DamagedRecordError:
        """The one-line error for record ``index``, which could not be read (``error``)."""
        try:
            path, file_index = self.shard_of(index)
        except Exception:  # the dataset_info itself is unreadable: name the folder
            path, file_index = self.path, None
        hint = f"run python -m phraseldm_jax prepare --verify --data_dir {self.data_dir}"
        return damage.damaged_record(path, index, self.split, error, hint, file_index)

    def __repr__(self) -> str:
        return f"RecordSource({self.path}, split={self.split!r}, {len(self)} examples)"


def dataset_path(data_dir: str, name: str) -> str:
    """The finished version folder of dataset ``name`` (highest version with dataset_info)."""
    root = dataset_swap.resolve(data_dir, name)
    versions = []
    if os.path.isdir(root):
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            if os.path.isfile(os.path.join(path, "dataset_info.json")):
                try:
                    versions.append((tfds.core.Version(entry), path))
                except ValueError:
                    continue  # e.g. an incomplete.XXXX_1.0.0 folder left by a killed build
    if not versions:
        raise FileNotFoundError(
            f"no finished dataset {name!r} under {data_dir} (build it with "
            f"`python -m phraseldm_jax.cli.prepare --data_dir {data_dir} ...`)"
        )
    return max(versions)[1]


def open_source(data_dir: str, name: str, split: str) -> RecordSource:
    """Opens ``split`` of dataset ``name`` (``songs``, ``phrases`` or ``bars``) for reading.

    Raises:
      FileNotFoundError: no finished dataset of that name.
      KeyError: the dataset has no such split (the message lists the ones it has).
    """
    path = dataset_path(data_dir, name)
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise KeyError(f"{path} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return RecordSource(builder.as_data_source(split), name, split, path, os.fspath(data_dir))


def split_sizes(data_dir: str, name: str) -> dict[str, int]:
    """Examples per split of a finished dataset."""
    info = tfds.builder_from_directory(dataset_path(data_dir, name)).info
    return {split: int(info.splits[split].num_examples) for split in info.splits}


def quiet() -> None:
    """Turns off TFDS's own progress bars and info messages (prepare prints its own)."""
    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.WARNING)

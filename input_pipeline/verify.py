"""Reads back every record of a prepared data folder and names what is damaged (``verify``).

What ``python -m phraseldm_jax prepare --verify --data_dir D`` runs. For each dataset
(``songs``, ``phrases``, ``bars``) and split it checks that every ArrayRecord file opens,
holds as many records as ``dataset_info.json`` says, and that each record reads back (its
chunk hash) and decodes; and that ``prepare_summary.json``'s counts match the datasets. One
line per problem, e.g.::

  D/phrases/1.0.0/phrases-train.array_record-00000-of-00001: 2 of 1281 records damaged
  (records 18, 95 of split 'train'; chunk data hash mismatch, chunk at 3172 with length 187)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import tqdm

from input_pipeline import damage, dataset_swap, prepare, tfds_builders

BATCH = 512  # records read at once; a batch that fails is read again one record at a time


@dataclasses.dataclass
class Report:
    """What ``verify`` found: ``problems`` (one line each) and what it read."""

    data_dir: str
    datasets: list[str] = dataclasses.field(default_factory=list)
    files: int = 0
    records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary_line(self) -> str:
        verdict = f"{len(self.problems)} problem(s)" if self.problems else "clean"
        return (
            f"verified {self.data_dir}: {', '.join(self.datasets) or 'no dataset'}, "
            f"{self.records} records in {self.files} files, {self.seconds:.1f} s: {verdict}"
        )


def _ranges(indices: Sequence[int], limit: int = 8) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3, 7`` (the first ``limit`` runs, then ``...``)."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit]]
    return ", ".join(text + (["..."] if len(runs) > limit else []))


def _read_file(path: str, decode: Callable[[bytes], object], advance: Callable[[int], None]):
    """(records in the file, [(index in file, error)] of those that do not read or decode)."""
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    try:
        n = reader.num_records()
        damaged = []
        for start in range(0, n, BATCH):
            indices = list(range(start, min(start + BATCH, n)))
            try:
                for data in reader.read(indices):
                    decode(data)
            except Exception:
                for index in indices:
                    try:
                        decode(reader.read([index])[0])
                    except Exception as error:
                        damaged.append((index, error))
            advance(len(indices))
        return n, damaged
    finally:
        reader.close()


def _verify_split(report: Report, builder, split: str, bar: tqdm.tqdm) -> None:
    from tensorflow_datasets.core.data_sources import base as base_data_source

    decode = builder.info.features.deserialize_example_np
    offset = 0
    for instruction in base_data_source.file_instructions(builder.info, split):
        path, expected = instruction.filename, instruction.examples_in_shard
        report.files += 1
        try:
            n, damaged = _read_file(path, decode, bar.update)
        except Exception as error:
            report.problems.append(f"{path}: unreadable ({damage.short_reason(error)})")
            bar.update(expected)
            offset += expected
            continue
        report.records += n
        if n != expected:
            report.problems.append(f"{path}: {n} records, its dataset_info.json says {expected}")
        if damaged:
            where = _ranges([offset + index for index, _ in damaged])
            reason = damage.short_reason(damaged[0][1])
            report.problems.append(
                f"{path}: {len(damaged)} of {n} records damaged "
                f"(records {where} of split {split!r}; {reason})"
            )
        offset += expected


def _verify_dataset(report: Report, name: str, progress: bool) -> dict[str, int] | None:
    """Reads dataset ``name``; returns its split sizes (None when it cannot be opened)."""
    import tensorflow_datasets as tfds

    path = tfds_builders.dataset_path(report.data_dir, name)
    try:
        builder = tfds.builder_from_directory(path)
        sizes = {split: int(info.num_examples) for split, info in builder.info.splits.items()}
    except Exception as error:
        report.problems.append(f"{path}: dataset_info.json unreadable ({error})")
        return None
    with tqdm.tqdm(
        total=sum(sizes.values()), desc=name, unit="record", disable=not progress
    ) as bar:
        for split in sizes:
            _verify_split(report, builder, split, bar)
    return sizes


def _check_summary(report: Report, sizes: dict[str, dict[str, int] | None]) -> None:
    """``prepare_summary.json``'s counts against the datasets' (a mix of builds shows here)."""
    path = dataset_swap.resolve(report.data_dir, prepare.SUMMARY_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as handle:
            written = json.load(handle)["written"]
    except (OSError, ValueError, KeyError) as error:
        report.problems.append(f"{path}: unreadable ({error})")
        return
    for name, listed in written.items():
        if name not in sizes:
            report.problems.append(f"{path} lists dataset {name!r}, which is missing")
        elif sizes[name] is not None and sizes[name] != listed:
            report.problems.append(
                f"{path} says {name} holds {listed}, the dataset holds {sizes[name]}"
            )


def verify(data_dir: str, progress: bool = True) -> Report:
    """Reads every record of every dataset under ``data_dir`` (raises FileNotFoundError when
    it holds none); ``report.problems`` is empty when all is well."""
    start = time.time()
    report = Report(data_dir=os.fspath(data_dir))
    names = prepare.existing_datasets(report.data_dir)
    if not names:
        raise FileNotFoundError(
            f"{data_dir} holds no prepared datasets ({', '.join(tfds_builders.DATASET_NAMES)})"
        )
    tfds_builders.quiet()
    sizes = {}
    for name in names:
        report.datasets.append(name)
        sizes[name] = _verify_dataset(report, name, progress)
    _check_summary(report, sizes)
    report.seconds = time.time() - start
    return report

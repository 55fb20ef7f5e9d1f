"""Batching of encoded PhraseVAE examples: padding rows (``pad_batch``), length buckets
(``BucketBatchIterDataset``), cutting a batch to its longest row, packing phrases several to a
row (``pack_batch``) and a process's block of rows.

Packing: POP909's phrases are short (median 22 tokens) beside the longest row of a random
batch, so a batch padded to its longest row is mostly padding. Packed rows hold the same
phrases one after another, each marked by its segment id; the model's segment masks
(``vae.PackedRows``) keep every phrase to itself, so the loss is that of the padded batch in
about a third of the tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from phraseldm_jax.vocab import BOS_ID, IGNORE_LABEL, PAD_ID

Example = dict[str, Any]  # {"input_ids": [n_in] int32, "target_ids": [n_out] int32, ...}


def pad_batch(
    examples: Sequence[Example], *, length: int, batch_size: int, filler: Example
) -> dict[str, np.ndarray]:
    """Pads encoded examples into one batch of ``batch_size`` rows of ``length`` tokens.

    Rows past ``len(examples)`` are ``filler`` with weight 0 and labels -100.
    Returns the batch dict described in the module docstring.
    """
    if not 0 < len(examples) <= batch_size:
        raise ValueError(f"cannot make a batch of {batch_size} rows from {len(examples)}")
    batch = {
        "input_ids": np.full((batch_size, length), PAD_ID, np.int32),
        "attention_mask": np.zeros((batch_size, length), np.int32),
        "decoder_input_ids": np.full((batch_size, length), PAD_ID, np.int32),
        "labels": np.full((batch_size, length), IGNORE_LABEL, np.int32),
        "weight": np.zeros((batch_size,), np.float32),
        "record_index": np.full((batch_size,), -1, np.int32),
        "truncated": np.zeros((batch_size,), np.int32),
    }
    rows = list(examples) + [filler] * (batch_size - len(examples))
    for row, example in enumerate(rows):
        inputs, targets = example["input_ids"], example["target_ids"]
        if len(inputs) > length or len(targets) > length:
            raise ValueError(
                f"record {example['record_index']}: {len(inputs)} input / {len(targets)} "
                f"target tokens do not fit a batch of length {length}"
            )
        batch["input_ids"][row, : len(inputs)] = inputs
        batch["attention_mask"][row, : len(inputs)] = 1
        batch["decoder_input_ids"][row, 0] = BOS_ID
        batch["decoder_input_ids"][row, 1 : len(targets)] = targets[:-1]
        if row < len(examples):
            batch["labels"][row, : len(targets)] = targets
            batch["weight"][row] = 1.0
            batch["record_index"][row] = example["record_index"]
            batch["truncated"][row] = example["truncated"]
    return batch


class BucketBatchIterDataset(grain.IterDataset):
    """Groups encoded examples by length and pads each batch to its bucket's length.

    An example goes to the smallest bucket that holds both its input and its target; a
    bucket emits a batch as soon as it has ``batch_size`` examples. With one bucket this is
    plain fixed-length batching in stream order. When the parent ends, the partial buckets
    are emitted (completed with ``filler`` rows) unless ``drop_remainder``.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        bucket_lengths: Sequence[int],
        batch_size: int,
        drop_remainder: bool,
        filler: Example,
    ):
        super().__init__(parent)
        self._bucket_lengths = tuple(int(n) for n in bucket_lengths)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._filler = filler

    def __iter__(self) -> _BucketBatchIterator:
        return _BucketBatchIterator(
            self._parent.__iter__(),
            bucket_lengths=self._bucket_lengths,
            batch_size=self._batch_size,
            drop_remainder=self._drop_remainder,
            filler=self._filler,
        )

    def __str__(self) -> str:
        return (
            f"BucketBatchIterDataset(bucket_lengths={self._bucket_lengths}, "
            f"batch_size={self._batch_size})"
        )


def _example_to_json(example: Example) -> dict[str, Any]:
    return {
        "input_ids": example["input_ids"].tolist(),
        "target_ids": example["target_ids"].tolist(),
        "record_index": int(example["record_index"]),
        "truncated": int(example["truncated"]),
    }


def _example_from_json(example: Mapping[str, Any]) -> Example:
    return {
        "input_ids": np.asarray(example["input_ids"], np.int32),
        "target_ids": np.asarray(example["target_ids"], np.int32),
        "record_index": int(example["record_index"]),
        "truncated": int(example["truncated"]),
    }


class _BucketBatchIterator(grain.DatasetIterator):
    """State: the parent's state, the examples waiting in each bucket, and whether the
    parent has ended (JSON-serialisable, as Grain's Orbax handler needs)."""

    def __init__(self, parent, *, bucket_lengths, batch_size, drop_remainder, filler):
        super().__init__(parent)
        self._bucket_lengths = bucket_lengths
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._filler = filler
        self._buffers: list[list[Example]] = [[] for _ in bucket_lengths]
        self._exhausted = False

    def _bucket_of(self, example: Example) -> int:
        needed = max(len(example["input_ids"]), len(example["target_ids"]))
        bucket = bisect.bisect_left(self._bucket_lengths, needed)
        if bucket == len(self._bucket_lengths):
            raise ValueError(
                f"record {example['record_index']} needs {needed} tokens, more than the "
                f"largest bucket {self._bucket_lengths[-1]}"
            )
        return bucket

    def _emit(self, bucket: int) -> dict[str, np.ndarray]:
        examples, self._buffers[bucket] = self._buffers[bucket], []
        return pad_batch(
            examples,
            length=self._bucket_lengths[bucket],
            batch_size=self._batch_size,
            filler=self._filler,
        )

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._exhausted:
            try:
                example = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            bucket = self._bucket_of(example)
            self._buffers[bucket].append(example)
            if len(self._buffers[bucket]) == self._batch_size:
                return self._emit(bucket)
        if not self._drop_remainder:
            for bucket, waiting in enumerate(self._buffers):
                if waiting:
                    return self._emit(bucket)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "exhausted": self._exhausted,
            "buffers": [[_example_to_json(e) for e in waiting] for waiting in self._buffers],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["buffers"]) != len(self._bucket_lengths):
            raise ValueError(
                f"iterator state has {len(state['buffers'])} buckets, this pipeline has "
                f"{len(self._bucket_lengths)} ({self._bucket_lengths})"
            )
        self._parent.set_state(state["parent"])
        self._exhausted = bool(state["exhausted"])
        self._buffers = [[_example_from_json(e) for e in waiting] for waiting in state["buffers"]]

    def __str__(self) -> str:
        return f"_BucketBatchIterator(bucket_lengths={self._bucket_lengths})"


class TrimToLongest:
    """Cuts a ``max_length`` batch to the smallest of ``lengths`` that holds its longest row
    (input or target): the same rows and, as every cut cell is padding, the same loss."""

    def __init__(self, lengths: Sequence[int]):
        self._lengths = tuple(lengths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        used = np.flatnonzero(
            batch["attention_mask"].any(0) | (batch["labels"] != IGNORE_LABEL).any(0)
        )
        longest = int(used[-1]) + 1 if used.size else 1
        length = self._lengths[bisect.bisect_left(self._lengths, longest)]
        return {
            key: value[:, :length] if value.ndim == 2 else value for key, value in batch.items()
        }


class TakeBlock:
    """Keeps block ``index`` of ``count`` equal blocks of rows of every array of a global
    batch (packed batches vary in rows: the block follows each batch's size)."""

    def __init__(self, index: int, count: int):
        self._index, self._count = index, count

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["input_ids"]) // self._count
        block = slice(self._index * rows, (self._index + 1) * rows)
        return {key: value[block] for key, value in batch.items()}


def pack_batch(
    batch: Mapping[str, np.ndarray], *, max_segments: int, row_multiple: int
) -> dict[str, np.ndarray]:
    """Packs the phrases of a padded batch (``pad_batch``) several to a row, keeping its length.

    First-fit decreasing: longest phrases first, each into the first row where its encoder
    input and its target both still fit and that holds fewer than ``max_segments`` phrases.
    The row count is rounded up to a multiple of ``row_multiple`` with empty rows. Weight-0
    rows are dropped. Returns (R rows, L = the batch's length, S = ``max_segments``):

      input_ids, attention_mask, decoder_input_ids, labels   [R, L] as in ``pad_batch``
      segment_ids, decoder_segment_ids   [R, L] int32  1, 2, ... per phrase of the row, 0 pad
      query_starts                       [R, S] int32  encoder offset of each phrase
      weight, record_index, truncated    [R, S]        per phrase slot (0 / -1 / 0 if empty)
    """
    length = batch["input_ids"].shape[1]
    input_lengths = batch["attention_mask"].sum(1)
    target_lengths = (batch["labels"] != IGNORE_LABEL).sum(1)
    phrases = np.flatnonzero(batch["weight"] > 0)
    order = phrases[np.argsort(-np.maximum(input_lengths, target_lengths)[phrases], kind="stable")]
    used_in, used_out, members = [], [], []  # per row
    for phrase in order:
        n_in, n_out = int(input_lengths[phrase]), int(target_lengths[phrase])
        for row in range(len(members)):
            if (
                len(members[row]) < max_segments
                and used_in[row] + n_in <= length
                and used_out[row] + n_out <= length
            ):
                break
        else:
            row = len(members)
            used_in.append(0), used_out.append(0), members.append([])
        members[row].append((phrase, used_in[row], used_out[row]))
        used_in[row] += n_in
        used_out[row] += n_out
    rows = max(1, -(-len(members) // row_multiple)) * row_multiple
    packed = {
        "input_ids": np.full((rows, length), PAD_ID, np.int32),
        "attention_mask": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "decoder_input_ids": np.full((rows, length), PAD_ID, np.int32),
        "decoder_segment_ids": np.zeros((rows, length), np.int32),
        "labels": np.full((rows, length), IGNORE_LABEL, np.int32),
        "query_starts": np.zeros((rows, max_segments), np.int32),
        "weight": np.zeros((rows, max_segments), np.float32),
        "record_index": np.full((rows, max_segments), -1, np.int32),
        "truncated": np.zeros((rows, max_segments), np.int32),
    }
    for row, placed in enumerate(members):
        for slot, (phrase, start_in, start_out) in enumerate(placed):
            n_in, n_out = int(input_lengths[phrase]), int(target_lengths[phrase])
            enc, dec = slice(start_in, start_in + n_in), slice(start_out, start_out + n_out)
            packed["input_ids"][row, enc] = batch["input_ids"][phrase, :n_in]
            packed["attention_mask"][row, enc] = 1
            packed["segment_ids"][row, enc] = slot + 1
            packed["decoder_input_ids"][row, dec] = batch["decoder_input_ids"][phrase, :n_out]
            packed["decoder_segment_ids"][row, dec] = slot + 1
            packed["labels"][row, dec] = batch["labels"][phrase, :n_out]
            packed["query_starts"][row, slot] = start_in
            packed["weight"][row, slot] = batch["weight"][phrase]
            packed["record_index"][row, slot] = batch["record_index"][phrase]
            packed["truncated"][row, slot] = batch["truncated"][phrase]
    return packed


class PackRows:
    """``pack_batch`` as a map of the pipeline."""

    def __init__(self, *, max_segments: int, row_multiple: int):
        self._options = dict(max_segments=max_segments, row_multiple=row_multiple)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return pack_batch(batch, **self._options)

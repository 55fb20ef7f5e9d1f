"""Grain input pipelines for the three PhraseVAE training stages.

A source record ``{"text": "i-0 o-0 p-60 d-12", "song_id": ..., ...}`` (``text`` as str or
bytes) becomes, as in the reference ``POP909Dataset`` (FACTS.md section 4):

- tokens: ``text`` split on whitespace, ids from ``PHRASE_VOCAB``;
- stage 1 only: span-infill masking of the encoder's copy (``span_infill.py``);
- encoder input ``[C0]..[C{q-1}] [BOS] tokens [EOS]`` (q = 4 in stages 2-3, 0 in stage 1);
- target ``tokens [EOS]``; decoder input ``[BOS]`` + target[:-1];
- input and target each right-truncated to ``max_length`` on their own, so they can lose
  different amounts (every truncated record is counted and logged).

Batches are numpy, with B = batch_size // process_count rows and L = ``max_length`` (or, with
``bucket_lengths``, the smallest bucket that holds every row of the batch; or, with
``pad_lengths``, the smallest of those that holds the batch's longest row):

  input_ids          [B, L] int32    encoder input, ``[PAD]`` after its end
  attention_mask     [B, L] int32    1 on the encoder input
  decoder_input_ids  [B, L] int32    ``[BOS]`` + target[:-1], ``[PAD]`` after its end
  labels             [B, L] int32    target ids, -100 after its end
  weight             [B]    float32  1 for a record, 0 for a row that fills an eval batch
  record_index       [B]    int32    the row's index in the source, -1 for filler rows
  truncated          [B]    int32    1 when the row's input or target lost tokens

Packed training batches (``pack_max_segments``; ``batching.pack_batch``) hold the same ``batch_size``
phrases several to a row, in R rows of ``max_length`` tokens, with ``segment_ids`` /
``decoder_segment_ids`` [R, L], ``query_starts`` [R, S] and ``weight`` / ``record_index`` /
``truncated`` per phrase slot [R, S]: the model's ``PackedRows``.

Filler rows (weight 0) hold an empty phrase (``[C..] [BOS] [EOS]``) so that no attention row
is fully masked; their labels are all -100, so token-mean losses skip them.

Training shuffles with a seed (a new order every epoch), repeats forever and drops
incomplete batches. Evaluation keeps the source order and every record once; the last batch
is completed with filler rows. Every iterator supports ``get_state``/``set_state`` and Orbax
(``grain.checkpoint.CheckpointSave``/``CheckpointRestore``) and continues exactly.

Multi-host: each process gets disjoint rows and all processes together get every record. In
fixed-length training each process reads its own slice of the source. Evaluation and
bucketed training need every process to agree on the length of each step's batch, so each
process reads the whole source, forms the global batch and keeps its own block of rows.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from input_pipeline import splits
from input_pipeline.batching import (
    BucketBatchIterDataset,
    Example,
    PackRows,
    TakeBlock,
    TrimToLongest,
)
from input_pipeline.span_infill import example_rng, span_infill
from phraseldm_jax.vocab import (
    BOS_ID,
    EOS_ID,
    PHRASE_VOCAB,
    QUERY_IDS,
)

logger = logging.getLogger(__name__)

# (n_query_tokens, span_mask) of each stage (FACTS.md section 1.1).
STAGE_DEFAULTS: dict[int, tuple[int, bool]] = {1: (0, True), 2: (4, False), 3: (4, False)}


class TruncationCounter:
    """Counts records whose input or target was cut at ``max_length`` (this process only).

    Records are counted each time they are encoded: a record seen in three epochs counts
    three times, and Grain's read-ahead is counted before its batch is consumed. With
    ``mp_prefetch`` the encoding happens in worker processes and this counter stays at zero;
    sum the batches' ``truncated`` field instead (it is exact in every setting).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.examples = 0  # records encoded
        self.truncated = 0  # records with the input or the target cut
        self.inputs_truncated = 0
        self.targets_truncated = 0

    def add(self, *, input_cut: bool, target_cut: bool) -> int:
        """Counts one encoded record; returns the running number of truncated records."""
        with self._lock:
            self.examples += 1
            self.inputs_truncated += int(input_cut)
            self.targets_truncated += int(target_cut)
            self.truncated += int(input_cut or target_cut)
            return self.truncated

    def __getstate__(self):  # picklable for grain's worker processes (locks are not)
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"TruncationCounter(examples={self.examples}, truncated={self.truncated}, "
            f"inputs_truncated={self.inputs_truncated}, "
            f"targets_truncated={self.targets_truncated})"
        )


def describe_record(example: Mapping, record_index: int) -> str:
    """``record 17 (song_id 'pop909/083', bar 5)``: how errors and warnings name a record."""
    details = []
    for key in ("song_id", "bar", "program"):
        if key in example:
            value = example[key]
            if isinstance(value, np.ndarray) and value.ndim == 0:
                value = value.item()
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            details.append(f"{key} {value!r}" if isinstance(value, str) else f"{key} {value}")
    return f"record {record_index}" + (f" ({', '.join(details)})" if details else "")


def _record_text(example: Mapping, record_index: int) -> str:
    if not isinstance(example, Mapping) or "text" not in example:
        raise ValueError(f"{describe_record({}, record_index)} has no 'text' field: {example!r}")
    text = example["text"]
    if isinstance(text, np.ndarray) and text.ndim == 0:
        text = text.item()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{describe_record(example, record_index)}: text is not UTF-8") from e
    if not isinstance(text, str):
        raise ValueError(
            f"{describe_record(example, record_index)}: text must be str or bytes, "
            f"got {type(text).__name__}"
        )
    return text


def encode_example(
    example: Mapping,
    *,
    record_index: int,
    n_query_tokens: int,
    span_mask: bool,
    max_length: int,
    seed: int = 0,
    epoch: int = 0,
    counter: TruncationCounter | None = None,
) -> Example:
    """One source record -> its encoder input and target ids (unpadded).

    Args:
      example: a source record with a ``text`` field.
      record_index: the record's index in the source; with ``seed`` and ``epoch`` it seeds
        the span masking.

    Returns:
      ``{"input_ids": [n_in] int32, "target_ids": [n_out] int32, "record_index": int,
      "truncated": 0 or 1}`` with n_in, n_out <= max_length.
    """
    text = _record_text(example, record_index)
    tokens = PHRASE_VOCAB.encode(text, source=describe_record(example, record_index))
    if not tokens:
        raise ValueError(f"{describe_record(example, record_index)}: empty token line")
    encoder_tokens = tokens
    if span_mask:
        encoder_tokens = span_infill(tokens, example_rng(seed, epoch, record_index))
    full_input = [*QUERY_IDS[:n_query_tokens], BOS_ID, *encoder_tokens, EOS_ID]
    full_target = [*tokens, EOS_ID]
    input_cut = len(full_input) > max_length
    target_cut = len(full_target) > max_length
    if counter is not None:
        n_truncated = counter.add(input_cut=input_cut, target_cut=target_cut)
    if input_cut or target_cut:
        # With a counter, warn at the 1st, 2nd, 4th, 8th, ... truncated record only.
        if counter is None or n_truncated & (n_truncated - 1) == 0:
            logger.warning(
                "%s: input of %d / target of %d tokens truncated to max_length %d%s",
                describe_record(example, record_index),
                len(full_input),
                len(full_target),
                max_length,
                f" ({n_truncated} truncated records so far)" if counter is not None else "",
            )
    return {
        "input_ids": np.asarray(full_input[:max_length], np.int32),
        "target_ids": np.asarray(full_target[:max_length], np.int32),
        "record_index": int(record_index),
        "truncated": int(input_cut or target_cut),
    }


def filler_example(n_query_tokens: int) -> Example:
    """The weight-0 row that completes an eval batch: an empty phrase, labels all -100."""
    return {
        "input_ids": np.asarray([*QUERY_IDS[:n_query_tokens], BOS_ID, EOS_ID], np.int32),
        "target_ids": np.asarray([EOS_ID], np.int32),
        "record_index": -1,
        "truncated": 0,
    }


class _WithRecordIndex:
    """(index, record) -> (record index, record): keeps the source index through shuffling.

    Grain hands the source epoch * n_records + record index once the data repeats.
    """

    def __init__(self, n_records: int):
        self._n_records = n_records

    def __call__(self, index: int, example: Any) -> tuple[int, Any]:
        return index % self._n_records, example


class _EncodeRecords:
    """(stream index, (record index, record)) -> encoded example; epoch = index // epoch_length."""

    def __init__(self, *, epoch_length: int, seed: int, counter: TruncationCounter | None, **kw):
        self._epoch_length = epoch_length
        self._seed = seed
        self._counter = counter
        self._options = kw  # n_query_tokens, span_mask, max_length

    def __call__(self, index: int, item: tuple[int, Any]) -> Example:
        record_index, example = item
        return encode_example(
            example,
            record_index=record_index,
            seed=self._seed,
            epoch=index // self._epoch_length,
            counter=self._counter,
            **self._options,
        )


def _check_bucket_lengths(bucket_lengths: Sequence[int] | None, max_length: int) -> tuple:
    if bucket_lengths is None:
        return (max_length,)
    lengths = tuple(int(n) for n in bucket_lengths)
    if not lengths or list(lengths) != sorted(set(lengths)) or lengths[0] <= 0:
        raise ValueError(f"bucket_lengths must be positive and strictly ascending: {lengths}")
    if lengths[-1] != max_length:
        raise ValueError(f"the largest bucket length must equal max_length {max_length}: {lengths}")
    return lengths


def make_vae_dataset(
    source: Sequence[Mapping],
    *,
    stage: int,
    batch_size: int,
    seed: int,
    train: bool,
    max_length: int = 128,
    n_query_tokens: int | None = None,
    span_mask: bool | None = None,
    bucket_lengths: Sequence[int] | None = None,
    pad_lengths: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 2,
    prefetch_buffer_size: int = 128,
    truncation_counter: TruncationCounter | None = None,
    pack_max_segments: int = 0,
    pack_row_multiple: int = 1,
) -> grain.IterDataset:
    """The batched PhraseVAE dataset of one process (see the module docstring for batches).

    Args:
      source: random access records (``len`` + ``__getitem__``), each with a ``text`` field.
      stage: 1, 2 or 3; sets the defaults of ``n_query_tokens`` (0 / 4 / 4) and ``span_mask``
        (True / False / False).
      batch_size: the global batch size; each process yields batch_size // process_count rows.
      seed: shuffling and span-masking seed, 0 <= seed < 2**32.
      train: shuffle every epoch, repeat forever, drop incomplete batches; otherwise one pass
        in source order with the last batch completed by weight-0 rows.
      bucket_lengths: ascending lengths ending in ``max_length`` (e.g. (32, 64, 128)); each
        batch is padded to the smallest one that fits all its rows. None: every batch is
        ``max_length`` long.
      pad_lengths: ascending lengths ending in ``max_length``; batches are drawn as without
        buckets (a random sample), each cut to the smallest of these that holds its longest
        row: the original's padding to the longest row, at a few compiled shapes. Not with
        ``bucket_lengths``.
      process_index, process_count: this process and the number of processes.
      read_threads, prefetch_buffer_size: Grain ``ReadOptions`` of the per-record work.
      truncation_counter: pass one to read the counts (warnings are logged either way, at
        the 1st, 2nd, 4th, ... truncated record).
      pack_max_segments: > 0: training batches are packed (``batching.pack_batch``), up to this many
        phrases a row, the row count a multiple of ``pack_row_multiple`` (times
        ``process_count``); each batch still holds ``batch_size`` phrases, in rows of
        ``max_length`` tokens (``pad_lengths`` then only apply to evaluation: packed rows
        at one length compile a few shapes, and were measured as fast as cut ones).
    """
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    default_queries, default_span_mask = STAGE_DEFAULTS[stage]
    n_query_tokens = default_queries if n_query_tokens is None else int(n_query_tokens)
    span_mask = default_span_mask if span_mask is None else bool(span_mask)
    if not 0 <= n_query_tokens <= len(QUERY_IDS):
        raise ValueError(f"n_query_tokens must be in 0..{len(QUERY_IDS)}, got {n_query_tokens}")
    if max_length < n_query_tokens + 3:
        raise ValueError(f"max_length {max_length} leaves no room for a phrase")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    buckets = _check_bucket_lengths(bucket_lengths, max_length)
    if pad_lengths is not None and len(buckets) > 1:
        raise ValueError("pad_lengths and bucket_lengths cannot be combined: choose one")
    trim = _check_bucket_lengths(pad_lengths, max_length) if pad_lengths else None
    if pack_max_segments < 0 or pack_row_multiple < 1:
        raise ValueError(
            f"pack_max_segments must be >= 0 and pack_row_multiple >= 1, got "
            f"{pack_max_segments} and {pack_row_multiple}"
        )
    pack = pack_max_segments > 0 and train
    if pack and len(buckets) > 1:
        raise ValueError("packing and bucket_lengths cannot be combined: choose one")
    if pack:
        trim = None
    if truncation_counter is None:  # still count, so that the warnings stay rate-limited
        truncation_counter = TruncationCounter()
    if len(source) == 0:
        raise ValueError("the source has no records")

    rows = batch_size // process_count
    # Fixed-length training can read a slice of the source per process; otherwise every
    # process reads everything and keeps its rows, so all processes agree on batch lengths.
    slice_source = train and len(buckets) == 1 and trim is None and not pack and process_count > 1
    ds = grain.MapDataset.source(source).map_with_index(_WithRecordIndex(len(source)))
    if slice_source:
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"process {process_index} of {process_count} has no records")
    epoch_length = len(ds)
    if train:
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map_with_index(
        _EncodeRecords(
            epoch_length=epoch_length,
            seed=seed,
            counter=truncation_counter,
            n_query_tokens=n_query_tokens,
            span_mask=span_mask,
            max_length=max_length,
        )
    )
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    ds = BucketBatchIterDataset(
        ds,
        bucket_lengths=buckets,
        batch_size=rows if slice_source else batch_size,
        drop_remainder=train,
        filler=filler_example(n_query_tokens),
    )
    if trim is not None:
        ds = ds.map(TrimToLongest(trim))
    if pack:
        multiple = pack_row_multiple * process_count
        ds = ds.map(PackRows(max_segments=pack_max_segments, row_multiple=multiple))
    if process_count > 1 and not slice_source:
        ds = ds.map(TakeBlock(process_index, process_count))
    return ds


def make_iterator(
    source: Sequence[Mapping], *, worker_count: int = 0, **kwargs
) -> grain.DatasetIterator:
    """``iter(make_vae_dataset(source, **kwargs))``, optionally over ``worker_count`` processes.

    The iterator is what the trainer checkpoints (``get_state``/``set_state``, or Orbax via
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore``). With ``worker_count > 0``
    each worker batches its own share of the records, so the batches differ from
    ``worker_count = 0`` (still deterministic for a fixed worker count).
    """
    ds = make_vae_dataset(source, **kwargs)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)


def pipeline_options(config: ml_collections.ConfigDict) -> dict:
    """``make_vae_dataset`` arguments of a training config shared by training and evaluation."""
    dc = config.data
    return dict(
        stage=int(dc.stage),
        max_length=int(dc.max_length),
        bucket_lengths=tuple(dc.bucket_lengths) if dc.bucket_lengths else None,
        pad_lengths=tuple(dc.pad_lengths) if dc.get("pad_lengths") else None,
        seed=int(config.train.seed),
        read_threads=int(dc.read_threads),
    )


def packing_options(config: ml_collections.ConfigDict, local_devices: int = 1) -> dict:
    """``make_vae_dataset``'s packing arguments of a training config (``data.pack_phrases``);
    the row count is also a multiple of ``local_devices``, so that rows split over them."""
    dc = config.data
    if not dc.get("pack_phrases", False):
        return {}
    multiple = math.lcm(int(dc.pack_row_multiple), int(local_devices))
    return dict(pack_max_segments=int(dc.pack_max_segments), pack_row_multiple=multiple)


def make_train_iter(
    config: ml_collections.ConfigDict, local_devices: int = 1
) -> Callable[[int, int], Any]:
    """The trainer's ``make_train_iter(process_index, process_count)`` over
    ``data.train_split`` of a PhraseVAE training config (``local_devices``: devices per
    process, for packed rows)."""
    source = splits.open_split(config.data, config.data.train_split)

    def make(process_index: int, process_count: int):
        return make_iterator(
            source,
            worker_count=int(config.data.worker_count),
            batch_size=int(config.data.batch_size),
            train=True,
            process_index=process_index,
            process_count=process_count,
            **pipeline_options(config),
            **packing_options(config, local_devices),
        )

    return make

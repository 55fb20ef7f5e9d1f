"""Grain input pipeline for PhraseLDM over a song-latent dataset (``latent_records.py``).

One record (raw VAE posterior means ``[4 * n_bars, 64]``, 4 slots per bar) becomes one
fixed-shape example:

  latents             [512, 64] float32  latents / scale_factor, then padded with the pad latent
  n_bars              []        int32    bars of the (augmented) song: the length condition
  section_type_ids    [30]      int32    section-encoder ids of the plan (sections.py), 0 = pad
  section_length_ids  [30]      int32
  has_plan            []        int32    1 when the song has a usable plan, else 0 (empty plan)
  weight              []        float32  1 for a song, 0 for a filler row completing an eval batch
  record_index        []        int32    the song's index in the split, -1 for filler rows

Batches stack these with a leading batch axis (``batch_size // process_count`` rows).

Padding (SPEC section 9.1): songs are padded to 128 bars with the ``[SEP]`` latent. The
reference appended it unscaled to scaled songs; we scale it like the song
(``sep_latent / scale_factor``). ``reference_padding=True`` restores the unscaled pad.

Section plans: a record's plan is used when ``plan_fits`` (it covers exactly the song's bars);
other songs get the empty plan (``has_plan = 0``, all ids 0). ``exclude_unfit_plans`` drops
those songs instead (meant for section-conditioned models).

Augmentations (training only; the reference's four, FACTS section 7.15), drawn per example:

- ``none``.
- ``phrase_permute``: the song's sections (the reference calls them phrases) are duplicated,
  each time a uniformly chosen one, until the next would take the song past 128 bars (or past
  30 sections, the most a plan can hold); then the sections are shuffled and the latents
  rearranged. Unlike the reference, the section plan is rearranged with them, so it keeps
  describing the content.
- ``phrase_subset``: keeps the first and the last section and a random non-empty subset of the
  sections in between (k uniform in 1..n, then k distinct sections, in song order); the plan
  follows (the reference left it unchanged).
- ``bar_permute``: the song is repeated up to 128 bars (``4 * 128`` rows, the last repeat cut)
  and its bars shuffled. No plan describes a shuffled song, so it gets the empty plan.

Section-based augmentations leave songs without a usable plan unchanged. Every example has its
own generator seeded by (seed, epoch, record index), so the augmentations are reproducible
whatever the sharding, and a restored iterator continues with exactly the same examples.

Training shuffles (a new order every epoch), repeats forever and drops the incomplete last
batch; evaluation keeps the split order, reads every song once and completes the last batch
with weight-0 filler rows. Multi-process: process ``i`` of ``n`` reads songs ``i::n``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from input_pipeline.latent_records import open_latent_source, read_stats
from input_pipeline.span_infill import example_rng
from phraseldm_jax import sections
from phraseldm_jax.phrases import MAX_BARS, SLOTS_PER_BAR

AUGMENTATIONS = ("none", "phrase_permute", "phrase_subset", "bar_permute")
MAX_SECTIONS = sections.MAX_SECTIONS


@dataclasses.dataclass(frozen=True)
class SongEncoding:
    """How records become examples: scaling, padding and the section-id vocabulary.

    scale_factor: raw latents are divided by it. pad_latent: [latent_dim], already in model
    space (see ``pad_latent``). max_bars: songs are padded to 4 * max_bars rows.
    """

    scale_factor: float
    pad_latent: np.ndarray
    max_bars: int = MAX_BARS
    max_sections: int = MAX_SECTIONS
    section_vocab: sections.SectionVocab = sections.DEFAULT_SECTION_VOCAB

    @property
    def latent_dim(self) -> int:
        return int(self.pad_latent.shape[0])

    @property
    def max_rows(self) -> int:
        return SLOTS_PER_BAR * self.max_bars


def pad_latent(stats: Mapping[str, Any], reference_padding: bool = False) -> np.ndarray:
    """The end-of-song pad in model space: ``sep_latent / scale_factor`` (ours), or the raw
    ``sep_latent`` (``reference_padding``, the original's unscaled pad). [latent_dim] float32."""
    sep = np.asarray(stats["sep_latent"], np.float32)
    if reference_padding:
        return sep
    return (sep / np.float32(stats["scale_factor"])).astype(np.float32)


def song_encoding(
    stats: Mapping[str, Any], *, reference_padding: bool = False, max_bars: int = MAX_BARS
) -> SongEncoding:
    """``SongEncoding`` from a dataset's ``stats.json`` (``read_stats``)."""
    scale = float(stats["scale_factor"])
    if not scale > 0:
        raise ValueError(f"stats.json: scale_factor must be > 0, got {scale}")
    return SongEncoding(scale, pad_latent(stats, reference_padding), max_bars)


# ------------------------------------------------------------------------------------------
# One record -> one example.


def describe(record: Mapping, record_index: int) -> str:
    """``song 3 ('pop909/083')``: how errors name a record."""
    return f"song {record_index} ({record.get('song_id', '?')!r})"


def record_plan(record: Mapping, record_index: int) -> sections.SectionPlan | None:
    """The record's section plan when ``plan_fits``, else None (the empty plan).

    Raises ValueError when a record claims a fitting plan that is malformed or does not
    cover its bars (a broken dataset, not a song to skip).
    """
    text = str(record.get("section_plan", "") or "")
    if not record.get("plan_fits", False) or not text.strip():
        return None
    try:
        return sections.parse_plan(
            text, n_bars=int(record["n_bars"]), source=describe(record, record_index)
        )
    except sections.SectionPlanError as err:
        raise ValueError(f"latent dataset record claims plan_fits but: {err}") from None


def check_record(record: Mapping, record_index: int, encoding: SongEncoding) -> np.ndarray:
    """The record's raw latents [4 * n_bars, latent_dim] float32 after checking them."""
    where = describe(record, record_index)
    latents = np.asarray(record["latents"], np.float32)
    n_bars = int(record["n_bars"])
    if latents.ndim != 2 or latents.shape != (SLOTS_PER_BAR * n_bars, encoding.latent_dim):
        raise ValueError(
            f"{where}: latents of shape {latents.shape}, expected "
            f"[{SLOTS_PER_BAR} * {n_bars} bars, {encoding.latent_dim}]"
        )
    if not 1 <= n_bars <= encoding.max_bars:
        raise ValueError(
            f"{where}: {n_bars} bars; songs must have 1..{encoding.max_bars} bars "
            "(longer songs should have been left out of the latent dataset)"
        )
    if not np.all(np.isfinite(latents)):
        raise ValueError(f"{where}: latents contain NaN or inf")
    return latents


def _bar_rows(bar_starts: np.ndarray, bar_ends: np.ndarray) -> np.ndarray:
    """Row indices of the bars [start, end) of each chosen span, concatenated."""
    bars = np.concatenate([np.arange(s, e) for s, e in zip(bar_starts, bar_ends)])
    return (bars[:, None] * SLOTS_PER_BAR + np.arange(SLOTS_PER_BAR)).reshape(-1)


def _rearrange_sections(latents, plan: sections.SectionPlan, order: Sequence[int]):
    bounds = np.asarray(plan.section_bounds())
    chosen = bounds[np.asarray(order)]
    new_plan = sections.SectionPlan(tuple(plan.sections[i] for i in order))
    return latents[_bar_rows(chosen[:, 0], chosen[:, 1])], new_plan


def phrase_permute(
    latents: np.ndarray,
    plan: sections.SectionPlan,
    rng: np.random.Generator,
    max_bars: int = MAX_BARS,
    max_sections: int = MAX_SECTIONS,
) -> tuple[np.ndarray, sections.SectionPlan]:
    """Duplicates random sections while they fit, then shuffles all sections (module doc)."""
    order = list(range(len(plan)))
    total = plan.n_bars
    while True:
        pick = int(rng.integers(len(plan)))
        if total + plan.sections[pick].length > max_bars or len(order) + 1 > max_sections:
            break
        order.append(pick)
        total += plan.sections[pick].length
    rng.shuffle(order)
    return _rearrange_sections(latents, plan, order)


def phrase_subset(
    latents: np.ndarray, plan: sections.SectionPlan, rng: np.random.Generator
) -> tuple[np.ndarray, sections.SectionPlan]:
    """First and last section plus a random non-empty subset of the inner ones (module doc)."""
    n_inner = len(plan) - 2
    if n_inner <= 0:
        return latents, plan
    k = int(rng.integers(1, n_inner + 1))
    inner = np.sort(rng.choice(n_inner, size=k, replace=False)) + 1
    order = [0, *inner.tolist(), len(plan) - 1]
    return _rearrange_sections(latents, plan, order)


def bar_permute(
    latents: np.ndarray, rng: np.random.Generator, max_bars: int = MAX_BARS
) -> np.ndarray:
    """The song tiled to ``max_bars`` bars, then its bars shuffled: [4 * max_bars, D]."""
    n_bars = latents.shape[0] // SLOTS_PER_BAR
    tiled_bars = np.resize(np.arange(n_bars), max_bars)  # repeats, the last copy cut
    shuffled = tiled_bars[rng.permutation(max_bars)]
    return latents[_bar_rows(shuffled, shuffled + 1)]


def augment(
    latents: np.ndarray,
    plan: sections.SectionPlan | None,
    kind: str,
    rng: np.random.Generator,
    encoding: SongEncoding,
) -> tuple[np.ndarray, sections.SectionPlan | None]:
    """Applies augmentation ``kind`` to raw song latents [4 * n_bars, D] and its plan."""
    if kind == "none":
        return latents, plan
    if kind == "bar_permute":
        return bar_permute(latents, rng, encoding.max_bars), None
    if plan is None:
        return latents, None
    if kind == "phrase_permute":
        return phrase_permute(latents, plan, rng, encoding.max_bars, encoding.max_sections)
    if kind == "phrase_subset":
        return phrase_subset(latents, plan, rng)
    raise ValueError(f"unknown augmentation {kind!r}; use one of {AUGMENTATIONS}")


def make_example(
    latents: np.ndarray,
    plan: sections.SectionPlan | None,
    record_index: int,
    encoding: SongEncoding,
) -> dict[str, np.ndarray]:
    """Scaled, padded example (module docstring) from raw latents [4 * n_bars, D] and a plan."""
    rows = latents.shape[0]
    if rows > encoding.max_rows:
        raise ValueError(f"song {record_index}: {rows} latents exceed {encoding.max_rows}")
    padded = np.empty((encoding.max_rows, encoding.latent_dim), np.float32)
    padded[:rows] = latents / np.float32(encoding.scale_factor)
    padded[rows:] = encoding.pad_latent
    type_ids = np.zeros((encoding.max_sections,), np.int32)
    length_ids = np.zeros((encoding.max_sections,), np.int32)
    if plan is not None:
        type_ids, length_ids, _ = sections.plan_to_ids(
            plan, encoding.section_vocab, encoding.max_sections
        )
    return {
        "latents": padded,
        "n_bars": np.int32(rows // SLOTS_PER_BAR),
        "section_type_ids": type_ids,
        "section_length_ids": length_ids,
        "has_plan": np.int32(plan is not None),
        "weight": np.float32(1.0),
        "record_index": np.int32(record_index),
    }


def encode_record(
    record: Mapping,
    record_index: int,
    encoding: SongEncoding,
    *,
    augmentation: str = "none",
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """One latent record -> one example (checks, augmentation, scaling, padding, sections)."""
    latents = check_record(record, record_index, encoding)
    plan = record_plan(record, record_index)
    if augmentation != "none":
        if rng is None:
            raise ValueError(f"augmentation {augmentation!r} needs a generator")
        latents, plan = augment(latents, plan, augmentation, rng, encoding)
    return make_example(latents, plan, record_index, encoding)


def filler_example(encoding: SongEncoding) -> dict[str, np.ndarray]:
    """The weight-0 row completing an eval batch: all pad latents, no plan, n_bars 1."""
    empty = np.zeros((0, encoding.latent_dim), np.float32)
    example = make_example(empty, None, -1, encoding)
    example["n_bars"] = np.int32(1)  # a valid length condition; the row is not counted
    example["weight"] = np.float32(0.0)
    return example


# ------------------------------------------------------------------------------------------
# Grain datasets.


class SubsetSource:
    """Random access to ``indices`` of ``source``; items are (source index, record)."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self._source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[int, Mapping]:
        index = int(self._indices[i])
        return index, self._source[index]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[int, Mapping]]:
        indices = [int(self._indices[i]) for i in items]
        if hasattr(self._source, "__getitems__"):
            records = self._source.__getitems__(indices)
        else:
            records = [self._source[i] for i in indices]
        return list(zip(indices, records))


def songs_with_plans(source: Sequence[Mapping]) -> list[int]:
    """Indices of the records whose plan fits (one pass over the split)."""
    return [i for i in range(len(source)) if record_plan(source[i], i) is not None]


class _EncodeSongs:
    """(stream index, (record index, record)) -> example; epoch = stream index // epoch length."""

    def __init__(self, encoding: SongEncoding, augmentation: str, seed: int, epoch_length: int):
        self._encoding = encoding
        self._augmentation = augmentation
        self._seed = seed
        self._epoch_length = epoch_length

    def __call__(self, index: int, item: tuple[int, Mapping]) -> dict[str, np.ndarray]:
        record_index, record = item
        rng = None
        if self._augmentation != "none":
            rng = example_rng(self._seed, index // self._epoch_length, record_index)
        return encode_record(
            record, record_index, self._encoding, augmentation=self._augmentation, rng=rng
        )


class _CompleteBatch:
    """Stacks examples, completing a short batch with filler rows (weight 0)."""

    def __init__(self, batch_size: int, filler: Mapping[str, np.ndarray]):
        self._batch_size = batch_size
        self._filler = filler

    def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        rows = list(examples) + [self._filler] * (self._batch_size - len(examples))
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def make_ldm_dataset(
    source: Sequence[Mapping],
    encoding: SongEncoding,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    augmentation: str = "none",
    exclude_unfit_plans: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 2,
    prefetch_buffer_size: int = 16,
) -> grain.IterDataset:
    """The batched PhraseLDM dataset of one process (see the module docstring).

    Args:
      source: one split of a latent dataset (``open_latent_source``) or any random-access
        sequence of latent records.
      encoding: scaling, padding and section ids (``song_encoding``).
      batch_size: the global batch; each process yields ``batch_size // process_count`` rows.
      seed: shuffling and augmentation seed, 0 <= seed < 2**32.
      train: shuffle every epoch, repeat forever, augment, drop the incomplete last batch;
        otherwise one pass in split order without augmentation, the last batch completed
        with weight-0 rows.
      augmentation: one of ``AUGMENTATIONS`` (training only).
      exclude_unfit_plans: leave out songs without a fitting section plan.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; use one of {AUGMENTATIONS}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    keep = songs_with_plans(source) if exclude_unfit_plans else range(len(source))
    if len(keep) == 0:
        raise ValueError(
            f"{source!r} has no songs"
            + (" with a fitting section plan" if exclude_unfit_plans else "")
        )
    ds = grain.MapDataset.source(SubsetSource(source, keep))
    if process_count > 1:
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"process {process_index} of {process_count} has no songs")
    rows = batch_size // process_count
    epoch_length = len(ds)
    if train:
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map_with_index(
        _EncodeSongs(encoding, augmentation if train else "none", seed, epoch_length)
    )
    complete = _CompleteBatch(rows, filler_example(encoding))
    ds = ds.batch(rows, drop_remainder=train, batch_fn=complete)
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    )


def make_iterator(
    data_dir: str,
    split: str,
    *,
    reference_padding: bool = False,
    max_bars: int = MAX_BARS,
    worker_count: int = 0,
    **kwargs,
) -> grain.DatasetIterator:
    """``iter(make_ldm_dataset(...))`` over ``split`` of the latent dataset in ``data_dir``.

    Checkpointable (``get_state``/``set_state``, Grain's Orbax handler). ``worker_count > 0``
    prepares batches in that many processes (deterministic for a fixed worker count).
    ``max_bars``: songs are padded to ``4 * max_bars`` latents (the model's ``sample_size``).
    """
    encoding = song_encoding(
        read_stats(data_dir), reference_padding=reference_padding, max_bars=max_bars
    )
    ds = make_ldm_dataset(open_latent_source(data_dir, split), encoding, **kwargs)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)


def make_train_iter(config: ml_collections.ConfigDict) -> Callable[[int, int], Any]:
    """The trainer's ``make_train_iter(process_index, process_count)`` over
    ``data.train_split`` of a PhraseLDM training config."""
    data = config.data

    def make(process_index: int, process_count: int):
        return make_iterator(
            data.latent_dir,
            data.train_split,
            max_bars=config.model.dit.sample_size // SLOTS_PER_BAR,
            reference_padding=data.reference_padding,
            worker_count=data.worker_count,
            batch_size=data.batch_size,
            seed=config.train.seed,
            train=True,
            augmentation=data.augmentation,
            exclude_unfit_plans=bool(data.exclude_unfit_plans and config.model.sec_control),
            process_index=process_index,
            process_count=process_count,
            read_threads=data.read_threads,
        )

    return make

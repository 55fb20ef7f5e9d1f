"""Tests for the PhraseVAE Grain pipelines (input_pipeline/vae_pipeline.py, span_infill.py)."""

from __future__ import annotations

import itertools
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from input_pipeline import vae_pipeline
from input_pipeline.span_infill import example_rng, span_infill
from input_pipeline.vae_pipeline import (
    TruncationCounter,
    encode_example,
    make_iterator,
    make_vae_dataset,
)
from phraseldm_jax.vocab import (
    BOS_ID,
    EOS_ID,
    IGNORE_LABEL,
    MASK_ID,
    PAD_ID,
    PHRASE_VOCAB,
    UnknownTokenError,
)

PHRASE = "i-0 o-0 p-60 d-12 o-12 p-64 d-12 p-60 d-6"
PHRASE_IDS = PHRASE_VOCAB.encode(PHRASE)
C0, C1, C2, C3 = (PHRASE_VOCAB.id_of(f"[C{k}]") for k in range(4))


def _random_line(rng: np.random.Generator, n_notes: int) -> str:
    tokens = [f"i-{rng.integers(0, 129)}"]
    for _ in range(n_notes):
        tokens += [f"o-{rng.integers(0, 48)}", f"p-{rng.integers(30, 100)}"]
        tokens += [f"d-{rng.integers(1, 48)}"]
    return " ".join(tokens)


def _corpus(n: int, seed: int = 0, max_notes: int = 20) -> list[dict]:
    """Records of varied length (4 to 3 * max_notes + 1 tokens), some with bytes text."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        text = _random_line(rng, int(rng.integers(1, max_notes + 1)))
        records.append({"text": text.encode() if i % 3 == 0 else text, "song_id": f"s/{i // 5}"})
    return records


def _take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _real_record_indices(batches: list[dict]) -> list[int]:
    return [int(r) for b in batches for r, w in zip(b["record_index"], b["weight"]) if w > 0]


# --- per-example construction -------------------------------------------------------------


class _ScriptedRng:
    """Stands in for a Generator: returns scripted span lengths and starts, logs the calls."""

    def __init__(self, lengths, starts):
        self.lengths, self.starts, self.calls = list(lengths), list(starts), []

    def poisson(self, lam):
        self.calls.append(("poisson", lam))
        return self.lengths.pop(0)

    def integers(self, low, high):
        self.calls.append(("integers", low, high))
        return self.starts.pop(0)


def test_span_infill_follows_the_reference_steps():
    tokens = list(range(100, 110))  # budget 0.3 * 10 = 3
    rng = _ScriptedRng(lengths=[0, 2, 5], starts=[2, 9, 1])
    out = span_infill(tokens, rng)
    # l=0 at 2 inserts a [MASK]; l=2 at 9 (of 11) cuts the last two; l=5 at 1 swallows a [MASK].
    assert out == [100, MASK_ID, 105, 106, 107, MASK_ID]
    # Sampled lengths 0 + 2 + 5 = 7 >= 3 stop the loop; starts are uniform over the current length.
    assert rng.calls == [
        ("poisson", 3.0), ("integers", 0, 10),
        ("poisson", 3.0), ("integers", 0, 11),
        ("poisson", 3.0), ("integers", 0, 10),
    ]  # fmt: skip
    assert rng.lengths == [] and rng.starts == []


def test_span_infill_statistics_match_the_reference():
    line = list(range(200, 222))  # 22 distinct tokens
    kept, lengths = [], []
    for record_index in range(4000):
        out = span_infill(line, example_rng(7, 0, record_index))
        kept.append(sum(t != MASK_ID for t in out))
        lengths.append(len(out))
        assert [t for t in out if t != MASK_ID] == sorted(t for t in out if t != MASK_ID)
    kept, lengths = np.array(kept), np.array(lengths)
    # FACTS.md section 4: "22 tokens give a masked length of 14.6 on average (range 7-21)".
    # That number is the count of original tokens the encoder still sees.
    assert 14.3 < kept.mean() < 14.8
    assert kept.min() >= 4 and kept.max() == 21
    # The whole masked line, [MASK]s included, is longer and can exceed 22 (l=0 inserts).
    assert 16.7 < lengths.mean() < 17.2
    assert lengths.max() > 22
    # A one-token line almost always becomes a lone [MASK].
    singles = [span_infill([23], example_rng(7, 0, i)) for i in range(2000)]
    assert np.mean([s == [MASK_ID] for s in singles]) > 0.9
    assert all(MASK_ID in s for s in singles)


def test_span_infill_is_deterministic_per_seed_epoch_and_record():
    line = list(range(200, 240))
    assert span_infill(line, example_rng(1, 2, 3)) == span_infill(line, example_rng(1, 2, 3))
    others = [example_rng(2, 2, 3), example_rng(1, 3, 3), example_rng(1, 2, 4)]
    for rng in others:
        assert span_infill(line, rng) != span_infill(line, example_rng(1, 2, 3))
    with pytest.raises(ValueError, match="non-negative|>= 0"):
        example_rng(-1, 0, 0)


def test_stage1_batch_is_bos_masked_phrase_eos_with_full_targets():
    source = [{"text": "b-1"}, {"text": PHRASE, "song_id": "pop909/001"}]
    (batch,) = make_iterator(source, stage=1, batch_size=2, seed=5, train=False, max_length=16)
    masked = span_infill(PHRASE_IDS, example_rng(5, 0, 1))
    assert masked != PHRASE_IDS and MASK_ID in masked
    expected_input = [BOS_ID, *masked, EOS_ID]
    row = batch["input_ids"][1]
    assert row[: len(expected_input)].tolist() == expected_input
    assert (row[len(expected_input) :] == PAD_ID).all()
    assert batch["attention_mask"][1].tolist() == [1] * len(expected_input) + [0] * (
        16 - len(expected_input)
    )
    target = [*PHRASE_IDS, EOS_ID]  # the target is never masked
    assert batch["labels"][1].tolist() == target + [IGNORE_LABEL] * (16 - len(target))
    assert batch["decoder_input_ids"][1].tolist() == [BOS_ID, *PHRASE_IDS] + [PAD_ID] * (
        16 - len(target)
    )
    # Regression pin for seed 5, epoch 0, record 1 (changes only if the masking changes).
    assert PHRASE_VOCAB.decode(masked) == "i-0 o-0 p-60 d-12 o-12 p-64 d-12 p-60 [MASK]"
    assert batch["weight"].tolist() == [1.0, 1.0]
    assert batch["record_index"].tolist() == [0, 1]


@pytest.mark.parametrize("stage", [2, 3])
def test_stage2_and_3_batches_have_query_tokens_and_no_masking(stage):
    source = [{"text": PHRASE}, {"text": PHRASE.encode()}]
    (batch,) = make_iterator(source, stage=stage, batch_size=2, seed=0, train=False, max_length=20)
    n = len(PHRASE_IDS)  # 9
    expected = {
        "input_ids": [C0, C1, C2, C3, BOS_ID, *PHRASE_IDS, EOS_ID] + [PAD_ID] * (20 - n - 6),
        "attention_mask": [1] * (n + 6) + [0] * (20 - n - 6),
        "decoder_input_ids": [BOS_ID, *PHRASE_IDS] + [PAD_ID] * (20 - n - 1),
        "labels": [*PHRASE_IDS, EOS_ID] + [IGNORE_LABEL] * (20 - n - 1),
    }
    for key, row in expected.items():
        assert batch[key].dtype == np.int32 and batch[key].shape == (2, 20)
        assert batch[key][0].tolist() == row, key
        assert batch[key][1].tolist() == row, key  # bytes text gives the same row
    assert PHRASE_VOCAB.decode(batch["input_ids"][0], skip=[PAD_ID]) == (
        f"[C0] [C1] [C2] [C3] [BOS] {PHRASE} [EOS]"
    )


def test_overrides_of_the_stage_defaults():
    example = {"text": PHRASE}
    out = encode_example(example, record_index=0, n_query_tokens=2, span_mask=False, max_length=32)
    assert out["input_ids"].tolist() == [C0, C1, BOS_ID, *PHRASE_IDS, EOS_ID]
    ds = make_vae_dataset([example], stage=1, span_mask=False, batch_size=1, seed=0, train=False)
    (batch,) = list(ds)
    assert batch["input_ids"][0, : len(PHRASE_IDS) + 2].tolist() == [BOS_ID, *PHRASE_IDS, EOS_ID]


def test_truncation_is_right_sided_per_side_and_counted(caplog):
    def line(n_tokens):  # i-0 then (o, p, d) triples, cut to n_tokens
        body = ["i-0"] + [t for k in range(50) for t in (f"o-{k}", "p-60", "d-3")]
        return " ".join(body[:n_tokens])

    source = [{"text": line(122)}, {"text": line(123)}, {"text": line(130), "song_id": "long/1"}]
    counter = TruncationCounter()
    with caplog.at_level(logging.WARNING, logger=vae_pipeline.__name__):
        (batch,) = make_iterator(
            source, stage=2, batch_size=3, seed=0, train=False, truncation_counter=counter
        )
    ids = [PHRASE_VOCAB.encode(r["text"]) for r in source]
    # 122 content tokens: 4 + 1 + 122 + 1 = 128, nothing cut.
    assert batch["input_ids"][0, -1] == EOS_ID and batch["truncated"][0] == 0
    # 123 content tokens: the input loses its [EOS], the target (124) is whole.
    assert batch["input_ids"][1].tolist() == [C0, C1, C2, C3, BOS_ID, *ids[1][:123]]
    assert batch["labels"][1].tolist() == [*ids[1], EOS_ID] + [IGNORE_LABEL] * 4
    assert batch["truncated"][1] == 1
    # 130 content tokens: both sides cut at 128, independently.
    assert batch["input_ids"][2].tolist() == [C0, C1, C2, C3, BOS_ID, *ids[2][:123]]
    assert batch["labels"][2].tolist() == ids[2][:128]
    assert batch["decoder_input_ids"][2].tolist() == [BOS_ID, *ids[2][:127]]
    assert batch["attention_mask"].sum(axis=1).tolist() == [128, 128, 128]
    assert counter.examples == 3 and counter.truncated == 2
    assert counter.inputs_truncated == 2 and counter.targets_truncated == 1
    assert "long/1" in caplog.text and "truncated" in caplog.text


def test_unknown_token_error_names_the_record():
    source = [{"text": PHRASE}] * 3 + [{"text": b"i-0 o-0 x-99", "song_id": b"pop909/007"}]
    with pytest.raises(UnknownTokenError, match=r"'x-99'.*record 3 \(song_id 'pop909/007'\)"):
        list(make_iterator(source, stage=2, batch_size=2, seed=0, train=False))


@pytest.mark.parametrize(
    ("record", "message"),
    [({"song_id": "a"}, "no 'text' field"), ({"text": "  "}, "empty token line")],
)
def test_bad_records_raise_clear_errors(record, message):
    with pytest.raises(ValueError, match=message):
        encode_example(record, record_index=4, n_query_tokens=4, span_mask=False, max_length=8)


# --- batching, shuffling, sharding --------------------------------------------------------


def test_eval_keeps_every_record_once_in_order_and_pads_the_last_batch():
    source = _corpus(23)
    batches = list(make_iterator(source, stage=2, batch_size=8, seed=0, train=False))
    assert len(batches) == 3
    assert _real_record_indices(batches) == list(range(23))
    last = batches[-1]
    assert last["weight"].tolist() == [1.0] * 7 + [0.0]
    assert last["record_index"][-1] == -1
    assert (last["labels"][-1] == IGNORE_LABEL).all()
    assert last["attention_mask"][-1].sum() == 6  # filler: [C0..C3] [BOS] [EOS]
    for batch in batches:
        for key in ("input_ids", "attention_mask", "decoder_input_ids", "labels"):
            assert batch[key].shape == (8, 128) and batch[key].dtype == np.int32
        assert batch["weight"].shape == (8,) and batch["weight"].dtype == np.float32
        assert batch["record_index"].shape == batch["truncated"].shape == (8,)


def test_training_is_deterministic_reshuffles_each_epoch_and_remasks():
    source = _corpus(16)
    kwargs = dict(stage=1, batch_size=4, train=True, max_length=64)
    first = _take(make_iterator(source, seed=3, **kwargs), 8)
    again = _take(make_iterator(source, seed=3, **kwargs), 8)
    other = _take(make_iterator(source, seed=4, **kwargs), 8)
    _assert_batches_equal(first, again)
    order = _real_record_indices(first)
    assert order != _real_record_indices(other)
    epoch0, epoch1 = order[:16], order[16:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(16)) and epoch0 != epoch1
    # The same record is masked afresh in the next epoch (targets stay the same).
    inputs = {}
    for batch in first:
        for row, record in enumerate(batch["record_index"]):
            inputs.setdefault(int(record), []).append(tuple(batch["input_ids"][row]))
    assert sum(a != b for a, b in inputs.values()) >= 12


def _orbax_roundtrip(tmp_path, iterator, make_fresh):
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    fresh = make_fresh()
    restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(
        1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )
    return restored["data"]


@pytest.mark.parametrize("bucket_lengths", [None, (16, 32, 64)])
def test_restoring_mid_epoch_continues_exactly(tmp_path, bucket_lengths):
    source = _corpus(40)
    kwargs = dict(stage=1, batch_size=4, seed=11, train=True, max_length=64)
    kwargs["bucket_lengths"] = bucket_lengths
    reference = _take(make_iterator(source, **kwargs), 14)

    iterator = make_iterator(source, **kwargs)
    _take(iterator, 6)
    state = iterator.get_state()
    if bucket_lengths:
        assert any(state["buffers"]), "bucketed state should hold waiting examples"
    fresh = make_iterator(source, **kwargs)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 8), reference[6:])

    restored = _orbax_roundtrip(tmp_path, iterator, lambda: make_iterator(source, **kwargs))
    _assert_batches_equal(_take(restored, 8), reference[6:])


def test_restoring_eval_near_the_end_finishes_the_pass(tmp_path):
    source = _corpus(21)
    kwargs = dict(stage=2, batch_size=4, seed=0, train=False, bucket_lengths=(32, 64, 128))
    reference = list(make_iterator(source, **kwargs))
    iterator = make_iterator(source, **kwargs)
    consumed = _take(iterator, len(reference) - 2)
    restored = _orbax_roundtrip(tmp_path, iterator, lambda: make_iterator(source, **kwargs))
    _assert_batches_equal(consumed + list(restored), reference)


def test_bucketing_keeps_every_record_and_respects_bucket_lengths():
    source = _corpus(60, max_notes=40)  # 4..121 tokens
    buckets = (32, 64, 128)
    batches = list(
        make_iterator(source, stage=2, batch_size=8, seed=0, train=False, bucket_lengths=buckets)
    )
    assert sorted(_real_record_indices(batches)) == list(range(60))
    fixed = list(make_iterator(source, stage=2, batch_size=8, seed=0, train=False))
    for batch in batches:
        length = batch["input_ids"].shape[1]
        assert length in buckets
        assert batch["labels"].shape == batch["decoder_input_ids"].shape == (8, length)
        smaller = max([0] + [b for b in buckets if b < length])
        for row in np.flatnonzero(batch["weight"]):
            needed = max(batch["attention_mask"][row].sum(), (batch["labels"][row] >= 0).sum())
            assert smaller < needed <= length
    # Same rows, same content, less padding.
    by_record = {}
    for batch in fixed:
        for row, record in enumerate(batch["record_index"]):
            if record >= 0:
                by_record[int(record)] = batch["input_ids"][row]
    for batch in batches:
        for row, record in enumerate(batch["record_index"]):
            if record >= 0:
                length = batch["input_ids"].shape[1]
                np.testing.assert_array_equal(batch["input_ids"][row], by_record[record][:length])
    assert sum(b["input_ids"].size for b in batches) < sum(b["input_ids"].size for b in fixed)


@pytest.mark.parametrize("train", [True, False])
def test_pad_lengths_cut_each_random_batch_to_its_longest_row(train):
    source = _corpus(60, max_notes=12)
    lengths = (16, 24, 32, 40, 48, 64, 128)
    kwargs = dict(stage=3, batch_size=8, seed=3, train=train)
    fixed = _take(make_iterator(source, **kwargs), 7)
    cut = _take(make_iterator(source, pad_lengths=lengths, **kwargs), 7)
    seen = set()
    for full, short in zip(fixed, cut):
        length = short["input_ids"].shape[1]
        seen.add(length)
        assert length in lengths
        # The same rows in the same order, and nothing but padding cut off.
        np.testing.assert_array_equal(short["record_index"], full["record_index"])
        np.testing.assert_array_equal(short["weight"], full["weight"])
        for key in ("input_ids", "attention_mask", "decoder_input_ids", "labels"):
            np.testing.assert_array_equal(short[key], full[key][:, :length])
        assert not full["attention_mask"][:, length:].any()
        assert (full["labels"][:, length:] == IGNORE_LABEL).all()
        # ... and the smallest such length: a shorter one would cut a row.
        needed = max(full["attention_mask"].sum(1).max(), (full["labels"] >= 0).sum(1).max())
        assert max([0] + [n for n in lengths if n < length]) < needed <= length
    assert len(seen) > 1


def test_pad_lengths_shard_the_global_batch_over_processes():
    source = _corpus(25)
    kwargs = dict(stage=2, batch_size=8, seed=2, train=True, pad_lengths=(16, 32, 64, 128))
    whole = _take(make_iterator(source, **kwargs), 6)
    parts = [
        _take(make_iterator(source, process_index=p, process_count=2, **kwargs), 6)
        for p in range(2)
    ]
    for step, (a, b) in enumerate(zip(*parts)):
        for key in whole[step]:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[step][key])


@pytest.mark.parametrize("bucket_lengths", [None, (32, 64, 128)])
def test_process_shards_are_disjoint_and_cover_the_data_in_eval(bucket_lengths):
    source = _corpus(29)
    kwargs = dict(stage=2, batch_size=6, seed=0, train=False, bucket_lengths=bucket_lengths)
    per_process = [
        list(make_iterator(source, process_index=p, process_count=3, **kwargs)) for p in range(3)
    ]
    # Every process runs the same number of steps with the same shapes (SPMD-safe).
    assert len({len(batches) for batches in per_process}) == 1
    for step in zip(*per_process):
        assert len({b["input_ids"].shape for b in step}) == 1
        assert all(b["input_ids"].shape[0] == 2 for b in step)
    indices = [_real_record_indices(batches) for batches in per_process]
    assert sorted(sum(indices, [])) == list(range(29))


def test_process_shards_are_disjoint_and_cover_the_data_in_training():
    source = _corpus(25)
    kwargs = dict(stage=1, batch_size=8, seed=2, train=True)
    # Fixed length: each process reads its own slice (13 and 12 records), epoch after epoch.
    iterators = [make_iterator(source, process_index=p, process_count=2, **kwargs) for p in (0, 1)]
    shards = [_real_record_indices(_take(iterator, 12)) for iterator in iterators]
    assert sorted(shards[0][:13]) == list(range(0, 25, 2))  # first epoch of process 0
    assert sorted(shards[1][:12]) == list(range(1, 25, 2))
    assert set(shards[0]) == set(range(0, 25, 2)) and set(shards[1]) == set(range(1, 25, 2))
    # Bucketed: the processes split the single-process global batches row-wise.
    kwargs["bucket_lengths"] = (32, 64, 128)
    whole = _take(make_iterator(source, **kwargs), 6)
    parts = [
        _take(make_iterator(source, process_index=p, process_count=2, **kwargs), 6)
        for p in range(2)
    ]
    for step, (a, b) in enumerate(zip(*parts)):
        for key in whole[step]:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[step][key])


def test_worker_processes_keep_every_record_and_restore():
    from absl import flags  # grain's worker processes read absl flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    source = _corpus(50)
    kwargs = dict(stage=1, batch_size=8, seed=0, worker_count=2, bucket_lengths=(32, 64))
    kwargs["max_length"] = 64
    iterator = make_iterator(source, train=False, **kwargs)
    try:
        assert sorted(_real_record_indices(list(iterator))) == list(range(50))
    finally:
        iterator.close()
    iterator = make_iterator(source, train=True, **kwargs)
    try:
        _take(iterator, 3)
        state = iterator.get_state()
        ahead = _take(iterator, 4)
        iterator.set_state(state)  # rewinds the workers
        _assert_batches_equal(_take(iterator, 4), ahead)
    finally:
        iterator.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stage=4), "stage"),
        (dict(batch_size=10, process_count=4), "multiple of process_count"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(bucket_lengths=(64, 32, 128)), "ascending"),
        (dict(bucket_lengths=(32, 64)), "equal max_length"),
        (dict(pad_lengths=(32, 64)), "equal max_length"),
        (dict(pad_lengths=(64, 128), bucket_lengths=(64, 128)), "cannot be combined"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    args = dict(stage=2, batch_size=8, seed=0, train=True) | kwargs
    with pytest.raises(ValueError, match=message):
        make_vae_dataset(_corpus(4), **args)


# --- real-looking data --------------------------------------------------------------------


def _pop909_phrase_lines(pop909_dir, n_songs: int) -> list[str]:
    """Phrase-level lines of the first songs, built the reference's way (FACTS section 5)."""
    from phraseldm_jax.remiz import MultiTrack

    lines = []
    for song in sorted(p for p in pop909_dir.iterdir() if p.is_dir())[:n_songs]:
        multitrack = MultiTrack.from_midi(str(song / f"{song.name}.mid"))
        for bar in multitrack.bars:
            for track in bar.tracks.values():
                lines.append(" ".join(track.to_remiz_seq(with_velocity=False)))
            lines += ["[INST]", "b-1"]
        lines.append("[SEP]")
    return lines


def test_bucketing_cuts_padding_on_real_looking_phrases(pop909_dir):
    if pop909_dir is not None:
        lines = _pop909_phrase_lines(pop909_dir, n_songs=8)
    else:
        print("POP909 not found: using synthetic phrase lines")
        rng = np.random.default_rng(0)
        lines = [_random_line(rng, int(rng.geometric(0.08))) for _ in range(2000)]
        lines = [" ".join(line.split()[:127]) for line in lines]
    source = [{"text": line} for line in lines]
    kwargs = dict(stage=2, batch_size=64, seed=0, train=False)
    fixed = list(make_iterator(source, **kwargs))
    bucketed = list(make_iterator(source, bucket_lengths=(32, 64, 128), **kwargs))
    assert sorted(_real_record_indices(bucketed)) == list(range(len(source)))
    fixed_cells = sum(b["input_ids"].size for b in fixed)
    bucketed_cells = sum(b["input_ids"].size for b in bucketed)
    print(f"{len(source)} lines: {fixed_cells} padded cells fixed, {bucketed_cells} bucketed")
    assert bucketed_cells < 0.6 * fixed_cells


def test_reads_the_tfds_phrase_and_bar_datasets(tmp_path):
    from input_pipeline import synthetic, tfds_builders

    tfds_builders.quiet()
    songs = synthetic.synthetic_records(n_songs=4)
    tfds_builders.build(str(tmp_path), names=("phrases", "bars"), songs=songs)
    for name, stage in (("phrases", 2), ("bars", 1)):
        source = tfds_builders.open_source(str(tmp_path), name, "train")
        batches = list(make_iterator(source, stage=stage, batch_size=32, seed=0, train=False))
        assert sorted(_real_record_indices(batches)) == list(range(len(source)))
        row = next(i for i, r in enumerate(batches[0]["record_index"]) if r >= 0)
        target = PHRASE_VOCAB.encode(source[int(batches[0]["record_index"][row])]["text"])
        labels = batches[0]["labels"][row]
        assert labels[labels >= 0].tolist() == [*target, EOS_ID][:128]
        training = make_iterator(source, stage=stage, batch_size=32, seed=0, train=True)
        assert _take(training, 2)[1]["weight"].tolist() == [1.0] * 32

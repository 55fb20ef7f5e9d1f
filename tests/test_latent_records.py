"""The latent dataset format: write, read back, atomic replacement, clear errors."""

import os

import numpy as np
import pytest

from input_pipeline import latent_records


def _song(i, n_bars):
    rng = np.random.default_rng(i)
    return {
        "song_id": f"s{i}",
        "latents": rng.normal(size=(4 * n_bars, 64)).astype(np.float32),
        "n_bars": n_bars,
        "section_plan": f"A-{n_bars}",
        "plan_fits": i % 2 == 0,
    }


def _stats():
    z = np.zeros(64, np.float32)
    return dict(scale_factor=0.76, abs_p999=3.1, inst_latent=z, bar_latent=z + 1,
                sep_latent=z + 2, latent_dim=64, slot_order="pitch_order")  # fmt: skip


def test_round_trip(tmp_path):
    songs = [_song(i, n) for i, n in enumerate([3, 8, 1])]
    out = tmp_path / "latents"
    counts = latent_records.write_latent_dataset(out, {"train": songs, "test": songs[:1]}, _stats())
    assert counts == {"train": 3, "test": 1}
    src = latent_records.open_latent_source(out, "train")
    assert len(src) == 3
    for want, got in zip(songs, src.__getitems__([0, 1, 2])):
        np.testing.assert_array_equal(got["latents"], want["latents"])
        assert (got["song_id"], got["n_bars"], got["plan_fits"]) == (
            want["song_id"], want["n_bars"], want["plan_fits"])  # fmt: skip
    stats = latent_records.read_stats(out)
    assert stats["bar_latent"].dtype == np.float32 and stats["songs_per_split"]["train"] == 3


def test_overwrite_is_atomic_and_failures_leave_nothing(tmp_path):
    out = tmp_path / "latents"
    latent_records.write_latent_dataset(out, {"train": [_song(0, 2)]}, _stats())
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        latent_records.write_latent_dataset(out, {"train": [_song(1, 2)]}, _stats())

    def broken():
        yield _song(2, 2)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        latent_records.write_latent_dataset(out, {"train": broken()}, _stats(), overwrite=True)
    assert latent_records.open_latent_source(out, "train")[0]["song_id"] == "s0"
    assert sorted(os.listdir(tmp_path)) == ["latents"]


def test_bad_records_are_clear_errors(tmp_path):
    bad = _song(0, 2)
    bad["latents"] = bad["latents"][:7]
    with pytest.raises(ValueError, match="4 slots for each of its 2 bars"):
        latent_records.write_latent_dataset(tmp_path / "x", {"train": [bad]}, _stats())
    with pytest.raises(FileNotFoundError, match="not a finished latent dataset"):
        latent_records.read_stats(tmp_path / "nothing")

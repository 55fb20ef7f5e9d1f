"""safetensors reading and atomic writing without torch."""

from __future__ import annotations

import os

import numpy as np
import pytest

from phraseldm_jax.convert import safetensors_io


def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "model.b": np.arange(7, dtype=np.int64),
        "half": rng.normal(size=(2, 2)).astype(np.float16),
        "transposed": rng.normal(size=(4, 3)).astype(np.float32).T,  # not C-contiguous
    }
    path = tmp_path / "model.safetensors"
    safetensors_io.write_safetensors(path, tensors, {"model.alias": "model.a.weight"})
    back = safetensors_io.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)
    assert safetensors_io.read_safetensors_metadata(path) == {"model.alias": "model.a.weight"}
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left


def test_overwrite_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors_io.write_safetensors(path, {"x": np.zeros(3, np.float32)})
    safetensors_io.write_safetensors(path, {"y": np.ones(2, np.float32)})
    assert list(safetensors_io.read_safetensors(path)) == ["y"]
    with pytest.raises(ValueError, match="'z' has dtype object"):
        safetensors_io.write_safetensors(path, {"z": np.array([object()], dtype=object)})
    np.testing.assert_array_equal(safetensors_io.read_safetensors(path)["y"], [1.0, 1.0])
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert safetensors_io.read_safetensors_metadata(path) == {}


def test_bad_input_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        safetensors_io.read_safetensors(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="corrupt.safetensors.*not a readable"):
        safetensors_io.read_safetensors(corrupt)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        safetensors_io.read_safetensors_metadata(corrupt)
    with pytest.raises(ValueError, match="metadata must map str to str"):
        safetensors_io.write_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(1)}, {"k": 1})
    with pytest.raises(ValueError, match="non-empty strings"):
        safetensors_io.write_safetensors(tmp_path / "m.safetensors", {"": np.zeros(1)})
    assert sorted(os.listdir(tmp_path)) == ["corrupt.safetensors"]

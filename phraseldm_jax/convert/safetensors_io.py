"""safetensors files without torch: read into numpy, write atomically.

The original checkpoints' ``model.safetensors`` are written by ``safetensors.torch.save_model``
(through ``PyTorchModelHubMixin``): tensors that share storage (PhraseVAE's tied embedding) are
stored once, and the file's metadata maps every dropped alias to the name that was kept.
``write_safetensors`` takes such a metadata dict too, so our exports look the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from phraseldm_jax import fileio


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as numpy arrays (bfloat16 is not supported by numpy
    and is refused with a clear error).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a readable safetensors file (the message names the file).
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError / TypeError
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's string metadata (e.g. ``{dropped alias: kept name}``), {} when it has none."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` (name -> array) to ``path`` atomically: a temporary file in the same
    folder, then ``os.replace``, so readers never see a half-written file.

    Arrays are written with their own dtype, C-contiguous. Metadata values must be strings.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: tensor names must be non-empty strings, got {name!r}")
        array = np.ascontiguousarray(np.asarray(value))
        if array.dtype.kind not in "biufc":
            raise ValueError(f"{path}: tensor {name!r} has dtype {array.dtype}, not a number type")
        arrays[name] = array
    if metadata is not None:
        bad = {
            k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)
        }
        if bad:
            raise ValueError(f"{path}: safetensors metadata must map str to str, got {bad}")
        metadata = dict(metadata)
    fileio.atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))

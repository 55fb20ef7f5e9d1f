"""Checks that tell a damaged checkpoint step from an intact one (``checkpointing`` uses them).

``inspect_step``: why a step folder is damaged (a metadata file missing or not JSON, a file
that differs from its ``file_digests.json``), or None; ``verify_arrays``: restored arrays
against the ``"checksums"`` saved in the step's ``progress``; ``one_line_reason`` and
``quiet_orbax_reports``: Orbax's errors as one line, without its tracebacks.

``tree_checksums``: two 32-bit sums per array leaf, computed on the devices where the arrays
live (one jitted call, no host copy of the arrays). Each is ``sum(word * odd_weight(position))
mod 2**32`` over the leaf's bits read as unsigned words, with two independent weight streams.
Integer sums are exact and order-independent, so the value is the same on any mesh or
sharding (and on the host after a restore), and one flipped bit always changes both sums: it
changes a word by ``2**k`` (k < 32), which times an odd weight is never 0 mod ``2**32``.

``file_digests``: SHA-256 of every file under a folder (a checkpoint step's metadata, index
and data files), for damage that does not show in the arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phraseldm_jax import fileio, optim

# Files every finished step holds; a step without them (or with them unreadable) is damaged.
STEP_METADATA = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"))
PROGRESS_JSON = os.path.join("progress", "metadata")  # where JsonSave puts ``progress``
CHECKSUMS = "checksums"  # the key of the state's checksums in ``progress``
FILE_DIGESTS = "file_digests.json"  # {"files": {path: [size, sha256]}, "sha256": of "files"}
# Written by Orbax after file_digests.json (commit_success.txt: a marker without data), or
# rewritten after the rename (_CHECKPOINT_METADATA gets its commit time: ``seal_step``).
UNDIGESTED = ("commit_success.txt", FILE_DIGESTS, STEP_METADATA[0])

# Constants of the two weight streams (murmur3's finaliser with different seeds).
_SEEDS = (np.uint32(0x9E3779B9), np.uint32(0x7F4A7C15))


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a well-spread hash of ``h`` (uint32, wraps)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words, one per element (8-byte dtypes: two, last axis)."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    size = jnp.dtype(leaf.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    raise TypeError(f"no checksum for dtype {leaf.dtype}")


def _leaf_sums(leaf: jax.Array) -> jax.Array:
    """``[2]`` uint32: the two weighted sums of one leaf. The position of each word comes from
    iotas over its shape (no reshape, so a sharded leaf stays where it is)."""
    words = _words(jnp.asarray(leaf))
    position = jnp.zeros(words.shape, jnp.uint32)
    for axis, length in enumerate(words.shape):
        position = position * np.uint32(length) + jax.lax.broadcasted_iota(
            jnp.uint32, words.shape, axis
        )
    sums = [
        jnp.sum(words * (_mix(position ^ seed) | np.uint32(1)), dtype=jnp.uint32) for seed in _SEEDS
    ]
    return jnp.stack(sums)


@jax.jit
def _tree_sums(tree: Any) -> Any:
    return jax.tree.map(_leaf_sums, tree)


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{"params/dense/kernel": "1f2e3d4c5b6a7988"}``: 16 hex digits per array leaf of
    ``tree`` (jax arrays on any mesh, or host numpy arrays: the same values either way).
    Evaluated at once even when called while a function is traced (a restore inside init)."""
    with jax.ensure_compile_time_eval():
        sums = _tree_sums(tree)
    leaves, _ = jax.tree_util.tree_flatten_with_path(sums)
    result = {}
    for path, value in leaves:
        if isinstance(value, jax.Array):
            value = value.addressable_data(0)  # replicated: readable on every process
        first, second = (int(v) for v in np.asarray(value))
        result[optim.path_string(path)] = f"{first:08x}{second:08x}"
    return result


def first_mismatch(expected: dict[str, str], tree: Any, prefix: str = "") -> str | None:
    """The path (``prefix`` + leaf path) of the first leaf of ``tree`` whose checksum is not
    the one in ``expected``, or that ``expected`` lacks; None when all match."""
    for path, value in tree_checksums(tree).items():
        if expected.get(prefix + path) != value:
            return prefix + path
    return None


def file_digests(directory: str, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """``{"state/_METADATA": [size, sha256 hex]}`` for every file under ``directory`` (paths
    relative to it, ``/``-separated), except files named in ``skip``."""
    digests = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            if name in skip:
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            digests[relative] = [os.path.getsize(path), fileio.file_sha256(path)]
    return dict(sorted(digests.items()))


def file_damage(directory: str, expected: dict[str, list]) -> str | None:
    """Why the files under ``directory`` differ from ``expected`` (``file_digests``): a missing
    folder or file, a different size (truncated) or content; None when all match."""
    for relative, (size, sha256) in expected.items():
        path = os.path.join(directory, *relative.split("/"))
        if not os.path.isfile(path):
            folder = relative.split("/")[0]
            if "/" in relative and not os.path.isdir(os.path.join(directory, folder)):
                return f"folder {folder} missing"
            return f"{relative} missing"
        actual = os.path.getsize(path)
        if actual != size:
            return (
                f"{relative} truncated ({actual} of {size} bytes)"
                if actual < size
                else (f"{relative} has {actual} bytes, expected {size}")
            )
        if fileio.file_sha256(path) != sha256:
            return f"{relative} does not match its checksum"
    return None


def inspect_step(directory: str) -> tuple[str | None, bool]:
    """``(why the step in directory is damaged or None, whether it carries checksums)``."""
    if os.path.isdir(directory) and not os.listdir(directory):
        return "the step folder is empty", False
    for name in (*STEP_METADATA, PROGRESS_JSON):
        try:
            read_json(os.path.join(directory, name))
        except FileNotFoundError:
            if name == PROGRESS_JSON and params_only(directory):
                return None, False  # a converted model: params alone, no checksums
            return f"{name} missing", False
        except (OSError, ValueError) as error:
            return f"{name} unreadable: {type(error).__name__}", False
    verified = CHECKSUMS in read_json(os.path.join(directory, PROGRESS_JSON))
    digests_path = os.path.join(directory, FILE_DIGESTS)
    if not os.path.isfile(digests_path):
        return (f"{FILE_DIGESTS} missing" if verified else None), False
    try:
        digests = read_json(digests_path)
        files = digests["files"]
        intact = digests["sha256"] == _text_digest(files)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{FILE_DIGESTS} unreadable: {type(error).__name__}", False
    if not intact:
        return f"{FILE_DIGESTS} does not match its checksum", False
    return file_damage(directory, files), verified


def params_only(directory: str) -> bool:
    """Whether the step holds only a ``state`` item (what the converter writes: no iterator
    position, no progress), as opposed to a training step that lost its progress."""
    return not any(os.path.exists(os.path.join(directory, n)) for n in ("progress", "data"))


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _text_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_file_digests(step_dir: str) -> None:
    """``file_digests.json`` of the files in ``step_dir`` (a step about to be renamed)."""
    _write_digests(step_dir, file_digests(step_dir, skip=UNDIGESTED))


def seal_step(step_dir: str) -> None:
    """Adds ``_CHECKPOINT_METADATA`` to the digests of a finished step (Orbax writes its
    commit time after the rename); a step whose run died before this keeps that file
    checked as JSON only."""
    path = os.path.join(step_dir, FILE_DIGESTS)
    if os.path.isfile(path):
        files = read_json(path)["files"]
        name = STEP_METADATA[0]
        files[name] = [
            os.path.getsize(os.path.join(step_dir, name)),
            fileio.file_sha256(os.path.join(step_dir, name)),
        ]
        _write_digests(step_dir, dict(sorted(files.items())))


def _write_digests(step_dir: str, files: dict) -> None:
    fileio.write_json(
        os.path.join(step_dir, FILE_DIGESTS), {"files": files, "sha256": _text_digest(files)}
    )


class StepDamaged(Exception):
    """Restored arrays differ from the checksums saved with them (the message: why)."""


def verify_arrays(progress: dict, tree: Any, prefix: str = "") -> None:
    """Raises StepDamaged when ``tree``'s arrays do not match ``progress``'s checksums
    (``prefix``: where ``tree`` sits in the saved state, ``"params/"`` for the params)."""
    if CHECKSUMS in progress:
        path = first_mismatch(progress[CHECKSUMS], tree, prefix)
        if path is not None:
            raise StepDamaged(f"checksum mismatch in {path}")


# One line for Orbax's errors.


def one_line_reason(error: BaseException) -> str:
    """One line for an error of Orbax / TensorStore reading a step (their messages can run to
    many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].split(" in OCDBT database")[0] if lines else type(error).__name__
    if text.startswith("OUT_OF_RANGE"):  # TensorStore read past the end of a blob
        text = "a data file is truncated: " + text
    return text if len(text) <= 160 else text[:157] + "..."


def quiet_orbax_reports() -> None:
    """After a failed read, Orbax's unfinished reads of the same step report themselves later,
    each with a traceback ("Event loop is closed", coroutines garbage-collected with their
    error): dozens of lines around the one warning that already says what happened. Installed
    before the first read (the reports can come before the error reaches us), it drops those
    two kinds of report and only them."""
    _quiet_orbax_errors()
    if getattr(sys, "_phraseldm_quiet_orbax", False):
        return
    sys._phraseldm_quiet_orbax = True
    previous = sys.unraisablehook

    def unraisable(report) -> None:
        code = getattr(report.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        if report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    sys.unraisablehook = unraisable


class _OrbaxErrorReports(logging.Filter):
    """Drops Orbax's ERROR reports (one traceback per writer thread: some 300 lines for a
    full disk), which CheckpointStore raises as one CheckpointSaveError line and readers
    report as one damage line; with absl at INFO (``--verbose``) they pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if logging.getLogger("absl").getEffectiveLevel() <= logging.INFO:
            return True
        return not _called_from_orbax()


def _called_from_orbax() -> bool:
    """Whether Orbax is on the calling stack (the record's own path names absl's module)."""
    frame = sys._getframe(1)
    while frame is not None:
        if f"{os.sep}orbax{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _quiet_orbax_errors() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrorReports) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxErrorReports())

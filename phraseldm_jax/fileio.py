"""Writing files whole or not at all: the one way every command writes its outputs.

A file is written under a temporary name in its own folder, flushed to disk (``fsync``) and
renamed onto its path (``os.replace``), so a reader sees the old file or the new one, never
half of one, and an interrupted write leaves the old file as it was. New files get the
permissions ``open()`` gives (0666 less the umask, i.e. 0644 under the usual umask 022) and
not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

PathLike = str | os.PathLike


def user_path(path: PathLike) -> str:
    """A path as a user gave it (relative to the working folder, ``~`` for the home folder)
    made absolute: Orbax and TensorStore take absolute paths only, and a path printed or saved
    in a summary then means the same thing from any folder."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def temporary_path(path: PathLike) -> str:
    """A fresh hidden name beside ``path`` that ends like it (writers that add a suffix, such as
    ``np.savez``, see the extension they expect)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)`` for a temporary file beside ``path``, syncs it and renames it
    onto ``path`` (creating the folder). On any error the temporary file is removed and
    ``path`` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself survives a crash once the folder is synced (not on every OS)
        _fsync(folder)
    except OSError:
        pass


def replace_folder(path: PathLike, build: Callable[[str], Any]) -> None:
    """Calls ``build(tmp)`` for a new empty folder beside ``path`` and puts it in ``path``'s
    place: an existing ``path`` is renamed aside, the new folder renamed onto ``path``, then the
    old one removed. On any error in ``build`` the new folder is removed and ``path`` is left as
    it was. A crash between the two renames leaves the old folder beside ``path`` as
    ``.old-<id>-<name>``. ``build`` writes its files with this module's writers."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    os.mkdir(tmp)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = os.path.join(folder, f".old-{uuid.uuid4().hex[:12]}-{name}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync(folder)
    except OSError:
        pass


def write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "xb") as f:
            f.write(data)

    atomic_write(path, write)


def json_text(value: Any, *, indent: int | None = 2, sort_keys: bool = True) -> str:
    """``value`` as JSON text ending in a newline (``default=str`` for anything else)."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys, default=str) + "\n"


def write_json(path: PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = True):
    """Writes ``value`` as JSON (indented, keys sorted by default) to ``path`` atomically."""
    write_text(path, json_text(value, indent=indent, sort_keys=sort_keys))


def read_json(path: PathLike) -> dict:
    """The JSON object in ``path``: FileNotFoundError if there is no file, ValueError (naming
    the file) if it is not JSON or not an object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoint and shipped-model digests)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""A data folder's datasets replaced as one set: built beside them, then swapped in.

``staged(data_dir)`` gives a fresh ``<data_dir>/incomplete.<pid>.<random>/`` to write every
entry of the new set into (``songs/``, ``phrases/``, ``bars/``, ``prepare_summary.json``);
readers never look there. When the block ends without error the set is published:

1. the files are flushed to disk and the folder is renamed ``ready.<pid>.<random>`` (the
   commit: from here the data folder's set is the new one);
2. entry by entry the old one moves into ``retired.<pid>.<random>/`` and the new one into
   ``<data_dir>/``;
3. the emptied ``ready.*`` and the ``retired.*`` folders are removed.

Readers resolve an entry with ``resolve``: from a ``ready.*`` folder while one still holds it,
else from ``<data_dir>``. So before the commit they see the whole old set and after it the
whole new set, also when a swap is killed halfway. ``recover`` (run by every build) finishes
such a swap and removes what killed builds left: ``retired.*``, and ``incomplete.*`` folders
whose build is gone (each build holds an ``flock`` on its folder's ``.owner`` file while it
runs, so two builds into one folder never remove each other's). Commits and recovery hold
``<data_dir>/.prepare.lock``. Every rename stays inside ``data_dir``: one filesystem, atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

INCOMPLETE = "incomplete."
READY = "ready."
RETIRED = "retired."
OWNER_FILE = ".owner"
LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def _data_dir_lock(data_dir: str) -> Iterator[None]:
    """Exclusive lock of ``data_dir`` for commits and recovery (waits for the holder)."""
    with open(os.path.join(data_dir, LOCK_FILE), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _entries(data_dir: str, prefix: str) -> list[str]:
    """Folders of ``data_dir`` named ``prefix...``, oldest first."""
    if not os.path.isdir(data_dir):
        return []
    found = []
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        if name.startswith(prefix):
            try:
                found.append((os.stat(path).st_mtime, path))
            except FileNotFoundError:
                continue  # gone meanwhile: a swap just finished
    return [path for _, path in sorted(found) if os.path.isdir(path)]


def resolve(data_dir: str, entry: str) -> str:
    """Where readers find ``entry`` of ``data_dir``'s current set (see the module docstring)."""
    data_dir = os.fspath(data_dir)
    for ready in reversed(_entries(data_dir, READY)):
        candidate = os.path.join(ready, entry)
        if os.path.lexists(candidate):
            return candidate
    return os.path.join(data_dir, entry)


def _fsync_tree(root: str) -> None:
    """Flushes every file and folder under ``root`` to disk (before the commit renames it)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _swap_in(data_dir: str, ready: str) -> None:
    """Moves each entry of ``ready`` into ``data_dir``, the old one aside; resumable."""
    retired = os.path.join(data_dir, RETIRED + os.path.basename(ready)[len(READY) :])
    os.makedirs(retired, exist_ok=True)
    for entry in sorted(os.listdir(ready)):
        if entry in (OWNER_FILE, LOCK_FILE):
            continue
        target = os.path.join(data_dir, entry)
        if os.path.lexists(target):
            os.rename(target, os.path.join(retired, entry))
        os.rename(os.path.join(ready, entry), target)
    _fsync_dir(data_dir)
    shutil.rmtree(ready)
    shutil.rmtree(retired)


def _owner_gone(folder: str) -> bool:
    """Whether the build that made ``folder`` has ended (its ``.owner`` lock is free)."""
    try:
        handle = open(os.path.join(folder, OWNER_FILE), "rb")
    except FileNotFoundError:
        return True  # staged() makes and locks it in one locked step: a foreign leftover
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _recover_locked(data_dir: str) -> list[str]:
    done = []
    for ready in _entries(data_dir, READY):
        _swap_in(data_dir, ready)
        done.append(f"finished the interrupted swap of {ready}")
    for retired in _entries(data_dir, RETIRED):
        shutil.rmtree(retired)
        done.append(f"removed {retired}")
    for incomplete in _entries(data_dir, INCOMPLETE):
        if _owner_gone(incomplete):
            shutil.rmtree(incomplete)
            done.append(f"removed the interrupted build {incomplete}")
    return done


def recover(data_dir: str) -> list[str]:
    """Finishes an interrupted swap and removes the leftovers of ended builds; returns one
    line per thing done. Folders of builds still running are kept."""
    if not os.path.isdir(data_dir):
        return []
    with _data_dir_lock(data_dir):
        return _recover_locked(data_dir)


def _take_ownership(folder: str):
    """Creates and locks ``folder/.owner`` (who builds here), kept locked until closed."""
    handle = open(os.path.join(folder, OWNER_FILE), "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    handle.write(json.dumps({**owner, "command": " ".join(sys.argv)}))
    handle.flush()
    return handle


@contextlib.contextmanager
def staged(data_dir: str) -> Iterator[str]:
    """A fresh folder beside ``data_dir``'s datasets to build the new set in (yielded);
    published as one when the block ends, removed when it raises."""
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with _data_dir_lock(data_dir):  # recovery never sees a folder not yet owned
        _recover_locked(data_dir)
        staging = tempfile.mkdtemp(prefix=f"{INCOMPLETE}{os.getpid()}.", dir=data_dir)
        owner = _take_ownership(staging)
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_tree(staging)
        with _data_dir_lock(data_dir):
            ready = os.path.join(data_dir, READY + os.path.basename(staging)[len(INCOMPLETE) :])
            os.rename(staging, ready)
            _fsync_dir(data_dir)
            _swap_in(data_dir, ready)
    finally:
        owner.close()

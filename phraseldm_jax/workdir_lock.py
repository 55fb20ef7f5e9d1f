"""One training per workdir: an exclusive ``flock`` on ``<workdir>/.lock`` for a whole run.

Two trainers writing one workdir would interleave their checkpoints and metrics.jsonl rows, so
process 0 of a run takes the lock before it writes anything there and holds it to the end; a
second trainer gets ``WorkdirBusyError`` naming the holder (the lock file holds its pid, host,
start time and command line as JSON). The kernel drops a ``flock`` when its holder dies, so
the lock of a killed run is taken over without a word. The file itself is never deleted (a
second process may already have it open). Nested ``hold`` calls of one process on one workdir
share the lock (``vae_task.train_and_test`` holds it around ``trainer.run`` and its test).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from phraseldm_jax import fileio
from phraseldm_jax.errors import WorkdirBusyError

LOCK_FILE = ".lock"
RECORD_KEYS = ("pid", "host", "started", "command")  # the lock file's JSON

_held: dict[str, list] = {}  # lock path -> [file descriptor, nesting depth] of this process


def lock_path(workdir: str) -> str:
    return os.path.join(fileio.user_path(workdir), LOCK_FILE)


def holder_record() -> dict:
    """What the lock file says about this process."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "command": " ".join(sys.argv),
    }


def read_holder(path: str, attempts: int = 20) -> dict:
    """The holder's record; retried briefly, since a holder that has just taken the lock may
    not have written it yet."""
    for _ in range(attempts):
        try:
            with open(path) as f:
                record = json.loads(f.read())
            if isinstance(record, dict) and "pid" in record:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def busy_message(workdir: str, holder: dict) -> str:
    """``<workdir> is in use by pid <pid> on <host> since <time> (<command>)``."""
    pid, host, started, command = (holder.get(k, "?") for k in RECORD_KEYS)
    return (
        f"{fileio.user_path(workdir)} is in use by pid {pid} on {host} since {started} ({command})"
    )


def _acquire(path: str, workdir: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirBusyError(busy_message(workdir, read_holder(path))) from None
    text = json.dumps(holder_record()) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds ``<workdir>/.lock`` exclusively for the ``with`` block (creating the workdir);
    raises ``WorkdirBusyError`` when another process holds it. ``enabled=False`` (processes
    other than 0 of a multi-process run) does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(fileio.user_path(workdir), exist_ok=True)
    path = lock_path(workdir)
    if path in _held:
        _held[path][1] += 1
    else:
        _held[path] = [_acquire(path, workdir), 1]
    try:
        yield
    finally:
        entry = _held[path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            os.ftruncate(entry[0], 0)  # no stale holder record once released
            os.close(entry[0])  # closing the last descriptor releases the flock

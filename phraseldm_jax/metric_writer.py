"""Training metrics to TensorBoard event files and ``metrics.jsonl`` (process 0 only).

In ``<workdir>``: ``tensorboard/events.out.tfevents.*`` (scalars, images, text) and
``metrics.jsonl`` (one JSON object per ``write`` call: ``{"step": 100, "train/loss": 1.23}``,
scalars and text only). ``config.json`` (the resolved config) is ``checkpointing``'s.
Other processes of a multi-host run get a writer that does nothing.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from phraseldm_jax import fileio

METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# Kept for the callers not yet switched to ``fileio.write_text`` (ldm_task, benchmarks).


def is_image(value: Any) -> bool:
    """``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4) arrays are logged as images."""
    return (
        isinstance(value, np.ndarray)
        and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4)))
        and value.shape[0] > 1
    )


def as_scalar(value: Any) -> float | None:
    """``float(value)`` for numbers and 0-d arrays, None for anything else."""
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        return float(value)
    return None


class MetricWriter:
    """Writes scalars, images and text for one run; a no-op on processes other than 0.

    ``resume_step``: the step the run continues from, the restored checkpoint's, or None (or
    0) for a run that starts afresh (no checkpoint restored). Rows after it, written by an
    interrupted run, are dropped from metrics.jsonl (all of them for a fresh start) and
    TensorBoard is told to purge them, so both show one history. Lines that are not JSON
    (a write cut short by a full disk or a power loss) are dropped with one warning line.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(os.fspath(workdir), METRICS_JSONL)
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        resume_step = resume_step or 0
        self._drop_rows_after(resume_step)
        from tensorboardX import SummaryWriter  # heavy import, only on the writing process

        self._tb = SummaryWriter(
            logdir=os.path.join(os.fspath(workdir), TENSORBOARD_DIR),
            purge_step=resume_step + 1,
            # A restart within the same second gets its own file, sorted after the last.
            filename_suffix=f".{time.time_ns() % 10**9:09d}",
        )
        self._tb._get_file_writer()  # writes the purge mark now, before the first row

    def _drop_rows_after(self, step: int) -> None:
        """Rewrites metrics.jsonl without rows past ``step`` and without unreadable lines."""
        if not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        rows = _parse_lines(self.jsonl_path, text.splitlines())
        kept = "".join(line + "\n" for line, row in rows if row.get("step", 0) <= step)
        if kept != text:
            fileio.write_text(self.jsonl_path, kept)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs every entry: numbers as scalars, image arrays as images, strings as text."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for name, value in metrics.items():
            scalar = as_scalar(value)
            if scalar is not None:
                self._tb.add_scalar(name, scalar, global_step=step)
                row[name] = scalar
            elif isinstance(value, str):
                self._tb.add_text(name, value, global_step=step)
                row[name] = value
            elif is_image(np.asarray(value)):
                image = np.asarray(value)
                self._tb.add_image(
                    name, image, global_step=step, dataformats="HW" if image.ndim == 2 else "HWC"
                )
            else:
                raise ValueError(
                    f"metric {name!r} at step {step}: cannot log a value of type "
                    f"{type(value).__name__} shape {np.shape(value)} (expected a number, a "
                    "string or an [H, W] / [H, W, C] image)"
                )
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(workdir: str) -> list[dict]:
    """All rows of ``<workdir>/metrics.jsonl`` (for tests, notebooks and result tables);
    lines that are not JSON objects are skipped with one warning line each."""
    path = os.path.join(os.fspath(workdir), METRICS_JSONL)
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    return [row for _, row in _parse_lines(path, lines)]


def _parse_lines(path: str, lines: list[str]) -> list[tuple[str, dict]]:
    """``(line, row)`` for the lines of ``path`` that are JSON rows; every other non-blank
    line: one warning line naming the file and the line number."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append((line, row))
        else:
            print(
                f"{path} line {number} is not a JSON row (a write cut short?); skipped it",
                file=sys.stderr,
                flush=True,
            )
    return rows

"""The non-finite guard of the training loop: which steps had a non-finite loss, gradient
or update (a flag the jitted step computes, ``FINITE``), what ``train.nonfinite`` does about
them ("stop" the run, or "skip" the update), and the logged means over the finite steps.

The loop screens every step before anything is saved, so a non-finite state never is.
"""

from __future__ import annotations

import math

import numpy as np

from phraseldm_jax.errors import NonFiniteError

# The per-step flag of the step's metrics: loss, gradient norm and updated params all finite.
# The loop reads it for every step and leaves it out of the logged means.
FINITE = "train/finite"
NONFINITE_POLICIES = ("stop", "skip")


def nonfinite_policy(tc) -> str:
    return tc.get("nonfinite", "stop")


def screen_steps(rows: list[dict], first_step: int, progress: dict, tc, last_good) -> None:
    """The non-finite guard over the fetched rows of steps ``first_step, first_step + 1, ...``.

    "stop": the first non-finite step raises ``NonFiniteError``. "skip": counts skipped steps
    into ``progress`` and raises once ``train.max_skipped_steps`` came in a row. Called for
    every step before anything is saved, so a non-finite state never is.
    """
    limit = int(tc.get("max_skipped_steps", 10))
    for step, row in enumerate(rows, start=first_step):
        if row[FINITE]:
            progress["skips_in_a_row"] = 0
            continue
        good = f"last good checkpoint {last_good}" if last_good else "no checkpoint saved yet"
        if nonfinite_policy(tc) == "stop":
            raise NonFiniteError(f"non-finite loss/gradients at step {step}; {good}")
        progress["skipped_steps"] += 1
        progress["skips_in_a_row"] += 1
        if progress["skips_in_a_row"] >= limit:
            raise NonFiniteError(
                f"non-finite loss/gradients at step {step} ({limit} steps in a row skipped, "
                f"train.max_skipped_steps={limit}); {good}"
            )


def window_means(rows: list[dict], count_skips: bool) -> dict[str, float]:
    """The logged row of one window: host means over its finite steps (skipped steps do not
    count) and, with ``count_skips``, ``train/skipped_steps`` (non-finite steps in it)."""
    finite = [row for row in rows if row[FINITE]]
    means = {}
    if finite:
        keys = [k for k in finite[0] if k != FINITE]
        means = {k: float(np.mean([row[k] for row in finite])) for k in keys}
    if count_skips:
        means["train/skipped_steps"] = float(len(rows) - len(finite))
    return means


def mean_loss(rows: list[dict]) -> float | None:
    """Mean train/loss of the finite rows (the lowest-loss checkpoint's measure), or None."""
    losses = [row["train/loss"] for row in rows if row[FINITE]]
    value = float(np.mean(losses)) if losses else math.nan
    return value if math.isfinite(value) else None

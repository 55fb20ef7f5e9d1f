"""Where a compiled step's time goes, from an XLA profile rather than from timing variants.

``profile_breakdown(compiled, call, steps)`` traces ``steps`` calls with ``jax.profiler``,
reads the trace back (``jax.profiler.ProfileData``), keeps the events named after instructions
of ``compiled``'s HLO, and sorts each instruction into a category by what it computes:

- ``dense_matmuls``: a dot without batch dimensions (the layers' weights);
- ``attention_products``: a dot with batch dimensions (q k^T and weights v per head), with
  whatever XLA fused into it (on CPU part of the softmax often is);
- ``softmax``: no dot, an exponential;
- ``dtype_converts``: no dot, a convert (bfloat16 in and out of the matmuls);
- ``copies_transposes``: no dot, a copy or transpose (layout changes);
- ``other``: the rest (norms, residuals, rotary, slices).

Event durations are summed per category and divided by ``steps``; ops that ran at the same
time on different cores are both counted, so the shares are of the summed op time.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

CATEGORIES = (
    "dense_matmuls",
    "attention_products",
    "softmax",
    "dtype_converts",
    "copies_transposes",
    "other",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


def _computations(hlo: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({instruction: its line}, {computation: its instruction lines}) of an HLO module."""
    lines, bodies, current = {}, collections.defaultdict(list), None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if match:
            lines[match.group(1)] = match.group(2)
            if current is not None:
                bodies[current].append(match.group(2))
    return lines, bodies


def _category(line: str, bodies: dict[str, list[str]]) -> str:
    called = re.search(r"calls=%([\w.\-]+)", line)
    text = "\n".join([line, *(bodies.get(called.group(1), []) if called else [])])
    dots = [t for t in text.splitlines() if " dot(" in t]
    if dots:
        return "attention_products" if any("lhs_batch_dims" in t for t in dots) else "dense_matmuls"
    if " exponential(" in text:
        return "softmax"
    if " convert(" in text:
        return "dtype_converts"
    if " copy(" in text or " transpose(" in text:
        return "copies_transposes"
    return "other"


def profile_breakdown(compiled: Any, call: Callable[[], Any], steps: int = 3) -> dict[str, Any]:
    """Seconds per step in each of ``CATEGORIES`` for ``call`` (which runs ``compiled`` once and
    blocks), and ``op_time_s``, their sum."""
    lines, bodies = _computations(compiled.as_text())
    call()  # warm
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                call()
        (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in lines:
                    category = _category(lines[event.name], bodies)
                    seconds[category] += event.duration_ns * 1e-9 / steps
    return {**seconds, "op_time_s": sum(seconds.values())}

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

``phases=True`` also sorts a training step's ops by the part of the step they belong to, read
from the JAX name stack XLA keeps in each op's metadata: ``random_bits`` (dropout masks and
other ``jax.random`` draws), ``backward`` (``transpose(jvp(...))``), ``forward`` (``jvp(...)``)
and ``update`` (the rest: optimiser, clipping, norms and metrics).
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
PHASES = ("forward", "backward", "random_bits", "update")
_RANDOM = re.compile(r"threefry|_bernoulli|_uniform|_normal|random_bits|rng_bit_generator|_gamma")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
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


def _phase(line: str, bodies: dict[str, list[str]]) -> str:
    """Which part of a training step an op belongs to (``PHASES``), from its name stack; a
    fusion that computes random bits anywhere in its body counts as ``random_bits``."""
    match = _OP_NAME.search(line)
    name = match.group(1) if match else ""
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = bodies.get(called.group(1), []) if called else []
    inner = " ".join(m.group(1) for b in body for m in [_OP_NAME.search(b)] if m)
    if _RANDOM.search(name) or _RANDOM.search(inner) or "rng-bit-generator(" in line:
        return "random_bits"
    if "transpose(jvp(" in name:
        return "backward"
    if "jvp(" in name:
        return "forward"
    return "update"


def profile_breakdown(
    compiled: Any, call: Callable[[], Any], steps: int = 3, phases: bool = False
) -> dict[str, Any]:
    """Seconds per step in each of ``CATEGORIES`` for ``call`` (which runs ``compiled`` once and
    blocks), and ``op_time_s``, their sum; with ``phases`` also ``phases``: seconds per step in
    each of ``PHASES``, each split by category."""
    lines, bodies = _computations(compiled.as_text())
    call()  # warm
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                call()
        (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    by_phase = {phase: dict.fromkeys(CATEGORIES, 0.0) for phase in PHASES}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in lines:
                    category = _category(lines[event.name], bodies)
                    duration = event.duration_ns * 1e-9 / steps
                    seconds[category] += duration
                    by_phase[_phase(lines[event.name], bodies)][category] += duration
    out = {**seconds, "op_time_s": sum(seconds.values())}
    if phases:
        out["phases"] = by_phase
    return out

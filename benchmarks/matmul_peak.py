"""Case (f): this machine's measured matmul peak and the DiT step's achieved FLOP/s, with a
breakdown of where the step's time goes.

Peak: a large square ``jnp.dot`` in float32 and bfloat16 (float32 accumulation), 2 N^3 FLOPs
per call; torch's float32 matmul of the same size for comparison. DiT step (paper size, batch
4, 512 slots): FLOPs from XLA's ``cost_analysis`` cross-checked with an analytic count (dense
layers applied per token + attention's two products), divided by the measured step time.

Breakdown of each step's time by what its XLA ops compute (dense matmuls, attention products,
softmax, dtype converts, copies, other), from a profile of the compiled step
(``benchmarks.op_profile``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, dit_step, op_profile


def matmul_peak(n: int, dtype, repeats: int) -> dict[str, float]:
    """FLOP/s of an n x n x n ``jnp.dot`` in ``dtype`` (float32 accumulation)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), dtype)
    b = jnp.asarray(rng.standard_normal((n, n)), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    compiled, _ = common.compile_twice(dot, a, b)
    timing, _ = common.time_calls(lambda: compiled(a, b).block_until_ready(), repeats)
    return {"n": n, "median_s": timing.median, "flops_per_s": 2 * n**3 / timing.median}


def torch_matmul_peak(n: int, repeats: int) -> dict[str, float]:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    timing, _ = common.time_calls(lambda: a @ b, repeats)
    return {"n": n, "median_s": timing.median, "flops_per_s": 2 * n**3 / timing.median}


def analytic_flops(params, config, batch: int, length: int) -> dict[str, float]:
    """FLOPs of one step of our DiT (length-conditioned, no context: cross-attention skipped):
    2 x in x out per token for every per-token dense kernel, plus 4 x T^2 x head_dim per head
    and block for the attention products. Per-song kernels (time, length) are negligible."""
    cfg = config.dit
    tokens = length + 1  # + the global token
    dense = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["dit"])[0]:
        names = [getattr(p, "key", "") for p in path]
        if names[-1] != "kernel" or names[0] in ("timestep_proj", "global_proj"):
            continue
        if "attn2" in names or names[0] == "cross_attention_proj":
            continue  # not run without a context
        dense += 2.0 * leaf.shape[0] * leaf.shape[1] * tokens
    attn = 4.0 * cfg.num_attention_heads * tokens**2 * cfg.attention_head_dim * cfg.num_layers
    return {"dense": batch * dense, "attention": batch * attn, "total": batch * (dense + attn)}


def run(opts: common.Options) -> dict[str, Any]:
    n = 256 if opts.quick else 2048
    peaks = {
        "jax_float32": matmul_peak(n, jnp.float32, opts.repeats),
        "jax_bfloat16": matmul_peak(n, jnp.bfloat16, opts.repeats),
        "torch_float32": torch_matmul_peak(n, opts.repeats),
    }
    pair = common.ldm_pair(opts.quick)
    batch, length = (1, 32) if opts.quick else (4, 512)
    x, t, n_bars = dit_step.inputs(batch, length)
    steps = {}
    for dtype in ("float32", "bfloat16"):
        step, params = dit_step.jax_step(pair, dtype)
        compiled, _ = common.compile_twice(step, params, x, t, n_bars)
        timing, _ = common.time_calls(
            lambda c=compiled, p=params: c(p, x, t, n_bars).block_until_ready(), opts.repeats
        )
        steps[dtype] = {
            "median_s": timing.median,
            "flops_xla": common.compiled_flops(compiled),
            "breakdown": op_profile.profile_breakdown(
                compiled, lambda c=compiled, p=params: c(p, x, t, n_bars).block_until_ready()
            ),
        }
    analytic = analytic_flops(pair.params, pair.config, batch, length)
    rows = []
    for dtype, peak in (("float32", "jax_float32"), ("bfloat16", "jax_bfloat16")):
        step = steps[dtype]
        achieved = analytic["total"] / step["median_s"]
        rows.append(
            {
                "dtype": dtype,
                "batch": batch,
                "step_s": step["median_s"],
                "flops_analytic": analytic["total"],
                "flops_xla": step["flops_xla"],
                "achieved_flops_per_s": achieved,
                "peak_flops_per_s": peaks[peak]["flops_per_s"],
                "fraction_of_peak": achieved / peaks[peak]["flops_per_s"],
            }
        )
    return {
        "peaks": peaks,
        "analytic_flops": analytic,
        "rows": rows,
        "breakdown": {dtype: step["breakdown"] for dtype, step in steps.items()},
        "table": table(peaks, rows, {dtype: step["breakdown"] for dtype, step in steps.items()}),
    }


def table(peaks: dict, rows: list[dict], parts: dict) -> str:
    peak_table = common.markdown_table(
        ["matmul", "n", "ms", "GFLOP/s"],
        [[k, v["n"], 1e3 * v["median_s"], v["flops_per_s"] / 1e9] for k, v in peaks.items()],
    )
    step_table = common.markdown_table(
        ["DiT step", "batch", "ms", "GFLOP (analytic)", "GFLOP (XLA)", "GFLOP/s", "of peak"],
        [
            [
                r["dtype"],
                r["batch"],
                1e3 * r["step_s"],
                r["flops_analytic"] / 1e9,
                r["flops_xla"] / 1e9,
                r["achieved_flops_per_s"] / 1e9,
                f"{100 * r['fraction_of_peak']:.0f}%",
            ]
            for r in rows
        ],
    )
    part_table = common.markdown_table(
        ["step time in (profile)", *(f"{d} ms" for d in parts), *(f"{d} share" for d in parts)],
        [
            [name]
            + [1e3 * parts[d][name] for d in parts]
            + [f"{100 * parts[d][name] / parts[d]['op_time_s']:.0f}%" for d in parts]
            for name in (*op_profile.CATEGORIES, "op_time_s")
        ],
    )
    return "\n\n".join([peak_table, step_table, part_table])

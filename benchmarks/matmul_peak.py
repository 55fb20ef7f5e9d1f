"""Case (f): this machine's measured matmul peak and the DiT step's achieved FLOP/s, with a
breakdown of where the step's time goes.

Peak: a large square ``jnp.dot`` in float32 and bfloat16 (float32 accumulation), 2 N^3 FLOPs
per call; torch's float32 matmul of the same size for comparison. DiT step (paper size, batch
4, 512 slots): FLOPs from XLA's ``cost_analysis`` cross-checked with an analytic count (dense
layers applied per token + attention's two products), divided by the measured step time.

Breakdown, by timing variants of the same shapes in isolation (one block, times the number of
blocks): the block's dense matmuls (fused qkv, attention out, SwiGLU in and out); the
self-attention core (``dit.self_attention``) split into its two matmuls alone and the rest
(scale, max, exp, sum, normalise: "softmax"); everything else in the step (rotary, layer
norms, SwiGLU gate, residuals, transposes: memory traffic) is the step minus those.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, dit_step
from phraseldm_jax import dit


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


def _time(fn, args, repeats) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    timing, _ = common.time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return timing.median


def breakdown(params, config, batch: int, length: int, step_s: float, repeats: int) -> dict:
    """Seconds per step spent in each part (see the module docstring), for float32."""
    cfg = config.dit
    block = params["dit"]["transformer_blocks_0"]
    tokens, heads, head_dim = length + 1, cfg.num_attention_heads, cfg.attention_head_dim
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((batch, tokens, cfg.inner_dim)), jnp.float32)
    kernels = [
        block["attn1"]["qkv"]["kernel"],
        block["attn1"]["out"]["kernel"],
        block["ff"]["proj_in"]["kernel"],
        block["ff"]["proj_out"]["kernel"],
    ]

    def dense_chain(h, qkv, out, ff_in, ff_out):
        a = jnp.dot(h, qkv)[..., : h.shape[-1]]
        b = jnp.dot(a, out)
        c = jnp.dot(b, ff_in)[..., : ff_out.shape[0]]
        return jnp.dot(c, ff_out)

    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, heads, tokens, head_dim)), jnp.float32)
        for _ in range(3)
    )

    def products_only(q, k, v):
        logits = jnp.einsum("bhtd,bhsd->bhts", q, k)
        return jnp.einsum("bhts,bhsd->bhtd", logits, v)

    layers = cfg.num_layers
    dense_s = layers * _time(dense_chain, (h, *kernels), repeats)
    attention_s = layers * _time(dit.self_attention, (q, k, v), repeats)
    products_s = layers * _time(products_only, (q, k, v), repeats)
    parts = {
        "dense_matmuls_s": dense_s,
        "attention_products_s": products_s,
        "softmax_and_attention_overhead_s": max(attention_s - products_s, 0.0),
        "rest_s": max(step_s - dense_s - attention_s, 0.0),
    }
    return {**parts, **{k[:-2] + "_fraction": v / step_s for k, v in parts.items()}}


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
        compiled, _ = common.compile_twice(
            dit_step.jax_step(pair.config, dtype), pair.params, x, t, n_bars
        )
        timing, _ = common.time_calls(
            lambda c=compiled: c(pair.params, x, t, n_bars).block_until_ready(), opts.repeats
        )
        steps[dtype] = {"median_s": timing.median, "flops_xla": common.compiled_flops(compiled)}
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
    parts = breakdown(
        pair.params,
        dataclasses.replace(pair.config),
        batch,
        length,
        steps["float32"]["median_s"],
        opts.repeats,
    )
    return {
        "peaks": peaks,
        "analytic_flops": analytic,
        "rows": rows,
        "breakdown_float32": parts,
        "table": table(peaks, rows, parts),
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
    names = ("dense_matmuls", "attention_products", "softmax_and_attention_overhead", "rest")
    part_table = common.markdown_table(
        ["float32 step time in", "ms", "share"],
        [[k, 1e3 * parts[k + "_s"], f"{100 * parts[k + '_fraction']:.0f}%"] for k in names],
    )
    return "\n\n".join([peak_table, step_table, part_table])

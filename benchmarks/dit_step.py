"""Case (a): one DiT denoising step of whole songs (512 slots), ours vs the torch reference.

Ours: the jitted ``PhraseLDM.apply`` (length-conditioned, context None so the cross-attention
is skipped: it would add exactly 0) in float32 and bfloat16 compute, the bfloat16 matmul kernels
cast once beforehand (``ldm.inference_params``) as the sampler does. Reference: diffusers'
``StableAudioDiTModel`` inside ``ReferencePhraseLDM.predict_noise`` (which, like the original,
runs the cross-attention on 7 zero context tokens) in float32 and under CPU bfloat16
autocast. Throughput is song-steps/s = batch / seconds per step. The four take turns call by
call (``common.time_interleaved``) so that the machine's speed drifting moves all alike.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from phraseldm_jax.phrases import SLOTS_PER_BAR


def inputs(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x [batch, length, 64] float32, t [batch] int32, n_bars [batch] int32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, 64), dtype=np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)
    n_bars = rng.integers(1, length // SLOTS_PER_BAR + 1, batch).astype(np.int32)
    return x, t, n_bars


def jax_step(pair: common.LdmPair, dtype: str):
    """(jit((params, x, t, n_bars) -> eps), params) of ``pair`` with compute ``dtype``; the
    params hold the matmul kernels in ``dtype`` (``ldm.inference_params``), as the sampler
    casts them once rather than at every step."""
    from phraseldm_jax import ldm

    config = ldm.with_compute_dtype(pair.config, dtype)
    model = ldm.PhraseLDM(config)
    params = jax.device_put(ldm.inference_params(pair.params, config))
    return jax.jit(lambda p, x, t, n: model.apply({"params": p}, x, t, n)), params


def our_sides(batch: int) -> list[tuple[str, list]]:
    """(row label, devices) of our step: on one device and, when there are several local
    devices (``sharding.use_cpu_cores`` on CPU), with the songs split over as many of them as
    divide the batch, as ``sampler.LatentSampler`` runs them over a mesh."""
    devices = jax.local_devices()
    sides = [("ours (jax)", devices[:1])]
    split = math.gcd(batch, len(devices))
    if split > 1:
        sides.append((f"ours (jax), {split} devices", devices[:split]))
    return sides


def place(params, arrays, devices):
    """(params replicated on ``devices``, arrays split over them along the batch)."""
    if len(devices) == 1:
        return jax.device_put(params, devices[0]), [jax.device_put(a, devices[0]) for a in arrays]
    mesh = Mesh(np.array(devices), ("songs",))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return params, [jax.device_put(a, NamedSharding(mesh, P("songs"))) for a in arrays]


def torch_step(torch_model, x, t, n_bars, bf16: bool):
    """A callable running the reference once (bf16: under ``torch.autocast``)."""
    import torch

    x, t, n_bars = torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(n_bars).long()

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return common.torch_ldm_forward(torch_model, x, t, n_bars).numpy()

    return run


def run(opts: common.Options) -> dict[str, Any]:
    pair = common.ldm_pair(opts.quick)
    length = 32 if opts.quick else 512
    batches = (1, 2) if opts.quick else (1, 4, 16)
    rows = []
    for batch in batches:
        x, t, n_bars = inputs(batch, length)
        repeats = max(2, opts.repeats // 2) if batch >= 16 else opts.repeats
        reference = torch_step(pair.torch_model, x, t, n_bars, False)()
        checked = pair.torch_model.predict_noise(x, t, n_bars)
        if not np.allclose(reference, checked, atol=1e-5):
            raise AssertionError("torch_ldm_forward differs from ReferencePhraseLDM.predict_noise")
        calls, fields = {}, {}
        for dtype in ("float32", "bfloat16"):
            for side, devices in our_sides(batch):
                step, params = jax_step(pair, dtype)
                params, args = place(params, (x, t, n_bars), devices)
                compiled, compile_times = common.compile_twice(step, params, *args)

                def call(compiled=compiled, params=params, args=args):
                    return compiled(params, *args).block_until_ready()

                calls[(side, dtype)] = call
                fields[(side, dtype)] = {
                    "devices": len(devices),
                    "max_abs_diff_vs_torch_f32": float(
                        np.abs(np.asarray(call()) - reference).max()
                    ),
                    "flops_xla": common.compiled_flops(compiled),
                    **compile_times,
                    **common.compiled_memory_mib(compiled),
                }
        for bf16 in (False, True):
            name = "bfloat16 autocast" if bf16 else "float32"
            step = torch_step(pair.torch_model, x, t, n_bars, bf16)
            try:
                step()
            except RuntimeError as err:  # autocast op not supported on this CPU build
                rows.append({"side": "torch", "dtype": name, "batch": batch, "error": str(err)})
                continue
            calls[("torch", name)], fields[("torch", name)] = step, {}
        timings = common.time_interleaved(calls, repeats)
        for (side, dtype), (timing, rss) in timings.items():
            rows.append(
                {
                    "side": side,
                    "dtype": dtype,
                    "batch": batch,
                    **timing.as_dict(),
                    "song_steps_per_s": batch / timing.median,
                    **fields[(side, dtype)],
                    "rss_delta_mib": rss,
                }
            )
    for row in rows:
        base = next(
            r
            for r in rows
            if r["side"] == "torch" and r["dtype"] == "float32" and r["batch"] == row["batch"]
        )
        if "median_s" in row:
            row["speedup_vs_torch_f32"] = base["median_s"] / row["median_s"]
    return {
        "length": length,
        "num_params": pair.num_params,
        "timing": "ours and torch take turns (common.time_interleaved); bfloat16 kernels cast "
        "once (ldm.inference_params), as the sampler does",
        "rows": rows,
        "table": table(rows),
    }


def table(rows: list[dict]) -> str:
    return common.markdown_table(
        [
            "side",
            "dtype",
            "batch",
            "ms/step",
            "song-steps/s",
            "x torch f32",
            "compile s",
            "cached compile s",
            "XLA peak MiB",
            "RSS +MiB",
        ],
        [
            [
                r["side"],
                r["dtype"],
                r["batch"],
                1e3 * r.get("median_s", float("nan")),
                r.get("song_steps_per_s", float("nan")),
                r.get("speedup_vs_torch_f32", float("nan")),
                r.get("compile_s", "-"),
                r.get("compile_cached_s", "-"),
                r.get("peak_mib", "-"),
                r.get("rss_delta_mib", float("nan")),
            ]
            for r in rows
        ],
    )

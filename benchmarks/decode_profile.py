"""Milliseconds per step of our PhraseVAE greedy decoder against the batch size (diagnostic).

The paper-size PhraseVAE (random init), every row live for all ``--max_length`` positions
([EOS] suppressed), for each compute dtype: how a step's cost grows with the rows decoded
together (docs/DECODING.md reads it). The side-by-side comparison with Hugging Face
``generate`` (uniform and real-song workloads, float32 and bfloat16 matmuls, token agreement)
is the ``vae_decoding`` case of ``python -m benchmarks.run``.

    flock /work/heavy.lock python -m benchmarks.decode_profile --batches 64,256,512
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from benchmarks import common
from phraseldm_jax import decoding


def step_profile(params, config, batches, dtypes, max_length: int, repeats: int) -> dict:
    """{f"{dtype} batch {n}": ms per step} (fastest of ``repeats`` decodes after a warm-up)."""
    out = {}
    for dtype in dtypes:
        for batch in batches:
            latents = np.random.default_rng(1).standard_normal((batch, config.latent_dim))
            decode = functools.partial(
                decoding.greedy_decode,
                params,
                config,
                latents.astype(np.float32),
                max_length=max_length,
                suppress_eos=True,
                compute_dtype=dtype,
            )
            timing, _ = common.time_calls(decode, repeats)
            key = f"{dtype} batch {batch}"
            out[key] = 1e3 * timing.min / (max_length - 1)
            print(f"  {dtype:9s} batch {batch:4d}: {out[key]:7.2f} ms/step", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,256,512", help="comma-separated row counts")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    pair = common.vae_pair(quick=False)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"per step, paper-size PhraseVAE, {args.max_length} positions, all rows live:")
    result = {
        "machine": common.machine_info(),
        "step_ms": step_profile(
            pair.params, pair.config, batches, args.dtypes.split(","), args.max_length, args.repeats
        ),
    }
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

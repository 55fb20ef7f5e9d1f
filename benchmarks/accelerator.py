"""The training-step and sampling benchmarks on a GPU or TPU, their JSON kept for docs/.

  python -m benchmarks.accelerator                 # on a machine whose JAX sees a GPU / TPU
  python -m benchmarks.accelerator --repeats 3 --out_dir /tmp/acc

Runs ``benchmarks.run`` (cases train_step, dit_step, song_generation, vae_decoding and
matmul_peak: ours on the accelerator, the PyTorch side where torch runs) and
``benchmarks.train_profile`` (step time, MFU against the measured matmul peak, where the time
goes) with the same code and switches as on CPU; the one per-backend choice in the models
(attention through ``jax.nn.dot_product_attention`` off CPU) is made in ``dit.self_attention``.
Writes ``<out_dir>/accelerator_<platform>_<device kind>.json`` and
``..._train_profile.json``. On a CPU-only machine it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

CASES = "train_step,dit_step,song_generation,vae_decoding,matmul_peak"


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import common

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls (default: %(default)s)")
    default_dir = os.path.join(common.REPO_ROOT, "benchmarks", "results")
    p.add_argument("--out_dir", default=default_dir, help="JSON folder (default: %(default)s)")
    args = p.parse_args(argv)
    import jax

    platform = jax.default_backend()
    if platform == "cpu":
        print(
            "benchmarks.accelerator: JAX sees no GPU or TPU here (backend cpu); "
            "run python -m benchmarks.run for the CPU figures",
            file=sys.stderr,
        )
        return 2
    kind = re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")
    out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"accelerator_{platform}_{kind}")
    from benchmarks import run, train_profile

    repeats = str(args.repeats)
    status = run.main(["--cases", CASES, "--repeats", repeats, "--cpu_devices", "1",
                       "--out", stem + ".json"])  # fmt: skip
    status |= train_profile.main(["--repeats", repeats, "--out", stem + "_train_profile.json"])
    return status


if __name__ == "__main__":
    sys.exit(main())

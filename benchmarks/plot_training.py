"""Learning curves of training workdirs as one PNG (docs/), from their ``metrics.jsonl``.

  python -m benchmarks.plot_training --out docs/pop909_small_training.png \\
      --run "VAE stage 2=runs/vae_small_stage2" --run "VAE stage 3=runs/vae_small_stage3" \\
      --metric eval/f1_op --metric eval/f1_opd --metric train/loss

One panel per metric; each run is a line in every panel where it logged that metric. Runs
chained one after another (VAE stages) can share a step axis with ``--chain``: each run's
steps then start where the previous run's ended.
"""

from __future__ import annotations

import argparse
import os
import sys

from phraseldm_jax import fileio, metric_writer


def curves(workdir: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in ``workdir``'s metrics.jsonl, in step order."""
    rows = [r for r in metric_writer.read_jsonl(workdir) if isinstance(r.get(metric), float)]
    rows.sort(key=lambda r: r["step"])
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]


def plot(runs: list[tuple[str, str]], metrics: list[str], out: str, chain: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    offsets, offset = {}, 0
    for label, workdir in runs:
        offsets[label] = offset if chain else 0
        steps = [int(r["step"]) for r in metric_writer.read_jsonl(workdir) if "step" in r]
        offset += max(steps, default=0)
    for ax, metric in zip(axes[0], metrics):
        for label, workdir in runs:
            steps, values = curves(workdir, metric)
            if steps:
                ax.plot([s + offsets[label] for s in steps], values, label=label, marker=".")
        ax.set_title(metric)
        ax.set_xlabel("step" + (" (stages chained)" if chain else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot_training",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR")
    parser.add_argument("--metric", action="append", required=True, help="e.g. eval/f1_op")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--chain", action="store_true", help="runs follow each other")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.run:
        label, sep, workdir = spec.partition("=")
        workdir = fileio.user_path(workdir)
        if not sep or not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
            parser.error(f"--run {spec}: expected LABEL=WORKDIR with a metrics.jsonl")
        runs.append((label, workdir))
    plot(runs, args.metric, fileio.user_path(args.out), args.chain)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

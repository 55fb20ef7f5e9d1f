"""Statistical training parity with dropout on (``python -m benchmarks.train_parity
--statistical``): several seeds of the same run on each side, and whether our loss curve lies
within the seed-to-seed spread of the original's.

Every run of a case starts from the same weights (our init of ``--init_seed``, moved to torch
by the converter) and sees the same real POP909 batches in the same order; only the training
randomness differs, drawn by each side its own way: ours from the run key
``run_key(seed)`` (the trainer's for ``train.seed = seed``) through the trainer's real loss (``vae_task.make_loss_fn``,
``ldm_task.make_ldm_task``: T5 dropout 0.1, the stage-3 eps, the LDM's timesteps and noise),
torch's from ``torch.manual_seed(seed)`` (T5 dropout in ``train()``, ``torch.randn`` eps,
``torch.randint`` timesteps, ``torch.randn`` noise). So the spread measured is the
training-noise spread. Curves are smoothed with a trailing moving mean (``--window`` steps);
``spread_report`` gives the original's spread and our mean's distance from its mean.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from benchmarks import common
from benchmarks import train_parity as tp

STATISTICAL_CASES = ("vae_stage3", "ldm_lencond")
# As the exact comparison's (``train_parity.COMPAT_SWITCHES``), but dropout as configured.
STATISTICAL_SWITCHES = {
    "vae": {"model.t5.dropout_rate": "0.1 (the config's) on both sides"},
    "ldm": tp.COMPAT_SWITCHES["ldm"],
}


# --------------------------------------------------------------------------------------------
# The statistics.


def moving_mean(curves: np.ndarray, window: int) -> np.ndarray:
    """[runs, steps - window + 1]: the trailing ``window``-step mean of each row of
    ``curves`` [runs, steps] (point i averages steps i .. i + window - 1)."""
    curves = np.asarray(curves, np.float64)
    if not 1 <= window <= curves.shape[1]:
        raise ValueError(f"window {window} must be in [1, {curves.shape[1]}] (the curve length)")
    sums = np.cumsum(np.pad(curves, ((0, 0), (1, 0))), axis=1)
    return (sums[:, window:] - sums[:, :-window]) / window


def spread_report(ours: np.ndarray, reference: np.ndarray, window: int) -> dict:
    """How our mean curve sits in the reference's seed spread, after smoothing both sides'
    curves [seeds, steps] over ``window`` steps.

    ``reference_std_*``: the reference's across-seed std (ddof 1) per point, its mean / min /
    max over the curve; ``reference_envelope_width_mean``: the mean min-max width;
    ``distance_{max,mean}_std``: |our mean - reference mean| in units of that point's std;
    ``distance_mean_over_std_mean``: mean |our mean - reference mean| / mean std (robust to
    points where few seeds happen to agree); ``inside_envelope_share``: the share of points
    where our mean lies within the reference's min-max envelope. ``final``: both means and the std at the last point."""
    if len(reference) < 2:
        raise ValueError("the reference needs at least 2 seeds for a spread")
    ours_s, ref_s = moving_mean(ours, window), moving_mean(reference, window)
    ours_mean, ref_mean = ours_s.mean(0), ref_s.mean(0)
    ref_std = ref_s.std(0, ddof=1)
    lo, hi = ref_s.min(0), ref_s.max(0)
    distance = np.abs(ours_mean - ref_mean) / np.maximum(ref_std, 1e-12)
    return {
        "window": window,
        "points": int(ref_mean.size),
        "seeds": {"ours": len(ours), "reference": len(reference)},
        "reference_std_mean": float(ref_std.mean()),
        "reference_std_min": float(ref_std.min()),
        "reference_std_max": float(ref_std.max()),
        "reference_envelope_width_mean": float((hi - lo).mean()),
        "distance_max_std": float(distance.max()),
        "distance_mean_std": float(distance.mean()),
        "distance_mean_over_std_mean": float(
            np.abs(ours_mean - ref_mean).mean() / max(ref_std.mean(), 1e-12)
        ),
        "signed_mean_std": float(((ours_mean - ref_mean) / np.maximum(ref_std, 1e-12)).mean()),
        "inside_envelope_share": float(np.mean((ours_mean >= lo) & (ours_mean <= hi))),
        "final": {
            "ours_mean": float(ours_mean[-1]),
            "reference_mean": float(ref_mean[-1]),
            "reference_std": float(ref_std[-1]),
        },
    }


def equal_runs_expectations(seeds_ours: int, seeds_reference: int, draws: int = 200_000) -> dict:
    """What ``spread_report``'s numbers average to if both sides' runs were draws of one
    distribution (a point's smoothed losses iid normal): the scale to read them against.

    |mean_a - mean_b| has mean sigma sqrt(2 / pi) sqrt(1 / a + 1 / b); it is independent of
    the reference's sample std s (normal samples), so ``distance_mean_std`` averages that
    times E[sigma / s] (infinite below 3 reference seeds) and ``distance_mean_over_std_mean``
    that over E[s / sigma]; ``inside_envelope_share`` by simulation (``draws``, seed 0)."""
    k = seeds_reference - 1
    abs_diff = np.sqrt(2 / np.pi) * np.sqrt(1 / seeds_ours + 1 / seeds_reference)
    mean_s = np.sqrt(2 / k) * np.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))
    inv_s = (
        np.sqrt(k / 2) * np.exp(math.lgamma((k - 1) / 2) - math.lgamma(k / 2)) if k >= 2 else np.inf
    )
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((draws, seeds_ours)).mean(1)
    ref = rng.standard_normal((draws, seeds_reference))
    inside = (ours >= ref.min(1)) & (ours <= ref.max(1))
    return {
        "distance_mean_std": float(abs_diff * inv_s),
        "distance_mean_over_std_mean": float(abs_diff / mean_s),
        "inside_envelope_share": float(inside.mean()),
    }


def analyse(result: dict, window: int) -> dict:
    """``result`` (a case's ``ours`` / ``torch`` curves) with its ``spread_report`` (torch as
    the reference), the same with the sides swapped, and the equal-runs expectations."""
    ours, theirs = np.asarray(result["ours"]), np.asarray(result["torch"])
    result["ours_vs_torch"] = spread_report(ours, theirs, window)
    result["torch_vs_ours"] = spread_report(theirs, ours, window)
    result["equal_runs"] = equal_runs_expectations(len(ours), len(theirs))
    result.pop("expected_distance_std", None)  # an earlier name
    return result


# --------------------------------------------------------------------------------------------
# The runs.


def run_key(seed: int) -> jax.Array:
    """``trainer.init_train_state``'s run key for ``train.seed = seed`` (threefry, as in
    training)."""
    return jax.random.split(jax.random.PRNGKey(seed))[1]


def _our_runs(task, config, params, batches: Sequence[dict], seeds: Sequence[int]) -> list:
    """Our loss curve per seed: the trainer's jitted step from ``params`` with the run key
    ``trainer.init_train_state`` derives from ``train.seed = seed``."""
    from phraseldm_jax import optim, trainer

    tx, lr_fn = optim.make_optimizer(config.optim, int(config.train.num_steps))
    step_fn = jax.jit(trainer.make_train_step(task, tx, lr_fn))
    batches = [jax.device_put(b) for b in batches]
    curves = []
    for seed in seeds:
        state = trainer.TrainState(
            step=np.int32(0), params=params, opt_state=tx.init(params), rng=run_key(seed)
        )
        state = jax.device_put(state)
        losses = []
        for batch in batches:
            state, metrics = step_fn(state, batch, None)
            losses.append(metrics["train/loss"])
        curves.append([float(x) for x in jax.device_get(losses)])
    return curves


def _torch_runs(model, make_optimizer, clip: float, losses: Sequence, seeds) -> list:
    """Torch's loss curve per seed: ``model`` from its initial weights in ``train()``, a fresh
    optimiser, ``torch.manual_seed(seed)``; ``losses[i]()`` is step i's loss closure."""
    import torch

    _, ttr, _ = tp._modules()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curves = []
    for seed in seeds:
        model.load_state_dict(initial)
        model.train()
        trainer_t = ttr.Trainer(model, make_optimizer(model), clip)
        torch.manual_seed(seed)
        curves.append([trainer_t.step(loss)[0] for loss in losses])
    model.load_state_dict(initial)
    return curves


def _vae_batches(stage: int, setup, songs, batch_size: int, steps: int, data_seed: int):
    """(ours, torch's) batch lists: the same POP909 lines per step (ours padded to one width,
    so one compile)."""
    from input_pipeline import batching, records, vae_pipeline

    _, ttr, _ = tp._modules()
    lines = [line["text"] for song in songs for line in records.phrase_lines(song)]
    q = setup.model_cfg.n_query_tokens
    max_length = int(setup.config.data.max_length)
    rng = np.random.default_rng(data_seed)
    picks = [rng.choice(len(lines), batch_size, replace=False) for _ in range(steps)]
    encoded = [
        [
            vae_pipeline.encode_example(
                {"text": lines[i]}, record_index=int(i), n_query_tokens=q, span_mask=False,
                max_length=max_length, seed=data_seed, epoch=0,
            )
            for i in rows
        ]
        for rows in picks
    ]  # fmt: skip
    width = max(len(e["input_ids"]) for batch in encoded for e in batch)
    width = min(max_length, -(-width // 8) * 8)
    ours = [
        batching.pad_batch(
            b, length=width, batch_size=batch_size, filler=vae_pipeline.filler_example(q)
        )
        for b in encoded
    ]
    theirs = [ttr.vae_batch([lines[i] for i in rows], stage) for rows in picks]
    return ours, theirs, width


def vae_case(stage, size, songs, *, batch_size, steps, seeds, init_seed, data_seed) -> dict:
    """Stage-``stage`` PhraseVAE curves of both sides, T5 dropout as the config says."""
    import torch

    from configs import vae_common
    from phraseldm_jax import trainer, vae_task

    _, ttr, _ = tp._modules()
    dropout = float(vae_common.vae_config(stage).model.t5.dropout_rate)
    setup = tp.vae_setup(stage, size, init_seed, dropout_rate=dropout)
    torch_dropout = setup.torch_model.t5.config.dropout_rate
    if torch_dropout != dropout:
        raise ValueError(f"torch T5 dropout {torch_dropout} != our config's {dropout}")
    ours_b, theirs_b, width = _vae_batches(stage, setup, songs, batch_size, steps, data_seed)
    task = trainer.Task("stat_vae", None, vae_task.make_loss_fn(setup.config))
    start = time.perf_counter()
    ours = _our_runs(task, setup.config, setup.params, ours_b, seeds)
    ours_s = time.perf_counter() - start
    model, latent_dim = setup.torch_model, setup.model_cfg.latent_dim

    def loss_closure(batch):
        def loss():
            eps = torch.randn(len(batch["input_ids"]), latent_dim) if stage == 3 else None
            return model.training_loss(batch, eps)

        return loss

    start = time.perf_counter()
    theirs = _torch_runs(
        model,
        lambda m: ttr.vae_optimizer(stage, m),
        0.0,
        [loss_closure(b) for b in theirs_b],
        seeds,
    )
    return {
        "ours": ours,
        "torch": theirs,
        "dropout_rate": dropout,
        "pad_width": width,
        "wall_s": {"ours": ours_s, "torch": time.perf_counter() - start},
    }


def ldm_case(variant, size, songs, *, batch_size, steps, seeds, init_seed, data_seed) -> dict:
    """PhraseLDM ``variant`` curves of both sides (the compatibility switches on)."""
    import torch

    from input_pipeline import ldm_pipeline
    from phraseldm_jax import ldm_task

    _, ttr, _ = tp._modules()
    setup = tp.ldm_setup(variant, size, songs, init_seed)
    setup.config.train.eval_every = 0  # the loss alone
    task = ldm_task.make_ldm_task(setup.config)
    stats, songs_l = setup.stats, setup.latent_songs
    encoding = ldm_pipeline.song_encoding(stats, reference_padding=True)
    rng = np.random.default_rng(data_seed)
    ours_b, closures = [], []
    model, n_steps = setup.torch_model, setup.cfg.diffusion_steps
    for _ in range(steps):
        picked = rng.choice(len(songs_l), batch_size, replace=len(songs_l) < batch_size)
        examples = [ldm_pipeline.encode_record(songs_l[i], int(i), encoding) for i in picked]
        ours_b.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
        chosen = [songs_l[i] for i in picked]
        x0 = ttr.ldm_latents(
            [s["latents"] for s in chosen],
            stats["scale_factor"],
            stats["sep_latent"],
            encoding.max_rows,
        )
        n_bars = torch.tensor([len(s["latents"]) // 4 for s in chosen])
        plans = [s["section_plan"] for s in chosen]

        def loss(x0=x0, n_bars=n_bars, plans=plans):
            t = torch.randint(0, n_steps, (len(x0),))
            return ttr.ldm_training_loss(model, x0, t, torch.randn(x0.shape), n_bars, plans)

        closures.append(loss)
    start = time.perf_counter()
    ours = _our_runs(task, setup.config, setup.params, ours_b, seeds)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = _torch_runs(model, ttr.ldm_optimizer, ttr.LDM_CLIP, closures, seeds)
    return {
        "ours": ours,
        "torch": theirs,
        "dropout_rate": 0.0,  # the small DiT and the length encoder have no dropout
        "wall_s": {"ours": ours_s, "torch": time.perf_counter() - start},
    }


# --------------------------------------------------------------------------------------------
# Command.


def run_statistical_case(case: str, songs, args) -> dict:
    """Both sides' curves of ``case``, ``analyse``d."""
    seeds = list(range(args.seeds))
    common_args = dict(steps=args.steps, seeds=seeds, init_seed=args.init_seed, data_seed=0)
    if case.startswith("vae_stage"):
        result = vae_case(
            int(case[-1]), args.sizes, songs, batch_size=args.vae_batch, **common_args
        )
    else:
        result = ldm_case(case, args.sizes, songs, batch_size=args.ldm_batch, **common_args)
    analyse(result, args.window)
    result.update(size=args.sizes, steps=args.steps, seeds=seeds)
    result["batch_size"] = args.vae_batch if case.startswith("vae") else args.ldm_batch
    return result


def table(results: Mapping[str, Mapping]) -> str:
    """One row per case; "(equal: x)" is what equal distributions would average to."""
    header = [
        "case", "seeds (ours/torch)", "torch std: mean (min-max)", "torch envelope width",
        "distance / point's std: mean, max", "distance / mean std", "inside torch envelope",
        "signed (std)", "swapped sides: distance / mean std, inside", "final loss ours / torch",
    ]  # fmt: skip
    rows = []
    for case, r in results.items():
        a, b = r["ours_vs_torch"], r["torch_vs_ours"]
        e = equal_runs_expectations(a["seeds"]["ours"], a["seeds"]["reference"])
        rows.append([
            case, f"{a['seeds']['ours']}/{a['seeds']['reference']}",
            f"{a['reference_std_mean']:.4f} ({a['reference_std_min']:.4f}-{a['reference_std_max']:.4f})",
            f"{a['reference_envelope_width_mean']:.4f}",
            f"{a['distance_mean_std']:.2f} (equal: {e['distance_mean_std']:.2f}), {a['distance_max_std']:.1f}",
            f"{a['distance_mean_over_std_mean']:.2f} (equal: {e['distance_mean_over_std_mean']:.2f})",
            f"{100 * a['inside_envelope_share']:.0f}% (equal: {100 * e['inside_envelope_share']:.0f}%)",
            f"{a['signed_mean_std']:+.2f}",
            f"{b['distance_mean_over_std_mean']:.2f}, {100 * b['inside_envelope_share']:.0f}%",
            f"{a['final']['ours_mean']:.4f} / {a['final']['reference_mean']:.4f}",
        ])  # fmt: skip
    return common.markdown_table(header, rows)


def plot(results: Mapping[str, Mapping], window: int, path: str) -> None:
    """Per case, three panels over the smoothed curves: both sides' means (the loss falls
    too far for the spread to show); every seed's deviation from torch's mean with torch's
    min-max envelope; our mean's distance from torch's in units of torch's std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        3, len(results), figsize=(6 * len(results), 9), squeeze=False,
        gridspec_kw={"height_ratios": [1.3, 2.2, 1.1]}, sharex="col",
    )  # fmt: skip
    for col, (case, r) in enumerate(results.items()):
        ours = moving_mean(np.asarray(r["ours"]), window)
        theirs = moving_mean(np.asarray(r["torch"]), window)
        x = np.arange(window, window + ours.shape[1])
        center = theirs.mean(0)
        curves, spread, distance = axes[0, col], axes[1, col], axes[2, col]
        curves.plot(x, center, color="tab:orange", lw=1.4, label="torch mean")
        curves.plot(x, ours.mean(0), color="tab:blue", lw=1.0, ls="--", label="ours mean")
        curves.set_yscale("log")
        curves.set_ylabel(f"loss ({window}-step mean)")
        curves.legend(fontsize=8)
        report = r["ours_vs_torch"]
        curves.set_title(
            f"{case} ({r['size']}, batch {r['batch_size']}, {len(r['ours'])}+{len(r['torch'])}"
            f" seeds)\ninside envelope {100 * report['inside_envelope_share']:.0f}%, distance"
            f" mean {report['distance_mean_std']:.2f} / max {report['distance_max_std']:.2f} std"
        )
        spread.fill_between(x, theirs.min(0) - center, theirs.max(0) - center,
                            color="tab:orange", alpha=0.25, label="torch min-max")  # fmt: skip
        for i, curve in enumerate(theirs):
            spread.plot(x, curve - center, color="tab:orange", lw=0.6,
                        label="torch seeds" if i == 0 else None)  # fmt: skip
        for i, curve in enumerate(ours):
            spread.plot(x, curve - center, color="tab:blue", lw=0.6, ls="--", alpha=0.7,
                        label="our seeds" if i == 0 else None)  # fmt: skip
        spread.plot(x, ours.mean(0) - center, color="tab:blue", lw=1.6, label="ours mean")
        spread.axhline(0, color="k", lw=0.5)
        spread.set_ylabel("loss - torch mean")
        spread.legend(fontsize=8, ncol=2)
        std = np.maximum(theirs.std(0, ddof=1), 1e-12)
        distance.axhspan(-1, 1, color="tab:orange", alpha=0.15)
        distance.plot(x, (ours.mean(0) - center) / std, color="tab:blue", lw=1)
        distance.axhline(0, color="k", lw=0.5)
        distance.set_ylim(-6, 6)  # points where 3 seeds happen to agree spike far beyond
        distance.set_ylabel("(ours - torch) / torch std")
        distance.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _default_paths(args) -> tuple[str, str]:
    """(JSON, PNG): ``--out`` / ``--plot`` or the repository's result and docs paths."""
    out = args.out or os.path.join(
        common.REPO_ROOT, "benchmarks", "results", "train_parity_statistical.json"
    )
    png = args.plot or os.path.join(common.REPO_ROOT, "docs", "train_parity_statistical.png")
    return out, png


def replot(args) -> int:
    """A finished run's statistics recomputed from its JSON's curves (written back), its
    table and its plot; exits 2 with one line if the JSON is unreadable."""
    import json

    out, png = _default_paths(args)
    try:
        with open(out) as f:
            saved = json.load(f)
        results, window = saved["cases"], int(saved["window"])
        for result in results.values():
            analyse(result, window)
    except (OSError, ValueError, KeyError) as e:
        print(f"--replot: cannot read the statistical results {out}: {e}", file=sys.stderr)
        return 2
    common.write_json(out, saved)
    plot(results, window, png)
    print(table(results))
    print(f"wrote {png}", file=sys.stderr)
    return 0


def main_statistical(args, cases: Sequence[str], argv) -> int:
    """``--statistical``: every case's curves, the table, the JSON and the plot
    (``--replot``: the table and the plot of the JSON's curves, nothing run)."""
    if args.replot:
        return replot(args)
    common.set_torch_threads(args.threads)
    songs, source = tp.load_songs(args.pop909 or tp.default_pop909_root(), args.songs)
    print(f"data: {len(songs)} songs from {source}", file=sys.stderr)
    out, png = _default_paths(args)
    results = {}
    start = time.perf_counter()
    for case in cases:
        print(f"== {case} ({args.seeds} seeds x 2 sides x {args.steps} steps) ...",
              file=sys.stderr, flush=True)  # fmt: skip
        results[case] = run_statistical_case(case, songs, args)
        common.write_json(out, {
            "command": "python -m benchmarks.train_parity " + " ".join(argv),
            "machine": common.machine_info(),
            "data": source,
            "compat_switches": STATISTICAL_SWITCHES,
            "window": args.window,
            "wall_s": time.perf_counter() - start,
            "cases": results,
        })  # fmt: skip
    plot(results, args.window, png)
    print(table(results))
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0

"""bfloat16 against float32 PhraseLDM training: the experiments behind docs/BF16.md.

  python -m benchmarks.precision --latent_dir /work/data_cache/pop909_latents --steps 500 \\
      --variants fp32,bf16,bf16_fourier,bf16_stream,autocast,autocast_eps6,bf16_weights \\
      --out /tmp/bf16.json

  python -m benchmarks.precision --params_from /work/runs/ldm/ldm_lencond_small \\
      --variants fp32,bf16,bf16_fourier,bf16_stream,autocast

Training: every variant trains the same small length-conditioned PhraseLDM (same seed, same batches,
the real ``ldm_task`` loss and ``trainer.make_train_step``) and reports the training loss
averaged over windows of ``--window`` steps, the gradient norm, and the validation noise MSE
at fixed timesteps (fixed songs and noise) every ``--eval_every`` steps.

With ``--params_from`` (a trained LDM workdir) nothing trains: every variant's forward pass
scores the same trained weights (noise MSE per timestep on fixed validation songs and noise),
which isolates what each precision choice does to the predictions. The songs come from the
run's own latent dataset (``data.latent_dir`` of its ``config.json``) unless ``--latent_dir``
names another one encoded by the same VAE.

Variants (``config.model.dit.dtype`` plus, for the diagnostics, Flax method interceptors that
put one float32 island of ours back into bfloat16, as torch autocast runs the original):

- ``fp32``: float32 everywhere.
- ``bf16``: ours: bf16 matmuls; Fourier features, norms, softmax, residual stream, output and
  loss in float32; float32 weights and Adam state.
- ``bf16_fourier``: + the Fourier time features as autocast computes them: the angle
  ``2 pi t w`` is a matmul output (rounded to bf16, spacing up to 64 rad at t near 999), and
  cos / sin run on that bf16 angle.
- ``bf16_stream``: + every linear output, the residual stream (at block boundaries) and the
  predicted noise rounded to bf16 (autocast's linear outputs are bf16, so its residual sums
  are bf16).
- ``autocast``: both of the above: what bf16 autocast ("bf16-mixed") does to the original.
- ``autocast_eps6`` / ``bf16_eps6``: the same with AdamW eps 1e-6 (the original's bf16 yaml).
- ``bf16_weights``: ours, plus weights and Adam moments rounded to bf16 after every update
  ("bf16-true": no float32 master weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import ldm_common
from input_pipeline import ldm_pipeline
from phraseldm_jax import dit, ldm, ldm_task, optim, trainer
from phraseldm_jax.phrases import SLOTS_PER_BAR

VARIANTS = (
    "fp32",
    "bf16",
    "bf16_fourier",
    "bf16_stream",
    "autocast",
    "autocast_eps6",
    "bf16_eps6",
    "bf16_weights",
)
EVAL_TIMESTEPS = (0, 5, 20, 100, 300, 600, 900, 999)
INFERENCE_TIMESTEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 900, 950, 999)


def round_bf16(x: jax.Array) -> jax.Array:
    """x rounded to the nearest bfloat16, kept in x's dtype."""
    return x.astype(jnp.bfloat16).astype(x.dtype)


def autocast_fourier(t: jax.Array, weight: jax.Array) -> jax.Array:
    """``dit.fourier_time_features`` as torch autocast computes the original's: the angle is
    a bf16 matmul output, cos and sin run in bf16. t: [batch] -> [batch, 2 * F] float32."""
    two_pi_t = (np.float32(2.0 * np.pi) * jnp.asarray(t, jnp.float32)).astype(jnp.bfloat16)
    angle = (two_pi_t[:, None] * weight.astype(jnp.bfloat16)[None, :]).astype(jnp.bfloat16)
    features = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    return features.astype(jnp.float32)


def interceptor(fourier: bool, stream: bool):
    """A Flax method interceptor putting the chosen float32 islands of the DiT into bf16."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if fourier and isinstance(module, dit.GaussianFourierProjection):
            next_fun(*args, **kwargs)  # creates the parameter at init
            weight = jax.lax.stop_gradient(module.variables["params"]["weight"])
            return autocast_fourier(args[0], weight)
        out = next_fun(*args, **kwargs)
        if stream and isinstance(module, (dit.Dense, dit.DiTBlock, dit.DiT)):
            out = round_bf16(out)
        return out

    return intercept


def variant_config(name: str, latent_dir: str, width: int, layers: int, batch: int):
    """The small length-conditioned LDM config of one variant (resolved against the data)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; use one of {VARIANTS}")
    config = ldm_common.ldm_config(True, False, "small")
    heads = max(1, width // 32)
    config.model.dit = ldm_common._dit(width, layers, heads, max(1, heads // 2), 64, 64)
    config.model.dit.dtype = "float32" if name == "fp32" else "bfloat16"
    config.data.latent_dir = latent_dir
    config.data.batch_size = batch
    config.train.eval_every = 0
    if name.endswith("eps6"):
        config.optim.eps = 1e-6
    ldm_task.resolve_config(config)
    return config


def validation_batch(config, songs: int) -> dict:
    """The first ``songs`` validation songs (fixed), as one batch."""
    iterator = ldm_pipeline.make_iterator(
        config.data.latent_dir,
        config.data.eval_split,
        max_bars=config.model.dit.sample_size // SLOTS_PER_BAR,
        batch_size=songs,
        seed=0,
        train=False,
    )
    return next(iterator)


def make_eval_fn(ldm_cfg, timesteps=EVAL_TIMESTEPS):
    """``eval(params, batch, noise) -> [len(timesteps)]`` noise MSE at each timestep."""
    from phraseldm_jax import diffusion

    def mse_at(params, batch, noise, t):
        t = jnp.full((batch["latents"].shape[0],), t, jnp.int32)
        x_t = diffusion.add_noise(batch["latents"], noise, t)
        cond = ldm.conditions_from_batch(batch)
        eps = ldm.predict_noise(params, ldm_cfg, x_t, t, cond)
        return jnp.mean(jnp.square(eps - noise))

    def evaluate(params, batch, noise):
        return jnp.stack([mse_at(params, batch, noise, t) for t in timesteps])

    return jax.jit(evaluate)


def run_variant(name: str, args) -> dict:
    """Trains one variant; returns its curves."""

    config = variant_config(name, args.latent_dir, args.width, args.layers, args.batch)
    fourier = name in ("bf16_fourier", "autocast", "autocast_eps6")
    stream = name in ("bf16_stream", "autocast", "autocast_eps6")
    task = ldm_task.make_ldm_task(config)
    data = ldm_pipeline.make_train_iter(config)(0, 1)
    example = trainer.peek_batch(data)
    tx, lr_fn = optim.make_optimizer(config.optim, args.steps)
    valid = validation_batch(config, args.eval_songs)
    noise = jax.random.normal(jax.random.PRNGKey(123), valid["latents"].shape, jnp.float32)
    evaluate = make_eval_fn(ldm_task.ldm_config(config))
    to_bf16 = jax.jit(lambda tree: jax.tree.map(round_bf16, tree))

    with nn.intercept_methods(interceptor(fourier, stream)):
        init = jax.jit(functools.partial(trainer.init_train_state, task, tx, config.train.seed))
        state = init(example)
        step_fn = jax.jit(trainer.make_train_step(task, tx, lr_fn), donate_argnums=0)
        curves = {"step": [], "loss": [], "grad_norm": [], "eval_step": [], "eval_mse": []}
        window_loss, window_grad = [], []
        start = time.time()
        for step in range(1, args.steps + 1):
            state, metrics = step_fn(state, next(data), None)
            if name == "bf16_weights":
                state = state.replace(
                    params=to_bf16(state.params), opt_state=to_bf16(state.opt_state)
                )
            window_loss.append(metrics["train/loss"])
            window_grad.append(metrics["train/grad_norm"])
            if step % args.window == 0:
                curves["step"].append(step)
                curves["loss"].append(float(np.mean(jax.device_get(window_loss))))
                curves["grad_norm"].append(float(np.mean(jax.device_get(window_grad))))
                window_loss, window_grad = [], []
                print(f"{name} step {step}: loss {curves['loss'][-1]:.4f}", file=sys.stderr)
            if step % args.eval_every == 0 or step == args.steps:
                mse = jax.device_get(evaluate(state.params, valid, noise))
                curves["eval_step"].append(step)
                curves["eval_mse"].append([float(x) for x in mse])
    curves["seconds"] = time.time() - start
    curves["finite"] = all(math.isfinite(x) for x in curves["loss"])
    return curves


def inference_errors(args) -> dict:
    """Per variant, the noise MSE per timestep of the trained weights in ``args.params_from``."""
    from phraseldm_jax import checkpointing, ldm

    config_path = os.path.join(args.params_from, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not an LDM workdir (no config.json)")
    with open(config_path) as f:
        saved = json.load(f)
    if "dit" not in saved.get("model", {}):
        raise ValueError(f"{config_path}: model.dit missing, not a PhraseLDM run")
    latent_dir = args.latent_dir or saved["data"]["latent_dir"]
    params = checkpointing.load_params(args.params_from, "latest")
    base = variant_config("fp32", latent_dir, 32, 1, args.eval_songs)
    valid = validation_batch(base, args.eval_songs)
    noise = jax.random.normal(jax.random.PRNGKey(123), valid["latents"].shape, jnp.float32)
    results = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; use one of {VARIANTS}")
        model = dict(saved["model"])
        model["dit"] = dict(model["dit"], dtype="float32" if name == "fp32" else "bfloat16")
        fourier = name in ("bf16_fourier", "autocast", "autocast_eps6")
        stream = name in ("bf16_stream", "autocast", "autocast_eps6")
        with nn.intercept_methods(interceptor(fourier, stream)):
            evaluate = make_eval_fn(ldm.PhraseLDMConfig(**model), INFERENCE_TIMESTEPS)
            mse = evaluate(params, valid, noise)
            results[name] = [float(x) for x in jax.device_get(mse)]
    return results


def inference_table(errors: dict) -> str:
    """Markdown table of ``inference_errors``: one row per timestep, one column per variant."""
    names = list(errors)
    lines = ["| t | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for j, t in enumerate(INFERENCE_TIMESTEPS):
        lines.append(f"| {t} | " + " | ".join(f"{errors[n][j]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def table(results: dict, key: str = "loss") -> str:
    """Markdown table: one row per logged step, one column per variant."""
    names = list(results)
    steps = results[names[0]]["step"]
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, step in enumerate(steps):
        row = [f"{results[n][key][i]:.4f}" for n in names]
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def eval_table(results: dict) -> str:
    """Markdown table of the last validation MSE per timestep, one column per variant."""
    names = list(results)
    lines = ["| t | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for j, t in enumerate(EVAL_TIMESTEPS):
        row = [f"{results[n]['eval_mse'][-1][j]:.4f}" for n in names]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__)
    p.add_argument("--latent_dir", help="song-latent dataset (latent_records)")
    p.add_argument("--variants", default="fp32,bf16,autocast")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--width", type=int, default=64, help="DiT inner width (heads of 32)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--window", type=int, default=50, help="steps averaged per logged loss")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--eval_songs", type=int, default=16)
    p.add_argument("--out", help="JSON file for the curves (written after every variant)")
    p.add_argument("--params_from", help="trained LDM workdir: compare forward passes only")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.params_from:
        errors = inference_errors(args)
        print(f"Noise MSE per timestep, weights of {args.params_from}:\n" + inference_table(errors))
        return 0
    if not args.latent_dir:
        p.error("--latent_dir is required for training (only --params_from can do without)")
    results = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]  # resume: variants already run are kept
    for name in args.variants.split(","):
        if name not in results:
            results[name] = run_variant(name, args)
            if args.out:
                from phraseldm_jax import fileio

                text = json.dumps({"args": vars(args), "results": results}, indent=1)
                fileio.write_text(args.out, text + "\n")
    print("Training loss (mean over each window):\n" + table(results))
    print("\nGradient norm:\n" + table(results, "grad_norm"))
    print(f"\nValidation noise MSE at step {args.steps}, per timestep:\n" + eval_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

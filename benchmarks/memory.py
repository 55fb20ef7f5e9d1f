"""Per-device memory of one training step at the paper's sizes, from XLA's compiled memory
analysis (nothing runs: the step is lowered on abstract arrays and compiled).

  python -m benchmarks.memory                      # both models, the default grid
  python -m benchmarks.memory --models ldm --meshes 1x1,1x8 --variants fp32,bf16_remat
  python -m benchmarks.memory --cpu_devices=0 --meshes 1x1   # on an accelerator host

Models: ``vae`` (PhraseVAE stage 3, T5 512/1024, 3+3 layers, batch 128 x 128 tokens, Adam)
and ``ldm`` (the length-conditioned PhraseLDM, 29.5M parameters, batch 128 x 512 latents,
AdamW). Meshes ``DxF`` are (data, fsdp); the batch is split over both, parameters and Adam
moments over fsdp (``mesh.fsdp_min_size`` 2**18). Variants: ``fp32``, ``bf16`` (compute
dtype), ``*_remat`` (every transformer block rematerialised).

Columns, per device, in MiB: ``args`` (train state + batch shard), ``out`` (new state +
metrics; the state is donated, so it aliases the arguments: ``alias``), ``temp`` (activations
and gradients live during the step), ``code`` (generated code), and ``peak`` = args + out -
alias + temp. By default the devices are 8 host CPU devices (``--cpu_devices=8``); XLA:CPU
buffer assignment and fusion differ from GPU/TPU, and the DiT's CPU attention runs a few
heads at a time, so read the numbers as relative sizes, not as a GPU's. XLA:CPU's scheduler
also runs rematerialised forward passes early, so ``temp`` does not show what remat saves;
``saved`` does, whatever the backend: the activations the loss keeps for its backward pass
(``jax.ad_checkpoint.print_saved_residuals``, inputs excluded) at the per-device batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import re
import sys
import time

if __name__ == "__main__":  # before jax starts: split the CPU into devices unless told not to
    CPU_DEVICES = next((a[14:] for a in sys.argv if a.startswith("--cpu_devices=")), "8")
    if int(CPU_DEVICES) > 0:
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} "
            f"--xla_force_host_platform_device_count={CPU_DEVICES}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
from jax import ad_checkpoint
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import ldm_common, vae_common
from phraseldm_jax import ldm_task, optim, sharding, trainer, trees, vae_task

MIB = 2**20
MODELS = ("vae", "ldm")
VARIANTS = ("fp32", "fp32_remat", "bf16", "bf16_remat")


def vae_setup(dtype: str, remat: bool):
    """(config, task, abstract batch) of PhraseVAE stage 3 at the paper's size."""
    config = vae_common.vae_config(3)
    config.model.t5.dtype = dtype
    config.model.t5.remat = remat
    config.train.eval_every = 0
    batch, length = int(config.data.batch_size), int(config.data.max_length)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    example = {
        "input_ids": tokens,
        "attention_mask": tokens,
        "decoder_input_ids": tokens,
        "labels": tokens,
    }
    return config, vae_task.vae_task(config), example


def ldm_setup(dtype: str, remat: bool):
    """(config, task, abstract batch) of the length-conditioned PhraseLDM at the paper's size."""
    config = ldm_common.ldm_config(True, False)
    config.model.dit.dtype = dtype
    config.model.dit.remat = remat
    config.train.eval_every = 0
    ldm_task.resolve_config(config, {"scale_factor": 0.759, "abs_p999": 3.06})
    batch, length = int(config.data.batch_size), int(config.model.dit.sample_size)

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    example = {
        "latents": spec((batch, length, 64), jnp.float32),
        "n_bars": spec((batch,)),
        "section_type_ids": spec((batch, 30)),
        "section_length_ids": spec((batch, 30)),
        "has_plan": spec((batch,)),
        "weight": spec((batch,), jnp.float32),
    }
    return config, ldm_task.make_ldm_task(config), example


ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def saved_activations(task, params, example, rows: int) -> float:
    """MiB of activations the loss saves for the backward pass on a batch of ``rows``
    examples (abstract ``params`` and ``example``; nothing runs)."""
    batch = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in example.items()}
    rng = jax.random.PRNGKey(0)

    def loss(p, b):
        return task.loss_fn(p, None, b, rng, True)[0]

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ad_checkpoint.print_saved_residuals(loss, params, batch)
    total = 0
    for line in text.getvalue().splitlines():
        match = RESIDUAL.match(line.strip())
        if match and "from the argument" not in match.group(3):
            shape = [int(d) for d in match.group(2).split(",") if d]
            total += math.prod(shape) * ITEMSIZE.get(match.group(1), 4)
    return total / MIB


def setup(model: str, variant: str):
    """(config, task, abstract batch) of ``model`` in ``variant``."""
    dtype = "bfloat16" if variant.startswith("bf16") else "float32"
    remat = variant.endswith("_remat")
    return (vae_setup if model == "vae" else ldm_setup)(dtype, remat)


def compiled_step(model: str, mesh_shape: tuple[int, int], variant: str):
    """The train step of ``trainer.run`` for one model / mesh / variant, compiled."""
    config, task, example = setup(model, variant)
    data, fsdp = mesh_shape
    mesh = sharding.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[: data * fsdp])
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.num_steps)
    init_fn = functools.partial(trainer.init_train_state, task, tx, 0)
    abstract = jax.eval_shape(init_fn, example)
    state_sh = sharding.tree_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
    batch_sh = sharding.batch_sharding(mesh)
    micro_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    step = jax.jit(
        trainer.make_train_step(task, tx, lr_fn, 1, micro_sh),
        in_shardings=(state_sh, batch_sh, None),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    state = sharding.with_shardings(abstract, state_sh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in example.items()
    }
    return step.lower(state, batch, None).compile(), abstract


def measure(model: str, mesh_shape: tuple[int, int], variant: str) -> dict:
    """Memory analysis of one compiled step, in MiB per device, and the parameter count."""
    start = time.time()
    compiled, abstract = compiled_step(model, mesh_shape, variant)
    _, task, example = setup(model, variant)
    rows = next(iter(example.values())).shape[0] // math.prod(mesh_shape)
    stats = compiled.memory_analysis()
    args = stats.argument_size_in_bytes / MIB
    out = stats.output_size_in_bytes / MIB
    alias = stats.alias_size_in_bytes / MIB
    temp = stats.temp_size_in_bytes / MIB
    return {
        "model": model,
        "mesh": "x".join(map(str, mesh_shape)),
        "variant": variant,
        "params_m": trees.param_count(abstract.params) / 1e6,
        "args": args,
        "out": out,
        "alias": alias,
        "temp": temp,
        "code": stats.generated_code_size_in_bytes / MIB,
        "peak": args + out - alias + temp,
        "saved": saved_activations(task, abstract.params, example, rows),
        "compile_s": time.time() - start,
    }


TABLE_HEADER = (
    "| model | params (M) | mesh | variant | args | out | alias | temp | code | peak | saved |\n"
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(r: dict) -> str:
    """One measurement as a markdown table row (columns of ``TABLE_HEADER``)."""
    return (
        f"| {r['model']} | {r['params_m']:.1f} | {r['mesh']} | {r['variant']} | "
        f"{r['args']:.1f} | {r['out']:.1f} | {r['alias']:.1f} | {r['temp']:.1f} | "
        f"{r['code']:.2f} | {r['peak']:.1f} | {r['saved']:.1f} |"
    )


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    return "\n".join([TABLE_HEADER, *(format_row(r) for r in rows)])


def parse_mesh(text: str) -> tuple[int, int]:
    data, fsdp = (int(x) for x in text.lower().split("x"))
    return data, fsdp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--meshes", default="1x1,1x8", help="comma-separated DATAxFSDP")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--cpu_devices", type=int, default=8, help="=N host CPU devices; =0: the real backend"
    )
    args = p.parse_args(argv)
    models = args.models.split(",")
    variants = args.variants.split(",")
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; use {MODELS}")
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; use {VARIANTS}")
    meshes = [parse_mesh(m) for m in args.meshes.split(",")]
    # Rows are printed as they are measured, so a cut-short run still leaves its table.
    print(f"Per-device MiB, {jax.devices()[0].platform} devices:\n{TABLE_HEADER}", flush=True)
    for model in models:
        for mesh_shape in meshes:
            for variant in variants:
                row = measure(model, mesh_shape, variant)
                print(format_row(row), flush=True)
                print(
                    f"{model} {row['mesh']} {variant}: peak {row['peak']:.1f} MiB "
                    f"({row['compile_s']:.0f} s to compile)",
                    file=sys.stderr,
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Case (d): training throughput (examples/s) of one PhraseVAE stage-3 step and one PhraseLDM
step at the paper's model sizes, ours vs the PyTorch equivalent with the same weights.

Ours: ``trainer.make_train_step`` (the training loop's own step: loss, gradients, optimiser
from ``optim.make_optimizer``, metrics), jitted with the state donated. Torch: the reference
modules in train mode, the same loss (VAE: token cross-entropy + 0.01 x per-dimension KL with a
sampled latent; LDM: epsilon MSE at random timesteps of the cosine schedule), backward,
``clip_grad_norm_`` where the config clips (LDM: 0.5) and ``torch.optim.AdamW`` with the
config's learning rate, eps and weight decay. Batches are random tokens / latents of full
length (the paper config pads VAE batches to 128 tokens); batch sizes are smaller than the
paper's 128 so that a step takes seconds on a CPU (stated in the table). Ours runs on one
device and data-parallel over the local devices (as many as divide the batch); all sides take
turns call by call (``common.time_interleaved``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from phraseldm_jax import optim, trainer, vocab
from phraseldm_jax.phrases import SLOTS_PER_BAR

VAE_BATCH, LDM_BATCH = 16, 4
# Our compute dtypes timed: float32, and bfloat16 matmuls with float32 weights, norms,
# softmax and loss (docs/BF16.md: as stable in training).
DTYPES = ("float32", "bfloat16")


def _with_dtype(config, group: str, dtype: str):
    """A copy of ``config`` with ``model.<group>.dtype`` set."""
    config = copy.deepcopy(config)
    config.model[group].dtype = dtype
    return config


def vae_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A stage-3 batch of full-length rows: encoder ``[C0..C3] [BOS] phrase [EOS]``, target
    ``phrase [EOS]``, decoder input ``[BOS]`` + target[:-1] (int32 [batch, length])."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(vocab.BAR_ID, 1000, (batch, length)).astype(np.int32)
    inputs = phrase.copy()
    inputs[:, :4] = vocab.QUERY_IDS[:4]
    inputs[:, 4] = vocab.BOS_ID
    inputs[:, -1] = vocab.EOS_ID
    labels = phrase.copy()
    labels[:, -1] = vocab.EOS_ID
    decoder_inputs = np.concatenate(
        [np.full((batch, 1), vocab.BOS_ID, np.int32), labels[:, :-1]], 1
    )
    return {
        "input_ids": inputs,
        "attention_mask": np.ones_like(inputs),
        "decoder_input_ids": decoder_inputs,
        "labels": labels,
    }


def ldm_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """An ``ldm_pipeline``-shaped batch of random latents (no section plan)."""
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((batch, length, 64)).astype(np.float32),
        "n_bars": rng.integers(1, length // SLOTS_PER_BAR + 1, batch).astype(np.int32),
        "section_type_ids": np.zeros((batch, 30), np.int32),
        "section_length_ids": np.zeros((batch, 30), np.int32),
        "has_plan": np.zeros((batch,), np.int32),
        "weight": np.ones((batch,), np.float32),
    }


def our_step(task, config, params, batch, devices=None) -> tuple[Any, dict[str, Any]]:
    """(a call running one jitted train step, its row fields so far). The state is donated,
    so each call feeds the next. ``devices``: data-parallel over them (batch split, state
    replicated, gradients all-reduced by XLA, as the trainer's mesh does with ``fsdp=1``);
    None: one device."""
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.num_steps)
    rng_impl = config.train.get("rng_impl", "threefry")
    step = jax.jit(trainer.make_train_step(task, tx, lr_fn, rng_impl=rng_impl), donate_argnums=0)
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates it
    state = trainer.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    if devices:
        mesh = Mesh(np.array(devices), ("data",))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    else:
        batch = jax.device_put(batch)
    compiled, compile_times = common.compile_twice(step, state, batch, None)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch, None)
        return jax.block_until_ready(metrics)

    call.compiled = compiled  # for cost analysis and profiles
    return call, {
        "side": f"ours (jax), {len(devices)} devices" if devices else "ours (jax)",
        "devices": len(devices) if devices else 1,
        **compile_times,
        **common.compiled_memory_mib(compiled),
    }


def torch_step(model, loss_fn, config) -> tuple[Any, dict[str, float]]:
    """(a call running one torch AdamW step on ``loss_fn(model)``, a dict holding the last
    loss)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=float(config.optim.lr),
        eps=float(config.optim.get("eps", 1e-8)),
        weight_decay=float(config.optim.get("weight_decay", 0.0)),
    )
    clip = float(config.optim.get("clip_norm", 0.0))
    last = {}

    def call():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        last["loss"] = loss.item()

    return call, last


def split_devices(batch_size: int) -> list | None:
    """For the data-parallel row: as many local devices as divide ``batch_size`` evenly
    (gcd), None when that is one."""
    count = math.gcd(batch_size, len(jax.local_devices()))
    return jax.local_devices()[:count] if count > 1 else None


def compare(make_task, configs, params, batch, torch_call, torch_last, repeats: int) -> list[dict]:
    """Rows of ours (for each of ``configs``, {compute dtype: config}: one device, and
    data-parallel over the local devices when they divide the batch) and torch, taking turns
    call by call (``common.time_interleaved``). Every one of ours runs the same number of
    steps from the same state, so their losses agree (within the compute dtype's rounding)."""
    ours = []
    devices = split_devices(len(next(iter(batch.values()))))
    for dtype, config in configs.items():
        task = make_task(config)
        for devs in (None, devices) if devices else (None,):
            call, fields = our_step(task, config, params, batch, devs)
            if dtype != "float32":
                fields["side"] += f", {dtype} compute"
            ours.append((call, fields))
    calls = {fields["side"]: call for call, fields in ours}
    timed = common.time_interleaved({**calls, "torch": torch_call}, repeats)
    rows = []
    for call, fields in ours:
        timing, rss = timed[fields["side"]]
        loss = float(call()["train/loss"])
        rows.append({**fields, **timing.as_dict(), "loss": loss, "rss_delta_mib": rss})
    timing, rss = timed["torch"]
    rows.append(
        {"side": "torch", **timing.as_dict(), "loss": torch_last["loss"], "rss_delta_mib": rss}
    )
    return rows


def vae_train_config(pair):
    """The stage-3 training config of a ``common.vae_pair`` model (its sizes, no eval)."""
    from configs import vae_common

    config = vae_common.vae_config(3)
    for name, value in dataclasses.asdict(pair.config.t5).items():
        config.model.t5[name] = value
    config.model.latent_dim = pair.config.latent_dim
    config.train.init_from = ""
    config.train.eval_every = 0
    return config


def ldm_train_config(pair):
    """The length-conditioned training config of a ``common.ldm_pair`` model (no eval)."""
    from configs import ldm_common
    from phraseldm_jax import ldm_task

    config = ldm_common.ldm_config(True, False, "")
    for name, value in dataclasses.asdict(pair.config.dit).items():
        config.model.dit[name] = value
    ldm_task.resolve_config(
        config, {"scale_factor": pair.config.scale_factor, "abs_p999": pair.config.clip_range}
    )
    config.train.eval_every = 0
    return config


def vae_case(opts: common.Options, repeats: int) -> list[dict]:
    import torch

    from phraseldm_jax import vae_task

    pair = common.vae_pair(opts.quick)
    config = vae_train_config(pair)
    configs = {dtype: _with_dtype(config, "t5", dtype) for dtype in DTYPES}
    batch_size, length = (4, 16) if opts.quick else (VAE_BATCH, int(config.data.max_length))
    batch = vae_batch(batch_size, length)
    kl_weight = float(config.train.kl_weight)
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}

    def loss_fn(ref):  # ReferencePhraseVAE: stage-3 modules under ``model``
        mean, logvar = ref.model.encode(t["input_ids"], t["attention_mask"])
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        logits = ref.model.logits(z, t["decoder_input_ids"])
        recon = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), t["labels"].reshape(-1), ignore_index=-100
        )
        kl = -0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), -1).mean() / mean.shape[-1]
        return recon + kl_weight * kl

    torch_call, torch_last = torch_step(copy.deepcopy(pair.torch_model), loss_fn, config)
    rows = compare(vae_task.vae_task, configs, pair.params, batch, torch_call, torch_last, repeats)
    shape = f"{batch_size} x {length} tokens"
    return [
        {"model": "PhraseVAE stage 3", "batch": shape, "examples": batch_size, **r} for r in rows
    ]


def ldm_case(opts: common.Options, repeats: int) -> list[dict]:
    import torch

    from phraseldm_jax import ldm_task

    pair = common.ldm_pair(opts.quick)
    config = ldm_train_config(pair)
    configs = {dtype: _with_dtype(config, "dit", dtype) for dtype in DTYPES}
    length = pair.config.dit.sample_size
    batch_size = 2 if opts.quick else LDM_BATCH
    batch = ldm_batch(batch_size, length)
    scheduler = pair.torch_model.scheduler()
    x0 = torch.from_numpy(batch["latents"])
    bars = torch.from_numpy(batch["n_bars"]).long()

    def loss_fn(ref):
        t = torch.randint(0, 1000, (batch_size,))
        noise = torch.randn_like(x0)
        eps = common.torch_ldm_forward(ref, scheduler.add_noise(x0, noise, t), t, bars)
        return torch.nn.functional.mse_loss(eps, noise)

    torch_call, torch_last = torch_step(copy.deepcopy(pair.torch_model), loss_fn, config)
    rows = compare(
        ldm_task.make_ldm_task, configs, pair.params, batch, torch_call, torch_last, repeats
    )
    shape = f"{batch_size} x {length} latents"
    return [
        {"model": "PhraseLDM (length-cond.)", "batch": shape, "examples": batch_size, **r}
        for r in rows
    ]


def run(opts: common.Options) -> dict[str, Any]:
    repeats = min(opts.repeats, 3)
    rows = vae_case(opts, repeats) + ldm_case(opts, repeats)
    for row in rows:
        row["examples_per_s"] = row["examples"] / row["median_s"]
    for row in rows:
        if row["side"] != "torch":
            ref = next(r for r in rows if r["model"] == row["model"] and r["side"] == "torch")
            row["speedup_vs_torch"] = ref["median_s"] / row["median_s"]
    return {"rows": rows, "table": table(rows)}


def table(rows: list[dict]) -> str:
    return common.markdown_table(
        [
            "model",
            "batch",
            "side",
            "s/step",
            "examples/s",
            "x torch",
            "loss",
            "compile s",
            "cached compile s",
            "XLA peak MiB",
            "RSS +MiB",
        ],
        [
            [
                r["model"],
                r["batch"],
                r["side"],
                r["median_s"],
                r["examples_per_s"],
                r.get("speedup_vs_torch", "-"),
                r["loss"],
                r.get("compile_s", "-"),
                r.get("compile_cached_s", "-"),
                r.get("peak_mib", "-"),
                r["rss_delta_mib"],
            ]
            for r in rows
        ],
    )

"""Training-step parity with the original: our ``trainer.make_train_step`` against the PyTorch
training reference (``tests/torch_training_reference.py``) on the same weights and batches.

  python -m benchmarks.train_parity                  # small sizes, 50 steps, all six cases
  python -m benchmarks.train_parity --sizes paper    # the paper's model sizes
  python -m benchmarks.train_parity --cases vae_stage3,ldm_seccond --steps 20
  python -m benchmarks.train_parity --statistical --seeds 3 --steps 500   # dropout on, seeds

``--statistical`` (``benchmarks/train_parity_stats.py``) runs each side several times with
dropout on and its own randomness, and compares our loss curve with the original's seed
spread (default cases vae_stage3, ldm_lencond; JSON ``train_parity_statistical.json`` and
the plot ``docs/train_parity_statistical.png``).

Cases: PhraseVAE stages 1-3 and the unconditional, length- and section-conditioned PhraseLDM.
Both sides start from our fresh init, moved to torch by the converter
(``convert.vae_weights`` / ``convert.ldm_weights``), in float32 with dropout off. Every step
both get the same real POP909 records (the raw folder at ``$PHRASELDM_POP909`` or
``../shared/data/pop909``; the synthetic corpus when absent), each side building its batch
its own way (ours: ``vae_pipeline`` / ``ldm_pipeline``; torch: the original's recipe), and
the same randomness: the span-masking generators, the stage-3 eps, the LDM's timesteps and
noise. The LDM's latents are a fixed random vector per distinct phrase (``tests/ldm_fixtures
.Codebook``) of the real songs. Our optimiser comes from the paper recipe's ``optim`` group
(``configs/vae_common.py``, ``configs/ldm_common.py``); torch's from FACTS 1.5 / 2.11.

Measured (relative = max |ours - torch| / ||torch tensor||, the worst tensor): the batches,
the loss of every step, after step 1 every gradient, parameter and Adam moment (optax's
mu / nu mapped to torch's exp_avg / exp_avg_sq through the converter), the parameters every
``--every`` steps, and that the parameters the original never optimises (the LDM's length and
section encoders, ``time_proj``) stay unchanged on both sides. Prints a table and writes JSON
(default ``benchmarks/results/train_parity_<size>.json``) with the library versions.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import common

CASES = ("vae_stage1", "vae_stage2", "vae_stage3", "ldm_uncond", "ldm_lencond", "ldm_seccond")
LDM_VARIANTS = {"ldm_uncond": (False, False), "ldm_lencond": (True, False)}
LDM_VARIANTS["ldm_seccond"] = (True, True)
SIZES = ("tiny", "small", "paper")
# Our defaults that differ from the original on purpose (SPEC section 9) and the switch each
# parity run sets.
COMPAT_SWITCHES = {
    "vae": {"model.t5.dropout_rate": 0.0},  # dropout off on both sides (exact comparison)
    "ldm": {
        "model.train_encoders": False,  # 9.6: the original never trains its encoders
        "model.cross_bias_mode": "additive",  # 9.5: the +1 logit "mask", pads unmasked
        "data.reference_padding": True,  # 9.1: the unscaled [SEP] pad latent
        "section vocabulary": "torch dicts set to ours",  # 9.4: set order (FACTS 6 (d))
    },
}
TARGETS = {"loss": 1e-6, "step": 1e-5, "trajectory": 1e-4}


def _modules():
    """The torch reference modules (``tests/`` on the path, as ``common.torch_reference``)."""
    ref = common.torch_reference()
    import ldm_fixtures
    import torch_training_reference

    return ref, torch_training_reference, ldm_fixtures


# --------------------------------------------------------------------------------------------
# Data.


def load_songs(pop909_root: str | None, n_songs: int) -> tuple[list[dict], str]:
    """(song records, where they came from): the first ``n_songs`` importable POP909 songs of
    at most 128 bars, else the synthetic corpus."""
    from input_pipeline import pop909, synthetic

    if pop909_root and os.path.isdir(pop909_root):
        songs = []
        for folder in pop909.song_dirs(pop909_root):
            try:
                song = pop909.import_song(folder)
            except pop909.Pop909Error:
                continue
            if 0 < song["n_bars"] <= 128:
                songs.append(song)
            if len(songs) == n_songs:
                return songs, f"POP909 ({pop909_root}, songs {songs[0]['song_id']}..)"
        if songs:
            return songs, f"POP909 ({pop909_root})"
    return synthetic.synthetic_records(n_songs), "synthetic corpus (POP909 not found)"


def default_pop909_root() -> str:
    from configs import paths

    return paths.RAW_POP909


# --------------------------------------------------------------------------------------------
# Comparing trees.


def tensor_diff(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> dict:
    """Worst absolute and relative (to the torch tensor's norm) difference over the torch
    side's tensors."""
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for name, b in theirs.items():
        a = np.asarray(ours[name], np.float64)
        b = np.asarray(b, np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        norm = float(np.linalg.norm(b))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        worst_abs = max(worst_abs, diff)
        if rel >= worst_rel:
            worst_rel, worst = rel, name
    return {"max_abs": worst_abs, "max_rel": worst_rel, "worst": worst, "tensors": len(theirs)}


def adam_moments(opt_state: Any, params: Any) -> tuple[Any, Any]:
    """optax's (mu, nu) with the params' structure; frozen leaves (``MaskedNode``) as zeros."""
    states = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    )
    (adam,) = [s for s in states if isinstance(s, optax.ScaleByAdamState)]

    def filled(tree):
        return jax.tree.map(
            lambda p, m: (
                np.zeros(p.shape, np.float32) if isinstance(m, optax.MaskedNode) else np.asarray(m)
            ),
            params,
            tree,
        )

    return filled(adam.mu), filled(adam.nu)


# --------------------------------------------------------------------------------------------
# One case: both sides, the loop.


class Sides:
    """Our jitted step and gradient, the torch trainer, and the converter between them.

    ``batches(step) -> (our batch, torch loss closure (model, dtype) -> loss, batch
    difference)``. ``make_trainer(model)``: the original's optimiser around ``model``; with
    ``float64`` a float64 copy of the torch model trains beside it on the same batches, the
    reference both float32 sides are measured against (``Float64Reference``)."""

    def __init__(
        self, task, tx, lr_fn, params, to_torch: Callable, make_trainer: Callable, model,
        batches, float64: bool = False,
    ):  # fmt: skip
        import copy

        import torch

        from phraseldm_jax import trainer

        train_step = trainer.make_train_step(task, tx, lr_fn)
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

        def step_and_grads(state, batch):
            """The trainer's step, plus the gradients of its loss (one program to compile)."""
            grads = grad_fn(state.params, None, batch, None, True)[1]
            return (*train_step(state, batch, None), grads)

        self.step_fn = jax.jit(step_and_grads)
        self.state = trainer.TrainState(
            step=np.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(0)
        )
        self.state = jax.device_put(self.state)
        self.to_torch, self.batches = to_torch, batches
        self.trainer_t = make_trainer(model)
        self.reference = (
            Float64Reference(make_trainer(copy.deepcopy(model).double())) if float64 else None
        )
        self.dtype = torch.float32
        self.initial_torch = {k: v.copy() for k, v in self._torch_params().items()}

    def _torch_params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.trainer_t.model.named_parameters()}

    def _ours(self, tree) -> dict[str, np.ndarray]:
        return self.to_torch(jax.device_get(tree))

    def params_diff(self) -> dict:
        return tensor_diff(self._ours(self.state.params), self._torch_params())

    def frozen_unchanged(self) -> bool | None:
        """Whether every parameter torch does not optimise kept its initial value, both sides
        (None: the case has none)."""
        frozen = [n for n in self.initial_torch if n not in self.trainer_t.names.values()]
        if not frozen:
            return None
        ours, theirs = self._ours(self.state.params), self._torch_params()
        return all(
            np.array_equal(ours[n], self.initial_torch[n])
            and np.array_equal(theirs[n], self.initial_torch[n])
            for n in frozen
        )

    def run(self, steps: int, every: int) -> dict:
        losses, checkpoints, first, float64 = [], {}, {}, {}
        batch_diff = 0.0
        for step in range(steps):
            batch, torch_loss, diff = self.batches(step)
            batch_diff = max(batch_diff, diff)
            self.state, metrics, grads = self.step_fn(self.state, batch)
            loss_t, grads_t = self.trainer_t.step(
                functools.partial(torch_loss, self.trainer_t.model, self.dtype)
            )
            if self.reference is not None:
                self.reference.step(torch_loss)
            loss_j = float(metrics["train/loss"])
            losses.append(
                {"ours": loss_j, "torch": loss_t, "rel": abs(loss_j - loss_t) / abs(loss_t)}
            )
            if step == 0:
                first["grads"] = tensor_diff(self._ours(grads), grads_t)
                first["params"] = self.params_diff()
                mu, nu = adam_moments(jax.device_get(self.state.opt_state), self.state.params)
                moments = self.trainer_t.moments()
                first["exp_avg"] = tensor_diff(
                    self._ours(mu), {k: m for k, (m, _) in moments.items()}
                )
                first["exp_avg_sq"] = tensor_diff(
                    self._ours(nu), {k: v for k, (_, v) in moments.items()}
                )
                first["optimised_tensors"] = len(self.trainer_t.names)
                if self.reference is not None:
                    first["float64"] = self.reference.distances(self, grads, grads_t)
            if (step + 1) % every == 0 or step + 1 == steps:
                checkpoints[str(step + 1)] = self.params_diff()
                if self.reference is not None:
                    float64[str(step + 1)] = self.reference.distances(self)
        out = {
            "batch_max_abs_diff": batch_diff,
            "loss": {
                "step1_rel": losses[0]["rel"],
                "max_rel": max(r["rel"] for r in losses),
                "steps": losses,
            },
            "step1": first,
            "params_every": checkpoints,
            "frozen_unchanged": self.frozen_unchanged(),
        }
        if self.reference is not None:
            out["float64_reference"] = float64
        return out


class Float64Reference:
    """The original in float64 on the same batches: the float32 answer both sides round.

    ``distances`` gives, for parameters (and at step 1 gradients), the worst relative distance
    of torch float32 and of ours float32 from it: when ours is about as far from it as torch
    is, the ours-vs-torch gap is float32 rounding on both sides, not a difference in what the
    step computes."""

    def __init__(self, trainer_t):
        import torch

        self.trainer_t, self.dtype = trainer_t, torch.float64

    def step(self, torch_loss) -> None:
        loss = functools.partial(torch_loss, self.trainer_t.model, self.dtype)
        self.last_grads = self.trainer_t.step(loss)[1]

    def _params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy() for n, p in self.trainer_t.model.named_parameters()}

    def distances(self, sides: Sides, grads=None, grads_t=None) -> dict:
        ref = self._params()
        out = {
            "params_torch32": tensor_diff(sides._torch_params(), ref),
            "params_ours32": tensor_diff(sides._ours(sides.state.params), ref),
        }
        if grads is not None:
            out["grads_torch32"] = tensor_diff(grads_t, self.last_grads)
            out["grads_ours32"] = tensor_diff(sides._ours(grads), self.last_grads)
        return out


def init_key(seed: int) -> jax.Array:
    """Parameter-init key: RngBitGenerator programs compile several times faster than
    threefry's on CPU (as ``tests/ldm_fixtures.init_key``)."""
    return jax.random.key(seed, impl="unsafe_rbg")


def _torch_state_dict(state_dict: Mapping[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}


def vae_setup(stage: int, size: str, seed: int, dropout_rate: float = 0.0) -> SimpleNamespace:
    """Both PhraseVAE sides before training: the paper recipe's config (optimiser, KL weight)
    with ``size``'s T5 at ``dropout_rate``, our init params (``seed``), the torch model holding
    the same weights (eval mode; its T5 dropout is the original's 0.1, active in ``train()``)
    and ``to_torch`` (our params -> its state dict)."""
    from configs import vae_common
    from phraseldm_jax import vae as vae_lib
    from phraseldm_jax import vae_task
    from phraseldm_jax.convert import vae_weights

    _, ttr, _ = _modules()
    config = vae_common.vae_config(stage)
    config.model = vae_common.vae_config(stage, "" if size == "paper" else size).model
    config.model.t5.dropout_rate = dropout_rate
    model_cfg = vae_task.model_config(config)
    params = jax.device_get(vae_lib.init_params(init_key(seed), model_cfg))
    c = model_cfg.t5
    hf_t5 = dict(
        d_model=c.d_model, d_ff=c.d_ff, d_kv=c.d_kv, num_heads=c.num_heads,
        num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
        vocab_size=c.vocab_size, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        layer_norm_epsilon=c.layer_norm_epsilon, decoder_start_token_id=1,
    )  # fmt: skip
    torch_model = ttr.vae_model(stage, hf_t5, model_cfg.n_query_tokens, model_cfg.latent_dim)

    def to_torch(tree):
        return vae_weights.vae_state_dict_from_params(tree, model_cfg, prefix="")

    torch_model.load_state_dict(_torch_state_dict(to_torch(params)), strict=True)
    return SimpleNamespace(
        config=config, model_cfg=model_cfg, params=params, torch_model=torch_model,
        to_torch=to_torch,
    )  # fmt: skip


def vae_sides(
    stage: int, size: str, songs, batch_size: int, seed: int, float64: bool = False
) -> Sides:
    """PhraseVAE stage ``stage``: the paper recipe's optimiser and KL weight, ``size``'s T5."""
    import torch

    from input_pipeline import batching, records, vae_pipeline
    from input_pipeline.span_infill import example_rng
    from phraseldm_jax import optim, trainer, vae_task
    from phraseldm_jax import vae as vae_lib

    _, ttr, _ = _modules()
    setup = vae_setup(stage, size, seed)
    config, model_cfg, params = setup.config, setup.model_cfg, setup.params
    torch_model, to_torch = setup.torch_model, setup.to_torch

    def make_trainer(m):
        return ttr.Trainer(m, ttr.vae_optimizer(stage, m))

    model = vae_lib.PhraseVAE(model_cfg)
    kl_weight = float(config.train.kl_weight)

    def loss_fn(params, frozen, batch, rng, train):
        del frozen, rng
        noise = batch.get("latent_noise")
        return vae_task.vae_loss(model, kl_weight, params, batch, train=train, latent_noise=noise)

    task = trainer.Task(name=f"parity_vae_stage{stage}", init_params=None, loss_fn=loss_fn)
    tx, lr_fn = optim.make_optimizer(config.optim, int(config.train.num_steps))
    make_lines = records.bar_lines if stage == 1 else records.phrase_lines
    lines = [line["text"] for song in songs for line in make_lines(song)]
    q = model_cfg.n_query_tokens if stage > 1 else 0
    rng = np.random.default_rng(seed)

    def batches(step):
        rows = rng.choice(len(lines), batch_size, replace=False)
        examples = [
            vae_pipeline.encode_example(
                {"text": lines[i]}, record_index=int(i), n_query_tokens=q, span_mask=stage == 1,
                max_length=int(config.data.max_length), seed=seed, epoch=step,
            )
            for i in rows
        ]  # fmt: skip
        ours = batching.pad_batch(
            examples,
            length=int(config.data.max_length),
            batch_size=batch_size,
            filler=vae_pipeline.filler_example(q),
        )
        spans = [example_rng(seed, step, int(i)) for i in rows]
        theirs = ttr.vae_batch([lines[i] for i in rows], stage, spans)
        noise = None
        if stage == 3:
            noise = rng.standard_normal((batch_size, model_cfg.latent_dim)).astype(np.float32)
            ours["latent_noise"] = noise
        diff = _vae_batch_diff(ours, theirs)
        noise_t = None if noise is None else torch.from_numpy(noise)

        def torch_loss(m, dtype):
            return m.training_loss(theirs, None if noise_t is None else noise_t.to(dtype))

        return ours, torch_loss, diff

    return Sides(
        task, tx, lr_fn, jax.device_put(params), to_torch, make_trainer, torch_model, batches,
        float64,
    )  # fmt: skip


def _vae_batch_diff(ours: Mapping[str, np.ndarray], theirs: Mapping[str, Any]) -> float:
    """How many token cells differ (ours is padded to max_length, theirs to the longest row)."""
    from phraseldm_jax.vocab import IGNORE_LABEL, PAD_ID

    bad = 0
    for key, pad in (("input_ids", PAD_ID), ("attention_mask", 0), ("labels", IGNORE_LABEL)):
        t = theirs[key].numpy()
        width = t.shape[1]
        bad += int(np.sum(ours[key][:, :width] != t)) + int(np.sum(ours[key][:, width:] != pad))
    return float(bad)


def ldm_setup(variant: str, size: str, songs, seed: int) -> SimpleNamespace:
    """Both PhraseLDM sides before training, with the compatibility switches
    (``COMPAT_SWITCHES["ldm"]``): the config (the paper's optimiser, ``size``'s DiT), our init
    params (``seed``), the songs' latents (a fixed random vector per distinct phrase), their
    stats, the torch model holding the same weights (eval mode) and ``to_torch``."""
    from configs import ldm_common
    from phraseldm_jax import ldm, ldm_task, phrases, sections
    from phraseldm_jax.convert import ldm_weights

    ref, _, fixtures = _modules()
    length_control, sec_control = LDM_VARIANTS[variant]
    config = ldm_common.ldm_config(length_control, sec_control, "" if size == "paper" else size)
    config.optim = ldm_common.ldm_config(length_control, sec_control).optim
    config.model.train_encoders = False
    config.model.cross_bias_mode = "additive"
    config.data.reference_padding = True
    codebook = fixtures.Codebook(seed, dim=int(config.model.dit.in_channels))
    if sec_control:
        songs = [s for s in songs if s["plan_fits"]]
    latent_songs = [
        dict(
            latents=codebook.song_latents(phrases.slot_phrases(s)),
            n_bars=s["n_bars"],
            section_plan=s["section_plan"],
            plan_fits=s["plan_fits"],
        )
        for s in songs
    ]
    stats = codebook.stats()
    ldm_task.resolve_config(config, stats)
    cfg = ldm_task.ldm_config(config)
    params = jax.device_get(ldm.init_params(init_key(seed), cfg))
    hf_dit = {k: getattr(cfg.dit, k) for k in ref.LDM_PAPER}
    torch_model = ref.ReferencePhraseLDM(
        model_config=hf_dit, length_control=length_control, sec_control=sec_control
    )
    if sec_control:
        torch_model.set_section_order("".join(sections.SECTION_TYPES), range(1, 33))

    def to_torch(tree):
        return ldm_weights.ldm_state_dict_from_params(tree, cfg)

    torch_model.load_state_dict(_torch_state_dict(to_torch(params)), strict=True)
    torch_model.eval()
    return SimpleNamespace(
        config=config, cfg=cfg, params=params, latent_songs=latent_songs, stats=stats,
        torch_model=torch_model, to_torch=to_torch,
    )  # fmt: skip


def ldm_sides(
    variant: str, size: str, songs, batch_size: int, seed: int, float64: bool = False
) -> Sides:
    """PhraseLDM ``variant`` with the compatibility switches (``COMPAT_SWITCHES["ldm"]``)."""
    import torch

    from input_pipeline import ldm_pipeline
    from phraseldm_jax import ldm_task, optim, trainer

    _, ttr, _ = _modules()
    setup = ldm_setup(variant, size, songs, seed)
    config, cfg, params, stats = setup.config, setup.cfg, setup.params, setup.stats
    latent_songs, torch_model, to_torch = setup.latent_songs, setup.torch_model, setup.to_torch

    def make_trainer(m):
        return ttr.Trainer(m, ttr.ldm_optimizer(m), ttr.LDM_CLIP)

    def loss_fn(params, frozen, batch, rng, train):
        del frozen, rng, train  # dropout off: the exact comparison
        return ldm_task.noise_prediction_loss(
            params, cfg, batch, batch["timesteps"], batch["noise"],
            mask_padding=bool(config.train.mask_padding),
        )  # fmt: skip

    task = trainer.Task(name=f"parity_{variant}", init_params=None, loss_fn=loss_fn)
    tx, lr_fn = optim.make_optimizer(config.optim, int(config.train.num_steps))
    encoding = ldm_pipeline.song_encoding(stats, reference_padding=True)
    rows = encoding.max_rows
    rng = np.random.default_rng(seed)

    def batches(step):
        del step
        picked = rng.choice(len(latent_songs), batch_size, replace=len(latent_songs) < batch_size)
        examples = [ldm_pipeline.encode_record(latent_songs[i], int(i), encoding) for i in picked]
        ours = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        t = rng.integers(0, cfg.diffusion_steps, batch_size)
        noise = rng.standard_normal(ours["latents"].shape).astype(np.float32)
        ours.update(timesteps=t.astype(np.int32), noise=noise)
        chosen = [latent_songs[i] for i in picked]
        x0 = ttr.ldm_latents(
            [s["latents"] for s in chosen], stats["scale_factor"], stats["sep_latent"], rows
        )
        n_bars = torch.tensor([len(s["latents"]) // 4 for s in chosen])
        plans = [s["section_plan"] for s in chosen]
        diff = float(np.max(np.abs(ours["latents"] - x0.numpy())))
        t_t, noise_t = torch.from_numpy(t), torch.from_numpy(noise)

        def torch_loss(m, dtype):
            return ttr.ldm_training_loss(m, x0.to(dtype), t_t, noise_t.to(dtype), n_bars, plans)

        return ours, torch_loss, diff

    return Sides(
        task, tx, lr_fn, jax.device_put(params), to_torch, make_trainer, torch_model, batches,
        float64,
    )  # fmt: skip


def run_case(
    case: str,
    size: str,
    songs,
    *,
    steps: int,
    every: int,
    batch_size: int,
    seed: int = 0,
    float64: bool = False,
) -> dict:
    """Both sides of one case for ``steps`` steps; the measurements (module docstring)."""
    start = time.perf_counter()
    if case.startswith("vae_stage"):
        sides = vae_sides(int(case[-1]), size, songs, batch_size, seed, float64)
    else:
        sides = ldm_sides(case, size, songs, batch_size, seed, float64)
    result = sides.run(steps, every)
    result.update(size=size, steps=steps, batch_size=batch_size, wall_s=time.perf_counter() - start)
    return result


# --------------------------------------------------------------------------------------------
# Command.


def within_targets(result: Mapping) -> bool:
    """Step-1 loss within 1e-6 relative; step-1 gradients, parameters and moments within 1e-5
    of their norms; parameters within 1e-4 at every check; frozen parameters unchanged. (Later
    losses follow the parameters' drift and are reported, not judged.)"""
    first = result["step1"]
    return (
        result["loss"]["step1_rel"] <= TARGETS["loss"]
        and all(first[k]["max_rel"] <= TARGETS["step"] for k in ("grads", "params", "exp_avg"))
        and first["exp_avg_sq"]["max_rel"] <= 2 * TARGETS["step"]
        and all(d["max_rel"] <= TARGETS["trajectory"] for d in result["params_every"].values())
        and result["frozen_unchanged"] is not False
    )


def table(results: Mapping[str, Mapping]) -> str:
    header = [
        "case", "loss@1 rel", "loss rel (all steps)", "grad abs", "grad rel", "params@1 abs", "params@1 rel",
        "exp_avg rel", "exp_avg_sq rel", "params@last abs", "params@last rel", "frozen kept",
        "within targets",
    ]  # fmt: skip
    rows = []
    for case, r in results.items():
        first, last = r["step1"], list(r["params_every"].values())[-1]
        rows.append([
            case, r["loss"]["step1_rel"], r["loss"]["max_rel"], first["grads"]["max_abs"], first["grads"]["max_rel"],
            first["params"]["max_abs"], first["params"]["max_rel"], first["exp_avg"]["max_rel"],
            first["exp_avg_sq"]["max_rel"], last["max_abs"], last["max_rel"],
            {None: "n/a", True: "yes", False: "NO"}[r["frozen_unchanged"]],
            "yes" if within_targets(r) else "NO",
        ])  # fmt: skip
    return common.markdown_table(header, rows)


def float64_table(results: Mapping[str, Mapping]) -> str:
    """Each float32 side's worst relative distance from the float64 original (step-1
    gradients and parameters, parameters at the last check), and ours / torch's."""
    header = [
        "case", "grads@1 torch32", "grads@1 ours32", "params@1 torch32", "params@1 ours32",
        "params@last torch32", "params@last ours32", "ours / torch @last",
    ]  # fmt: skip
    rows = []
    for case, r in results.items():
        if "float64_reference" not in r:
            continue
        first, last = r["step1"]["float64"], list(r["float64_reference"].values())[-1]
        t_last, o_last = last["params_torch32"]["max_rel"], last["params_ours32"]["max_rel"]
        rows.append([
            case, first["grads_torch32"]["max_rel"], first["grads_ours32"]["max_rel"],
            first["params_torch32"]["max_rel"], first["params_ours32"]["max_rel"], t_last,
            o_last, o_last / t_last if t_last else "-",
        ])  # fmt: skip
    return common.markdown_table(header, rows)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_parity", description=__doc__)
    p.add_argument("--sizes", default="small", choices=SIZES, help="model sizes")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " + str(CASES))
    p.add_argument("--steps", type=int, help="training steps per case (50; statistical 500)")
    p.add_argument("--every", type=int, default=10, help="compare parameters every N steps")
    p.add_argument("--vae_batch", type=int, default=32, help="PhraseVAE batch size")
    p.add_argument("--ldm_batch", type=int, default=4, help="PhraseLDM batch size")
    p.add_argument("--songs", type=int, default=8, help="POP909 songs the batches come from")
    p.add_argument("--pop909", default="", help="raw POP909 folder (default: configs/paths.py)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--out", default="", help="JSON path")
    p.add_argument(
        "--float64_reference", action="store_true",
        help="also train the original in float64 and measure both float32 sides against it",
    )  # fmt: skip
    p.add_argument("--statistical", action="store_true", help="seeds with dropout on, spread")
    p.add_argument("--seeds", type=int, default=3, help="statistical: runs per side")
    p.add_argument("--window", type=int, default=25, help="statistical: moving-mean steps")
    p.add_argument("--init_seed", type=int, default=0, help="statistical: the shared init")
    p.add_argument("--plot", default="", help="statistical: PNG path")
    p.add_argument("--replot", action="store_true", help="statistical: reanalyse --out's curves")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 500 if args.statistical else 50
    if args.statistical and args.cases == ",".join(CASES):
        args.cases = "vae_stage3,ldm_lencond"
    if args.statistical and (args.seeds < 2 or not 1 <= args.window <= args.steps):
        p.error("--statistical needs --seeds >= 2 and 1 <= --window <= --steps")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; use {CASES}")
    if min(args.steps, args.every, args.vae_batch, args.ldm_batch, args.songs) < 1:
        p.error("--steps, --every, --vae_batch, --ldm_batch and --songs must be >= 1")
    return args, cases


def main(argv: Sequence[str] | None = None) -> int:
    args, cases = parse_args(argv)
    if args.statistical:
        from benchmarks import train_parity_stats

        return train_parity_stats.main_statistical(
            args, cases, sys.argv[1:] if argv is None else argv
        )
    common.set_torch_threads(args.threads)
    songs, source = load_songs(args.pop909 or default_pop909_root(), args.songs)
    print(f"data: {len(songs)} songs from {source}", file=sys.stderr)
    results = {}
    out = args.out or os.path.join(
        common.REPO_ROOT, "benchmarks", "results", f"train_parity_{args.sizes}.json"
    )
    for case in cases:
        print(f"== {case} ...", file=sys.stderr, flush=True)
        batch = args.vae_batch if case.startswith("vae") else args.ldm_batch
        results[case] = run_case(
            case,
            args.sizes,
            songs,
            steps=args.steps,
            every=args.every,
            batch_size=batch,
            float64=args.float64_reference,
        )
        common.write_json(
            out,
            {
                "command": "python -m benchmarks.train_parity "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": common.machine_info(),
                "data": source,
                "compat_switches": COMPAT_SWITCHES,
                "targets": TARGETS,
                "cases": results,
            },
        )
    print(table(results))
    if args.float64_reference:
        print("\nDistance from the original in float64 (max |x - x64| / ||x64||):")
        print(float64_table(results))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(within_targets(r) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

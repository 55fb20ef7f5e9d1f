"""The PhraseVAE training task: init from the previous stage, loss and evaluation.

``vae_task(config)`` gives the ``trainer.Task`` of one stage (SPEC section 4, FACTS 1):

- init: fresh parameters, or, with ``train.init_from``, the T5 of the previous stage's
  ``train.init_from_checkpoint`` checkpoint and fresh new heads (as the original, which keeps
  only the ``model.t5.*`` weights);
- loss: token-mean cross-entropy; stage 3 adds ``train.kl_weight`` times the per-dimension KL,
  with z sampled from the posterior and dropout on;
- evaluate: on ``eval.split``, the teacher-forced loss and token accuracy over every record
  once (filler rows weighted out), then F1op / F1opd / F1iopd of greedy reconstructions
  (posterior mean in stage 3) scoring every decoded record, and a few reconstructions as text.

The data (splits, the training iterator) is ``input_pipeline``'s; ``evaluate_checkpoint`` scores
a finished run on any split; ``train_and_test`` is what ``train_vae.py`` runs (training, then the
best checkpoint on the test split, written to ``test_metrics.json``).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from input_pipeline import splits, vae_pipeline
from phraseldm_jax import (
    checkpointing,
    decoding,
    errors,
    fileio,
    metric_writer,
    sharding,
    trainer,
    workdir_lock,
)
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.metrics import f1 as f1_lib
from phraseldm_jax.vocab import EOS_ID, IGNORE_LABEL, PHRASE_VOCAB

TEST_METRICS = "test_metrics.json"


def model_config(config: ml_collections.ConfigDict) -> vae_lib.PhraseVAEConfig:
    """``PhraseVAEConfig(**config.model)``, checked against ``config.data.stage``."""
    model = vae_lib.PhraseVAEConfig(**config.model)
    stage = int(config.data.stage)
    if vae_lib.STAGE_HEADS.get(stage) != model.head:
        raise ValueError(
            f"config.data.stage={stage} needs config.model.head={vae_lib.STAGE_HEADS.get(stage)!r}, "
            f"got {model.head!r}"
        )
    return model


# ----------------------------------------------------------------------------------------
# Init and loss.


def load_previous_t5(workdir: str, which: str, target_t5: Any) -> Any:
    """The ``t5`` params of a previous stage's checkpoint, checked against ``target_t5``.

    Raises CheckpointMismatchError (missing/unexpected paths, shapes) when the previous stage
    had another T5 size.
    """
    params, _ = checkpointing.load_trained(workdir, which, exact=True)
    if "t5" not in params:
        raise ValueError(
            f"{workdir} ({which}): the checkpoint has no 't5' params: {sorted(params)}"
        )
    what = f"T5 of {checkpointing.checkpoint_dir(workdir, which)} vs config.model.t5"
    checkpointing.check_matches(what, params["t5"], target_t5)
    return params["t5"]


def make_warm_start(config: ml_collections.ConfigDict) -> Callable | None:
    """``params -> params`` with the previous stage's T5 (``train.init_from``), or None."""
    init_from = str(config.train.init_from)
    which = str(config.train.init_from_checkpoint)
    if not init_from:
        return None
    loaded = {}

    def warm_start(params):
        params = dict(params)
        if "t5" not in loaded:  # read once, even if the init is traced again
            loaded["t5"] = load_previous_t5(init_from, which, params["t5"])
        params["t5"] = jax.tree.map(jnp.asarray, loaded["t5"])
        return params

    return warm_start


def token_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Share of labelled positions (labels != -100) whose argmax is the label."""
    valid = labels != IGNORE_LABEL
    hits = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(hits) / jnp.maximum(jnp.sum(valid), 1)


def latent_statistics(mean: jax.Array, phrases: jax.Array | None = None) -> dict[str, jax.Array]:
    """Mean, unbiased std and max |.| over all elements of the posterior means [..., D]
    (with ``phrases`` [...] bool, of the phrases' means only: packed rows' empty slots out)."""
    if phrases is None:
        return {
            "latent_mean": jnp.mean(mean),
            "latent_std": jnp.std(mean, ddof=1),
            "latent_max_abs": jnp.max(jnp.abs(mean)),
        }
    keep = jnp.broadcast_to(phrases[..., None], mean.shape)
    count = jnp.sum(keep)
    average = jnp.sum(jnp.where(keep, mean, 0.0)) / jnp.maximum(count, 1)
    squares = jnp.sum(jnp.where(keep, jnp.square(mean - average), 0.0))
    return {
        "latent_mean": average,
        "latent_std": jnp.sqrt(squares / jnp.maximum(count - 1, 1)),
        "latent_max_abs": jnp.max(jnp.where(keep, jnp.abs(mean), 0.0)),
    }


def packed_rows(batch: Mapping[str, jax.Array]) -> vae_lib.PackedRows | None:
    """The ``PackedRows`` of a packed training batch (``data.pack_phrases``), else None."""
    if "segment_ids" not in batch:
        return None
    return vae_lib.PackedRows(
        batch["segment_ids"], batch["decoder_segment_ids"], batch["query_starts"]
    )


def vae_loss(
    model: vae_lib.PhraseVAE,
    kl_weight: float,
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    train: bool,
    rngs: Mapping[str, jax.Array] | None = None,
    latent_noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one batch and its metrics, with the randomness passed in.

    ``train`` turns dropout on (rng ``"dropout"`` in ``rngs``) and, in stage 3, samples z
    (rng ``"latent"``, or the given ``latent_noise`` [batch, latent_dim] eps). A packed batch
    (``packed_rows``) gives the same loss as its phrases one per row.
    """
    packing = packed_rows(batch)
    logits, posterior = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        deterministic=not train,
        sample_latent=train,
        latent_noise=latent_noise,
        packing=packing,
        rngs=rngs,
    )
    recon = vae_lib.cross_entropy_loss(logits, batch["labels"])
    metrics = {"recon": recon, "accuracy": token_accuracy(logits, batch["labels"])}
    loss = recon
    if posterior is not None:
        mean, logvar = posterior
        weights = None if packing is None else batch["weight"]
        kl = vae_lib.kl_divergence(mean, logvar, weights)
        loss = recon + kl_weight * kl
        phrases = None if packing is None else batch["weight"] > 0
        metrics.update(kl=kl, **latent_statistics(mean, phrases))
    return loss, metrics


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable:
    """``loss_fn(params, frozen, batch, rng, train) -> (loss, metrics)`` of the trainer: the
    ``vae_loss`` with dropout and z drawn from ``rng``."""
    model = vae_lib.PhraseVAE(model_config(config))
    kl_weight = float(config.train.kl_weight)

    def loss_fn(params, frozen, batch, rng, train):
        del frozen
        rngs = {"dropout": jax.random.fold_in(rng, 0), "latent": jax.random.fold_in(rng, 1)}
        return vae_loss(model, kl_weight, params, batch, train=train, rngs=rngs if train else None)

    return loss_fn


# ----------------------------------------------------------------------------------------
# Evaluation.


def _eval_forward(model: vae_lib.PhraseVAE, sample: bool, params, batch, rng):
    """Sums over one eval batch, and what the decoder needs for the F1 reconstructions."""
    weight = batch["weight"]
    labels = batch["labels"]
    memory, memory_mask = None, None
    if model.config.head == "vae":
        logits, (mean, logvar) = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["decoder_input_ids"],
            deterministic=True,
            sample_latent=sample,
            rngs={"latent": rng} if sample else None,
        )
    else:
        memory, memory_mask = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            method=vae_lib.PhraseVAE.encode_memory,
        )
        logits = model.apply(
            {"params": params},
            memory,
            batch["decoder_input_ids"],
            memory_mask,
            method=vae_lib.PhraseVAE.decode_logits,
        )
    valid = labels != IGNORE_LABEL
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    out = {
        "nll_sum": -jnp.sum(jnp.where(valid, picked, 0.0)),
        "tokens": jnp.sum(valid),
        "correct": jnp.sum(valid & (jnp.argmax(logits, -1) == labels)),
        "examples": jnp.sum(weight),
        "labels": labels,
        "weight": weight,
        "record_index": batch["record_index"],
    }
    if model.config.head == "vae":
        per_example_kl = -0.5 * jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
        rows = weight[:, None] > 0
        out.update(
            kl_sum=jnp.sum(weight * per_example_kl) / mean.shape[-1],
            mean_sum=jnp.sum(jnp.where(rows, mean, 0.0)),
            mean_sq_sum=jnp.sum(jnp.where(rows, mean**2, 0.0)),
            mean_max_abs=jnp.max(jnp.where(rows, jnp.abs(mean), 0.0)),
            mean=mean,
        )
    else:
        out.update(memory=memory, memory_mask=memory_mask)
    return out


@functools.lru_cache(maxsize=16)
def _jitted_eval_forward(model_config: vae_lib.PhraseVAEConfig, sample: bool, mesh) -> Callable:
    """``_eval_forward`` jitted once per model config (evaluators of one run share compiles)."""
    forward = functools.partial(_eval_forward, vae_lib.PhraseVAE(model_config), sample)
    return jax.jit(forward, out_shardings=sharding.replicated(mesh))


_SUMMED = ("nll_sum", "tokens", "correct", "examples", "kl_sum", "mean_sum", "mean_sq_sum")


def label_texts(labels: np.ndarray) -> list[str]:
    """Target phrase strings of label rows ``[N, L]``: tokens before ``[EOS]`` / -100."""
    texts = []
    for row in np.asarray(labels):
        ids = [int(i) for i in row if i != IGNORE_LABEL]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        texts.append(PHRASE_VOCAB.decode(ids))
    return texts


class Evaluator:
    """``evaluator(params, step) -> metrics`` on one split (see the module docstring).

    Args:
      config: the training config (groups ``model``, ``data``, ``eval``, ``train``, ``mesh``).
      split: the split to score.
      max_examples: records scored (evenly spread over the split); 0 = all; None =
        ``config.eval.max_examples``.
      max_f1_examples: records of those decoded for F1; 0 = all; None =
        ``config.eval.max_f1_examples``.
    """

    def __init__(
        self,
        config,
        split: str,
        max_examples: int | None = None,
        max_f1_examples: int | None = None,
    ):
        if max_examples is None:
            max_examples = config.eval.max_examples
        if max_f1_examples is None:
            max_f1_examples = config.eval.max_f1_examples
        self.config = config
        self.model_config = model_config(config)
        self.ec = config.eval
        self.kl_weight = float(config.train.kl_weight)
        source = splits.open_split(config.data, split)
        self.split = split
        self.source = splits.Subset(source, splits.spread_indices(len(source), int(max_examples)))
        self.f1_records = splits.spread_indices(len(self.source), int(max_f1_examples))
        self.mesh = sharding.make_mesh(config.mesh)
        n_devices = self.mesh.devices.size
        if int(self.ec.batch_size) % n_devices:
            raise ValueError(
                f"eval.batch_size={self.ec.batch_size} must be a multiple of the {n_devices} devices"
            )
        self._batches: list[dict] | None = None
        self._forward = _jitted_eval_forward(
            self.model_config, bool(self.ec.sample_latent), self.mesh
        )

    def batches(self) -> list[dict]:
        """This process's eval batches, encoded once and kept."""
        if self._batches is None:
            iterator = vae_pipeline.make_iterator(
                self.source,
                batch_size=int(self.ec.batch_size),
                train=False,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                **vae_pipeline.pipeline_options(self.config),
            )
            self._batches = list(iterator)
        return self._batches

    def __call__(self, params: Any, step: int) -> dict[str, Any]:
        start = time.time()
        metrics = self.run(params, step)[0]
        metrics["seconds"] = time.time() - start
        return metrics

    def run(self, params: Any, step: int) -> tuple[dict[str, Any], list[str], list[str]]:
        """(metrics, decoded phrases, their targets); the phrases in batch order."""
        batch_sh = sharding.batch_sharding(self.mesh)
        rng = jax.random.fold_in(jax.random.PRNGKey(int(self.config.train.seed)), step)
        totals: dict[str, float] = {}
        decode_params = self._single_device(params)
        outputs, targets, latents = [], [], []
        for batch in self.batches():
            out = sharding.fetch(self._forward(params, sharding.global_batch(batch_sh, batch), rng))
            for key in _SUMMED:
                if key in out:
                    totals[key] = totals.get(key, 0.0) + float(out[key])
            if "mean_max_abs" in out:
                totals["mean_max_abs"] = max(totals.get("mean_max_abs", 0.0), out["mean_max_abs"])
            rows = np.flatnonzero(
                (out["weight"] > 0) & np.isin(out["record_index"], self.f1_records)
            )
            if not len(rows):
                continue
            targets.extend(label_texts(out["labels"][rows]))
            if "mean" in out:
                latents.append(out["mean"][rows])
            else:
                memory, mask = out["memory"][rows], out["memory_mask"][rows]
                outputs.extend(self._decode_memory(decode_params, memory, mask))
        if latents:
            outputs = self._decode_latents(decode_params, np.concatenate(latents))
        return self._summarise(totals, outputs, targets), outputs, targets

    def _single_device(self, params: Any) -> Any:
        """Decoding runs on one device: on params replicated over a mesh it would repeat the
        work on every device."""
        if self.mesh.devices.size == 1:
            return params
        if jax.process_count() > 1:  # FSDP shards on other hosts: every process gathers all
            params = multihost_utils.process_allgather(params, tiled=True)
        return jax.device_put(params, jax.local_devices()[0])

    def _decode_options(self) -> dict:
        return dict(
            max_length=int(self.ec.max_decode_length), batch_size=int(self.ec.decode_batch_size)
        )

    def _decode_latents(self, params, latents: np.ndarray) -> list[str]:
        tokens = decoding.greedy_decode(
            params, self.model_config, latents, **self._decode_options()
        )
        return decoding.tokens_to_phrases(tokens)

    def _decode_memory(self, params, memory: np.ndarray, mask: np.ndarray) -> list[str]:
        tokens = decoding.greedy_decode_memory(
            params, self.model_config, memory, mask, **self._decode_options()
        )
        return decoding.tokens_to_phrases(tokens)

    def _summarise(self, totals: dict, outputs: list[str], targets: list[str]) -> dict[str, Any]:
        recon = totals["nll_sum"] / max(totals["tokens"], 1.0)
        metrics: dict[str, Any] = {
            "recon": recon,
            "loss": recon,
            "accuracy": totals["correct"] / max(totals["tokens"], 1.0),
            "examples": totals["examples"],
        }
        if "kl_sum" in totals:
            n = totals["examples"] * self.model_config.latent_dim
            kl = totals["kl_sum"] / max(totals["examples"], 1.0)
            variance = (totals["mean_sq_sum"] - totals["mean_sum"] ** 2 / n) / max(n - 1, 1)
            metrics.update(
                kl=kl,
                loss=recon + self.kl_weight * kl,
                latent_mean=totals["mean_sum"] / n,
                latent_std=float(np.sqrt(max(variance, 0.0))),
                latent_max_abs=float(totals["mean_max_abs"]),
            )
        if targets:
            quirks = bool(self.ec.reference_f1_quirks)
            metrics.update(f1_lib.reconstruction_f1(outputs, targets, reference_quirks=quirks))
            metrics["exact_match"] = float(np.mean([o == t for o, t in zip(outputs, targets)]))
            metrics["f1_examples"] = len(targets)
            metrics["reconstructions"] = reconstruction_text(
                outputs, targets, int(self.ec.num_text_examples)
            )
        return metrics


def reconstruction_text(outputs: Sequence[str], targets: Sequence[str], count: int) -> str:
    """Markdown of the first ``count`` reconstructions of real phrases (targets with notes)."""
    shown = [(o, t) for o, t in zip(outputs, targets) if t.startswith("i-")][:count]
    blocks = [f"target: `{t}`  \noutput: `{o}`" for o, t in shown]
    return "\n\n".join(blocks) or "(no phrase with notes among the decoded records)"


# ----------------------------------------------------------------------------------------
# The task, and scoring a finished run.


def vae_task(config: ml_collections.ConfigDict) -> trainer.Task:
    """The ``trainer.Task`` of the PhraseVAE stage that ``config`` describes."""
    model = model_config(config)
    evaluate = None
    if int(config.train.eval_every) > 0:
        evaluate = Evaluator(config, config.eval.split)
    return trainer.Task(
        name=f"phrase_vae_{model.head}",
        init_params=lambda rng, example_batch: vae_lib.init_params(rng, model),
        warm_start=make_warm_start(config),
        loss_fn=make_loss_fn(config),
        evaluate=evaluate,
    )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, split: str, which: str = "best"
) -> dict[str, Any]:
    """Metrics of ``workdir``'s ``which`` checkpoint (``latest`` if it has no best) on
    every record of ``split``; includes ``checkpoint`` and ``checkpoint_step``."""
    params, used = checkpointing.load_trained(workdir, which)
    evaluator = Evaluator(config, split, max_examples=0, max_f1_examples=0)
    params = jax.device_put(params, sharding.replicated(evaluator.mesh))
    metrics = evaluator(params, used.step)
    metrics.update(split=split, checkpoint=used.which_used, checkpoint_step=used.step)
    return metrics


def train_and_test(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``trainer.run`` in ``workdir`` (resuming if it holds a checkpoint), then the best
    checkpoint's metrics on ``eval.test_split``, with the training wall time and steps per
    second; written to ``<workdir>/test_metrics.json`` and returned. The workdir's lock is
    held for both. A run stopped by a signal is not tested: the summary is then
    ``{"final_step", "interrupted", "interruption_line", "exit_status"}`` (``TrainResult``'s)."""
    trainer.maybe_initialize_distributed()
    with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
        return _train_and_test(config, workdir)


def check_data_config(dc: ml_collections.ConfigDict) -> None:
    """Mistakes in ``config.data`` found before the workdir is touched (``ConfigError``)."""
    if dc.get("pack_phrases", False):
        if len(dc.bucket_lengths or ()) > 1:
            raise errors.ConfigError(
                "data.pack_phrases and data.bucket_lengths cannot be combined: set "
                "--config.data.bucket_lengths=() or --config.data.pack_phrases=False"
            )
        if int(dc.pack_max_segments) < 1 or int(dc.pack_row_multiple) < 1:
            raise errors.ConfigError(
                f"data.pack_max_segments={dc.pack_max_segments} and data.pack_row_multiple="
                f"{dc.pack_row_multiple} must be >= 1"
            )
    if dc.get("pad_lengths") and len(dc.bucket_lengths or ()) > 1:
        raise errors.ConfigError("data.pad_lengths and data.bucket_lengths cannot be combined")


def _train_and_test(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    check_data_config(config.data)
    first_step = max(checkpointing.finished_steps(workdir, "latest"), default=0)
    start = time.time()
    result = trainer.run(
        config,
        workdir,
        vae_task(config),
        vae_pipeline.make_train_iter(config, jax.local_device_count()),
    )
    train_seconds = time.time() - start
    if result.interrupted:
        return {
            "final_step": result.step,
            "interrupted": result.interrupted,
            "interruption_line": result.interruption_line,
            "exit_status": result.exit_status,
        }
    eval_seconds = 0.0
    if jax.process_index() == 0:
        rows = metric_writer.read_jsonl(workdir)
        eval_seconds = sum(r.get("eval/seconds", 0.0) for r in rows if r["step"] > first_step)
    metrics = evaluate_checkpoint(config, workdir, config.eval.test_split)
    summary = {
        **scalar_metrics(metrics),
        "final_step": result.step,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "stopped_early": result.stopped_early,
        "train_wall_seconds": train_seconds,
        "steps_this_run": result.step - first_step,
        "steps_per_second": (result.step - first_step) / max(train_seconds, 1e-9),
        "eval_seconds_during_training": eval_seconds,
        "steps_per_second_without_eval": (result.step - first_step)
        / max(train_seconds - eval_seconds, 1e-9),
    }
    if jax.process_index() == 0:
        fileio.write_json(os.path.join(workdir, TEST_METRICS), summary)
    return summary


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers and short strings of a metrics dict, JSON-ready (long texts dropped)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, np.number)):
            out[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
        elif isinstance(value, str) and "\n" not in value:
            out[key] = value
    return out

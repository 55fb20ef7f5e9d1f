"""Case (c): PhraseVAE greedy decoding, phrases/s, ours (``decoding.greedy_decode``: jitted,
key/value cache, early exit, compaction of finished rows) vs Hugging Face ``generate``
(``do_sample=False``, cache on) on the torch reference with the same weights.

Two workloads:
- ``uniform``: 512 random latents, paper-size random-init VAE, every row forced to run all
  ``max_length`` positions on both sides (equal work). [EOS] is suppressed with ``generate``'s
  ``suppress_tokens`` and our decoder's ``suppress_eos`` when it has that option; otherwise
  the tied [EOS] embedding row is zeroed in both copies of the weights (its logit is then 0,
  below the largest of the 999 others), which forces the same on both sides.
- ``real``: a trained PhraseVAE (``--vae_workdir``) decoding whole test songs of its latent
  dataset (``--latent_dir``, made by ``phraseldm_jax.latent_dataset`` encoding POP909's test
  split), laid out as the LDM produces them: 4 slots per bar, [SEP] latents up to 512 slots.
  Most rows ([INST], ``b-1``, [SEP]) end after two tokens; both sides stop rows at [EOS].
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from phraseldm_jax import decoding, vocab


def suppress_eos_supported() -> bool:
    return "suppress_eos" in inspect.signature(decoding.greedy_decode).parameters


def buffers_supported() -> bool:
    """Whether ``greedy_decode`` takes ``buffers`` (cache buffers kept between calls)."""
    return "buffers" in inspect.signature(decoding.greedy_decode).parameters


def torch_generate(torch_vae, latents: np.ndarray, max_length: int, suppress_eos: bool):
    """HF greedy ``generate`` from latents [N, latent_dim] -> int64 [N, <= max_length]."""
    import torch
    import transformers

    kwargs = {"suppress_tokens": [vocab.EOS_ID]} if suppress_eos else {}
    with torch.no_grad():
        memory = torch_vae.model.memory(torch.from_numpy(np.asarray(latents, np.float32)))
        return torch_vae.model.t5.generate(
            encoder_outputs=transformers.modeling_outputs.BaseModelOutput(last_hidden_state=memory),
            max_length=max_length,
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=vocab.BOS_ID,
            pad_token_id=vocab.PAD_ID,
            eos_token_id=vocab.EOS_ID,
            use_cache=True,
            **kwargs,
        ).numpy()


def without_eos(pair: common.VaePair) -> tuple[Any, Any]:
    """(our params, torch model) copies with the tied [EOS] embedding row zeroed."""
    import torch

    params = jax.tree.map(np.asarray, pair.params)
    params = {**params, "t5": {**params["t5"], "shared": dict(params["t5"]["shared"])}}
    table = np.array(params["t5"]["shared"]["embedding"])
    table[vocab.EOS_ID] = 0.0
    params["t5"]["shared"]["embedding"] = table
    model = copy.deepcopy(pair.torch_model)
    with torch.no_grad():
        model.model.t5.shared.weight[vocab.EOS_ID] = 0.0
        model.model.t5.lm_head.weight[vocab.EOS_ID] = 0.0
    return jax.device_put(params), model


def generated_lengths(tokens: np.ndarray) -> np.ndarray:
    """Positions each row ran: up to and including its [EOS], else all columns."""
    tokens = np.asarray(tokens)
    has_eos = (tokens == vocab.EOS_ID).any(1)
    first = (tokens == vocab.EOS_ID).argmax(1) + 1
    return np.where(has_eos, first, tokens.shape[1])


def our_variants() -> dict[str, tuple[str | None, list | None]]:
    """Our decoder's settings, by row label: (compute dtype, devices); rows split over every
    local device too when there are several (``sharding.use_cpu_cores`` on CPU)."""
    variants = {"ours (jax)": (None, None), "ours (jax), bfloat16 matmuls": ("bfloat16", None)}
    devices = jax.local_devices()
    if len(devices) > 1:
        for label, (dtype, _) in list(variants.items()):
            variants[f"{label}, {len(devices)} devices"] = (dtype, devices)
    return variants


def compare(name, pair, params, torch_model, latents, max_length, suppress, repeats) -> list:
    """Rows for our variants (``our_variants``) and torch on one workload; they take turns
    call by call (``common.time_interleaved``)."""
    options = {"suppress_eos": True} if suppress and suppress_eos_supported() else {}
    torch_suppress = bool(suppress and options)
    variants = our_variants()
    if buffers_supported():  # one pool per variant, kept across its calls as PhraseVAEModel does
        buffers = {label: {"buffers": decoding.CacheBuffers()} for label in variants}
    else:
        buffers = {label: {} for label in variants}

    def ours(label):
        dtype, devices = variants[label]
        return decoding.greedy_decode(
            params,
            pair.config,
            latents,
            max_length=max_length,
            compute_dtype=dtype,
            devices=devices,
            **options,
            **buffers[label],
        )

    def reference():
        return torch_generate(torch_model, latents, max_length, torch_suppress)

    ours_tokens, first_call = {}, {}
    for label in variants:
        start = time.perf_counter()
        ours_tokens[label] = ours(label)
        first_call[label] = time.perf_counter() - start
    ref_tokens = reference()
    calls = {label: functools.partial(ours, label) for label in variants}
    timings = common.time_interleaved({**calls, "torch": reference}, min(repeats, 3), warmup=0)
    cached_call = {}
    for label in variants:
        jax.clear_caches()
        start = time.perf_counter()
        ours(label)
        cached_call[label] = time.perf_counter() - start
    padded = np.full((len(ref_tokens), max_length), vocab.PAD_ID, np.int64)
    padded[:, : ref_tokens.shape[1]] = ref_tokens
    n = len(latents)
    common_fields = {"workload": name, "latents": n, "max_length": max_length}
    ref_timing, ref_rss = timings["torch"]
    float32 = ours_tokens["ours (jax)"]
    rows = []
    for label, (dtype, devices) in variants.items():
        timing, rss = timings[label]
        tokens = ours_tokens[label]
        rows.append(
            {
                **common_fields,
                "side": label,
                "compute_dtype": dtype or "float32",
                "devices": len(devices) if devices else 1,
                **timing.as_dict(),
                "phrases_per_s": n / timing.median,
                "mean_positions": float(generated_lengths(tokens).mean()),
                "compile_s": max(first_call[label] - timing.median, 0.0),
                "compile_cached_s": max(cached_call[label] - timing.median, 0.0),
                "rss_delta_mib": rss,
                "cache_buffers_mib": buffers[label]["buffers"].nbytes / 2**20
                if buffers[label]
                else 0.0,
                "rows_equal_to_torch": float(np.mean((padded == tokens).all(1))),
                "rows_equal_to_ours_float32": float(np.mean((float32 == tokens).all(1))),
                "eos_suppression": "suppress_eos option"
                if options
                else ("[EOS] embedding row zeroed on both sides" if suppress else "none"),
                "speedup_vs_torch": ref_timing.median / timing.median,
            }
        )
    rows.append(
        {
            **common_fields,
            "side": "torch generate",
            **ref_timing.as_dict(),
            "phrases_per_s": n / ref_timing.median,
            "mean_positions": float(generated_lengths(padded).mean()),
            "rss_delta_mib": ref_rss,
        }
    )
    return rows


def real_song_latents(opts: common.Options, num_songs: int) -> tuple[np.ndarray | None, str]:
    """(latents [num_songs * 512, 64] of test songs in the LDM's layout, why not)."""
    if not opts.vae_workdir or not opts.latent_dir:
        return None, "skipped: needs --vae_workdir and --latent_dir"
    from input_pipeline import latent_records

    try:
        stats = latent_records.read_stats(opts.latent_dir)
        source = latent_records.open_latent_source(opts.latent_dir, "test")
    except (OSError, ValueError) as err:
        return None, f"skipped: {opts.latent_dir}: {err}"
    made_by = stats.get("vae_workdir", "")
    if made_by and os.path.abspath(made_by) != os.path.abspath(opts.vae_workdir):
        return None, f"skipped: {opts.latent_dir} was encoded by {made_by}, not {opts.vae_workdir}"
    sep = np.asarray(stats["sep_latent"], np.float32)
    songs = []
    for index in range(min(num_songs, len(source))):
        latents = np.asarray(source[index]["latents"], np.float32)[:512]
        padding = np.repeat(sep[None], 512 - len(latents), 0)
        songs.append(np.concatenate([latents, padding]))
    return np.concatenate(songs), ""


def run(opts: common.Options) -> dict[str, Any]:
    pair = common.vae_pair(opts.quick)
    n_latents, max_length = (16, 16) if opts.quick else (512, 128)
    latents = np.random.default_rng(0).standard_normal((n_latents, pair.config.latent_dim))
    latents = latents.astype(np.float32)
    if suppress_eos_supported():
        params, torch_model = pair.params, pair.torch_model
    else:
        params, torch_model = without_eos(pair)
    rows = compare("uniform", pair, params, torch_model, latents, max_length, True, opts.repeats)
    result: dict[str, Any] = {"num_params": pair.num_params}
    real, why = real_song_latents(opts, num_songs=1)
    if real is not None:
        trained = common.trained_vae_pair(opts.vae_workdir)
        rows += compare(
            "real songs",
            trained,
            trained.params,
            trained.torch_model,
            real,
            max_length,
            False,
            opts.repeats,
        )
        result["real_vae"] = {"workdir": trained.source, "num_params": trained.num_params}
    result["real_songs"] = why or f"{len(real) // 512} test songs of {opts.latent_dir}"
    if why:
        print(f"vae_decoding: real song latents {why}")
    result.update(rows=rows, table=table(rows) + ("\n\nreal song latents: " + why if why else ""))
    return result


def table(rows: list[dict]) -> str:
    return common.markdown_table(
        [
            "workload",
            "side",
            "latents",
            "mean positions",
            "s",
            "phrases/s",
            "x torch",
            "rows = torch",
            "compile s",
            "cached compile s",
            "RSS +MiB",
        ],
        [
            [
                r["workload"],
                r["side"],
                r["latents"],
                r["mean_positions"],
                r["median_s"],
                r["phrases_per_s"],
                r.get("speedup_vs_torch", "-"),
                r.get("rows_equal_to_torch", "-"),
                r.get("compile_s", "-"),
                r.get("compile_cached_s", "-"),
                r["rss_delta_mib"],
            ]
            for r in rows
        ],
    )

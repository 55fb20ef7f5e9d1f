"""PhraseVAE greedy decoding: phrases/s of our decoder variants vs Hugging Face ``generate``.

Same weights on both sides (our params -> the original's state dict via ``convert``), same
number of CPU threads. Workloads:
- ``uniform``: 512 random latents, the paper-size VAE (random init), [EOS] suppressed on both
  sides (``suppress_eos`` / ``generate(suppress_tokens=[EOS])``): every row runs all 128
  positions (equal work);
- ``real``: a trained PhraseVAE (``--vae_workdir``) decoding test songs of its latent dataset
  (``--latent_dir``) in the LDM's layout (4 slots per bar, [SEP] latents up to 512 rows);
  rows stop at [EOS] on both sides.
Variants: compute dtype float32 / bfloat16 of ``decoding.greedy_decode``; plus ``--steps``: the
time of one decoder step against the batch size (where the time goes).

    flock /work/heavy.lock python -m benchmarks.decode_profile --steps \\
        --vae_workdir /work/runs/vae_small_stage3 --latent_dir /work/runs/ldm/pop909_latents_vae_small
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np

from phraseldm_jax import decoding, t5, vae, vocab


def paper_config() -> vae.PhraseVAEConfig:
    """The stage-3 PhraseVAE of ``configs/vae_stage3.py`` (T5 512/1024, 3+3 layers, z 64)."""
    return vae.PhraseVAEConfig(t5=t5.PAPER_T5, head="vae", n_query_tokens=4, latent_dim=64)


def torch_model(params, config: vae.PhraseVAEConfig):
    """The original's stage-3 modules (HF T5 + post_proj) holding ``params``, eval mode."""
    import torch
    import transformers

    from phraseldm_jax.convert import vae_weights

    c = config.t5
    hf_config = transformers.T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_ff=c.d_ff,
        d_kv=c.d_kv,
        num_heads=c.num_heads,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        decoder_start_token_id=vocab.BOS_ID,
        dropout_rate=0.0,
    )
    width = config.memory_width
    model = torch.nn.Module()
    model.t5 = transformers.T5ForConditionalGeneration(hf_config)
    model.layer_norm = torch.nn.LayerNorm(width)
    model.proj = torch.nn.Linear(width, 2 * config.latent_dim)
    model.post_proj = torch.nn.Linear(config.latent_dim, width)
    state = vae_weights.vae_state_dict_from_params(jax.device_get(params), config, prefix="")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


def generate(model, config, latents: np.ndarray, max_length: int, suppress_eos: bool):
    """HF greedy ``generate`` (KV cache) -> int32 [N, max_length] padded with [PAD]."""
    import torch
    import transformers

    with torch.no_grad():
        z = torch.from_numpy(np.asarray(latents, np.float32))
        memory = model.post_proj(z).reshape(len(z), config.n_query_tokens, -1)
        out = model.t5.generate(
            encoder_outputs=transformers.modeling_outputs.BaseModelOutput(last_hidden_state=memory),
            max_length=max_length,
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=vocab.BOS_ID,
            pad_token_id=vocab.PAD_ID,
            eos_token_id=vocab.EOS_ID,
            use_cache=True,
            **({"suppress_tokens": [vocab.EOS_ID]} if suppress_eos else {}),
        ).numpy()
    padded = np.full((len(out), max_length), vocab.PAD_ID, np.int32)
    padded[:, : out.shape[1]] = out
    return padded


def best_time(fn, repeats: int) -> tuple[float, object]:
    """(fastest of ``repeats`` calls in seconds, the last result); one untimed warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def compare(name, params, config, latents, max_length, suppress_eos, repeats, dtypes) -> dict:
    """phrases/s of generate and of each compute dtype of ours, token agreement with float32."""
    model = torch_model(params, config)
    n = len(latents)
    t_ref, ref_tokens = best_time(
        lambda: generate(model, config, latents, max_length, suppress_eos), repeats
    )
    rows = {"generate": {"s": t_ref, "phrases_per_s": n / t_ref}}
    fp32_tokens = None
    for dtype in dtypes:
        decode = functools.partial(
            decoding.greedy_decode,
            params,
            config,
            latents,
            max_length=max_length,
            suppress_eos=suppress_eos,
            compute_dtype=dtype,
        )
        t_ours, tokens = best_time(decode, repeats)
        if dtype == "float32":
            fp32_tokens = tokens
        row = {
            "s": t_ours,
            "phrases_per_s": n / t_ours,
            "x_generate": t_ref / t_ours,
            "rows_equal_generate": float(np.mean((tokens == ref_tokens).all(1))),
        }
        if fp32_tokens is not None:
            row["rows_equal_float32"] = float(np.mean((tokens == fp32_tokens).all(1)))
        rows[f"ours {dtype}"] = row
    eos = (ref_tokens == vocab.EOS_ID).argmax(1)
    lengths = np.where((ref_tokens == vocab.EOS_ID).any(1), eos + 1, max_length)
    print(f"\n{name}: {n} latents, max_length {max_length}, mean positions {lengths.mean():.1f}")
    for side, row in rows.items():
        print(f"  {side:16s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return {"latents": n, "mean_positions": float(lengths.mean()), "rows": rows}


def step_profile(params, config, batches, dtypes, max_length=128) -> dict:
    """Milliseconds per decoder step (all rows live, [EOS] suppressed) at each batch size."""
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
            seconds, _ = best_time(decode, 1)
            out[f"{dtype} batch {batch}"] = 1e3 * seconds / (max_length - 1)
            print(f"  {dtype:9s} batch {batch:4d}: {out[f'{dtype} batch {batch}']:7.2f} ms/step")
    return out


def song_latents(latent_dir: str, n_songs: int) -> np.ndarray:
    """[n_songs * 512, latent_dim]: test songs' slot latents, [SEP]-padded to 512 rows each."""
    from input_pipeline import latent_records

    stats = latent_records.read_stats(latent_dir)
    source = latent_records.open_latent_source(latent_dir, "test")
    sep = np.asarray(stats["sep_latent"], np.float32)
    songs = []
    for index in range(min(n_songs, len(source))):
        latents = np.asarray(source[index]["latents"], np.float32)[:512]
        songs.append(np.concatenate([latents, np.repeat(sep[None], 512 - len(latents), 0)]))
    return np.concatenate(songs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", action="store_true", help="also time one step vs batch")
    parser.add_argument("--skip_uniform", action="store_true")
    parser.add_argument("--vae_workdir", default="")
    parser.add_argument("--latent_dir", default="")
    parser.add_argument("--songs", type=int, default=1)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    result = {"threads": args.threads, "devices": str(jax.devices())}
    config = paper_config()
    params = jax.device_put(vae.init_params(config, jax.random.key(0, impl="unsafe_rbg")))
    if args.steps:
        print(f"per step, paper size, {args.max_length} positions:")
        result["step_ms"] = step_profile(params, config, (64, 256, 512), dtypes, args.max_length)
    if not args.skip_uniform:
        latents = np.random.default_rng(0).standard_normal((args.latents, config.latent_dim))
        result["uniform"] = compare(
            "uniform (paper size, [EOS] suppressed)",
            params,
            config,
            latents.astype(np.float32),
            args.max_length,
            True,
            args.repeats,
            dtypes,
        )
    if args.vae_workdir and args.latent_dir:
        from phraseldm_jax import vae_inference

        trained = vae_inference.PhraseVAEModel.from_workdir(args.vae_workdir)
        result["real"] = compare(
            f"real songs ({args.vae_workdir}, {args.songs} test song(s))",
            trained.decode_params,
            trained.config,
            song_latents(args.latent_dir, args.songs),
            args.max_length,
            False,
            args.repeats,
            dtypes,
        )
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

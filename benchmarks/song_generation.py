"""Case (b): whole-song generation wall time (one 128-bar song: 512 latents), sampling plus
decoding of every latent into a phrase.

Reference: the original's recipe, diffusers' ``DDPMScheduler`` (cosine betas, x0 clipped)
over 1000 steps of the torch DiT, then ``generate`` on the 512 latents. The torch loop runs
``--torch_ddpm_steps`` steps and the 1000-step time is extrapolated from their mean (marked in
the table). The reference's DDPM steps, both decoders and the DPM-Solver++ 10-step sampler take
turns call by call (``common.time_interleaved``), and the whole-song speedup is also given
round by round, every figure of a round timed in that round. Ours: ``sampler.LatentSampler`` (the whole loop is one compiled ``lax.scan``) with
DPM-Solver++(2M) and DDIM at a few tens of steps, then ``decoding.greedy_decode``. Both decoders
get the same latents (our sampler's) so they do the same work. Weights are random (paper
size); quality per sampler on a trained model comes from ``sampler_quality.json`` in the
results folder when another run has written it.

With ``--ldm_workdir`` (a trained PhraseLDM whose config names its PhraseVAE) the case also
runs end to end on trained weights, both sides exported from the same workdirs: each side
samples its own 128-bar song and decodes its own latents, so decoding costs what a real song
costs (rows stop at [EOS]). The reference runs all 1000 DDPM steps there (no extrapolation).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common, vae_decoding
from phraseldm_jax import decoding, sampler, songs, vae_inference
from phraseldm_jax import ldm as ldm_lib
from phraseldm_jax.phrases import SLOTS_PER_BAR

FAST_SAMPLERS = (("dpmpp_2m", 10), ("dpmpp_2m", 20), ("ddim", 25), ("ddim", 50))
QUICK_SAMPLERS = (("dpmpp_2m", 2), ("ddim", 3))
QUALITY_FILE = "sampler_quality.json"
DIT_DTYPES = ("float32", "bfloat16")  # the sampler's DiT compute dtype (configs: dit.dtype)


def torch_ddpm_steps(pair: common.LdmPair, length: int, n_bars: int, steps: int):
    """A callable running ``steps`` reference DDPM steps (model + scheduler), always the same
    ones (the first after step 0, from the same noise); one warm-up call made here."""
    import torch

    scheduler = pair.torch_model.scheduler()
    scheduler.set_timesteps(1000)
    bars = torch.tensor([n_bars])
    timesteps = scheduler.timesteps[1 : steps + 1]

    def run():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, length, 64, generator=generator)
        with torch.no_grad():
            for t in timesteps:
                eps = common.torch_ldm_forward(pair.torch_model, x, t.reshape(1), bars)
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x

    run()
    return run


def our_sampler(pair, settings, cond, repeats: int, dtype: str) -> tuple[np.ndarray, dict, Any]:
    """(raw latents [1, length, 64], timing row, a callable sampling again) of one fast
    sampler, the DiT computing in ``dtype``."""
    key = jax.random.PRNGKey(0)
    config = ldm_lib.with_compute_dtype(pair.config, dtype)
    first = sampler.LatentSampler(config, settings)
    latents = first(pair.params, key, cond)
    compile_s = first.compile_seconds
    jax.clear_caches()
    again = sampler.LatentSampler(config, settings)  # compiled from the persistent cache
    again(pair.params, key, cond)
    compile_cached_s = again.compile_seconds

    def sample():
        return again(pair.params, key, cond)

    timing, rss = common.time_calls(sample, repeats, warmup=0)
    return (
        latents,
        {
            "dit_dtype": dtype,
            "sample_s": timing.median,
            "sample_times_s": timing.times,
            "compile_s": compile_s,
            "compile_cached_s": compile_cached_s,
            "rss_delta_mib": rss,
        },
        sample,
    )


def torch_ddpm_song(pair: common.LdmPair, n_bars: int) -> tuple[np.ndarray, float]:
    """(raw latents [length, 64], seconds) of the reference's full 1000-step DDPM song."""
    import torch

    scheduler = pair.torch_model.scheduler()
    scheduler.set_timesteps(1000)
    generator = torch.Generator().manual_seed(0)
    length = pair.config.dit.sample_size
    x = torch.randn(1, length, 64, generator=generator)
    bars = torch.tensor([n_bars])
    start = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = common.torch_ldm_forward(pair.torch_model, x, t.reshape(1), bars)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    seconds = time.perf_counter() - start
    return x[0].numpy() * pair.config.scale_factor, seconds


def trained_end_to_end(opts: common.Options, repeats: int) -> dict[str, Any]:
    """Fast samplers + our decoder against DDPM-1000 + ``generate`` on one trained pair.

    Both sides go from latents to songs (``songs.Song``: text, bars, MultiTrack). Ours is
    ``songs.decode_songs`` as ``sample.py`` runs it: rows split over the local devices,
    slots past the song's first ``[SEP]`` not decoded ("to the end"); the "every slot" column
    decodes all 512 slots as the original does (and as a forced length needs). The reference
    decodes every slot with ``generate``, as the original does."""
    with open(os.path.join(opts.ldm_workdir, "config.json")) as f:
        vae_workdir = json.load(f)["vae"]["workdir"]
    ldm = common.trained_ldm_pair(opts.ldm_workdir)
    vae = common.trained_vae_pair(vae_workdir)
    length = ldm.config.dit.sample_size
    n_bars, max_length = length // SLOTS_PER_BAR, 128
    cond = ldm_lib.make_conditions(1, n_bars=n_bars)
    decoder = vae_inference.PhraseVAEModel(
        vae.config,
        vae.params,
        max_length=max_length,
        decode_batch_size=vae_inference.SONG_DECODE_BATCH,
        devices=jax.local_devices(),
    )

    def decode_ours(latents, past_the_end=False):
        return songs.decode_songs(decoder, latents[None], past_the_end=past_the_end)[0]

    rows = []
    for (name, steps), dtype in itertools.product(FAST_SAMPLERS, DIT_DTYPES):
        settings = sampler.SamplerSettings(sampler=name, num_steps=steps)
        latents, row, _ = our_sampler(ldm, settings, cond, repeats, dtype)
        song = latents[0]
        decoded = decode_ours(song)  # compiles
        decode_ours(song, True)
        timings = common.time_interleaved(
            {
                "to_end": functools.partial(decode_ours, song),
                "all": functools.partial(decode_ours, song, True),
            },
            repeats,
            warmup=0,
        )
        end = int(songs.song_ends(decoder.first_tokens(song)[None])[0])
        tokens = decoding.greedy_decode(vae.params, vae.config, song[:end], max_length=max_length)
        row.update(
            decode_s=timings["to_end"][0].median,
            decode_every_slot_s=timings["all"][0].median,
            song_end_slot=end,
            bars=decoded.n_bars,
            mean_decoded_positions=float(vae_decoding.generated_lengths(tokens).mean())
            if end
            else 0.0,
        )
        row["total_s"] = row["sample_s"] + row["decode_s"]
        row["total_every_slot_s"] = row["sample_s"] + row["decode_every_slot_s"]
        rows.append({"side": "ours (jax)", "sampler": name, "steps": steps, **row})
    torch_latents, torch_sample_s = torch_ddpm_song(ldm, n_bars)

    def reference_decode():
        tokens = vae_decoding.torch_generate(vae.torch_model, torch_latents, max_length, False)
        return tokens, songs.song_from_slots(decoding.tokens_to_phrases(tokens))

    decode_timing, _ = common.time_calls(reference_decode, max(1, repeats - 1), warmup=1)
    tokens, reference_song = reference_decode()
    reference = {
        "side": "torch (diffusers DDPM + generate)",
        "sampler": "ddpm",
        "steps": 1000,
        "sample_s": torch_sample_s,
        "decode_s": decode_timing.median,
        "song_end_slot": int(songs.song_ends(tokens[None, :, 1])[0]),
        "bars": reference_song.n_bars,
        "mean_decoded_positions": float(vae_decoding.generated_lengths(tokens).mean()),
    }
    reference["total_s"] = reference["sample_s"] + reference["decode_s"]
    for row in rows:
        row["speedup_vs_reference"] = reference["total_s"] / row["total_s"]
        row["speedup_every_slot_vs_reference"] = reference["total_s"] / row["total_every_slot_s"]
    rows.append(reference)
    return {
        "ldm_workdir": os.path.abspath(opts.ldm_workdir),
        "vae_workdir": os.path.abspath(vae_workdir),
        "ldm_params": ldm.num_params,
        "vae_params": vae.num_params,
        "decode_devices": len(jax.local_devices()),
        "rows": rows,
        "table": common.markdown_table(
            ["side", "sampler", "steps", "DiT dtype", "sampling s", "song end (slot, bars)"]
            + ["decoded slots: mean positions", "decoding s (to the end / every slot)"]
            + [f"total s ({n_bars}-bar request)", "x reference (to the end / every slot)"],
            [
                [
                    r["side"],
                    r["sampler"],
                    r["steps"],
                    r.get("dit_dtype", "float32"),
                    r["sample_s"],
                    f"{r['song_end_slot']}, {r['bars']}",
                    r["mean_decoded_positions"],
                    f"{r['decode_s']:.3g} / {r.get('decode_every_slot_s', r['decode_s']):.3g}",
                    r["total_s"],
                    f"{r['speedup_vs_reference']:.3g} / {r['speedup_every_slot_vs_reference']:.3g}"
                    if "speedup_vs_reference" in r
                    else "1",
                ]
                for r in rows
            ],
        ),
    }


def read_quality(results_dir: str) -> Any:
    path = os.path.join(results_dir, QUALITY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(opts: common.Options) -> dict[str, Any]:
    ldm = common.ldm_pair(opts.quick)
    vae = common.vae_pair(opts.quick)
    length = ldm.config.dit.sample_size
    n_bars, max_length = length // SLOTS_PER_BAR, (16 if opts.quick else 128)
    cond = ldm_lib.make_conditions(1, n_bars=n_bars)
    repeats = min(opts.repeats, 3)
    rows, song_latents, samplers = [], None, {}
    sampler_list = QUICK_SAMPLERS if opts.quick else FAST_SAMPLERS
    headline = sampler_list[0]  # the fastest: the whole-song comparison in turns uses it
    for (name, steps), dtype in itertools.product(sampler_list, DIT_DTYPES):
        settings = sampler.SamplerSettings(sampler=name, num_steps=steps)
        latents, row, samplers[name, steps, dtype] = our_sampler(
            ldm, settings, cond, repeats, dtype
        )
        song_latents = latents[0] if song_latents is None else song_latents
        rows.append({"side": "ours (jax)", "sampler": name, "steps": steps, **row})
    # One CacheBuffers per decoder setting, kept across its calls as sample.py's PhraseVAEModel
    # keeps one (the cache grows into buffers the previous decode left).
    buffers = {dtype: decoding.CacheBuffers() for dtype in DIT_DTYPES}

    def ours_decode(compute_dtype="float32"):
        return decoding.greedy_decode(
            vae.params,
            vae.config,
            song_latents,
            max_length=max_length,
            compute_dtype=compute_dtype,
            devices=jax.local_devices(),
            buffers=buffers[compute_dtype],
        )

    def torch_decode():
        return vae_decoding.torch_generate(vae.torch_model, song_latents, max_length, False)

    ours_decode(), ours_decode("bfloat16")  # compile
    ddpm_steps = opts.torch_ddpm_steps
    # Everything the whole-song figures are made of takes turns call by call (a drift of the
    # shared machine's speed then moves both sides alike): our decoders, generate, the
    # reference's DDPM steps and the headline sampler in both DiT dtypes.
    calls = {
        "decode float32": ours_decode,
        "decode bfloat16": functools.partial(ours_decode, "bfloat16"),
        "torch generate": torch_decode,
        "torch ddpm": torch_ddpm_steps(ldm, length, n_bars, ddpm_steps),
        **{f"sample {dtype}": samplers[(*headline, dtype)] for dtype in DIT_DTYPES},
    }
    timed = common.time_interleaved(calls, max(1, repeats), warmup=0)
    times = {name: timing.times for name, (timing, _) in timed.items()}
    median = {name: timing.median for name, (timing, _) in timed.items()}
    step_s = median["torch ddpm"] / ddpm_steps
    reference = {
        "side": "torch (diffusers DDPM + generate)",
        "sampler": "ddpm",
        "steps": 1000,
        "sample_s": 1000 * step_s,
        "extrapolated_from_steps": ddpm_steps,
        "step_s": step_s,
        "decode_s": median["torch generate"],
        "decode_rss_delta_mib": timed["torch generate"][1],
    }
    reference["total_s"] = reference["sample_s"] + reference["decode_s"]
    for row in rows:
        row.update(
            decode_s=median["decode float32"],
            decode_rss_delta_mib=timed["decode float32"][1],
            decode_bf16_s=median["decode bfloat16"],  # bfloat16 matmuls
        )
        row["total_s"] = row["sample_s"] + row["decode_s"]
        row["speedup_vs_reference"] = reference["total_s"] / row["total_s"]
        row["total_bf16_decode_s"] = row["sample_s"] + row["decode_bf16_s"]
        row["speedup_bf16_decode_vs_reference"] = reference["total_s"] / row["total_bf16_decode_s"]
    rows.append(reference)
    whole_song = in_turns_ratios(times, ddpm_steps, headline)
    quality = read_quality(opts.results_dir)
    text = table(rows, n_bars) + "\n\n" + whole_song["table"]
    trained = None
    if opts.ldm_workdir and not opts.quick:
        trained = trained_end_to_end(opts, repeats)
        text += f"\n\nEnd to end on trained weights ({trained['ldm_workdir']}, "
        text += f"{trained['ldm_params']:,} + {trained['vae_params']:,} parameters):\n\n"
        text += trained["table"]
    if quality is not None:
        text += "\n\nSteps vs quality (trained model, from " + QUALITY_FILE + "):\n\n"
        text += quality_table(quality)
    else:
        text += f"\n\n(no {QUALITY_FILE} in {opts.results_dir}: steps-vs-quality not shown)"
    return {
        "n_bars": n_bars,
        "slots": length,
        "decode_max_length": max_length,
        "ldm_params": ldm.num_params,
        "vae_params": vae.num_params,
        "mean_decoded_positions": float(vae_decoding.generated_lengths(ours_decode()).mean()),
        "cache_buffers_mib": {d: b.nbytes / 2**20 for d, b in buffers.items()},
        "rows": rows,
        "whole_song_in_turns": whole_song,
        "trained_end_to_end": trained,
        "quality": quality,
        "table": text,
    }


def in_turns_ratios(times: dict[str, list[float]], ddpm_steps: int, headline) -> dict[str, Any]:
    """The whole-song speedup round by round: in round r the reference's song is
    1000 / ddpm_steps x its DDPM call + generate, ours the headline sampler + our decoding,
    all timed in that round. Per DiT/decoding dtype: every round's ratio and their median."""
    rounds = len(times["torch ddpm"])
    reference = [
        1000 / ddpm_steps * times["torch ddpm"][r] + times["torch generate"][r]
        for r in range(rounds)
    ]
    out, table_rows = {"reference_s": reference, "sampler": list(headline)}, []
    for dtype in DIT_DTYPES:
        ours = [times[f"sample {dtype}"][r] + times[f"decode {dtype}"][r] for r in range(rounds)]
        ratios = [ref / our for ref, our in zip(reference, ours)]
        out[dtype] = {"ours_s": ours, "ratios": ratios, "median_ratio": float(np.median(ratios))}
        table_rows.append(
            [
                f"{headline[0]} {headline[1]} steps, DiT and decoding {dtype}",
                ", ".join(f"{t:.2f}" for t in ours),
                ", ".join(f"{t:.1f}" for t in reference),
                ", ".join(f"{x:.1f}" for x in ratios),
                float(np.median(ratios)),
            ]
        )
    out["table"] = "Whole song, round by round (every figure of a round timed in that round):\n\n"
    out["table"] += common.markdown_table(
        ["ours", "ours s", "reference s (DDPM-1000 + generate)", "x reference", "median x"],
        table_rows,
    )
    return out


def table(rows: list[dict], n_bars: int) -> str:
    return common.markdown_table(
        [
            "side",
            "sampler",
            "steps",
            "DiT dtype",
            "sampling s",
            "decoding s (f32 / bf16 matmuls)",
            f"total s ({n_bars} bars)",
            "x reference (f32 / bf16 decoding)",
            "compile s",
            "cached compile s",
            "RSS +MiB",
        ],
        [
            [
                r["side"],
                r["sampler"],
                r["steps"],
                r.get("dit_dtype", "float32"),
                f"{r['sample_s']:.3g}"
                + (
                    f" (extrapolated from {r['extrapolated_from_steps']} steps)"
                    if "extrapolated_from_steps" in r
                    else ""
                ),
                f"{r['decode_s']:.3g}"
                + (f" / {r['decode_bf16_s']:.3g}" if "decode_bf16_s" in r else ""),
                r["total_s"],
                f"{r['speedup_vs_reference']:.3g} / {r['speedup_bf16_decode_vs_reference']:.3g}"
                if "speedup_vs_reference" in r
                else "1",
                r.get("compile_s", "-"),
                r.get("compile_cached_s", "-"),
                r.get("rss_delta_mib", r.get("decode_rss_delta_mib", "-")),
            ]
            for r in rows
        ],
    )


def quality_table(quality: Any) -> str:
    """Steps vs quality: one row per sampler run of ``sampler_quality.json`` (``runs``:
    name -> metrics), PhraseFID relative to the DDPM-1000 run's; other layouts as JSON."""
    runs = quality.get("runs") if isinstance(quality, dict) else None
    if not isinstance(runs, dict) or not runs:
        return "```\n" + json.dumps(quality, indent=1)[:4000] + "\n```"
    base = next((r.get("phrase_fid") for n, r in runs.items() if n.startswith("ddpm:1000")), None)
    keys = ("phrase_fid", "melody_similarity", "length_accuracy", "sample_seconds")
    rows = []
    for name, r in runs.items():
        fid = r.get("phrase_fid")
        relative = f"{100 * (fid / base - 1):+.1f}%" if fid and base else "-"
        rows.append([name, *(r.get(k, "-") for k in keys), relative])
    return common.markdown_table(["run", *keys, "PhraseFID vs DDPM-1000"], rows)

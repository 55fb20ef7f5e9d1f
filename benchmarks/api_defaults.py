"""The public API with default arguments against the PyTorch original, in turns.

  python -m benchmarks.api_defaults

Paper-size models with random weights are written as the original's folders
(``convert.export_phrase_ldm`` / ``export_phrase_vae``) and read back twice: by the public API
(``convert.import_phrase_ldm`` / ``import_phrase_vae``) and by the torch reference's
``from_pretrained``. Timed, the two sides taking turns call by call:

- one DiT call, batch 4 x 512 slots: ``LoadedPhraseLDM.predict_noise(x, t, n_bars)`` against
  the diffusers DiT forward (no grad);
- greedy decoding of 256 latents: ``LoadedPhraseVAE.greedy_decode(latents)`` against
  ``generate(do_sample=False)`` (both stop rows at [EOS]).

Each also runs with the API's float32 setting, to show what the default changes: the largest
difference of the noise prediction from float32 (relative to its norm) and the share of
decoded rows equal to ``generate``'s. Writes ``benchmarks/results/api_defaults.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common, vae_decoding


def _folders(folder: str):
    """(API LDM, torch LDM, API VAE, torch VAE) of random paper-size models."""
    from phraseldm_jax.convert import api

    ldm_pair, vae_pair = common.ldm_pair(False), common.vae_pair(False)
    api.export_phrase_ldm(api.LoadedPhraseLDM(ldm_pair.config, ldm_pair.params), f"{folder}/ldm")
    api.export_phrase_vae(api.LoadedPhraseVAE(vae_pair.config, vae_pair.params), f"{folder}/vae")
    ldm, vae = api.import_phrase_ldm(f"{folder}/ldm"), api.import_phrase_vae(f"{folder}/vae")
    return ldm, ldm_pair.torch_model, vae, vae_pair.torch_model


def run(repeats: int, n_latents: int = 256) -> dict[str, Any]:
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512, 64)).astype(np.float32)
    t, n_bars = np.array([10, 300, 600, 900]), np.array([16, 32, 64, 128])
    latents = rng.standard_normal((n_latents, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        ldm, torch_ldm, vae, torch_vae = _folders(folder)

    def torch_dit():
        with torch.no_grad():
            tx, tt = torch.from_numpy(x), torch.from_numpy(t)
            return common.torch_ldm_forward(torch_ldm, tx, tt, torch.from_numpy(n_bars)).numpy()

    calls = {
        "predict_noise (default)": lambda: ldm.predict_noise(x, t, n_bars),
        "predict_noise (dtype float32)": lambda: ldm.predict_noise(x, t, n_bars, dtype="float32"),
        "diffusers DiT": torch_dit,
    }
    for call in calls.values():
        call()  # compile / warm
    dit = common.time_interleaved(calls, repeats)
    eps = {name: np.asarray(call()) for name, call in calls.items()}
    ref = eps["diffusers DiT"]
    decode_calls = {
        "greedy_decode (default)": lambda: vae.greedy_decode(latents),
        "greedy_decode (dtype float32)": lambda: vae.greedy_decode(latents, dtype="float32"),
        "generate": lambda: vae_decoding.torch_generate(torch_vae, latents, 128, False),
    }
    for call in decode_calls.values():
        call()
    dec = common.time_interleaved(decode_calls, max(1, repeats // 2))
    tokens = {name: np.asarray(call()) for name, call in decode_calls.items()}
    theirs = tokens["generate"]
    rows = []
    for name in calls:
        rows.append({
            "call": name, "median_s": dit[name][0].median,
            "x_original": dit["diffusers DiT"][0].median / dit[name][0].median,
            "max_diff_rel_to_original": float(np.max(np.abs(eps[name] - ref)) / np.linalg.norm(ref)),
        })  # fmt: skip
    for name in decode_calls:
        ours = tokens[name]
        width = min(ours.shape[1], theirs.shape[1])
        equal = np.all(ours[:, :width] == theirs[:, :width], axis=1)
        rows.append({
            "call": name, "median_s": dec[name][0].median,
            "x_original": dec["generate"][0].median / dec[name][0].median,
            "rows_equal_to_generate": float(equal.mean()),
        })  # fmt: skip
    table = common.markdown_table(
        ["call", "s", "x original", "max |eps - torch| / ||torch||", "rows = generate"],
        [[r["call"], r["median_s"], r["x_original"], r.get("max_diff_rel_to_original", "-"),
          r.get("rows_equal_to_generate", "-")] for r in rows],
    )  # fmt: skip
    return {"rows": rows, "table": table, "latents": n_latents}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.api_defaults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=5, help="timed DiT calls (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--out", default="", help="JSON (default benchmarks/results/api_defaults.json)")
    args = p.parse_args(argv)
    common.set_torch_threads(args.threads)
    result = run(args.repeats)
    out = args.out or os.path.join(common.REPO_ROOT, "benchmarks", "results", "api_defaults.json")
    command = "python -m benchmarks.api_defaults " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    common.write_json(out, {"command": command, "machine": common.machine_info(), **result})
    print(result["table"])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

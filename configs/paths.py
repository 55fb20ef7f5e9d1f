"""Default locations of datasets and runs, in one place.

Everything defaults to folders inside the checkout (``data_cache/`` and ``runs/``, both
git-ignored) and can be moved with environment variables, so that configs never name a
machine's paths:

- ``PHRASELDM_DATA``: prepared datasets (``<PHRASELDM_DATA>/pop909`` from
  ``python -m phraseldm_jax.cli.prepare``, ``<PHRASELDM_DATA>/pop909_latents`` from
  ``phraseldm_jax.latent_dataset``);
- ``PHRASELDM_RUNS``: training workdirs (``<PHRASELDM_RUNS>/vae_stage3`` is the PhraseVAE whose
  latents the LDM configs expect);
- ``PHRASELDM_POP909``: the raw POP909 folder (default ``../shared/data/pop909`` next to the
  checkout, where it sits on the project's machines);
- ``PHRASELDM_PRETRAINED``: the shipped models ``sample.py`` uses without ``--checkpoint``
  (default ``pretrained/pop909-small`` in the checkout; layout: ``phraseldm_jax/shipped.py``).
  Read at each call of ``pretrained_dir()``, so a test or a shell can point it elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _from_env(variable: str, default: Path) -> str:
    return str(Path(os.environ.get(variable) or default))


DATA_ROOT = _from_env("PHRASELDM_DATA", REPO_ROOT / "data_cache")
RUNS_ROOT = _from_env("PHRASELDM_RUNS", REPO_ROOT / "runs")
RAW_POP909 = _from_env("PHRASELDM_POP909", REPO_ROOT.parent / "shared" / "data" / "pop909")

POP909_SONGS = os.path.join(DATA_ROOT, "pop909")  # songs / phrases / bars datasets
POP909_LATENTS = os.path.join(DATA_ROOT, "pop909_latents")  # the LDM's latent dataset
POP909_VAE = os.path.join(RUNS_ROOT, "vae_stage3")  # the PhraseVAE that made those latents


def pretrained_dir() -> str:
    """The shipped models' folder: ``$PHRASELDM_PRETRAINED``, else ``pretrained/pop909-small``
    in the checkout (read now, not at import)."""
    return _from_env("PHRASELDM_PRETRAINED", REPO_ROOT / "pretrained" / "pop909-small")


PRETRAINED = pretrained_dir()  # as the environment was at import

"""Conversion between the original PyTorch checkpoints and phraseldm-jax parameters.

The public API (``api.py``): ``import_phrase_vae``, ``import_phrase_ldm``, ``export_phrase_vae``,
``export_phrase_ldm``, ``save_workdir``, ``load_workdir``. Command line:
``python -m phraseldm_jax.cli.convert import|export ...``.
"""

from phraseldm_jax.convert.api import (
    LoadedPhraseLDM,
    LoadedPhraseVAE,
    export_phrase_ldm,
    export_phrase_vae,
    import_phrase_ldm,
    import_phrase_vae,
    is_original_folder,
    load_workdir,
    save_workdir,
)
from phraseldm_jax.errors import CheckpointMismatchError

__all__ = [
    "CheckpointMismatchError",
    "LoadedPhraseLDM",
    "LoadedPhraseVAE",
    "export_phrase_ldm",
    "export_phrase_vae",
    "import_phrase_ldm",
    "import_phrase_vae",
    "is_original_folder",
    "load_workdir",
    "save_workdir",
]

"""Loading trained models: a training workdir (Orbax checkpoints + ``config.json``) or a
folder in the original's layout (``config.json`` + ``model.safetensors``, read by
``convert.api``).

``load_ldm`` / ``read_ldm_config`` for the PhraseLDM, ``load_vae`` for the PhraseVAE (what
``vae_inference.PhraseVAEModel.from_workdir`` builds on). A workdir's ``which`` checkpoint is
loaded, or the other one when it has none (a run without evaluation has no best checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from phraseldm_jax import checkpointing, decoding, fileio
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.convert import api, ldm_weights
from phraseldm_jax.ldm import PhraseLDMConfig


@dataclasses.dataclass(frozen=True)
class LoadedLDM:
    """A PhraseLDM ready to sample: config, params and where it came from.

    format: "orbax" (a ``train_ldm.py`` workdir) or "original" (config.json +
    model.safetensors). vae_workdir: the PhraseVAE the workdir names ("" if none).
    default_clip: the clip mode the model travels with: "scaled" for a model trained here,
    "reference" for the original's weights (trained and sampled with the raw clip value in
    scaled space); an exported model records its own, read back by import
    (``convert.api.workdir_clip``, ``LoadedPhraseLDM.clip``).
    """

    config: PhraseLDMConfig
    params: Any
    format: str
    vae_workdir: str
    default_clip: str
    checkpoint: checkpointing.CheckpointUsed | None = None  # None for an original folder


@dataclasses.dataclass(frozen=True)
class LoadedVAE:
    """A stage-3 PhraseVAE's config and params; ``max_length`` is its training
    ``data.max_length`` (the default for an original folder); ``source`` names the files."""

    config: vae_lib.PhraseVAEConfig
    params: Any
    max_length: int
    source: str
    checkpoint: checkpointing.CheckpointUsed | None = None  # None for an original folder


# ------------------------------------------------------------------------------------------
# PhraseLDM.


def _checkpoint_format(path: str) -> str:
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "orbax"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "original"
    raise FileNotFoundError(
        f"{path} is neither an LDM training workdir (no checkpoints/ folder) nor an original "
        "PhraseLDM folder (no model.safetensors)"
    )


def read_ldm_config(path: str) -> PhraseLDMConfig:
    """The model config of a checkpoint folder, without loading weights (cheap)."""
    if _checkpoint_format(path) == "original":
        return ldm_weights.ldm_config_from_hf_config(
            fileio.read_json(os.path.join(path, "config.json"))
        )
    model = checkpointing.read_workdir_config(path, "dit")["model"]
    if model.get("scale_factor", 0) <= 0 or model.get("clip_range", 0) <= 0:
        raise ValueError(f"{path}/config.json: model.scale_factor / clip_range not resolved")
    return PhraseLDMConfig(**model)


def load_ldm(path: str, which: str = "best") -> LoadedLDM:
    """Loads a PhraseLDM from a training workdir (the ``which`` checkpoint, else the other
    one) or from a folder in the original's layout."""
    fmt = _checkpoint_format(path)
    if fmt == "original":  # section ids in the order of its section_vocab.json, if any
        model = api.import_phrase_ldm(path)
        return LoadedLDM(model.config, model.params, fmt, "", model.clip)
    config = read_ldm_config(path)
    params, used = checkpointing.load_trained(path, which)
    workdir_config = checkpointing.read_workdir_config(path)
    vae = workdir_config.get("vae", {}).get("workdir", "")
    clip = api.workdir_clip(workdir_config)
    return LoadedLDM(config, params, fmt, vae or "", clip, used)


# ------------------------------------------------------------------------------------------
# PhraseVAE.


def load_vae(path: str, which: str = "best") -> LoadedVAE:
    """Loads a PhraseVAE from a training workdir (the ``which`` checkpoint, else the other
    one) or from a folder in the original's layout."""
    if api.is_original_folder(path):
        model = api.import_phrase_vae(path)
        return LoadedVAE(model.config, model.params, decoding.DEFAULT_MAX_LENGTH, str(path))
    config = checkpointing.read_workdir_config(path, "t5")
    params, used = checkpointing.load_trained(path, which)
    max_length = int(config.get("data", {}).get("max_length", decoding.DEFAULT_MAX_LENGTH))
    source = f"checkpoint {os.path.join(path, used.path)}"
    model_config = vae_lib.PhraseVAEConfig(**config["model"])
    return LoadedVAE(model_config, params, max_length, source, used)
